"""Every CUDA-only path, end to end, on one GPU, in under 10 minutes: one table to paste into the README.

    python benchmarks/gpu_check.py [--work DIR] [--skip mfu,vllm]

Checks, each in its own process with its own time limit (a crash or a hang in one
does not stop the others), all on the builtin SmolLM2-135M unless said:

  cuda-tests       pytest tests/gpu: bitsandbytes' CUDA 4-bit kernels (batched greedy
                   answers equal one-at-a-time ones) and FlashAttention-2 packing
                   (a flat row's logits equal each example alone)
  qlora-bf16       prepare + train: QLoRA in bf16, FlashAttention-2 when flash-attn
                   works (else sdpa), packing, micro_batch_size 4: loss first -> last
  t4-plan          the T4 plan on this GPU: QLoRA with model.dtype float16 and sdpa
                   (fp16 autocast, loss scaling, fp32 adapters): loss finite and falling
  merge-parity     merge qlora-bf16's adapter in bfloat16 (probe answers it changed: a
                   figure) and in float32 (every probe answer must agree); then greedy
                   answers of the float32 merge against the adapter on its 4-bit base,
                   and the largest logit gap
  vllm-parity      model.engine vllm against transformers: greedy answers of the
                   fine-tuned system, and base and finetuned sharing one vLLM engine
                   (skipped when vllm is not installed)
  mfu-8b           benchmarks/train_throughput.py on a random Llama-3.1-8B shape in
                   bf16: tokens/s and MFU

Needs the test install (pip install -e ".[dev]" and the builtin model) with a CUDA
build of torch. Prints a markdown table; writes it and each check's log to --work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "My K2 shows E4, what does that mean?",
    "How do I reset the thermostat to factory settings?",
    "Can I control it from my phone?",
    "Why does the screen go dark?",
    "How do I pair it with Wi-Fi?",
    "What batteries does it take?",
    "Does it work with a heat pump?",
    "How do I set a schedule?",
]


def experiment(work: Path, name: str, model: dict, train: dict) -> Path:
    """A small support experiment (no retrieval), written next to the shipped data."""
    import yaml

    data = REPO / "examples" / "data" / "support"
    body = {
        "name": name,
        "seed": 42,
        "model": {"ref": "builtin:smollm2-135m-instruct", **model},
        "data": {"train": str(data / "conversations.jsonl"), "valid_split": 0.1, "max_length": 512},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "train": {"backend": "local", "packing": True, "eval_every": 10, **train},
        "eval": {"data": str(data / "eval.jsonl"), "systems": ["base", "finetuned"], "max_new_tokens": 48},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def tuneforge(*args: str, log: Path, timeout: int, check: bool = True) -> None:
    with open(log, "a") as out:
        subprocess.run(
            [sys.executable, "-m", "tuneforge", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=check,
            timeout=timeout,
            cwd=log.parent,
        )


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def train_check(work: Path, name: str, model: dict, train: dict, timeout: int) -> str:
    log = work / f"{name}.log"
    path = experiment(work, name, model, train)
    run = work / "runs" / name
    started = time.perf_counter()
    tuneforge("prepare", str(path), log=log, timeout=timeout)
    tuneforge("train", str(path), "--run-dir", str(run), log=log, timeout=timeout)
    seconds = time.perf_counter() - started
    seen = losses(run)
    if not seen or not all(v == v and abs(v) != float("inf") for v in seen):
        raise AssertionError(f"losses not finite: {seen}")
    first, last = sum(seen[:3]) / len(seen[:3]), sum(seen[-3:]) / len(seen[-3:])
    if last >= first:
        raise AssertionError(f"loss did not fall: {first:.3f} -> {last:.3f}")
    attention = "?"
    for line in log.read_text().splitlines():
        if "attention" in line and ("flash" in line or "sdpa" in line):
            attention = "flash_attention_2" if "flash" in line else "sdpa"
    return f"loss {first:.3f} -> {last:.3f} over {len(seen)} steps, {seconds:.0f} s with prepare ({attention})"


def check_cuda_tests(work: Path, timeout: int) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/gpu"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    (work / "cuda-tests.log").write_text(out.stdout)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "no output"
    if out.returncode:
        raise AssertionError(summary)
    return summary.strip("= ")


def check_qlora_bf16(work: Path, timeout: int) -> str:
    return train_check(
        work,
        "qlora-bf16",
        {"quantization": "4bit", "dtype": "bfloat16"},
        {"max_steps": 40, "micro_batch_size": 4, "batch_size": 8},
        timeout,
    )


def check_t4_plan(work: Path, timeout: int) -> str:
    return train_check(
        work,
        "t4-plan",
        {"quantization": "4bit", "dtype": "float16", "attention": "sdpa"},
        {"max_steps": 30, "micro_batch_size": 1, "batch_size": 8, "optimizer": "paged_adamw_8bit"},
        timeout,
    )


def check_merge_parity(work: Path, timeout: int) -> str:
    """The default (bfloat16) merge, which may round a short fine-tune away, then a float32 merge, which must not."""
    path, run = work / "qlora-bf16.yaml", work / "runs" / "qlora-bf16"
    if not (run / "adapter" / "adapter_config.json").exists():
        raise AssertionError("needs qlora-bf16's adapter")
    log = work / "merge-parity.log"
    # exit 1 when probe answers changed: a figure here, not a failure
    tuneforge("merge", str(path), "--run-dir", str(run), log=log, timeout=timeout, check=False)
    rounded = json.loads((run / "merge_report.json").read_text())
    tuneforge("merge", str(path), "--run-dir", str(run), "--dtype", "float32", log=log, timeout=timeout)
    exact = json.loads((run / "merge_report.json").read_text())
    note = (
        f"probe answers changed by the merge: {len(rounded['mismatches'])}/{rounded['probes']} in {rounded['dtype']}, "
        f"{len(exact['mismatches'])}/{exact['probes']} in {exact['dtype']}; "
    )
    return note + compare_systems(work, path, run, "merged", "merge-parity")


def check_vllm_parity(work: Path, timeout: int) -> str:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "SKIP: vllm is not installed"
    path, run = work / "qlora-bf16.yaml", work / "runs" / "qlora-bf16"
    return compare_systems(work, path, run, "vllm", "vllm-parity")


def compare_systems(work: Path, path: Path, run_dir: Path, other: str, name: str) -> str:
    """Greedy answers of the fine-tuned system on its transformers engine against `other` (merged, or vllm)."""
    import torch

    from tuneforge.config import load_experiment
    from tuneforge.engine.transformers import Engine, Settings
    from tuneforge.run import RunDir

    experiment_ = load_experiment(path)
    run = RunDir(experiment_, run_dir)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    settings = Settings(max_new_tokens=32)
    reference = Engine.load(experiment_, "finetuned", run)
    expected = [a.text for a in reference.generate(chats, settings, batch_size=1)]
    gap = None
    if other == "merged":
        as_saved = experiment_.model_copy(update={"model": experiment_.model.model_copy(update={"dtype": "float32"})})
        candidate = Engine.load(as_saved, adapter=None, merged=str(run.sub("merged")), quantization="none")
        ids = torch.tensor([reference.prompt_ids(chats[0])])
        with torch.no_grad():
            a = reference.model(input_ids=ids.to(reference.device)).logits.float()
            b = candidate.model(input_ids=ids.to(candidate.device)).logits.float()
        gap = (a - b).abs().max().item()
    else:
        from tuneforge.systems import Systems

        experiment_ = experiment_.model_copy(update={"model": experiment_.model.model_copy(update={"engine": "vllm"})})
        systems = Systems(experiment_, run, planned=("base", "finetuned"))
        candidate, base = systems._engine("finetuned"), systems._engine("base")
        engines = len(systems._pool.engines)  # base and finetuned: one engine, the adapter a LoRA request on it
        base_answers = [a.text for a in base.generate(chats, settings, batch_size=len(chats))]
    got = [a.text for a in candidate.generate(chats, settings, batch_size=len(chats))]
    same = sum(x == y for x, y in zip(expected, got))
    (work / f"{name}.log").write_text(json.dumps({"transformers": expected, other: got}, indent=1))
    note = f"{same}/{len(chats)} greedy answers equal" + (
        f", max logit gap {gap:.3f} (4-bit base vs its float32 merge)" if gap is not None else ""
    )
    if other == "vllm":  # (a merge onto the 16-bit base departs from the 4-bit one by design: a figure, not a check)
        note += (
            f"; base and finetuned on {engines} vLLM engine(s), "
            f"{sum(x != y for x, y in zip(base_answers, got))}/{len(chats)} answers differ"
        )
        if engines != 1 or same < len(chats) // 2:
            raise AssertionError(note)
    return note


def check_mfu_8b(work: Path, timeout: int) -> str:
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "train_throughput.py"),
            "--model",
            "random:llama-3.1-8b",
            "--quantization",
            "none",
            "--sides",
            "baseline,tuneforge",
            "--steps",
            "4",
            "--batch",
            "8",
            "--max-length",
            "1024",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    (work / "mfu-8b.log").write_text(out.stdout)
    if out.returncode:
        raise AssertionError(out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "failed")
    mfu = re.findall(r"MFU ([\d.]+%)", out.stdout)
    speed = re.search(r"speedup vs baseline: ([\d.]+)", out.stdout)
    return (
        f"MFU baseline {mfu[0] if mfu else '?'}, tuneforge {mfu[-1] if mfu else '?'}; "
        f"speedup {speed.group(1) if speed else '?'}"
    )


CHECKS = {  # name: (function, seconds allowed)
    "cuda-tests": (check_cuda_tests, 120),
    "qlora-bf16": (check_qlora_bf16, 150),
    "t4-plan": (check_t4_plan, 150),
    "merge-parity": (check_merge_parity, 90),
    "vllm-parity": (check_vllm_parity, 150),
    "mfu-8b": (check_mfu_8b, 180),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--work", default=None, help="folder for the runs, logs and table (default: a new temporary one)"
    )
    parser.add_argument("--skip", default="", help=f"comma-separated, from {', '.join(CHECKS)}")
    parser.add_argument("--check", choices=list(CHECKS), help=argparse.SUPPRESS)  # one check, in a child process
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.check:
        function, allowed = CHECKS[args.check]
        print(json.dumps({"result": function(work, allowed)}))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU; torch sees none", file=sys.stderr)
        return 2
    device = f"{torch.cuda.get_device_name()} · torch {torch.__version__} · CUDA {torch.version.cuda}"
    skip = {s for s in args.skip.split(",") if s}
    rows, failed = [], 0
    for name, (_, allowed) in CHECKS.items():
        if name in skip:
            rows.append((name, "skipped", "--skip", 0.0))
            continue
        started = time.perf_counter()
        try:
            out = subprocess.run(
                [sys.executable, __file__, "--work", str(work), "--check", name],
                capture_output=True,
                text=True,
                timeout=allowed + 30,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            (work / f"{name}.stderr").write_text(out.stderr)
            if out.returncode == 0:
                result = json.loads(out.stdout.strip().splitlines()[-1])["result"]
                status = "skip" if result.startswith("SKIP") else "pass"
            else:
                last = (out.stderr.strip().splitlines() or ["no output"])[-1]
                result, status = last[:160], "FAIL"
        except subprocess.TimeoutExpired:
            result, status = f"over {allowed + 30} s", "FAIL"
        failed += status == "FAIL"
        rows.append((name, status, result, time.perf_counter() - started))
        print(f"{name}: {status} ({rows[-1][3]:.0f} s) {result}", flush=True)
    table = [f"GPU check on {device}", "", "| check | result | figures | seconds |", "| --- | --- | --- | --- |"]
    table += [f"| {n} | {s} | {r.replace('|', '/')} | {t:.0f} |" for n, s, r, t in rows]
    text = "\n".join(table)
    (work / "gpu_check.md").write_text(text + "\n")
    print("\n" + text + f"\n\nlogs and runs in {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
