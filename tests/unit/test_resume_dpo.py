"""Kill a DPO run with SIGKILL mid-epoch, resume, and land on the same adapter as an uninterrupted run, against the
same reference. The reference is TRL's frozen copy ("ref") of the adapter as training starts: a fresh adapter (lora_B
0, so exactly the base with the adapter off), or train.init_adapter. Each checkpoint saves it in ref/, and a resume
loads it back from there (transformers loads every adapter folder of a checkpoint)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.test_resume import _tuneforge

PAIRS = 80
STEPS = PAIRS // 2  # 1 pair per micro batch, 2 accumulated, one epoch
KILL_AFTER = 10  # the checkpoint that must be complete before the kill (one every 5 steps)


def _pairs(folder):
    path = folder / "pairs.jsonl"
    with open(path, "w") as fh:
        for i in range(PAIRS):
            pair = {
                "input": {"messages": [{"role": "user", "content": f"question {i}?"}]},
                "preferred_output": [{"role": "assistant", "content": f"answer {i % 7}."}],
                "non_preferred_output": [{"role": "assistant", "content": f"no {i % 5}, never."}],
            }
            fh.write(json.dumps(pair) + "\n")
    return path


def _start_adapter(folder, model_dir):
    """A LoRA adapter on the tiny model with seeded random weights (lora_B too): as a reference it differs from the
    base, so a resume that referenced the base, or the trained adapter, would train differently."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)  # train reads the starting adapter's tokenizer
    return folder


def _prepared_runs(tmp_path, model_dir, init_adapter=None):
    """The experiment file and two run folders prepared alike (prepared once here, then copied): straight, killed."""
    from tuneforge.config import load_experiment
    from tuneforge.data.prepare import prepare
    from tuneforge.models import load_tokenizer
    from tuneforge.run import RunDir

    pairs = _pairs(tmp_path)
    exp = tmp_path / "dpo.yaml"
    exp.write_text(
        f"name: dpo\nseed: 11\nmodel: {{ref: {model_dir}, quantization: none}}\n"
        f"data: {{train: {pairs.name}, valid_split: 0, max_length: 64}}\n"
        "lora: {r: 4, alpha: 8, dropout: 0.1}\n"
        "train: {method: dpo, epochs: 1, micro_batch_size: 1, grad_accum: 2, lr: 1.0e-3, save_every: 5, "
        "eval_every: 1000, keep_best: false, keep_checkpoints: 20"
        + (f", init_adapter: {init_adapter}" if init_adapter else "")
        + "}\n"
    )
    experiment = load_experiment(exp)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run = RunDir(experiment, straight).start("prepare")
    prepare(experiment, run, load_tokenizer(experiment.model), progress=False)
    shutil.copytree(straight, killed)
    return exp, straight, killed


def _train(exp, run_dir, *more, cwd, env):
    """`tuneforge train` in a subprocess, its output in a log file (a pipe nobody reads while it runs would fill)."""
    log = run_dir.parent / ("-".join([run_dir.name, *(m.lstrip("-") for m in more)]) + ".log")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _tuneforge("train", str(exp), "--run-dir", str(run_dir), *more, cwd=cwd),
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proc.log = log
    return proc


def _finished(proc) -> None:
    proc.wait(timeout=600)
    assert proc.returncode == 0, proc.log.read_text()[-3000:]


def _kill_after_checkpoint(proc, checkpoints) -> int:
    """SIGKILL once checkpoint-KILL_AFTER is complete; the newest checkpoint's step, checked to be mid-epoch."""
    deadline = time.time() + 300
    while not (checkpoints / f"checkpoint-{KILL_AFTER}" / "tuneforge_complete.json").exists():
        assert proc.poll() is None, "training ended before it could be killed: " + proc.log.read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (checkpoints.parent / "adapter").exists()
    newest = max(int(p.name.split("-")[1]) for p in checkpoints.glob("checkpoint-*"))
    assert KILL_AFTER <= newest < STEPS  # killed in the middle of the (only) epoch
    return newest


def _margins(run_dir) -> dict[int, float]:
    """reward_margin by step from metrics.jsonl: beta times the policy's log-ratio over the reference's."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["reward_margin"] for r in map(json.loads, lines) if "reward_margin" in r}


def _interrupted_and_straight(tmp_path, model_dir, init_adapter=None):
    """Train straight and (at once, beside it) train, SIGKILL and resume; (straight, killed, the kill's step)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    exp, straight, killed = _prepared_runs(tmp_path, model_dir, init_adapter)
    uninterrupted = _train(exp, straight, cwd=tmp_path, env=env)
    newest = _kill_after_checkpoint(_train(exp, killed, cwd=tmp_path, env=env), killed / "checkpoints")
    _finished(_train(exp, killed, "--resume", cwd=tmp_path, env=env))
    _finished(uninterrupted)
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["train"]["resumed_from"] == f"checkpoint-{newest}"
    assert manifest["train"]["steps"] == STEPS > newest

    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), (key, (a[key] - b[key]).abs().max())
    # against the same reference after the resume: every step's reward margin as the uninterrupted run's
    margins, again = _margins(straight), _margins(killed)
    assert sorted(margins) == sorted(again) == list(range(1, STEPS + 1))
    for step in range(newest + 1, STEPS + 1):
        assert again[step] == pytest.approx(margins[step], abs=1e-6), step
    assert margins[STEPS] > 0.01  # it learned to prefer: the comparison is not between two untrained adapters
    return straight, killed, newest


def _references_after_the_resume(straight, killed, newest) -> dict[str, torch.Tensor]:
    """The frozen reference ("ref", TRL's copy of the adapter as training starts) that each checkpoint the resumed
    process saved holds: the same, bit for bit, as the uninterrupted run's at that step. Returned once."""
    resumed = sorted(c for c in killed.glob("checkpoints/checkpoint-*") if int(c.name.split("-")[1]) > newest)
    assert f"checkpoint-{STEPS}" in {c.name for c in resumed}
    first = load_file(straight / "checkpoints" / f"checkpoint-{STEPS}" / "ref" / "adapter_model.safetensors")
    for checkpoint in resumed:
        reference = load_file(checkpoint / "ref" / "adapter_model.safetensors")
        assert reference.keys() == first.keys(), checkpoint.name
        for key in first:
            assert torch.equal(reference[key], first[key]), (checkpoint.name, key)
    assert not (killed / "adapter" / "ref").exists()  # the frozen copy is not part of the result
    return first


@pytest.mark.slow
def test_dpo_sigkill_then_resume_equals_uninterrupted_against_the_base(tmp_path, tiny_model_dir):
    straight, killed, newest = _interrupted_and_straight(tmp_path, tiny_model_dir)
    adapter = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # trained away from the start (0)
    # the reference is a frozen copy of the fresh adapter, whose lora_B is 0: exactly the base with the adapter off
    reference = _references_after_the_resume(straight, killed, newest)
    assert all(not t.any() for k, t in reference.items() if "lora_B" in k)


@pytest.mark.slow
def test_dpo_sigkill_then_resume_from_an_init_adapter_keeps_its_frozen_reference(tmp_path, tiny_model_dir):
    start = _start_adapter(tmp_path / "start", tiny_model_dir)
    straight, killed, newest = _interrupted_and_straight(tmp_path, tiny_model_dir, init_adapter="start")
    first = load_file(start / "adapter_model.safetensors")
    trained = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert trained.keys() == first.keys() and any(not torch.equal(trained[k], first[k]) for k in first)
    # the reference after the resume is the starting adapter, bit for bit, not the checkpoint's trained one
    reference = _references_after_the_resume(straight, killed, newest)
    assert reference.keys() == first.keys() and all(torch.equal(reference[k], first[k]) for k in first)
