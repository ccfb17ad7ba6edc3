"""Kill a training process with SIGKILL mid-epoch, resume, and land on the same adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file


def _experiment(tmp_path, model_dir, name):
    data = tmp_path / "chats.jsonl"
    if not data.exists():
        with open(data, "w") as fh:
            for i in range(300):
                fh.write(
                    json.dumps(
                        {
                            "messages": [
                                {"role": "user", "content": f"question {i}?"},
                                {"role": "assistant", "content": f"answer {i % 7}."},
                            ]
                        }
                    )
                    + "\n"
                )
    exp = tmp_path / f"{name}.yaml"
    exp.write_text(
        f"name: {name}\nseed: 11\nmodel: {{ref: {model_dir}, quantization: none}}\n"
        f"data: {{train: {data.name}, valid_split: 0.05, max_length: 32}}\n"
        "lora: {r: 4, alpha: 8, dropout: 0.1}\n"  # dropout on: the RNG state must be restored too
        "train: {epochs: 1, micro_batch_size: 1, grad_accum: 2, lr: 1.0e-3, save_every: 10, eval_every: 1000, "
        "keep_best: false, packing: false}\n"
    )
    return exp


def _tuneforge(*args, cwd):
    return [sys.executable, "-m", "tuneforge", *args]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = _experiment(tmp_path, tiny_model_dir, "straight")
    killed = _experiment(tmp_path, tiny_model_dir, "killed")
    for exp in (straight, killed):
        subprocess.run(
            _tuneforge("prepare", str(exp), cwd=tmp_path), cwd=tmp_path, env=env, check=True, capture_output=True
        )
    subprocess.run(
        _tuneforge("train", str(straight), cwd=tmp_path), cwd=tmp_path, env=env, check=True, capture_output=True
    )

    proc = subprocess.Popen(
        _tuneforge("train", str(killed), cwd=tmp_path),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = tmp_path / "runs" / "killed" / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints / "checkpoint-30" / "tuneforge_complete.json").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "runs" / "killed" / "adapter").exists()
    steps_per_epoch = 143  # 285 rows / (1 row x 2 accumulated), the last step takes the odd row
    newest = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert 30 <= newest < steps_per_epoch  # killed in the middle of the (only) epoch

    out = subprocess.run(
        _tuneforge("train", str(killed), "--resume", cwd=tmp_path),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    manifest = json.loads((tmp_path / "runs" / "killed" / "manifest.json").read_text())
    assert manifest["train"]["resumed_from"].startswith("checkpoint-")
    assert manifest["train"]["steps"] == steps_per_epoch

    a = load_file(tmp_path / "runs" / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "runs" / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)

    # resuming the finished run again has nothing to do, and says so instead of training on
    adapter = tmp_path / "runs" / "killed" / "adapter" / "adapter_model.safetensors"
    written = adapter.stat().st_mtime_ns
    again = subprocess.run(
        _tuneforge("train", str(killed), "--resume", cwd=tmp_path),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"nothing to resume: this run already finished its {steps_per_epoch} steps" in again.stdout
    assert adapter.stat().st_mtime_ns == written
