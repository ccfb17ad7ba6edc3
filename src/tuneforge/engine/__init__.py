"""The generation engines under `systems.py`: transformers (with the dynamic batcher) and vLLM, and the torch-free
generation settings and tool-call parsing they share."""
