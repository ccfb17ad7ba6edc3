"""A prepared data folder read back: what `tuneforge prepare` wrote, as Examples, for train, eval, rag and merge."""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.data.records import Example
from tuneforge.errors import TuneforgeError


def load_prepared(folder: Path, split: str) -> list[Example]:
    """Read back a prepared split (messages plus the meta sidecar) as Examples."""
    messages_path, meta_path = folder / f"{split}.jsonl", folder / f"{split}.meta.jsonl"
    if not messages_path.exists():
        raise TuneforgeError(f"{messages_path} does not exist; run `tuneforge prepare` first")
    examples = []
    with open(messages_path, encoding="utf-8") as fm, open(meta_path, encoding="utf-8") as fmeta:
        for line, meta_line in zip(fm, fmeta):
            record, meta = json.loads(line), json.loads(meta_line)
            examples.append(
                Example.from_openai(record, meta["id"], meta["source"], meta.get("label"), meta.get("meta", {}))
            )
    return examples
