"""The run directory: where every verb of one experiment reads and writes.

runs/<name>/config.yaml     the resolved experiment (after overrides)
runs/<name>/manifest.json   versions, git sha, seed, device, data hashes, summaries
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from tuneforge.atomic import atomic_write_json, atomic_write_text
from tuneforge.config import Experiment

TRACKED_PACKAGES = (
    "tuneforge",
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "tokenizers",
    "faiss-cpu",
    "sentence-transformers",
    "openai",
    "gradio",
)


class RunDir:
    """One experiment's run directory."""

    def __init__(self, experiment: Experiment, run_dir: str | Path | None = None):
        self.experiment = experiment
        self.path = Path(run_dir) if run_dir else Path("runs") / experiment.name
        self.eval_cache: Path | None = None  # a sweep's points share one answer cache; else eval/cache/
        self.base_eval_cache: Path | None = None  # ... and the base model's valid metrics at step 0 of training

    def sub(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def read_manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}

    def start(self, verb: str) -> RunDir:
        """Create the directory, write the resolved config and refresh the manifest."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.yaml", self.experiment.to_yaml())
        manifest = self.read_manifest()
        manifest.update(
            name=self.experiment.name,
            seed=self.experiment.seed,
            source=str(self.experiment._source) if self.experiment._source else None,
            updated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            last_verb=verb,
            python=sys.version.split()[0],
            platform=platform.platform(),
            packages=package_versions(),
            git_sha=git_sha(self.experiment.base_dir),
            device=device_summary(),
        )
        manifest.setdefault("created", manifest["updated"])
        atomic_write_json(self.manifest_path, manifest)
        return self

    def record(self, section: str, value: Any) -> None:
        """Set one section of the manifest (data hashes, training summary, ...)."""
        manifest = self.read_manifest()
        manifest[section] = value
        atomic_write_json(self.manifest_path, manifest)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_sha(folder: Path) -> str | None:
    """The commit of the repository holding the experiment file, with -dirty if it has changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=folder, capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_summary() -> dict[str, Any]:
    import torch

    summary: dict[str, Any] = {"cuda": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
    if summary["cuda"]:
        summary["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        summary["cuda_version"] = torch.version.cuda
    return summary
