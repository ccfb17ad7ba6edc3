"""Where tuneforge keeps what outlives a run: converted models and tokenizer files."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """What tuneforge keeps across runs (converted models, tokenizer files): $TUNEFORGE_HOME, else
    ~/.cache/tuneforge."""
    return Path(os.environ.get("TUNEFORGE_HOME") or Path.home() / ".cache" / "tuneforge")
