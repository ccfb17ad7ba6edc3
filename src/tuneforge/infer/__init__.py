"""Inference: the engine that answers chats, and the verbs built on it (generate, chat, merge, serve)."""
