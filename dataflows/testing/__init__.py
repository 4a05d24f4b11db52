"""Test doubles for the flows: an in-memory Kafka (:mod:`dataflows.testing.memory_broker`).
Nothing outside tests imports this package (``tests/test_project.py`` checks)."""
