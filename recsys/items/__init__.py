"""Items: the catalog, their frozen text embeddings and the faiss vector index. See docs/MAP.md."""
