"""The ``recsys`` command line: run the flow (``run``), a local broker (``broker``), produce,
tail, forget, replay and the demo. Arguments are checked here, before any heavy import; the
work itself is in :mod:`dataflows` (streams) and :mod:`recsys` (logic). See docs/MAP.md."""
