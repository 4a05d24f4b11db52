"""Streaming recommender library: plain Python, no Kafka, no Bytewax."""
