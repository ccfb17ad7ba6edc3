"""The installed `tuneforge` command as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
VERBS = ["prepare", "train", "generate", "chat", "merge", "rag", "eval", "demo", "serve", "run", "config"]


def tuneforge(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tuneforge", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_help_lists_every_verb():
    out = tuneforge("--help")
    assert out.returncode == 0
    for verb in VERBS:
        assert f"\n    {verb} " in out.stdout, verb


def test_bad_file_exits_2_lists_problems_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodel: {quantisation: 4bit}\ntrain: {epochs: three, schedule: cosin}\n")
    out = tuneforge("prepare", str(bad), cwd=tmp_path)
    assert out.returncode == 2
    assert "3 problems" in out.stderr
    for key in ("model.quantisation", "train.epochs", "train.schedule"):
        assert key in out.stderr
    assert "did you mean 'quantization'" in out.stderr
    assert list(tmp_path.iterdir()) == [bad]  # no run directory, nothing written


def test_config_prints_resolved_with_overrides():
    out = tuneforge("config", str(REPO / "configs" / "quickstart.yaml"), "train.lr=5e-5", "seed=3")
    assert out.returncode == 0, out.stderr
    assert "lr: 5.0e-05" in out.stdout and "seed: 3" in out.stdout
    schema = tuneforge("config", "--schema")
    assert json.loads(schema.stdout)["title"] == "Experiment"
    explain = tuneforge("config", "--explain")
    assert "train.max_grad_norm" in explain.stdout


def test_run_dir_override_gets_config_and_manifest(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: tiny\nseed: 5\n")
    out = tuneforge("run", str(exp), "--run-dir", str(tmp_path / "elsewhere"), "seed=9", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "elsewhere"
    assert "seed: 9" in (run / "config.yaml").read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["seed"] == 9 and manifest["name"] == "tiny"
    assert "torch" in manifest["packages"] and "transformers" in manifest["packages"]
    assert manifest["device"]["cuda"] in (True, False)
    assert str(run) in out.stdout
    assert not (tmp_path / "runs").exists()
