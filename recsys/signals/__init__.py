"""Global signals learned from every user's events: trending popularity, co-visitation and
transitions, session neighbours. Each is kept in memory and persisted incrementally. See docs/MAP.md."""
