"""`tuneforge sweep` and `tuneforge compare` as a user runs them, on the real builtin model: a 2x2 grid of tiny runs,
killed in its third point and run again, then compared; and the same kind of sweep as Ray tasks on a local instance."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.reviews import write_reviews

pytestmark = pytest.mark.e2e

EXPERIMENT = """name: tiny
seed: 3
data:
  train: reviews.csv
  template: {user: "Review: {review}", assistant: "{sentiment}"}
  label: sentiment
  valid_split: 0.25
train: {max_steps: 3, batch_size: 4}
eval: {systems: [base, finetuned]}
sweep:
  params: {train.lr: [1.0e-4, 3.0e-4], lora.r: [4, 8]}
  metric: accuracy
"""
POINTS = ["lr=0.0001-r=4", "lr=0.0001-r=8", "lr=0.0003-r=4", "lr=0.0003-r=8"]


def _setup(tmp_path: Path) -> Path:
    write_reviews(
        tmp_path / "reviews.csv",
        24,
        ["positive", "negative"],
        lambda label, i: f"{'great, loved it' if label == 'positive' else 'awful, it broke'} (order {i})",
    )
    (tmp_path / "exp.yaml").write_text(EXPERIMENT)
    return tmp_path / "exp.yaml"


def _tuneforge(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "tuneforge", *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )


def _status(folder: Path) -> str | None:
    try:
        return json.loads((folder / "point.json").read_text()).get("status")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_grid_shares_preparation_resumes_after_a_kill_and_compares_the_four_points(tmp_path):
    exp = _setup(tmp_path)
    root = tmp_path / "runs" / "tiny" / "sweep"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "sweep", str(exp)], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
    )
    third = root / POINTS[2]
    deadline = time.monotonic() + 600
    # kill the sweep (no chance to tidy up) once two points are done and the third has a complete checkpoint
    while time.monotonic() < deadline and first.poll() is None:
        if all(_status(root / p) == "done" for p in POINTS[:2]) and list(
            third.glob("checkpoints/checkpoint-*/tuneforge_complete.json")
        ):
            first.send_signal(signal.SIGKILL)
            break
        time.sleep(0.5)
    first.wait(timeout=60)
    log.close()
    said = (tmp_path / "first.log").read_text()
    assert first.returncode == -signal.SIGKILL, said[-3000:]
    assert _status(third) == "running" and not (root / POINTS[3]).exists()
    assert "preparing the data once for 4 points" in said
    kept = {
        p: (
            (root / p / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns,
            (root / p / "point.json").read_text(),
        )
        for p in POINTS[:2]
    }

    again = _tuneforge("sweep", str(exp), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 finished before, 2 to run" in again.stdout and "reused from" in again.stdout
    assert f"point {POINTS[2]}: resuming its interrupted training from checkpoint-" in again.stdout
    for point, (mtime, record) in kept.items():  # finished points were not redone
        assert (root / point / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == mtime
        assert (root / point / "point.json").read_text() == record
    assert json.loads((third / "manifest.json").read_text())["train"]["resumed_from"].startswith("checkpoint-")

    # four normal run folders, each with its resolved config and an eval
    for point in POINTS:
        assert _status(root / point) == "done"
        assert (root / point / "adapter" / "adapter_config.json").exists()
        assert set(json.loads((root / point / "eval" / "metrics.json").read_text())) == {
            "base",
            "finetuned",
            "majority",
        }
    configs = {p: (root / p / "config.yaml").read_text() for p in POINTS}
    assert (
        "r: 8" in configs["lr=0.0001-r=8"]
        and "lr: 0.0003" in configs["lr=0.0003-r=4"]
        and "sweep: null" in configs[POINTS[0]]
    )
    # one preparation, linked into every point; base scored once for all of them
    shared = list((root / "prepared").iterdir())
    assert len(shared) == 1
    inodes = {(root / p / "data" / "train.jsonl").stat().st_ino for p in POINTS} | {
        (shared[0] / "data" / "train.jsonl").stat().st_ino
    }
    assert len(inodes) == 1
    assert len(re.findall(r"scoring labels \(base\):\s+0%", said + again.stdout + again.stderr)) == 1  # one bar starts
    assert len((root / "eval-cache" / "base.jsonl").read_text().splitlines()) == 6  # the 6 valid reviews
    # ... and the base model's valid metrics before training (step 0) were computed by the first point alone
    step0 = [json.loads((root / p / "metrics.jsonl").read_text().splitlines()[0]) for p in POINTS]
    assert all(r["step"] == 0 and "eval_accuracy" in r for r in step0)
    assert all(
        {k: v for k, v in r.items() if k != "epoch"} == {k: v for k, v in step0[0].items() if k != "epoch"}
        for r in step0
    )
    assert (said + again.stdout).count("valid metrics at step 0: the same as an earlier point's") == 3

    # the report the sweep wrote, and `tuneforge compare` run by hand
    summary = json.loads((root / "compare" / "compare.json").read_text())
    assert [r["run"] for r in summary["runs"]] == POINTS and summary["differing"] == ["lora.r", "train.lr"]
    assert summary["best"]["run"] in POINTS and summary["metric"] == "finetuned.accuracy"
    out = _tuneforge("compare", str(root), "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for point in POINTS:
        assert f"| {point}" in out.stdout
    assert "| lora.r | train.lr |" in out.stdout and "(best)" in out.stdout
    assert (tmp_path / "report" / "best.yaml").exists() and (tmp_path / "report" / "curves.png").exists()
    best = _tuneforge(
        "config", str(tmp_path / "report" / "best.yaml"), cwd=tmp_path
    )  # a valid experiment, ready to run
    assert best.returncode == 0 and str(tmp_path / "reviews.csv") in best.stdout, best.stderr

    # the experiment changed under finished points: refused, nothing rerun
    exp.write_text(EXPERIMENT.replace("max_steps: 3", "max_steps: 4"))
    changed = _tuneforge("sweep", str(exp), cwd=tmp_path)
    assert changed.returncode == 1 and "train.max_steps" in changed.stderr and POINTS[0] in changed.stderr


def test_ray_executor_runs_the_points_as_tasks_on_a_local_instance(tmp_path):
    pytest.importorskip("ray")
    exp = _setup(tmp_path)
    env = {**os.environ, "RAY_ADDRESS": ""}
    driver = subprocess.Popen(
        [sys.executable, "-m", "tuneforge", "sweep", str(exp), 'sweep.params={"lora.r": [4, 8]}', "--executor", "ray"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    stdout, stderr = driver.communicate(timeout=900)
    assert driver.returncode == 0, (stdout[-2000:], stderr[-3000:])
    assert "started a local Ray instance" in stdout and "2 points as tasks" in stdout
    root = tmp_path / "runs" / "tiny" / "sweep"
    assert json.loads((root / "sweep.json").read_text())["executor"] == "ray"
    workers = set()
    for point in ("r=4", "r=8"):
        record = json.loads((root / point / "point.json").read_text())
        assert record["status"] == "done" and isinstance(record["value"], float)
        assert (root / point / "eval" / "metrics.json").exists() and (
            root / point / "adapter" / "adapter_config.json"
        ).exists()
        workers.add(record["pid"])
    assert driver.pid not in workers  # trained in Ray's worker processes, not in the command's own
    assert "sweep: 2 done" in stdout and (root / "compare" / "compare.html").exists()
