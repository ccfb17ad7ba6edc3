"""Answers and scores already computed, kept per system in eval/cache/<system>.jsonl.

A line is keyed by a hash of the system's identity (its name, base model, the
adapter's file hash, the retriever index), the prompt, and the settings that shape
the answer; changing any of them misses the cache, so a stale answer is never
reused. Re-running eval with one more system computes only that system's lines.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.atomic import atomic_write_jsonl, file_sha256

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.run import RunDir


def key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def system_identity(name: str, experiment: Experiment, run: RunDir) -> dict:
    """What decides a system's answers, down to the adapter's bytes and the retriever's index."""
    from tuneforge.eval.baselines import BASELINES
    from tuneforge.hosted import openai_base_url
    from tuneforge.systems import resolve, training_system_prompt

    if name in BASELINES:
        train = run.sub("data", "train.jsonl")
        return {"name": name, "train": file_sha256(train) if train.exists() else None, "seed": experiment.seed}
    spec = resolve(name, experiment)  # an adapter:/merged: folder as Systems finds it (the file's folder)
    identity: dict[str, Any] = {"name": name, "system_prompt": training_system_prompt(run, spec)}
    if spec.hosted:
        identity["base_url"] = openai_base_url(experiment)
    else:
        from tuneforge.engine.transformers import system_source

        adapter, merged = system_source(spec.model, run)
        identity.update(
            model=experiment.model.model_dump(mode="json"),
            adapter=_folder_hash(adapter, "adapter_model.safetensors"),
            merged=_folder_hash(merged, "config.json"),
        )
    if spec.rag:
        identity["rag"] = experiment.rag.model_dump(mode="json")
        identity["corpus"] = _corpus_hash(experiment, run)
    return identity


def _corpus_hash(experiment: Experiment, run: RunDir) -> str | None:
    """The documents retrieved from, not the index file: the index is built on first use, after this is read."""
    from tuneforge.rag.retriever import PREPARED
    from tuneforge.rag.store import corpus_sha256, read_corpus

    if experiment.rag.corpus == PREPARED:
        train = run.sub("data", "train.jsonl")
        return file_sha256(train) if train.exists() else None
    return corpus_sha256(read_corpus(experiment.rag.corpus, experiment.base_dir, experiment.rag.text_column))


def _folder_hash(folder: str | None, main: str) -> str | None:
    if folder is None:
        return None
    files = sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file() and (p.name == main or p.suffix in (".safetensors", ".bin", ".json"))
    )
    return key([(p.name, file_sha256(p)) for p in files])


class Cache:
    """One system's cached results: `get(key)` before computing, `put` after, `save()` once done."""

    def __init__(self, folder: Path, system: str):
        self.path = folder / f"{re.sub(r'[^A-Za-z0-9._+-]+', '_', system)}.jsonl"
        self.hits = self.misses = 0
        self.entries = self._read()
        self.dirty = False

    def _read(self) -> dict[str, Any]:
        entries: dict[str, Any] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    entries[record["key"]] = record["value"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a damaged line is just recomputed
        return entries

    def get(self, k: str) -> Any:
        if k in self.entries:
            self.hits += 1
            return self.entries[k]
        self.misses += 1
        return None

    def put(self, k: str, value: Any) -> None:
        self.entries[k] = value
        self.dirty = True

    def stamp(self, keys: list[str], seconds: float) -> None:
        """Record what computing these entries cost (shared evenly), so a cached re-run reports the same seconds."""
        for k in keys:
            self.entries[k]["seconds"] = seconds / max(len(keys), 1)
        self.dirty = self.dirty or bool(keys)

    def seconds(self, keys: list[str]) -> float:
        """What the entries behind these keys cost to compute, whenever they were computed."""
        return round(sum(self.entries[k].get("seconds", 0.0) for k in dict.fromkeys(keys)), 2)

    def save(self) -> None:
        """Write the entries, merged with what others (a sweep's points running at once) wrote since this was read."""
        if not self.dirty:
            return
        import fcntl

        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            merged = {**self._read(), **self.entries}
            atomic_write_jsonl(self.path, ({"key": k, "value": v} for k, v in merged.items()))
        self.dirty = False
