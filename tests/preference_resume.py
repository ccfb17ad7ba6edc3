"""Helpers for the resume tests of the preference recipes (tests/unit/test_resume_dpo.py, test_resume_kto.py): train
one run straight and (at once, beside it) the same run killed with SIGKILL mid-epoch and resumed, then compare them.

Both recipes train against a reference: TRL's frozen copy ("ref") of the adapter as training starts, a fresh adapter
(lora_B 0, so exactly the base with the adapter off) or train.init_adapter. Each checkpoint saves it in ref/, and a
resume loads it back from there (transformers loads every adapter folder of a checkpoint)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.test_resume import _tuneforge

SAVE_EVERY = 5
KILL_AFTER = 10  # the checkpoint that must be complete before the kill
# what a step logs that must continue after the resume as the uninterrupted run logged it; not supervised_tokens,
# which each process counts from its own start (the summary divides it by that process's seconds)
CONTINUED = "epoch loss lr grad_norm reward_margin preference_accuracy reward_chosen reward_rejected kl".split()


@dataclass(frozen=True)
class Recipe:
    """A preference method's run in these tests: one epoch over `records` in `steps` optimizer steps."""

    method: str
    records: list[dict]
    batching: str  # train: keys that make `steps` of the records, e.g. "micro_batch_size: 1, grad_accum: 2"
    steps: int


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


def _prepared_runs(tmp_path, model_dir, recipe: Recipe, init_adapter=None):
    """The experiment file and two run folders prepared alike (prepared once here, then copied): straight, killed."""
    from tuneforge.config import load_experiment
    from tuneforge.data.prepare import prepare
    from tuneforge.models import load_tokenizer
    from tuneforge.run import RunDir

    data = tmp_path / f"{recipe.method}.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in recipe.records))
    exp = tmp_path / f"{recipe.method}.yaml"
    exp.write_text(
        f"name: {recipe.method}\nseed: 11\nmodel: {{ref: {model_dir}, quantization: none}}\n"
        f"data: {{train: {data.name}, valid_split: 0, max_length: 64}}\n"
        "lora: {r: 4, alpha: 8, dropout: 0.1}\n"  # inert: TRL's preference trainers turn dropout off
        f"train: {{method: {recipe.method}, epochs: 1, {recipe.batching}, lr: 1.0e-3, save_every: {SAVE_EVERY}, "
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


def _kill_after_checkpoint(proc, checkpoints, steps: int) -> int:
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
    assert KILL_AFTER <= newest < steps  # killed in the middle of the (only) epoch
    return newest


def logged_steps(run_dir) -> dict[int, dict]:
    """metrics.jsonl's training records by step, each step logged once."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if "loss" in r]
    by_step = {r["step"]: r for r in trained}
    assert len(by_step) == len(trained), [r["step"] for r in trained]
    return by_step


def interrupted_and_straight(tmp_path, model_dir, recipe: Recipe, init_adapter=None):
    """Train straight and (at once, beside it) train, SIGKILL and resume: the same adapter, and every step logged once
    with the uninterrupted run's metrics (against the same reference, so the same reward margins). (straight, killed,
    the kill's step)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    exp, straight, killed = _prepared_runs(tmp_path, model_dir, recipe, init_adapter)
    uninterrupted = _train(exp, straight, cwd=tmp_path, env=env)
    newest = _kill_after_checkpoint(_train(exp, killed, cwd=tmp_path, env=env), killed / "checkpoints", recipe.steps)
    _finished(_train(exp, killed, "--resume", cwd=tmp_path, env=env))
    _finished(uninterrupted)
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["train"]["resumed_from"] == f"checkpoint-{newest}"
    assert manifest["train"]["steps"] == recipe.steps > newest

    # the log goes on from the checkpoint: every step once, before the kill and after the resume as logged straight.
    # First: a wrong reference shows in the reward margins at once, in the weights hardly (Adam's steps keep their
    # size whatever the gradient's scale; with KTO the adapters of such a resume differed by 4e-6)
    logged, again = logged_steps(straight), logged_steps(killed)
    assert sorted(logged) == sorted(again) == list(range(1, recipe.steps + 1))
    for step in logged:
        kept = [key for key in CONTINUED if key in logged[step]]
        assert kept == [key for key in CONTINUED if key in again[step]], step
        for key in kept:
            assert again[step][key] == pytest.approx(logged[step][key], rel=1e-5, abs=1e-6), (step, key)
    # KTO logs a margin only for a step whose answers were of both classes: the test needs one after the resume
    margins = [logged[step]["reward_margin"] for step in logged if "reward_margin" in logged[step]]
    assert any(step > newest and "reward_margin" in logged[step] for step in logged)
    assert margins[-1] > 0.01  # it learned to prefer: the comparison is not between two untrained adapters

    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), (key, (a[key] - b[key]).abs().max())
    return straight, killed, newest


def references_after_the_resume(straight, killed, newest, steps: int) -> dict[str, torch.Tensor]:
    """The frozen reference ("ref", TRL's copy of the adapter as training starts) that each checkpoint the resumed
    process saved holds: the same, bit for bit, as the uninterrupted run's at that step. Returned once."""
    resumed = sorted(c for c in killed.glob("checkpoints/checkpoint-*") if int(c.name.split("-")[1]) > newest)
    assert f"checkpoint-{steps}" in {c.name for c in resumed}
    first = load_file(straight / "checkpoints" / f"checkpoint-{steps}" / "ref" / "adapter_model.safetensors")
    for checkpoint in resumed:
        reference = load_file(checkpoint / "ref" / "adapter_model.safetensors")
        assert reference.keys() == first.keys(), checkpoint.name
        for key in first:
            assert torch.equal(reference[key], first[key]), (checkpoint.name, key)
    assert not (killed / "adapter" / "ref").exists()  # the frozen copy is not part of the result
    return first


def resumed_from_start_adapter(tmp_path, model_dir, recipe: Recipe) -> None:
    """interrupted_and_straight from train.init_adapter (_start_adapter's): trained away from it, and after the resume
    still against it, bit for bit, not the checkpoint's trained adapter."""
    start = _start_adapter(tmp_path / "start", model_dir)
    straight, killed, newest = interrupted_and_straight(tmp_path, model_dir, recipe, init_adapter="start")
    first = load_file(start / "adapter_model.safetensors")
    trained = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert trained.keys() == first.keys() and any(not torch.equal(trained[k], first[k]) for k in first)
    reference = references_after_the_resume(straight, killed, newest, recipe.steps)
    assert reference.keys() == first.keys() and all(torch.equal(reference[k], first[k]) for k in first)
