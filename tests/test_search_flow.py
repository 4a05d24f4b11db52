"""Search end to end through the real graph: producer bytes -> KafkaSource -> Shard -> the
``search-results`` KafkaSink, over the in-memory broker and over the real local broker (Tansu).

Every search event gets exactly one schema-valid answer keyed by its user, naming the event it
answers; what shoppers bought after a query in the stream is learned on the way (the last
searches for it rank that item first).
"""

from __future__ import annotations

import orjson
import pytest

from dataflows.kafka_io import KafkaClients, consume_all, ensure_topics, produce_records
from dataflows.live import live_flow
from dataflows.runner import run
from recsys.events import CatalogItem, Event, encode
from recsys.schemas import validate
from recsys.settings import Settings
from recsys.shard.step import Shard

CATALOG = [
    CatalogItem("tent-blue", "Blue dome tent", category="Camping/Tents", brand="Alpina", price=120.0),
    CatalogItem("tent-green", "Green tunnel tent", category="Camping/Tents", brand="Northway", price=240.0),
    CatalogItem("bag-down", "Down sleeping bag", category="Camping/Sleeping bags", brand="Alpina", price=90.0),
    CatalogItem("shoe-trail", "Trail running shoe", category="Footwear/Running", brand="Alpina", price=110.0),
    CatalogItem("coffee", "Ground coffee beans", category="Grocery/Coffee", brand="Roast", price=8.0),
    CatalogItem("x9", "item x9"),
]


@pytest.fixture(scope="module")
def embed_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("embeddings"))


def _events(n_users: int = 40) -> list[Event]:
    """Each user: a search for 'picnic set', a purchase of the id-only x9, then a search for 'tent'."""
    out, ts = [], 1_700_000_000_000
    for u in range(n_users):
        user = f"u{u}"
        out.append(Event(f"{user}-s1", "search", user, None, ts, query="picnic set"))
        out.append(Event(f"{user}-p", "purchase", user, "x9", ts + 60_000))
        out.append(Event(f"{user}-s2", "search", user, None, ts + 120_000, query="tent"))
        ts += 1_000
    return out


def _settings(tmp_path, embed_cache, prefix: str = "", **kw) -> Settings:
    return Settings(
        events_topic=prefix + "events", catalog_topic=prefix + "catalog", recommendations_topic=prefix + "recommendations",
        dead_letters_topic=prefix + "dead-letters", search_results_topic=prefix + "search-results",
        state_dir=str(tmp_path / "state"), recovery_dir=str(tmp_path / "recovery"), embed_cache_dir=embed_cache,
        stop_at_end=True, poll_max_records=20, **kw,
    )


def _run(clients, settings: Settings, events: list[Event]) -> list:
    ensure_topics(clients, {settings.events_topic: 2, settings.catalog_topic: 1, settings.recommendations_topic: 2,
                            settings.dead_letters_topic: 1, settings.search_results_topic: 2})
    produce_records(clients, settings.catalog_topic, ((c.item_id.encode(), encode(c)) for c in CATALOG))
    produce_records(clients, settings.events_topic, [(e.user_id.encode(), encode(e)) for e in events])
    engine = Shard.open(settings)
    engine.upsert_catalog(CATALOG)
    run(live_flow(settings, clients, engine=engine), recovery_dir=settings.recovery_dir, snapshot_interval_s=1.0)
    engine.close()
    return consume_all(clients, settings.search_results_topic, timeout_s=30)


def _check(records: list, events: list[Event]) -> None:
    searches = {e.event_id: e for e in events if e.type == "search"}
    answers = [(r.key.decode(), orjson.loads(r.value)) for r in records]
    assert sorted(a["trigger_event_id"] for _, a in answers) == sorted(searches)  # each search answered once
    for key, answer in answers:
        assert validate("search_result", answer) == []
        search = searches[answer["trigger_event_id"]]
        assert key == answer["user_id"] == search.user_id
        assert answer["query"] == search.query and answer["event_ts"] == search.ts
        assert answer["emitted_at"] > 0 and answer["model_version"].startswith("search-")
    tents = [a for _, a in answers if a["query"] == "tent"]
    assert all(a["items"][0]["item_id"].startswith("tent-") for a in tents)
    # what the first shoppers bought after 'picnic set' is what the last ones are offered first
    picnic = sorted((a for _, a in answers if a["query"] == "picnic set"), key=lambda a: a["event_ts"])
    assert picnic[0]["no_match"] is True
    assert picnic[-1]["items"][0]["item_id"] == "x9"
    assert picnic[-1]["items"][0]["reason"] == "often chosen after searching 'picnic set'"


def test_every_search_is_answered_on_the_search_results_topic_in_memory(memory_broker, tmp_path, embed_cache):
    events = _events()
    _check(_run(memory_broker, _settings(tmp_path, embed_cache), events), events)


def test_every_search_is_answered_on_the_search_results_topic_through_real_broker(
    local_broker, tmp_path, embed_cache, topic_name
):
    prefix = topic_name("s") + "-"
    events = _events()
    settings = _settings(tmp_path, embed_cache, prefix=prefix, bootstrap_servers=local_broker.bootstrap)
    _check(_run(KafkaClients(settings), settings, events), events)
