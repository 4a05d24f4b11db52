"""The right to be forgotten (issue 9, defect 7): ``forget_user`` on the control topic and
``recsys forget`` erase every key holding a shopper's id or data, survive restarts and
re-delivery, and leave an audit record with the id's hash only."""

from __future__ import annotations

import logging

import orjson
import pytest
from rocksdict import Options, Rdict

from dataflows.kafka_io import consume_all, ensure_topics, produce_records
from dataflows.live import live_flow
from dataflows.runner import run
from recsys.control import ControlMessage, decode_control, encode_control, user_hash
from recsys.events import CatalogItem, DecodeError, Envelope, Event, encode
from recsys.schemas import validate
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys_cli.main import main as cli_main

VICTIM = "shopper-7f3a9c"
T0 = 1_700_000_000_000
ITEMS = [CatalogItem(f"i{n}", f"product number {n}", category="things") for n in range(30)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("emb"))


def _settings(tmp_path, cache, **kw) -> Settings:
    kw.setdefault("head_enabled", False)
    return Settings(state_dir=str(tmp_path / "state"), embed_cache_dir=cache, head_snapshot_interval_s=3600, **kw)


def _open(settings: Settings) -> Shard:
    engine = Shard.open(settings)
    engine.upsert_catalog(ITEMS)
    return engine


def _history(users: list[str], per_user: int = 6) -> list[Event]:
    events = []
    for n in range(per_user):
        for u, user in enumerate(users):
            events.append(Event(f"{user}-e{n}", "purchase" if n == 3 else "click", user, f"i{(u * 3 + n) % 30}", T0 + 1000 * (n * len(users) + u), session_id=f"{user}-s"))
    return events


def _envs(events, start=0, topic="events"):
    return [Envelope(topic, 0, start + n, e.user_id.encode(), encode(e), e.ts) for n, e in enumerate(events)]


def _control(user_id: str, offset: int, ts: int) -> Envelope:
    return Envelope("control", 0, offset, user_id.encode(), encode_control(ControlMessage("forget_user", user_id)), ts)


def _raw_hits(state_dir: str, needle: bytes) -> list[bytes]:
    """Every key of the RocksDB state whose key or value contains ``needle`` (a full scan)."""
    db = Rdict(state_dir + "/rocks", options=Options(raw_mode=True))
    try:
        return [k for k, v in db.items() if needle in k or needle in v]
    finally:
        db.close()


def test_forget_erases_every_key_holding_the_user_and_they_come_back_as_new(tmp_path, cache, caplog):
    settings = _settings(tmp_path, cache)
    engine = _open(settings)
    others = [f"other{n}" for n in range(5)]
    engine.process(_envs(_history([VICTIM, *others])))
    engine.close()
    assert _raw_hits(settings.state_dir, VICTIM.encode())  # user record, outbox, sessions

    engine = _open(settings)
    erased_at = T0 + 10_000_000
    with caplog.at_level(logging.INFO, logger="recsys.audit"):
        result = engine.process([_control(VICTIM, 0, erased_at)])
    assert result.counts["forgotten"] == 1
    audit = [r.getMessage() for r in caplog.records if r.name == "recsys.audit"]
    assert audit and user_hash(VICTIM) in audit[0] and VICTIM not in audit[0]
    assert int(audit[0].rpartition("keys_deleted=")[2]) >= 3, audit  # their record, outbox and sessions
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="recsys.audit"):  # nothing of theirs was held: it says 0, not 4
        engine.process([_control("never-seen-user", 1, erased_at)])
    assert [r.getMessage().rpartition("keys_deleted=")[2] for r in caplog.records if r.name == "recsys.audit"] == ["0"]
    assert engine.shown.get(VICTIM) is None
    blank = engine.recommend_for(["never-seen"], erased_at)[0]
    assert engine.recommend_for([VICTIM], erased_at)[0] == blank
    engine.close()

    assert _raw_hits(settings.state_dir, VICTIM.encode()) == []
    assert len(_raw_hits(settings.state_dir, b"other3")) >= 3  # the others are all there

    # after a restart: the request re-delivered changes nothing; an old event of theirs (a
    # re-delivery, or one queued before the request) is dropped; a newer one starts a new user
    engine = _open(settings)
    again = engine.process([_control(VICTIM, 0, erased_at)])
    assert again.counts["forgotten"] == 0 and again.counts["redelivered_skipped"] == 1
    old = engine.process(_envs([Event("late", "purchase", VICTIM, "i1", erased_at - 5)], start=100))
    assert old.counts["forgotten_dropped"] == 1 and old.counts["applied"] == 0
    back = [Event("new1", "click", VICTIM, "i7", erased_at + 1), Event("new2", "click", "brand-new", "i7", erased_at + 1)]
    result = engine.process(_envs(back, start=101))
    recs = {u: [i["item_id"] for i in orjson.loads(p)["items"]] for u, p in result.recommendations}
    assert recs[VICTIM] == recs["brand-new"]
    state = engine.users.get_many([VICTIM], now_ts=erased_at)[VICTIM]
    assert [h[0] for h in state.history] == ["i7"] and state.bought == {}
    engine.close()


def test_sessions_freed_by_an_erasure_are_reused_as_after_a_restart(tmp_path, cache):
    """The slots an erasure frees are reused the same way whether or not the process
    restarted in between: the session structure stays exact across crashes."""
    more = _envs(_history(["c", "d"]), start=1000)
    out = []
    for name, restart in (("straight", False), ("restarted", True)):
        settings = _settings(tmp_path / name, cache)
        engine = _open(settings)
        engine.process(_envs(_history([VICTIM, "a", "b"])))
        engine.forget([VICTIM], erased_at_ms=T0 + 10**7)
        assert engine.sessions.scores([VICTIM], 10) == [[]]
        if restart:
            engine.close()
            engine = _open(settings)
        engine.process(more)
        out.append((engine.sessions.scores(["a", "b", "c", "d"], 10), sorted(engine.kv.iter_prefix(b"ses:"))))
        assert not [k for k, v in engine.kv.iter_prefix(b"") if VICTIM.encode() in k + v]
        engine.close()
    assert out[0] == out[1]


def test_forget_offline_from_the_cli(tmp_path, cache):
    settings = _settings(tmp_path, cache)
    engine = _open(settings)
    engine.process(_envs(_history([VICTIM, "keep"])))
    engine.close()
    assert cli_main(["forget", VICTIM, "--offline", "--state-dir", settings.state_dir, "--embed-cache-dir", cache, "--no-head-enabled"]) == 0
    assert _raw_hits(settings.state_dir, VICTIM.encode()) == []
    assert _raw_hits(settings.state_dir, b"keep")


def _cli_forget_offline(state_dir, cache, *extra) -> int:
    return cli_main(["forget", VICTIM, "--offline", "--state-dir", str(state_dir), "--embed-cache-dir", cache, "--no-head-enabled", *extra])


def test_forget_offline_reaches_every_shard_of_a_multi_process_state(tmp_path, cache, capsys):
    # `recsys run --processes 2` keeps <state>/shard-0 and <state>/shard-1; the erasure used to
    # open (and create) an empty <state>/rocks, print its audit line and leave both shards as they were
    base = tmp_path / "state"
    for shard in range(2):
        engine = _open(_settings(tmp_path, cache, shards=2, shard=shard).for_shard())
        engine.process(_envs(_history([VICTIM, f"keep{shard}"])))
        engine.close()
    assert _cli_forget_offline(base, cache) == 0
    for shard in range(2):
        assert _raw_hits(str(base / f"shard-{shard}"), VICTIM.encode()) == []
        assert _raw_hits(str(base / f"shard-{shard}"), f"keep{shard}".encode())
    assert not (base / "rocks").exists()
    out = capsys.readouterr().out
    assert "shard-0: 1 of 1 held here (shard 0 of 2)" in out and "shard-1: 1 of 1 held here (shard 1 of 2)" in out


def test_forget_offline_without_the_flows_embedding_cache_is_refused_and_embeds_nothing(tmp_path, cache, monkeypatch, capsys):
    # opening the state indexes its catalog again from the cached vectors: until 2026-12-07 an
    # erasure run without the flow's --embed-cache-dir embedded the whole catalog with the model,
    # into a new ./var/embeddings wherever the operator ran it (minutes, for a real catalog)
    settings = _settings(tmp_path, cache)
    engine = _open(settings)
    engine.process(_envs(_history([VICTIM, "keep"])))
    engine.close()
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("RECSYS_EMBED_CACHE_DIR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli_main(["forget", VICTIM, "--offline", "--state-dir", settings.state_dir, "--no-head-enabled"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "no embedding cache at var/embeddings" in err and "--embed-cache-dir" in err
    assert list(work.iterdir()) == [] and _raw_hits(settings.state_dir, VICTIM.encode())  # nothing done
    # the flow's cache given: erased
    assert cli_main(["forget", VICTIM, "--offline", "--state-dir", settings.state_dir, "--embed-cache-dir", cache,
                     "--no-head-enabled"]) == 0
    assert _raw_hits(settings.state_dir, VICTIM.encode()) == [] and list(work.iterdir()) == []


def test_forget_offline_refuses_a_directory_without_flow_state(tmp_path, cache, capsys):
    with pytest.raises(SystemExit) as exit_:
        _cli_forget_offline(tmp_path / "typo", cache)
    assert exit_.value.code == 1
    assert "no flow state under" in capsys.readouterr().err and not (tmp_path / "typo").exists()
    # an empty rocks directory holds no database: until 2026-12-06 one was created there, and the
    # command reported "0 of 1 held here", exit 0 (an operator's probe)
    (tmp_path / "empty" / "rocks").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        _cli_forget_offline(tmp_path / "empty", cache)
    assert exit_.value.code == 1 and "no flow state under" in capsys.readouterr().err
    assert list((tmp_path / "empty" / "rocks").iterdir()) == []


def test_forget_offline_of_a_sharing_state_goes_through_the_exchange_without_the_flag(tmp_path, cache):
    # without --share-signals the erasure dropped the user's sessions on this shard only, so its
    # global signals left the other shards'; the state says it shares, and that is enough now
    settings = _settings(tmp_path, cache, share_signals=True)
    engine = _open(settings)
    engine.process(_envs(_history([VICTIM, "keep"])))
    before = len(engine.exchange.pending())  # the batch's own message, not yet seen back from the log
    engine.close()
    assert _cli_forget_offline(settings.state_dir, cache) == 0
    engine = _open(settings)
    try:
        assert len(engine.exchange.pending()) == before + 1  # the erasure op, published at the next start
    finally:
        engine.close()


def test_control_messages_are_validated_and_the_schema_agrees():
    good = {"type": "forget_user", "user_id": "u1"}
    assert decode_control(orjson.dumps(good)) == ControlMessage("forget_user", "u1") and validate("control", good) == []
    # an id no event can have (a NUL, a terminal escape): until 2026-12-08 taken, and "u\x00e" then erased search
    # learning of the shopper "u" (their trail records' prefix; tests/test_forget_search.py)
    for bad in ({"type": "forget_everyone", "user_id": "u1"}, {"type": "forget_user"}, {"type": "forget_user", "user_id": ""},
                {"type": "forget_user", "user_id": 7}, {"type": "forget_user", "user_id": "u\x00e"},
                {"type": "forget_user", "user_id": "u\x1b[2J"}):
        with pytest.raises(DecodeError):
            decode_control(orjson.dumps(bad))
        assert validate("control", bad) != []


def test_forget_through_the_control_topic_end_to_end(local_broker, kafka_clients, topic_name, tmp_path, cache, capsys):
    """``recsys forget`` sends the request to the control topic; the live flow reading it
    erases the user, and events older than the erasure never bring them back."""
    prefix = topic_name("fg") + "-"
    settings = _settings(
        tmp_path, cache, bootstrap_servers=local_broker.bootstrap, stop_at_end=True, recovery_dir=str(tmp_path / "recovery"),
        events_topic=prefix + "events", catalog_topic=prefix + "catalog", recommendations_topic=prefix + "recs",
        dead_letters_topic=prefix + "dead", control_topic=prefix + "control",
    )
    ensure_topics(kafka_clients, {settings.events_topic: 2, settings.catalog_topic: 1, settings.recommendations_topic: 2, settings.dead_letters_topic: 1})
    produce_records(kafka_clients, settings.catalog_topic, ((c.item_id.encode(), encode(c)) for c in ITEMS))
    produce_records(kafka_clients, settings.events_topic, ((e.user_id.encode(), encode(e)) for e in _history([VICTIM, "x1", "x2", "x3"])))

    def run_flow() -> dict:
        engine = _open(settings)
        run(live_flow(settings, kafka_clients, engine=engine), recovery_dir=settings.recovery_dir, snapshot_interval_s=1.0)
        totals = dict(engine.totals)
        engine.close()
        return totals

    first = run_flow()
    assert first["applied"] == 24
    assert _raw_hits(settings.state_dir, VICTIM.encode())

    flags = ["--bootstrap-servers", local_broker.bootstrap, "--control-topic", settings.control_topic]
    assert cli_main(["forget", VICTIM, *flags]) == 0
    assert VICTIM not in capsys.readouterr().out  # the CLI's audit line names the hash only
    # queued behind the request: an old event of theirs (a retry of an upstream job)
    produce_records(kafka_clients, settings.events_topic, [(VICTIM.encode(), encode(Event("old", "purchase", VICTIM, "i2", T0 + 99_999)))])
    second = run_flow()
    assert second["forgotten"] == 1 and second["forgotten_dropped"] == 1 and second.get("applied", 0) == 0
    assert _raw_hits(settings.state_dir, VICTIM.encode()) == []
    assert _raw_hits(settings.state_dir, b"x2")
    recs = consume_all(kafka_clients, settings.recommendations_topic, timeout_s=30)
    assert len(recs) >= 4


def test_a_dead_letter_left_unsent_is_not_sent_again_after_its_shoppers_erasure(tmp_path, cache):
    """A refused event is kept unsent until the dead letters' sink acknowledges it, and a restart
    sends what is left (README, Guarantees); it holds the shopper's event. Erased before that
    restart, they must not be published again: the dead letter is left out, as their lists are.
    Another shopper's is sent as before."""
    import time

    settings = _settings(tmp_path, cache, unknown_item_wait_s=0.0)
    engine = _open(settings)
    engine.expect_acknowledgements()
    bad = [Event(f"{u}-bad", "click", u, "no-such-item", T0) for u in (VICTIM, "bystander")]
    assert len(engine.process(_envs(bad)).dead_letters) == 2
    engine.process([_control(VICTIM, 0, int(time.time() * 1000) + 1000)])  # erased after the refusal
    engine.close()  # nothing acknowledged

    restarted = Shard.open(settings)
    try:
        left = restarted.unsent().get("dead_letters", [])
        assert [key for key, _ in left] == ["bystander"], left
    finally:
        restarted.close()


def test_a_forget_that_creates_its_control_topic_says_so(local_broker, kafka_clients, topic_name, capsys):
    """``recsys forget`` onto a control topic no flow ever made (a slip of the flag or of
    ``RECSYS_CONTROL_TOPIC``) created the topic and reported the erasure as sent, and no flow would
    ever apply it. It still sends (a flow started later reads the topic from its start), and now
    says the topic is new; a topic that exists gets no such note."""
    topic = topic_name("contrl")
    flags = ["--bootstrap-servers", local_broker.bootstrap, "--control-topic", topic]
    assert cli_main(["forget", VICTIM, *flags]) == 0
    err = capsys.readouterr().err
    assert f"topic {topic!r} did not exist" in err and "created it" in err and "RECSYS_CONTROL_TOPIC" in err, err
    assert cli_main(["forget", "someone-else", *flags]) == 0
    assert "did not exist" not in capsys.readouterr().err
    assert len(consume_all(kafka_clients, topic, timeout_s=30)) == 2
