"""recsys/items/worker.py and the engine's use of it (RECSYS_EMBED_WORKER): new item text embedded
by a process of its own, off the batch's path, applied in order, lost by no crash."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from recsys.events import CatalogItem, Envelope, Event, encode
from recsys.items.embeddings import Embedder
from recsys.items.worker import EmbeddingWorker, WorkerGone
from recsys.settings import Settings
from recsys.shard.step import Shard
from recsys.store.kv import RocksKV

pytestmark = pytest.mark.processes

_WAIT_S = 60.0  # the worker loads the model (a few seconds) before its first answer


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("emb"))


def _settings(tmp_path, cache_dir: str, **overrides) -> Settings:
    return Settings(state_dir=str(tmp_path / "state"), recovery_dir=None, embed_cache_dir=cache_dir, **overrides)


def _catalog(offset: int, item_id: str, title: str, **fields) -> Envelope:
    return Envelope("catalog", 0, offset, item_id.encode(), orjson.dumps({"item_id": item_id, "title": title, **fields}), 1_000)


def _event(offset: int, event_id: str, user: str, item: str, ts: int = 1_000) -> Envelope:
    return Envelope("events", 0, offset, user.encode(), encode(Event(event_id, "click", user, item, ts=ts)), ts)


def _open(settings: Settings, embedder: Embedder) -> Shard:
    engine = Shard(settings, RocksKV(settings.state_dir), embedder)
    engine.upsert_catalog([CatalogItem("tent", title="Red dome tent"), CatalogItem("kettle", title="Steel kettle")])
    return engine


def _until_applied(engine: Shard, item_id: str):
    """Empty batches (the flow's timer) until ``item_id`` is in the catalog; their results."""
    results = []
    deadline = time.monotonic() + _WAIT_S
    while item_id not in engine.items.catalog:
        assert time.monotonic() < deadline, f"{item_id} not applied within {_WAIT_S} s"
        time.sleep(0.02)
        results.append(engine.process([]))
    return results


def _started(engine: Shard) -> None:
    deadline = time.monotonic() + _WAIT_S
    while not engine._worker.started():
        assert time.monotonic() < deadline, "the embedding worker did not start"
        time.sleep(0.05)


@pytest.mark.parametrize("overrides, why", [
    ({"share_signals": True}, "not with --share-signals yet"),
    ({"unknown_items": "admit"}, "not with --unknown-items admit"),
    ({"stop_at_end": True}, "not with --stop-at-end"),
    ({"unknown_item_wait_s": 0.0}, "not with RECSYS_UNKNOWN_ITEM_WAIT_S=0"),
])
def test_an_embedding_worker_asked_for_where_none_can_run_says_why(tmp_path, cache_dir, overrides, why):
    """``--embed-worker`` with settings it does not run with was ignored without a word until
    2026-12-07 (an operator's probe): the engine now says why, and `recsys run` prints it."""
    embedder = Embedder(Settings().model_name, cache_dir)
    engine = _open(_settings(tmp_path, cache_dir, embed_worker=True, **overrides), embedder)
    try:
        assert engine._worker is None and why in engine.embed_worker_off_because
    finally:
        engine.close()
    engine = _open(_settings(tmp_path, cache_dir, **overrides), embedder)  # not asked for: nothing to say
    try:
        assert engine.embed_worker_off_because is None
    finally:
        engine.close()


def test_the_worker_answers_in_order_with_the_vectors_the_engine_would_compute(cache_dir):
    texts = [["Blue trail running shoes"], ["Cast iron skillet", "Wool socks, grey"], []]
    worker = EmbeddingWorker(Settings().model_name, cache_dir)
    try:
        jobs = [worker.submit(t) for t in texts]
        answers = [worker.result(job, timeout_s=_WAIT_S) for job in jobs]
        assert worker.outstanding == 0
    finally:
        worker.close()
    with Embedder(Settings().model_name, None) as local:
        for got, t in zip(answers, texts[:2]):
            np.testing.assert_array_equal(got, local.embed(t))
    assert answers[2].shape == (0, 384)


_LONG = "a very long query about blue dome tents for four people with poles and pegs"


def test_queries_queued_at_the_worker_share_one_model_call_and_items_keep_their_own(cache_dir):
    """Query requests (``cached=False``) that queued while the worker was busy are answered from
    one model call, each with its own rows; an item's request after them gets a call of its own,
    through the embedding cache; answers come back in the order sent."""
    worker = EmbeddingWorker(Settings().model_name, cache_dir)
    try:
        worker.result(worker.submit(["warm up"], cached=False), timeout_s=_WAIT_S)
        os.kill(worker.pid, signal.SIGSTOP)  # the requests below queue in the pipe meanwhile
        try:
            # a short query padded beside a long one is not the vector it has alone (in its last bits,
            # on this machine): equal to the rows of the texts together, the two shared a call
            jobs = [worker.submit(["tent"], cached=False), worker.submit([_LONG, "kettle"], cached=False),
                    worker.submit(["Wool socks, grey"]), worker.submit(["enamel mug"], cached=False)]
            deadline = time.monotonic() + 5
            while not worker._outgoing.empty():  # the sender thread has written every request
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.1)
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        answers = [worker.result(job, timeout_s=_WAIT_S) for job in jobs]
    finally:
        worker.close()
    with Embedder(Settings().model_name, None) as local:
        together = local.embed(["tent", _LONG, "kettle"])
        np.testing.assert_array_equal(answers[0], together[:1])
        np.testing.assert_array_equal(answers[1], together[1:])
        np.testing.assert_array_equal(answers[2], local.embed(["Wool socks, grey"]))
        np.testing.assert_array_equal(answers[3], local.embed(["enamel mug"]))
    with Embedder(Settings().model_name, cache_dir) as cached:  # the item's text is in the cache, the queries' are not
        cached.embed(["Wool socks, grey", "tent"])
        assert cached.stats["hits"] == 1 and cached.stats["misses"] == 1


def test_a_new_item_is_embedded_off_the_batch_and_its_event_waits_for_it(tmp_path, cache_dir):
    with Embedder(Settings().model_name, cache_dir) as embedder:
        engine = _open(_settings(tmp_path, cache_dir, embed_worker=True), embedder)
        try:
            _started(engine)
            misses = embedder.stats["misses"]  # the start-up catalog's
            first = engine.process([_catalog(0, "boots", "Green hiking boots"), _event(0, "e1", "u1", "boots")])
            # the batch returned without the model: nothing embedded in this process
            assert embedder.stats["misses"] == misses and first.counts["catalog_deferred"] == 1
            assert "boots" not in engine.items.catalog and first.counts["waited"] == 1 and not first.recommendations
            later = _until_applied(engine, "boots")
            assert sum(r.counts["catalog_deferred_applied"] for r in later) == 1
            assert sum(r.counts["applied"] for r in later) == 1  # the event, released once its item applied
            assert embedder.stats["misses"] == misses
            with Embedder(Settings().model_name, None) as local:
                np.testing.assert_array_equal(engine.items.vector("boots"), local.embed(["Green hiking boots"])[0])
            # the worker wrote the engine's own cache (not one of its own): a read of the text is a hit
            hits = embedder.stats["hits"]
            embedder.embed(["Green hiking boots"])
            assert embedder.stats["hits"] == hits + 1 and embedder.stats["misses"] == misses
            assert not (Path(embedder.cache_path) / Path(embedder.cache_path).name).exists()
        finally:
            engine.close()


def test_an_items_later_records_apply_after_its_deferred_one_in_order(tmp_path, cache_dir):
    with Embedder(Settings().model_name, cache_dir) as embedder:
        engine = _open(_settings(tmp_path, cache_dir, embed_worker=True), embedder)
        try:
            _started(engine)
            os.kill(engine._worker.pid, signal.SIGSTOP)  # no answer before the second batch
            try:
                engine.process([_catalog(0, "boots", "Green hiking boots", price=80.0)])
                # the same item again before the worker answers: no new text, but it must not overtake
                second = engine.process([_catalog(1, "boots", "Green hiking boots", price=60.0),
                                         _catalog(2, "kettle", "Steel kettle", price=20.0)])
            finally:
                os.kill(engine._worker.pid, signal.SIGCONT)
            assert second.counts["catalog_deferred"] == 1  # the kettle (known text) applied at once
            assert engine.items.catalog.get("kettle").price == 20.0
            _until_applied(engine, "boots")
            deadline = time.monotonic() + _WAIT_S
            while engine.deferred_records:  # the second record's answer may come a batch later (a busy box)
                assert engine.items.catalog.get("boots").price == 80.0  # never the later record first
                assert time.monotonic() < deadline, "the second record was not applied"
                time.sleep(0.02)
                engine.process([])
            assert engine.items.catalog.get("boots").price == 60.0
            assert not engine._deferred and not engine._deferred_ids
        finally:
            engine.close()


def test_a_tombstone_for_an_item_still_at_the_worker_withdraws_it_once_it_applies(tmp_path, cache_dir):
    with Embedder(Settings().model_name, cache_dir) as embedder:
        engine = _open(_settings(tmp_path, cache_dir, embed_worker=True), embedder)
        try:
            _started(engine)
            os.kill(engine._worker.pid, signal.SIGSTOP)  # no answer before the tombstone's batch
            try:
                engine.process([_catalog(0, "boots", "Green hiking boots", price=80.0)])
                engine.process([Envelope("catalog", 0, 1, b"boots", None, 1_000)])
            finally:
                os.kill(engine._worker.pid, signal.SIGCONT)
            deadline = time.monotonic() + _WAIT_S
            while engine.deferred_records:
                assert time.monotonic() < deadline, "the deferred records were not applied"
                time.sleep(0.02)
                engine.process([])
            boots = engine.items.catalog.get("boots")
            assert (boots.title, boots.price, boots.available) == ("Green hiking boots", 80.0, False)
            assert not engine.items.recommendable("boots")
        finally:
            engine.close()


def test_a_record_the_worker_had_not_answered_is_in_the_state_after_a_crash(tmp_path, cache_dir):
    settings = _settings(tmp_path, cache_dir, embed_worker=True)
    with Embedder(Settings().model_name, cache_dir) as embedder:
        engine = _open(settings, embedder)
        _started(engine)
        engine.process([_catalog(0, "boots", "Green hiking boots"), _event(0, "e1", "u1", "boots")])
        assert "boots" not in engine.items.catalog
        engine._worker._process.kill()  # dies with the request unanswered; the engine is dropped unclosed
        engine.kv.close()
        restarted = Shard(settings.model_copy(update={"embed_worker": False}), RocksKV(settings.state_dir), embedder)
        try:
            assert "boots" in restarted.items.catalog and restarted.items.vector("boots") is not None
            out = restarted.process([])  # the parked event is released: its item is there
            assert out.counts["applied"] == 1
        finally:
            restarted.close()


def test_a_dead_worker_is_reported_and_the_engine_embeds_in_the_batch(tmp_path, cache_dir, caplog):
    with Embedder(Settings().model_name, cache_dir) as embedder:
        engine = _open(_settings(tmp_path, cache_dir, embed_worker=True), embedder)
        try:
            _started(engine)
            engine.process([_catalog(0, "boots", "Green hiking boots"), _event(0, "e1", "u1", "boots")])
            os.kill(engine._worker.pid, signal.SIGKILL)
            engine._worker._process.wait()
            out = engine.process([_catalog(1, "socks", "Wool socks")])
            assert engine._worker is None and "is gone" in caplog.text
            assert "boots" in engine.items.catalog and "socks" in engine.items.catalog
            assert out.counts["applied"] == 1 and out.counts["catalog_deferred_applied"] == 1
        finally:
            engine.close()


def _search(offset: int, event_id: str, user: str, query: str, ts: int = 1_000) -> Envelope:
    return Envelope("events", 0, offset, user.encode(), encode(Event(event_id, "search", user, None, ts=ts, query=query)), ts)


def _until_answered(engine: Shard) -> list:
    """Empty batches (the flow's timer) until a search result comes out; their results."""
    results = []
    deadline = time.monotonic() + _WAIT_S
    while not any(r.search_results for r in results):
        assert time.monotonic() < deadline, f"no search answered within {_WAIT_S} s"
        time.sleep(0.02)
        results.append(engine.process([]))
    return results


def _until_worker_idle(engine: Shard) -> None:
    """Empty batches (the flow's timer) until the worker has answered every query sent to it."""
    deadline = time.monotonic() + _WAIT_S
    while engine.queries_at_worker:
        assert time.monotonic() < deadline, "the worker did not answer"
        time.sleep(0.02)
        engine.process([])


def test_a_new_query_is_encoded_off_the_batch_and_only_its_search_and_its_shoppers_later_events_wait(tmp_path, cache_dir):
    """Issue 13: a search whose query the engine has no vector for is not answered in the batch
    that brings it: the worker encodes the query while the batch goes on without the model (the
    other shopper is recommended at once), the search and its shopper's later events wait, and
    the first batch after the vector came back answers the search, then applies the click. The
    vector is the one the engine would have made itself, bit for bit. A batch that holds only the
    searching shopper's own events encodes in the batch: no one else would wait."""
    with Embedder(Settings().model_name, cache_dir) as embedder:
        engine = _open(_settings(tmp_path, cache_dir, embed_worker=True), embedder)
        try:
            _started(engine)
            asked = Event("s1", "search", "u1", None, ts=1_000, query="red tent for camping")
            text = engine.search.unencoded_query(asked)
            assert text is not None and engine.search.encoder.stats["calls"] == 0
            os.kill(engine._worker.pid, signal.SIGSTOP)  # no answer before the batch is done
            try:
                first = engine.process([_search(0, "s1", "u1", asked.query), _event(1, "c1", "u1", "tent"),
                                        _event(2, "c2", "u2", "kettle")])
            finally:
                os.kill(engine._worker.pid, signal.SIGCONT)
            assert first.counts["queries_to_worker"] == 1 and first.counts["waited"] == 2
            assert not first.search_results and [user for user, _ in first.recommendations] == ["u2"]
            assert engine.search.encoder.stats["calls"] == 0  # no model call in the engine's process
            later = _until_answered(engine)
            ((user, payload),) = [answer for r in later for answer in r.search_results]
            answer = orjson.loads(payload)
            assert user == "u1" and answer["trigger_event_id"] == "s1" and answer["items"][0]["item_id"] == "tent"
            assert [u for r in later for u, _ in r.recommendations] == ["u1"]  # the click, after the search
            assert sum(r.counts["applied"] for r in later) == 2
            with Embedder(Settings().model_name, None) as local:
                np.testing.assert_array_equal(engine.search.encoder(text), local.embed([text])[0])
            # the query is known now: the next search for it is answered in its own batch
            again = engine.process([_search(3, "s2", "u3", asked.query), _event(4, "c3", "u2", "tent")])
            assert len(again.search_results) == 1 and again.counts["queries_to_worker"] == 0
            # a new query in a batch of its shopper's own events (a quiet stream) keeps no one else
            # waiting: encoded in the batch, sooner than the worker's round trip and the next batch
            calls = engine.search.encoder.stats["calls"]
            alone = engine.process([_search(5, "s3", "u4", "blue kettle for tea"), _event(6, "c4", "u4", "kettle")])
            assert len(alone.search_results) == 1 and alone.counts["queries_to_worker"] == 0
            assert alone.counts["applied"] == 2 and engine.search.encoder.stats["calls"] == calls + 1
        finally:
            engine.close()


def test_a_search_waits_for_a_slow_worker_no_longer_than_the_query_bound(tmp_path, cache_dir):
    """A wait for a query only saves the batch the model's time: with the worker stopped, the
    search is answered once ``QUERY_WAIT_S`` has passed, its query encoded in the batch, and the
    worker's late answer changes nothing."""
    from recsys.shard.step import QUERY_WAIT_S

    with Embedder(Settings().model_name, cache_dir) as embedder:
        engine = _open(_settings(tmp_path, cache_dir, embed_worker=True), embedder)
        try:
            _started(engine)
            os.kill(engine._worker.pid, signal.SIGSTOP)
            try:
                first = engine.process([_search(0, "s1", "u1", "green kettle for tea"), _event(1, "c1", "u2", "kettle")])
                assert first.counts["waited"] == 1 and not first.search_results
                time.sleep(QUERY_WAIT_S + 0.05)
                answered = engine.process([])
                assert len(answered.search_results) == 1 and engine.search.encoder.stats["calls"] == 1
            finally:
                os.kill(engine._worker.pid, signal.SIGCONT)
            deadline = time.monotonic() + _WAIT_S
            while engine.queries_at_worker:  # the late answer is taken, and dropped: the query is cached
                assert time.monotonic() < deadline
                time.sleep(0.02)
                assert not engine.process([]).search_results
        finally:
            engine.close()


def test_a_search_waiting_for_its_query_at_a_crash_is_answered_once_after_the_restart(tmp_path, cache_dir):
    """The worker's jobs are not state, the parked search is: after a restart it is released at
    the first batch and its query encoded there, answered once."""
    settings = _settings(tmp_path, cache_dir, embed_worker=True)
    with Embedder(Settings().model_name, cache_dir) as embedder:
        engine = _open(settings, embedder)
        _started(engine)
        first = engine.process([_search(0, "s1", "u1", "steel kettle please"), _event(1, "c1", "u2", "kettle")])
        assert not first.search_results and first.counts["waited"] == 1 and first.counts["applied"] == 1
        engine._worker._process.kill()  # dies before its answer was read; the engine is dropped unclosed
        engine.kv.close()
        restarted = Shard(settings.model_copy(update={"embed_worker": False}), RocksKV(settings.state_dir), embedder)
        try:
            out = restarted.process([])
            ((user, payload),) = out.search_results
            assert user == "u1" and orjson.loads(payload)["trigger_event_id"] == "s1"
            assert not restarted.process([]).search_results
            # a re-delivered copy (Bytewax's offsets were not committed) is answered from the outbox
            again = restarted.process([_search(0, "s1", "u1", "steel kettle please"), _event(1, "c1", "u2", "kettle")])
            assert [p for _, p in again.search_results] == [payload]
        finally:
            restarted.close()


def test_a_search_parked_at_a_crash_and_redelivered_in_the_restarts_first_batch_is_answered_once(tmp_path, cache_dir):
    """A real restart re-delivers the parked search in its first batch, the batch that releases
    it: one answer (before 2026-12-06 the copy was answered too, 1 ms after it; found by the
    crash test with the embedding worker, tests/test_crash_search.py)."""
    settings = _settings(tmp_path, cache_dir, embed_worker=True)
    batch = [_search(0, "s1", "u1", "steel kettle please"), _event(1, "c1", "u2", "kettle"), _event(2, "c2", "u1", "kettle")]
    with Embedder(Settings().model_name, cache_dir) as embedder:
        engine = _open(settings, embedder)
        _started(engine)
        first = engine.process(batch)
        assert not first.search_results and first.counts["waited"] == 2 and first.counts["applied"] == 1
        engine._worker._process.kill()
        engine.kv.close()
        restarted = Shard(settings.model_copy(update={"embed_worker": False}), RocksKV(settings.state_dir), embedder)
        try:
            out = restarted.process(batch)  # Bytewax's offsets were not committed: the batch again
            assert [orjson.loads(p)["trigger_event_id"] for _, p in out.search_results] == ["s1"]
            assert out.counts["applied"] == 2  # the search and u1's click behind it, once each
            u1 = restarted.users.get_many(["u1"], now_ts=1_000)["u1"]
            assert [item for item, _, _ in u1.history] == ["kettle"]  # the click once (the search keeps no item)
        finally:
            restarted.close()


def test_the_flows_timer_applies_a_new_item_the_worker_embedded_while_the_stream_is_idle(tmp_path, cache_dir):
    """A new item's record alone, then nothing: the flow's timer calls the engine until the
    worker's vectors are applied, so the item becomes recommendable and searchable without
    waiting for the next event. Before 2026-12-06 the timer called it only while events waited
    in the waiting room: the record stayed deferred until something else arrived."""
    from dataflows.flow import TICK, ShardStep

    settings = _settings(tmp_path, cache_dir, embed_worker=True)
    with Embedder(Settings().model_name, cache_dir) as embedder:
        engine = _open(settings, embedder)
        try:
            _started(engine)
            step = ShardStep(lambda: engine)
            step([_catalog(0, "lamp", "Brass desk lamp with a green shade")])
            assert engine.deferred_records == 1 and "lamp" not in engine.items.catalog
            deadline = time.monotonic() + _WAIT_S
            while "lamp" not in engine.items.catalog:  # the timer's ticks, and nothing else
                assert time.monotonic() < deadline, "the deferred record was never applied"
                step([TICK])
                time.sleep(0.02)
            assert engine.deferred_records == 0 and engine.items.index.row("lamp") >= 0
        finally:
            engine.close()


def test_replays_and_in_memory_engines_never_use_the_worker(tmp_path, cache_dir):
    from recsys.store.kv import MemoryKV

    with Embedder(Settings().model_name, cache_dir) as embedder:
        memory = Shard(_settings(tmp_path, cache_dir, embed_worker=True), MemoryKV(), embedder)
        no_wait = Shard(_settings(tmp_path, cache_dir, embed_worker=True, unknown_item_wait_s=0), RocksKV(tmp_path / "s2"), embedder)
        try:
            assert memory._worker is None and no_wait._worker is None
        finally:
            memory.close()
            no_wait.close()


def test_worker_gone_is_raised_when_the_process_is_killed(cache_dir):
    worker = EmbeddingWorker(Settings().model_name, cache_dir)
    try:
        worker.result(worker.submit(["warm"]), timeout_s=_WAIT_S)
        job = worker.submit(["x"])
        os.kill(worker.pid, signal.SIGKILL)
        worker._process.wait()
        with pytest.raises(WorkerGone, match="is gone"):
            worker.result(job, timeout_s=_WAIT_S)
    finally:
        worker.close()


def test_requests_queued_faster_than_the_worker_embeds_never_block_the_engine(cache_dir):
    """A bulk import sends a request per batch while the worker is still writing an earlier
    answer; a send into a full pipe used to block the engine for ever (a deadlock)."""
    import threading

    worker = EmbeddingWorker(Settings().model_name, cache_dir)
    jobs: list[int] = []
    requests = [[f"item {j}-{i}: a long catalog description " + "with many words " * 8 for i in range(64)] for j in range(8)]
    sender = threading.Thread(target=lambda: jobs.extend(worker.submit(r) for r in requests), daemon=True)
    try:
        sender.start()
        sender.join(_WAIT_S)
        assert not sender.is_alive(), "submit blocked"
        answers = [worker.result(job, timeout_s=_WAIT_S) for job in jobs]
        assert [a.shape for a in answers] == [(64, 384)] * len(requests)
    finally:
        worker.close()


def test_the_worker_exits_when_the_engines_process_is_killed(cache_dir):
    """A flow killed with SIGKILL leaves no worker behind: it reads the end of its pipe."""
    import subprocess
    import sys

    code = ("import sys, time\nfrom recsys.items.worker import EmbeddingWorker\n"
            f"w = EmbeddingWorker('all-MiniLM-L6-v2', {cache_dir!r})\nprint(w.pid, flush=True)\ntime.sleep(600)\n")
    engine = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        worker_pid = int(engine.stdout.readline())
        engine.kill()  # while the worker may still be loading its model
        engine.wait()
        deadline = time.monotonic() + _WAIT_S
        while _alive(worker_pid):
            assert time.monotonic() < deadline, "the worker outlived the engine's process"
            time.sleep(0.1)
    finally:
        engine.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_an_erased_shoppers_query_still_at_the_worker_is_not_kept_when_its_vector_comes_back(tmp_path, cache_dir):
    """The erasure takes the shopper's query texts out of the query vectors (tests/test_forget_search.py).
    A search of theirs still waiting for its vector at the worker was dropped with their waiting
    events, but its vector, back after the erasure, was cached and written to the ring (qv:) with
    the text, linked to no one. It is now let go; another shopper waiting for the same text is
    answered all the same (encoded in the batch)."""
    from recsys.control import ControlMessage, encode_control
    from recsys.search.semantic import QV_PREFIX

    def erase(user: str, offset: int) -> None:
        erasure = Envelope("control", 0, offset, user.encode(), encode_control(ControlMessage("forget_user", user)), 2_000)
        assert engine.process([erasure]).counts["forgotten"] == 1

    with Embedder(Settings().model_name, cache_dir) as embedder:
        engine = _open(_settings(tmp_path, cache_dir, embed_worker=True), embedder)
        try:
            _started(engine)
            texts = [engine.search.unencoded_query(Event("q", "search", "u", None, 1, query=q))
                     for q in ("gift for maria lopez", "gift for ana silva")]  # what the model reads
            os.kill(engine._worker.pid, signal.SIGSTOP)  # the vector comes back after the erasure
            try:
                parked = engine.process([_search(0, "s1", "victim", "gift for maria lopez"), _event(1, "c1", "u2", "kettle")])
                assert parked.counts["queries_to_worker"] == 1 and not parked.search_results
                erase("victim", 0)
            finally:
                os.kill(engine._worker.pid, signal.SIGCONT)
            _until_worker_idle(engine)
            stored = [value for _, value in engine.kv.iter_prefix(QV_PREFIX)]
            assert texts[0] not in engine.search.encoder and not any(b"lopez" in v for v in stored)

            # another shopper waits for the same text as the erased one: answered once the vector is back
            os.kill(engine._worker.pid, signal.SIGSTOP)
            try:
                engine.process([_search(2, "s2", "victim2", "gift for ana silva", ts=3_000), _event(3, "c2", "u2", "kettle", ts=3_000)])
                engine.process([_search(4, "s3", "u3", "gift for ana silva", ts=4_000), _event(5, "c3", "u2", "kettle", ts=4_000)])
                erase("victim2", 1)
            finally:
                os.kill(engine._worker.pid, signal.SIGCONT)
            ((user, _),) = [answer for r in _until_answered(engine) for answer in r.search_results]
            assert user == "u3" and texts[1] in engine.search.encoder  # encoded for u3 (their trail has it)

            # a search released by the query-wait bound (answered, its text encoded in the batch) and
            # its shopper erased while the text is still at the worker (a review found it kept then)
            from recsys.shard.step import QUERY_WAIT_S

            os.kill(engine._worker.pid, signal.SIGSTOP)
            try:
                engine.process([_search(6, "s4", "victim3", "gift for eva novak", ts=5_000), _event(7, "c4", "u2", "kettle", ts=5_000)])
                time.sleep(QUERY_WAIT_S + 0.05)
                assert len(engine.process([]).search_results) == 1 and engine.queries_at_worker == 1
                erase("victim3", 2)
            finally:
                os.kill(engine._worker.pid, signal.SIGCONT)
            _until_worker_idle(engine)
            assert not any(b"novak" in value for _, value in engine.kv.iter_prefix(QV_PREFIX))
            assert not any("novak" in text for text in engine.search.encoder._cache)
        finally:
            engine.close()
