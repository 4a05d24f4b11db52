"""The full system as a backtest model: the very step the dataflow runs, fed from a list."""

from __future__ import annotations

from recsys.events import Envelope, Event, encode
from recsys.shard.batching import user_disjoint_chunks
from recsys.shard.step import Shard


class FullSystem:
    """The full system as a backtest :class:`recsys.backtest.protocols.BacktestModel`: ``learn`` runs the very
    ``Shard.process`` step the dataflow runs (events re-encoded to the bytes a producer sends),
    ``recommend`` reads committed state.

    ``learn`` cuts what it is given into user-disjoint batches of ``batch_size`` (as the replay
    and a live poll do), and an engine in evaluate mode ranks for each batch's users first: so
    the re-ranker learns from what users did after what it would have shown them, as it does
    live. (Fed 10k-event chunks with nothing shown, it never learned at all in leave-last-out.)
    """

    name = "full-system"

    def __init__(self, engine: Shard, topic: str = "events", batch_size: int = 500, *,
                 name: str = "full-system", freeze_after: int | None = None):
        self.engine = engine
        self.topic = topic
        self.batch_size = batch_size
        self.name = name
        self.freeze_after = freeze_after  # ablation: engine.freeze() once this many events were learned
        self._offset = 0

    def end_of_training(self) -> None:
        """Leave-last-out ranks after the last training event: serve every head step learned."""
        self.engine.serve_all_learned()

    def recommend(self, user_ids: list[str], k: int, now_ts: int) -> list[list[str]]:
        return [[i.item_id for i in items] for items in self.engine.recommend_for(user_ids, now_ts, k, explain=False, remember=True)]

    def learn(self, events: list[Event]) -> None:
        if self.freeze_after is not None and self.engine.learning and self._offset + len(events) > self.freeze_after:
            cut = max(self.freeze_after - self._offset, 0)
            self.learn(events[:cut])
            self.engine.freeze()
            events = events[cut:]
        for chunk in user_disjoint_chunks(events, self.batch_size):
            envelopes = []
            for event in chunk:
                envelopes.append(Envelope(self.topic, 0, self._offset, event.user_id.encode(), encode(event), event.ts))
                self._offset += 1
            self.engine.process(envelopes)
