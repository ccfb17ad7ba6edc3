"""Every YAML under configs/ (except launcher configs) is a valid experiment file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.config import load_experiment

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXPERIMENTS = sorted(p for p in CONFIGS.rglob("*.yaml") if "accelerate" not in p.parts)


def test_there_are_shipped_configs():
    assert any(p.name == "quickstart.yaml" for p in EXPERIMENTS)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_config_validates(path):
    experiment = load_experiment(path)
    for value in (experiment.data.train, experiment.data.valid, experiment.eval.data):
        if value and not value.startswith("hub:"):
            assert experiment.resolve_path(value).exists(), f"{path.name}: {value} does not exist"
