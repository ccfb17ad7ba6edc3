"""tuneforge: one YAML experiment file to prepare data, fine-tune, retrieve, evaluate and serve chat models."""

__version__ = "0.1.0"
