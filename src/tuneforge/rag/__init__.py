"""Retrieval over the user's own documents: chunks, embeddings, a FAISS index, prompts with citations."""
