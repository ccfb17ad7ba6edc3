"""GPU training benchmark: throughput and MFU of six training setups (phase A), and QLoRA memory on a T4-sized
budget (phase B). One call, about 8 minutes on an H100 or H200, no network:

    timeout 470 python benchmarks/gpu_perf.py --out $OUT

Phase A trains a randomly initialised Llama-3.1-8B shape in bf16 with LoRA r16 on every linear layer (dropout 0), on
the same mixed chat data (tokenized by the builtin SmolLM2 tokenizer, whose ids are valid in Llama's vocabulary),
about 64 examples per optimizer step, on each side:

  tuneforge      ForgeTrainer as the SFT recipe now sets it up: the packed attention the plan chooses
                 (train/attention.py), activation checkpointing planned from the measured activations
                 (train/memory.py), two pinned-memory loader workers, logging every 10 steps; 32 examples x 2
  tuneforge-compile  the same with each decoder layer compiled (train/kernels.py), 5 warm-up steps at least
  trl-padfree    TRL SFTTrainer, padding_free: a micro-batch's examples end to end in one row, 32 x 2
  tuneforge-was  ForgeTrainer as it was: packed rows with a dense block mask built on the CPU, logging every step, 8 x 8
  trl-packing    TRL SFTTrainer, packing bfd into rows of about 32 examples, 1 row x 2
  padded         transformers Trainer + PEFT, examples padded to the longest of the micro-batch, 8 x 8

Each side runs in its own process with its own time limit. After `--warmup` steps, `--steps` steps are timed between
synchronised timestamps (a slow side stops early, after at least 3, to leave time for the rest); tokens are counted
in `training_step`, one more step is profiled for the attention kernel, and the held-out loss is scored.

Phase B loads an 8B shape saved to local disk through tuneforge's own loader in 4-bit NF4 with float16 compute, adds
the adapters as training does, and trains 2 + 8 steps of one packed 2,048-token row with gradient checkpointing and
paged 8-bit AdamW, under a 14.5 GiB memory cap with SDPA's flash and cuDNN kernels off (a T4 has neither).

Every finished side is appended to OUT/gpu_perf.jsonl at once (a timeout keeps what finished); the tables are printed
and written to OUT/gpu_perf.md; each side's output goes to OUT/gpu_perf.log. A rehearsal on CPU:

    python benchmarks/gpu_perf.py --model random:tiny --device cpu --steps 3 --warmup 1 --out /tmp/gpu_perf
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.time()  # --budget counts from here, before the heavy imports, as the outer `timeout` does
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
if importlib.util.find_spec("tuneforge") is None:  # a GPU machine with the checkout but no install: its src/
    sys.path.insert(1, str(BENCH.parent / "src"))

from _timing import StepTimer, count_trained_tokens, matmul_params, synchronize, tag_token_counts, throughput  # noqa: E402
from train_throughput import LLAMA_8B_SHAPE  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

SIDES = ("tuneforge", "trl-padfree", "tuneforge-compile", "tuneforge-was", "trl-packing", "padded")
GEOMETRY = {  # (examples per micro-batch, micro-batches per optimizer step): about 64 examples a step on every side
    "tuneforge": (32, 2),
    "tuneforge-compile": (32, 2),
    "trl-padfree": (32, 2),
    "tuneforge-was": (8, 8),
    "trl-packing": (32, 2),
    "padded": (8, 8),
}
# Phase B's two processes: the 8B shape saved once (the capped process could not hold it), then the capped training.
MEMORY_JOBS = ("qlora-save", "qlora-2k")
ORDER = (
    "tuneforge",
    "trl-padfree",
    "qlora-save",
    "qlora-2k",
    "tuneforge-compile",
    "tuneforge-was",
    "trl-packing",
    "padded",
)
# Each job's share of the time left, against the others still to run: the new path, its rival and the compiled side
# (32 layers to compile) get more; a side that finishes early leaves its time to the rest.
WEIGHT = {
    "tuneforge": 1.5,
    "trl-padfree": 1.5,
    "qlora-save": 1.0,
    "qlora-2k": 1.4,
    "tuneforge-compile": 1.5,
    "tuneforge-was": 1.0,
    "trl-packing": 0.7,
    "padded": 0.7,
}
COMPILED_WARMUP = 5  # warm-up steps at least, for a compiled side: recompilations for new row lengths come first
MIN_JOB_S = 30.0  # a job that cannot have this long is skipped: start-up alone takes about 20 s on an 8B
TINY_SHAPE = dict(LLAMA_8B_SHAPE, vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
TINY_SHAPE.update(num_attention_heads=4, num_key_value_heads=2)
SHAPES = {"random:llama-3.1-8b": LLAMA_8B_SHAPE, "random:tiny": TINY_SHAPE}
GIB = 2**30
T4_BYTES = 16e9  # a T4's 16 GB (about 15 GiB usable)
CAP_BYTES = 14.5 * GIB
MEMORY_WARMUP, MEMORY_STEPS = 2, 8  # phase B's steps at most: memory peaks in the first steps, speed is not its point


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_perf.jsonl, gpu_perf.md and gpu_perf.log")
    parser.add_argument("--phase", default="AB", choices=["A", "B", "AB"])
    parser.add_argument("--sides", default=",".join(SIDES), help=f"phase A's sides, from {', '.join(SIDES)}")
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per side (phase B: 8)")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps before the measured ones (B: 2)")
    parser.add_argument(
        "--model", default="random:llama-3.1-8b", help="random:llama-3.1-8b, random:tiny or builtin:..."
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tokenizer", help="a tokenizer folder to use instead of the builtin SmolLM2's")
    parser.add_argument(
        "--attention-kind",
        choices=["varlen", "flex", "device_mask", "block_mask"],
        help="the tuneforge side's packed attention instead of the plan's (varlen on CPU runs its SDPA reference)",
    )
    parser.add_argument("--max-length", type=int, default=1024, help="examples are truncated to this many tokens")
    parser.add_argument("--eval-examples", type=int, default=24, help="held out from training, scored after it")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for every side together")
    parser.add_argument("--work", default=str(work_folder()), help="where phase B saves the 8B shape (16 GB)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--child", choices=SIDES + MEMORY_JOBS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # time.time() the child must end by
    return parser.parse_args(argv)


def work_folder() -> Path:
    """/dev/shm when it can hold the 16 GB 8B shape (written and read back at memory speed), else the temp folder."""
    import shutil

    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 24 * GIB:
        return shm / "tuneforge-gpu-perf"
    return Path(tempfile.gettempdir()) / "tuneforge-gpu-perf"


# --------------------------------------------------------------------------- the model and the data


def device_plan(args, dtype: str, quantization: str = "none"):
    from tuneforge.config import ModelSection
    from tuneforge.models import plan_device

    return plan_device(ModelSection(device=args.device, dtype=dtype, quantization=quantization))


def compute_dtype(args) -> str:
    return "bfloat16" if args.device == "cuda" else "float32"


def load_base(args):
    """(plan, tokenizer, model): a random shape built on the device in the compute dtype, or a real model."""
    import torch

    from tuneforge.config import ModelSection
    from tuneforge.models import load_model, materialize, resolve

    torch.manual_seed(args.seed)
    if args.model in SHAPES:
        plan = device_plan(args, compute_dtype(args))
        model = random_model(SHAPES[args.model], plan)
    else:
        section = ModelSection(ref=args.model, device=args.device, dtype=compute_dtype(args), quantization="none")
        plan = device_plan(args, compute_dtype(args))
        model = load_model(section, plan, materialize(resolve(args.model)))
    model.config.use_cache = False  # a cache would let packed examples see each other
    return plan, bench_tokenizer(args), model


def random_model(shape: dict, plan):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, plan.dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the compute dtype: an 8B in fp32 first would need 32 GB more
    try:
        with torch.device(plan.device):
            return LlamaForCausalLM(LlamaConfig(**shape, attn_implementation=plan.attention))
    finally:
        torch.set_default_dtype(previous)


def bench_tokenizer(args):
    from tuneforge.config import ModelSection
    from tuneforge.models import load_tokenizer

    if args.tokenizer:
        return load_tokenizer(ModelSection(ref=args.tokenizer), args.tokenizer)
    return load_tokenizer(ModelSection())  # SmolLM2's ids (< 49,152) are valid in Llama-3's 128k vocabulary


def bench_data(args, tokenizer):
    """(held-out examples, training examples, mean training length), each example (input_ids, labels)."""
    from train_throughput import mixed_examples, tokenized

    examples = tokenized(tokenizer, mixed_examples(args.seed), args.max_length)
    held_out, train = examples[: args.eval_examples], examples[args.eval_examples :]
    return held_out, train, sum(len(ids) for ids, _ in train) / len(train)


# --------------------------------------------------------------------------- phase A: one side


def tuneforge_attention(model, plan, forced: str | None = None) -> tuple[str, str, str]:
    """(collator mode, attention kind, why): the packed attention the plan chooses (or `forced`), with the model
    switched to it. Without train.attention (older tuneforge): the plan's attention and its collator mode."""
    from tuneforge.train.batching import attention_mode

    try:
        from tuneforge.train.attention import PackedAttention, packed_attention, use_packed_attention
    except ImportError:
        note = "no tuneforge.train.attention: the current path (the plan's attention, its collator mode)"
        print(f"note: {note}", flush=True)
        return attention_mode(plan.attention, True), plan.attention, note
    choice = PackedAttention(forced, "--attention-kind") if forced else packed_attention(plan, True)
    use_packed_attention(model, choice)
    return attention_mode(choice.kind, True), choice.kind, choice.reason


def training_args(args, plan, side: str, max_steps: int, **extra) -> dict:
    micro, accum = GEOMETRY.get(side, (1, 1))
    return dict(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        max_steps=max_steps,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=10,  # TRL's default; tuneforge-was logs every step, as it did
        save_strategy="no",
        report_to="none",
        use_cpu=plan.device == "cpu",
        bf16=plan.dtype == "bfloat16" and plan.device == "cuda",
        fp16=plan.dtype == "float16",
        optim="adamw_torch_fused" if plan.device == "cuda" else "adamw_torch",
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        gradient_checkpointing=False,  # explicit: TRL's default is on
        **extra,
    )


def build_trainer(args, side: str, plan, tokenizer, model, train, mean_len: float, max_steps: int, choice=None):
    """(trainer, what it runs: attention kind and why); `choice`: tuneforge_attention's, for the tuneforge side."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    micro, _ = GEOMETRY[side]
    examples = [{"input_ids": ids, "labels": labels} for ids, labels in train]
    common = training_args(args, plan, side, max_steps)
    if side == "padded":
        from train_throughput import pad_to_longest

        config = TrainingArguments(**common)
        trainer = Trainer(model=model, args=config, train_dataset=Dataset.from_list(examples))
        trainer.data_collator = pad_to_longest(tokenizer.pad_token_id)
        return trainer, f"{plan.attention}, padded"
    if side.startswith("trl-"):
        if side == "trl-packing":  # rows of about `micro` examples, one row a micro-batch
            common.update(packing=True, packing_strategy="bfd", max_length=int(micro * mean_len))
            common["per_device_train_batch_size"] = 1
        else:
            common.update(padding_free=True, max_length=None)  # already cut to --max-length
        trainer = SFTTrainer(
            model=model, args=SFTConfig(**common), train_dataset=Dataset.from_list(examples), processing_class=tokenizer
        )
        return trainer, f"{plan.attention}, padding-free"
    return forge_trainer(args, side, plan, tokenizer, model, train, mean_len, common, choice)


def forge_trainer(args, side, plan, tokenizer, model, train, mean_len, common, choice):
    from datasets import Dataset
    from trl import SFTConfig

    from tuneforge.data.packing import build_rows
    from tuneforge.train.batching import Collator, mask_dtype
    from tuneforge.train.trainer import ForgeTrainer

    micro, _ = GEOMETRY[side]
    capacity = max(args.max_length, int(micro * mean_len))  # one packed row holds about `micro` examples
    rows = [
        {"input_ids": r.input_ids, "labels": r.labels, "seq_lens": r.seq_lens}
        for r in build_rows(train, capacity, packing=True, seed=args.seed)
    ]
    if side == "tuneforge-was":
        mode, attention = "block_mask", f"{plan.attention}, CPU block mask"
        common["logging_steps"] = 1
    else:
        mode, kind, reason = choice
        attention = f"{kind}: {reason}"
        if plan.device == "cuda":  # as the recipe loads on a GPU (train/common.py): collated while the GPU computes
            common.update(dataloader_num_workers=2, dataloader_pin_memory=True, dataloader_persistent_workers=True)
    common["per_device_train_batch_size"] = 1
    config = SFTConfig(dataset_kwargs={"skip_prepare_dataset": True}, packing=False, **common)
    trainer = ForgeTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(rows),
        data_collator=Collator(tokenizer.pad_token_id, mode, mask_dtype(plan.device, plan.dtype)),
        processing_class=tokenizer,
    )
    if side != "tuneforge-was":
        attention += "; " + plan_checkpointing(trainer, plan, capacity)
    return trainer, attention


def plan_checkpointing(trainer, plan, tokens: int) -> str:
    """train.gradient_checkpointing: auto, as the recipe applies it to the built trainer; what it chose."""
    from tuneforge.train.memory import choose_checkpointing

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    choice = choose_checkpointing("auto", trainer.model, plan, tokens, trainable)
    for key, value in choice.trainer_kwargs(type(trainer.args)).items():
        setattr(trainer.args, key, value)
    return choice.describe()


def compiled(model, side: str) -> str | None:
    """tuneforge-compile: each decoder layer compiled in place, as train.compile: true does."""
    if side != "tuneforge-compile":
        return None
    from tuneforge.train.kernels import compile_layers

    return f"{compile_layers(model)} decoder layers compiled"


def run_side(args) -> dict:
    """Phase A, one side: train, time, count, profile one step, score the held-out loss."""
    from train_throughput import add_lora

    plan, tokenizer, base = load_base(args)
    held_out, train, mean_len = bench_data(args, tokenizer)
    n_params = matmul_params(base)
    new_path = args.child in ("tuneforge", "tuneforge-compile")
    choice = tuneforge_attention(base, plan, args.attention_kind) if new_path else None
    model = add_lora(base, plan)
    compile_note = compiled(model, args.child)
    warmup = max(args.warmup, COMPILED_WARMUP) if compile_note else args.warmup
    max_steps = warmup + args.steps + 1  # + the profiled step
    trainer, attention = build_trainer(args, args.child, plan, tokenizer, model, train, mean_len, max_steps, choice)
    trainer.data_collator = tag_token_counts(trainer.data_collator)
    timer = StepTimer(warmup, args.steps, deadline=args.deadline)
    timer.extra_steps = 1
    probe = KernelProbe(timer)
    counts = count_trained_tokens(trainer, timer)
    trainer.add_callback(timer)
    trainer.add_callback(probe)
    trainer.train()
    result = throughput(timer, counts, n_params, plan.device_name if plan.device == "cuda" else None)
    micro, accum = GEOMETRY[args.child]
    result.update(
        micro=f"{micro} x {accum}",
        tokens_per_micro=counts.padded / counts.batches if counts.batches else None,
        attention=attention + (f"; {compile_note}" if compile_note else ""),
        warmup_steps=warmup,
        kernels=probe.kernels,
        plan=plan.describe(),
        **memory(timer),
    )
    result["held_out_loss"], result["loss_error"] = scored(trainer.model, held_out, plan)
    return result


def scored(model, held_out, plan) -> tuple[float | None, str | None]:
    """The held-out loss, scored one plain example at a time through the plan's attention (a packed-only kernel
    such as varlen cannot read a plain row)."""
    from train_throughput import held_out_loss

    try:
        model.get_base_model().set_attn_implementation(plan.attention)
        return held_out_loss(model, held_out, plan), None
    except Exception as exc:  # a training-only kernel may refuse plain rows: the side's figures still stand
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def memory(timer: StepTimer) -> dict:
    """Peak GPU memory over the measured steps, and over the whole run (warm-up included)."""
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        import resource

        return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}
    allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    before = timer.warmup_peak_bytes or (0, 0)
    return {
        "peak_allocated_gib": allocated / GIB,
        "peak_reserved_gib": reserved / GIB,
        "run_peak_allocated_gib": max(allocated, before[0]) / GIB,
        "run_peak_reserved_gib": max(reserved, before[1]) / GIB,
    }


class KernelProbe(TrainerCallback):
    """Profiles the step after the measured ones and keeps the attention kernels that ran, by device time."""

    # softmax shows SDPA's math fallback; the loss's log-softmax is not attention
    PATTERN = r"(?i)attn|attention|flash|fmha|sdp|flex|triton_tem|mha|(?<!log_)(?<!log)softmax"

    def __init__(self, timer: StepTimer):
        self.timer, self.kernels, self._profiler = timer, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        import torch

        if self.timer.measuring or self.timer.stop_at is None or self._profiler or self.kernels is not None:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(activities=activities)
        self._profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._profiler is None:
            return
        synchronize()
        self._profiler.__exit__(None, None, None)
        self.kernels = attention_kernels(self._profiler, self.PATTERN)
        self._profiler = None


def autograd_node(name: str) -> bool:
    """A CPU profile's autograd bookkeeping around an op, not the op: 'autograd::engine::...', '...Backward0'."""
    return name.startswith("autograd::") or name.endswith("Backward0")


def attention_kernels(profiler, pattern: str, top: int = 3) -> list[str]:
    """The attention-looking kernels (GPU) or ops (CPU) of a profile, longest first, with their share of the step."""
    import re

    events = profiler.key_averages()
    on_gpu = [e for e in events if getattr(e, "self_device_time_total", 0) > 0]
    timed = [(e.key, e.self_device_time_total) for e in on_gpu] or [(e.key, e.self_cpu_time_total) for e in events]
    total = sum(t for _, t in timed) or 1
    found = sorted(((t, k) for k, t in timed if re.search(pattern, k) and not autograd_node(k)), reverse=True)[:top]
    return [f"{k[:90]} ({t / total:.0%})" for t, k in found]


# --------------------------------------------------------------------------- phase B: QLoRA memory


def memory_folder(args) -> Path:
    return Path(args.work) / f"{args.model.replace(':', '-')}-{args.device}"


def save_random_model(args) -> dict:
    """The random shape saved once as safetensors with a config and the tokenizer, for tuneforge's loader."""
    folder = memory_folder(args)
    if (folder / ".complete").exists():
        return {"folder": str(folder), "saved": False}
    if args.model not in SHAPES:
        raise SystemExit("phase B needs a random:... shape (it saves the weights it then loads)")
    started = time.perf_counter()
    plan = device_plan(args, "float16" if args.device == "cuda" else "float32")
    model = random_model(SHAPES[args.model], plan)
    model.save_pretrained(folder, max_shard_size="4GB")
    bench_tokenizer(args).save_pretrained(folder)
    (folder / ".complete").write_text("saved by benchmarks/gpu_perf.py\n")
    return {"folder": str(folder), "saved": True, "save_s": time.perf_counter() - started}


def t4_stand_in() -> str:
    """Cap this process at 14.5 GiB and turn off the SDPA kernels a T4 (sm75) lacks."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(CAP_BYTES / total)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    return f"capped at 14.5 GiB of {total / GIB:.1f}; SDPA flash and cuDNN off"


def qlora_model(args):
    """(plan, tokenizer, model, experiment) through tuneforge's own path: load_model in 4-bit, add_adapters."""
    from tuneforge.config import Experiment, LocalTrain, LoraSection, ModelSection
    from tuneforge.models import load_model, load_tokenizer, plan_device
    from tuneforge.train.common import add_adapters

    folder = str(memory_folder(args))
    cuda = args.device == "cuda"
    section = ModelSection(
        ref=folder, quantization="4bit", dtype="float16" if cuda else "float32", attention="sdpa", device=args.device
    )
    experiment = Experiment(
        name="gpu-perf-qlora",
        seed=args.seed,
        model=section,
        lora=LoraSection(r=16, alpha=32, dropout=0.0, target_modules="all-linear"),
        train=LocalTrain(gradient_checkpointing=True, optimizer="paged_adamw_8bit" if cuda else "adamw"),
    )
    plan = plan_device(section)
    model = load_model(section, plan, folder)
    model.config.use_cache = False
    return plan, load_tokenizer(section, folder), add_adapters(model, experiment, plan), experiment


def packed_mode(plan) -> tuple[str, str]:
    """The collator mode a T4 would train packed rows with: the device-built mask where tuneforge has it."""
    from tuneforge.train.batching import attention_mode

    try:
        from tuneforge.train.attention import packed_attention  # noqa: F401
    except ImportError:
        return attention_mode(plan.attention, True), f"{plan.attention}, CPU block mask (no train.attention yet)"
    return attention_mode("device_mask", True), "device_mask (SDPA, mask built on the device)"


def run_memory(args) -> dict:
    """Phase B: 2 + 8 steps of one packed 2,048-token row, QLoRA 8B, T4 stand-in; peak memory against 16 GB."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig

    from tuneforge.data.packing import build_rows
    from tuneforge.train.batching import Collator, mask_dtype
    from tuneforge.train.common import keep_trainable_fp32
    from tuneforge.train.trainer import ForgeTrainer

    cap = t4_stand_in() if args.device == "cuda" else "no cap (CPU rehearsal: not a memory figure)"
    plan, tokenizer, model, experiment = qlora_model(args)
    _, train, _ = bench_data(args, tokenizer)
    rows = [
        {"input_ids": r.input_ids, "labels": r.labels, "seq_lens": r.seq_lens}
        for r in build_rows(train, 2048, True, args.seed)
    ]
    mode, attention = packed_mode(plan)
    warmup, steps = min(args.warmup, MEMORY_WARMUP), min(args.steps, MEMORY_STEPS)
    common = training_args(args, plan, "qlora-2k", warmup + steps)
    common.update(
        optim="paged_adamw_8bit" if args.device == "cuda" else "adamw_torch",
        gradient_checkpointing=True,  # non-reentrant, as tuneforge trains
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=False,
        fp16=plan.dtype == "float16",
    )
    trainer = ForgeTrainer(
        model=model,
        args=SFTConfig(dataset_kwargs={"skip_prepare_dataset": True}, packing=False, **common),
        train_dataset=Dataset.from_list(rows),
        data_collator=tag_token_counts(Collator(tokenizer.pad_token_id, mode, mask_dtype(plan.device, plan.dtype))),
        processing_class=tokenizer,
    )
    keep_trainable_fp32(trainer.model, plan.dtype)
    timer = StepTimer(warmup, steps, deadline=args.deadline)
    counts = count_trained_tokens(trainer, timer)
    trainer.add_callback(timer)
    trainer.train()
    result = throughput(timer, counts, 0, None)
    result.update(attention=attention, cap=cap, plan=plan.describe(), params_gib=parameter_bytes(trainer.model))
    result.update(memory(timer))
    if args.device == "cuda":
        result["t4_share"] = result["run_peak_reserved_gib"] * GIB / T4_BYTES
        result["fits_cap"] = result["run_peak_reserved_gib"] <= 14.5
        result["peak_below_cap"] = torch.cuda.max_memory_reserved() < CAP_BYTES
    return result


def parameter_bytes(model) -> dict[str, float]:
    """GiB of parameters by dtype: where fp32 copies (embeddings, head, norms) sit beside the 4-bit weights."""
    found: dict[str, float] = {}
    for p in model.parameters():
        key = "nf4" if getattr(p, "quant_type", None) else str(p.dtype).removeprefix("torch.")  # packed in any dtype
        found[key] = found.get(key, 0.0) + p.numel() * p.element_size() / GIB
    return {k: round(v, 3) for k, v in sorted(found.items())}


# --------------------------------------------------------------------------- the parent: jobs, budget, tables


def jobs(args) -> list[str]:
    sides = [s for s in args.sides.split(",") if s]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        raise SystemExit(f"--sides: unknown {', '.join(unknown)}; choose from {', '.join(SIDES)}")
    chosen = (sides if "A" in args.phase else []) + (list(MEMORY_JOBS) if "B" in args.phase else [])
    return sorted(chosen, key=ORDER.index)


class Terminated(Exception):
    """The outer `timeout` asked this process to stop: the running side is killed and the tables still written."""


def _terminate(signum, frame):
    raise Terminated


def run_job(args, argv: list[str], job: str, seconds: float, log: Path) -> dict:
    """One side in its own process group, killed with its children at `seconds`; its result, or why there is none."""
    record = {"phase": "B" if job in MEMORY_JOBS else "A", "side": job, "model": args.model, "limit_s": round(seconds)}
    if job in MEMORY_JOBS and args.device != "cuda":
        print(f"note: {job} on CPU is a rehearsal of the code path: its memory says nothing about a T4", flush=True)
    result_file = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, __file__, *argv, "--child", job, "--result", str(result_file)]
    cmd += ["--deadline", str(time.time() + seconds)]
    started = time.perf_counter()
    rc: int | str = "timed out"
    with open(log, "a") as out:
        out.write(f"\n===== {job} (limit {seconds:.0f} s) =====\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=seconds)
        except (subprocess.TimeoutExpired, Terminated) as stop:
            rc = "terminated by the outer timeout" if isinstance(stop, Terminated) else rc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    record["wall_s"] = round(time.perf_counter() - started, 1)
    text = result_file.read_text() if result_file.exists() else ""
    result_file.unlink(missing_ok=True)
    if rc == 0 and text:
        record.update(json.loads(text))
    else:
        record["error"] = rc if isinstance(rc, str) else f"exit {rc}"
        record["log_tail"] = log_tail(log)
    return record


def log_tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def child(args) -> None:
    """One job in this process; its result (or that it ran out of GPU memory, and at what peak) to --result."""
    import torch

    try:
        if args.child == "qlora-save":
            result = save_random_model(args)
        elif args.child == "qlora-2k":
            result = run_memory(args)
        else:
            result = run_side(args)
    except torch.OutOfMemoryError as exc:
        peak = torch.cuda.max_memory_reserved() / GIB
        result = {"error": f"out of GPU memory (peak reserved {peak:.1f} GiB): {str(exc).splitlines()[0][:160]}"}
    Path(args.result).write_text(json.dumps(result, default=str))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # nothing here comes from the hub: a lookup fails at once instead of waiting on a network the GPU machine lacks
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        child(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log, jsonl = out / "gpu_perf.log", out / "gpu_perf.jsonl"
    signal.signal(signal.SIGTERM, _terminate)
    todo = jobs(args)
    deadline = STARTED + args.budget
    records = []
    try:
        for i, job in enumerate(todo):
            left = deadline - time.time()
            if left < MIN_JOB_S or (records and records[-1].get("error", "").startswith("terminated")):
                record = {"phase": "B" if job in MEMORY_JOBS else "A", "side": job, "error": "skipped: no time left"}
            else:
                seconds = left * WEIGHT[job] / sum(WEIGHT[j] for j in todo[i:])
                print(f"--- {job}: up to {max(seconds, MIN_JOB_S):.0f} s", flush=True)
                record = run_job(args, argv, job, max(seconds, MIN_JOB_S), log)
            record.setdefault("wall_s", 0)
            records.append(record)
            with open(jsonl, "a") as fh:
                fh.write(json.dumps(record, default=str) + "\n")
            print(summary_line(record), flush=True)
    except Terminated:  # between two sides: the tables of what finished
        pass
    table = tables(args, records)
    print("\n" + table)
    (out / "gpu_perf.md").write_text(table + "\n")


def fmt(value, spec: str = ".2f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def failure(r: dict) -> str:
    if r["error"].startswith("skipped"):
        return r["error"]
    return f"{r['error']} after {r['wall_s']} s (see gpu_perf.log)"


def summary_line(r: dict) -> str:
    if "error" in r:
        return f"{r['side']}: {failure(r)}"
    if r["side"] == "qlora-save":
        return f"qlora-save: {'saved' if r['saved'] else 'already saved'} in {r['folder']}"
    return (
        f"{r['side']}: {r['measured_steps']} steps, median {fmt(r['median_step_s'], '.3f')} s, "
        f"{fmt(r['tokens_per_s'], ',.0f')} tok/s, MFU 4N {fmt(r.get('mfu_4n'), '.1%')}"
    )


def tables(args, records: list[dict]) -> str:
    lines = []
    done = [r for r in records if r["phase"] == "A" and "error" not in r]
    if any(r["phase"] == "A" for r in records):
        lines += throughput_table(args, records, done)
    memory_rows = [r for r in records if r["side"] == "qlora-2k"]
    if memory_rows:
        lines += ["", *memory_table(memory_rows[0])]
    elif "B" in args.phase:
        lines += ["", "Phase B: no result (see gpu_perf.log)"]
    return "\n".join(lines)


def throughput_table(args, records: list[dict], done: list[dict]) -> list[str]:
    first = done[0] if done else {}
    name, peak = first.get("device_name"), first.get("peak_tflops")
    where = (
        f"{name}, peak {peak:.0f} TFLOPs dense bf16" if peak else f"{name or args.device}: peak unknown, MFU omitted"
    )
    n = first.get("matmul_params")
    lines = [
        f"Phase A: {args.model} ({first.get('plan', args.device)}), LoRA r16 all-linear, ~64 examples a step; "
        f"{where}; N = {f'{n / 1e9:.3f}e9' if n else 'unknown'} matmul parameters (lm_head in, embeddings out); "
        f"{args.warmup} warm-up steps left out",
        "",
        "| side | micro x GA | tokens/micro | attention (kernel seen) | first step s | steps | median s | p90 s "
        "| tok/s | supervised tok/s | MFU 4N | MFU 6N | peak alloc GiB | peak reserved GiB | held-out loss |",
        "|" + " --- |" * 15,
    ]
    reasons: list[str] = []
    losses = sorted(r["held_out_loss"] for r in done if r.get("held_out_loss") is not None)
    middle = losses[len(losses) // 2] if losses else None
    for r in records:
        if r["phase"] != "A":
            continue
        if "error" in r:
            lines.append(f"| {r['side']} | {failure(r)} |" + " |" * 13)
            continue
        kernels = "; ".join(r.get("kernels") or []) or "not profiled"
        kind, _, why = r["attention"].partition(": ")
        if why:
            reasons.append(f"{r['side']}'s attention, {kind}: {why}")
        loss = r.get("held_out_loss")
        flag = (
            "" if loss is None or middle is None else (" ok" if abs(loss - middle) <= 0.01 * middle else " **off >1%**")
        )
        lines.append(
            f"| {r['side']} | {r['micro']} | {fmt(r['tokens_per_micro'], ',.0f')} | {kind} <br> {kernels} "
            f"| {fmt(r['first_step_s'], '.1f')} | {r['measured_steps']} | {fmt(r['median_step_s'], '.3f')} "
            f"| {fmt(r['p90_step_s'], '.3f')} | {fmt(r['tokens_per_s'], ',.0f')} "
            f"| {fmt(r['supervised_tokens_per_s'], ',.0f')} | {fmt(r.get('mfu_4n'), '.1%')} "
            f"| {fmt(r.get('mfu_6n'), '.1%')} | {fmt(r.get('peak_allocated_gib'))} "
            f"| {fmt(r.get('peak_reserved_gib'))} | {fmt(loss, '.4f')}{flag} |"
        )
    lines += ["", "held-out loss: 'ok' within 1% of the sides' median (random weights: a sanity check, not quality)"]
    return lines + reasons


def memory_table(r: dict) -> list[str]:
    if "error" in r:
        return [f"Phase B (QLoRA 8B, 2k): {failure(r)}"]
    if "run_peak_reserved_gib" not in r:
        return [
            f"Phase B (CPU rehearsal, {r['plan']}): {r['measured_steps']} steps ran, median "
            f"{fmt(r['median_step_s'], '.2f')} s, peak RSS {fmt(r.get('peak_rss_gib'))} GiB; parameters by dtype "
            f"{r['params_gib']} GiB (not a memory figure: needs CUDA)"
        ]
    return [
        f"Phase B: QLoRA {r['model']} at 2,048 tokens, {r['plan']}, {r['attention']}; {r['cap']}",
        "",
        "| steps | median s | peak alloc GiB | peak reserved GiB | whole run alloc / reserved GiB | of a T4's 16 GB "
        "| within 14.5 GiB | parameters GiB by dtype |",
        "|" + " --- |" * 8,
        f"| {r['measured_steps']} | {fmt(r['median_step_s'], '.2f')} | {fmt(r['peak_allocated_gib'])} "
        f"| {fmt(r['peak_reserved_gib'])} | {fmt(r['run_peak_allocated_gib'])} / {fmt(r['run_peak_reserved_gib'])} "
        f"| {fmt(r['t4_share'], '.0%')} | {'yes' if r['fits_cap'] else 'NO'} | {r['params_gib']} |",
    ]


if __name__ == "__main__":
    main()
