"""Bytewax dataflows and Kafka I/O that wire recsys/ to streams."""
