"""One shard's step: raw messages in, state committed atomically with its outbox and
watermarks, recommendations and dead letters out; model snapshots beside it. See docs/MAP.md."""
