"""`tuneforge serve`: the OpenAI-compatible HTTP API over `systems.py`, and OpenAI's fine-tuning endpoints run by
tuneforge's own trainer (files, jobs, events, checkpoints), with its project keys and job store."""
