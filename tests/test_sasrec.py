"""SASRec baseline: learns order, is seeded, caches its weights per (log, split, seed)."""

from recsys.backtest.sasrec import SASRecBaseline
from recsys.events import Event


def _chains():
    evs = [Event(str(i), "click", f"u{i // 3}", "abc"[i % 3], i) for i in range(60)]
    return evs + [Event("x", "click", "me", "a", 60), Event("y", "click", "me", "b", 61)]


def _tiny(**kw):
    return SASRecBaseline(dim=16, epochs=20, max_len=4, batch_size=4, lr=1e-2, seed=0, **kw)


def test_sasrec_learns_what_follows_a_sequence_not_what_is_popular():
    m = _tiny()
    m.learn(_chains())
    assert m.recommend(["me"], k=1, now_ts=62) == [["c"]]  # a and b are more popular than c
    assert m.trainings == 1 and m.fallback_stats["fell_back"] == 0


def test_sasrec_caches_trained_weights_per_key_and_reloads_them(tmp_path):
    first = _tiny(cache_dir=str(tmp_path), cache_key="log-split-seed0")
    first.learn(_chains())
    recs = first.recommend(["me", "u1"], k=3, now_ts=62)
    assert first.train_seconds > 0 and len(list(tmp_path.glob("*.pt"))) == 1
    again = _tiny(cache_dir=str(tmp_path), cache_key="log-split-seed0")
    again.learn(_chains())
    assert again.recommend(["me", "u1"], k=3, now_ts=62) == recs
    assert again.train_seconds == 0  # loaded, not trained

