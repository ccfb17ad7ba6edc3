"""Launchers: DDP with two CPU processes (torchrun, gloo), and `accelerate launch -m tuneforge train`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def _experiment(tmp_path, model_dir):
    data = tmp_path / "chats.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": f"a{i % 5}."}]}
            )
            + "\n"
            for i in range(40)
        )
    )
    exp = tmp_path / "ddp.yaml"
    exp.write_text(
        f"name: ddp\nmodel: {{ref: {model_dir}, quantization: none}}\n"
        f"data: {{train: {data.name}, valid_split: 0.1, max_length: 32}}\n"
        "train: {max_steps: 4, micro_batch_size: 2, grad_accum: 1, lr: 1.0e-3, save_every: 2, eval_every: 2, "
        "packing: true}\n"
    )
    subprocess.run(
        [sys.executable, "-m", "tuneforge", "prepare", str(exp)], cwd=tmp_path, env=ENV, check=True, capture_output=True
    )
    return exp


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_two_process_ddp_on_cpu(tmp_path, tiny_model_dir):
    exp = _experiment(tmp_path, tiny_model_dir)
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "tuneforge", "train", str(exp)],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    summary = json.loads((run / "manifest.json").read_text())["train"]
    assert summary["steps"] == 4
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    marker = json.loads((run / "checkpoints" / "checkpoint-4" / "tuneforge_complete.json").read_text())
    assert marker["world_size"] == 2
    assert out.stdout.count("adapter written to") == 1  # only the main process writes the run's outputs
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3, 4]  # one writer: each step once
    # supervised tokens are summed over both processes, in the log and the summary alike
    assert trained[-1]["supervised_tokens"] == summary["supervised_tokens"] > 0
    assert (
        "batch_size 4 packed rows per step (micro_batch_size 2 x grad_accum 1)" in out.stdout
    )  # 2 packed rows on each of 2 processes


def test_accelerate_launch_runs_the_train_verb(tmp_path, tiny_model_dir):
    exp = _experiment(tmp_path, tiny_model_dir)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            "1",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--cpu",
            "-m",
            "tuneforge",
            "train",
            str(exp),
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "runs" / "ddp" / "manifest.json").read_text())["train"]["steps"] == 4


def test_ddp_label_eval_splits_the_valid_prompts_and_gathers_the_same_scores(tmp_path, tiny_model_dir):
    """Each process scores its share of the valid prompts; the gathered metrics equal one process scoring them all."""
    from tests.reviews import write_reviews

    write_reviews(
        tmp_path / "reviews.csv",
        44,
        ["positive", "negative", "neutral", "positive"],
        lambda label, i: f"{label[:3]} words {i}",
    )
    exp = tmp_path / "labels.yaml"
    exp.write_text(
        f"name: ddp-labels\nseed: 5\nmodel: {{ref: {tiny_model_dir}, quantization: none}}\n"
        "data: {train: reviews.csv, template: {user: 'Review: {review}', assistant: '{sentiment}'}, "
        "label: sentiment, valid_split: 0.25}\n"
        "train: {max_steps: 2, micro_batch_size: 2, grad_accum: 1, eval_every: 2, save_every: 2}\n"
    )
    base = {}
    for name, launcher in (
        ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]),
        ("one", [sys.executable]),
    ):
        run = tmp_path / name
        subprocess.run(
            [sys.executable, "-m", "tuneforge", "prepare", str(exp), "--run-dir", str(run)],
            cwd=tmp_path,
            env=ENV,
            check=True,
            capture_output=True,
        )
        out = subprocess.run(
            [*launcher, "-m", "tuneforge", "train", str(exp), "--run-dir", str(run)],
            cwd=tmp_path,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        base[name] = next(r for r in records if r["step"] == 0 and "eval_accuracy" in r)  # the model before training
    valid = (tmp_path / "one" / "data" / "valid.jsonl").read_text().splitlines()
    assert len(valid) >= 4  # both processes score some
    for key in ("eval_accuracy", "eval_macro_f1", "eval_loss"):
        assert base["two"][key] == pytest.approx(base["one"][key], rel=1e-4), key
