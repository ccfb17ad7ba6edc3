"""How the training benchmarks time steps, count tokens and turn them into MFU, shared so their figures compare.

- Warm-up steps are left out: the first steps pay for cuBLAS start-up, lazy kernel loading, allocator growth and
  compilation, which say nothing about the steady step.
- Tokens are counted in `training_step`, on the batches actually trained. accelerate collates one batch ahead, so a
  count in the collator sees one batch more than was trained (5 collations for 4 steps, +25%).
- MFU is given on two bases: 4·N FLOPs per token (forward plus input gradients: LoRA computes no base-weight
  gradients) and 6·N (the usual public basis), N the 2-D matmul weights without embeddings, lm_head included.
- The peak is looked up by the device's exact name: an H100 PCIe is not an H100 SXM.
"""

from __future__ import annotations

import re
import statistics
import time

from transformers import TrainerCallback

IGNORE = -100
# the keys a tagged collator adds to a batch; training_step takes them out again
REAL_TOKENS, SUPERVISED_TOKENS = "bench_real_tokens", "bench_supervised_tokens"

# Dense bf16/fp16 tensor-core peaks in TFLOPs, matched against torch.cuda.get_device_name() in this order.
PEAKS: list[tuple[str, float]] = [
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100.*(SXM|HBM3)", 989.0),  # the SXM5 part names itself "NVIDIA H100 80GB HBM3"
    (r"H200.*NVL", 835.0),
    (r"\bH200\b", 989.0),
    (r"\bGH200\b", 989.0),
    (r"\bA100\b", 312.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),  # not the A10G (AWS), whose clocks are lower
    (r"\bT4\b", 65.0),
]


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the device so named, or None when the name is not one we know exactly."""
    for pattern, peak in PEAKS:
        if re.search(pattern, device_name):
            return peak
    return None


def synchronize() -> None:
    """Wait for the GPU's queued work, so a timestamp means the work before it is done (no-op on CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Synchronised timestamps around every optimizer step after `warmup` steps, for at most `steps` of them.

    The window opens at the end of the last warm-up step rather than at the next `on_step_begin`: the Trainer
    collates a step's micro-batches (`get_batch_samples`) before it calls `on_step_begin`, and that time belongs to
    the step. Each measured step is the time from the previous step's end to its own end, collation and logging
    included. With a `deadline` (time.time()), measuring stops early, after at least `min_steps`, when one more step
    and the work after training (`tail_s`) would pass it, so a slow side still reports. After the measured steps,
    `extra_steps` more run (a profiled one, say) and training stops."""

    def __init__(self, warmup: int, steps: int, deadline: float | None = None, min_steps: int = 3, tail_s: float = 20):
        self.warmup, self.steps, self.deadline, self.min_steps, self.tail_s = warmup, steps, deadline, min_steps, tail_s
        self.extra_steps = 0
        self.measuring = False  # from the end of the last warm-up step to the end of the last measured step
        self.step_seconds: list[float] = []
        self.first_step_seconds: float | None = None
        self.stop_at: int | None = None  # the global step after which training stops
        self.warmup_peak_bytes: tuple[int, int] | None = None  # (allocated, reserved) over the warm-up, on CUDA
        self._begin = self._last = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        synchronize()
        self._begin = time.perf_counter()  # the first step's time includes the dataloader's start and first collation
        if self.warmup == 0:
            self._open_window()

    def on_step_end(self, args, state, control, **kwargs):
        synchronize()
        now = time.perf_counter()
        step = state.global_step
        if step == 1:
            self.first_step_seconds = now - self._begin
        if self.measuring:
            self.step_seconds.append(now - self._last)
            self._last = now
            if len(self.step_seconds) >= self.steps or (len(self.step_seconds) >= self.min_steps and self._late()):
                self.measuring = False
                self.stop_at = step + self.extra_steps
        elif step == self.warmup:
            self._open_window()
        if self.stop_at is not None and step >= self.stop_at:
            control.should_training_stop = True
        return control

    def _late(self) -> bool:
        if self.deadline is None:
            return False
        return time.time() + max(self.step_seconds) * (1 + self.extra_steps) + self.tail_s > self.deadline

    def _open_window(self) -> None:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.warmup_peak_bytes = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()
        self.measuring = True
        self._last = time.perf_counter()

    @property
    def measured_seconds(self) -> float:
        return sum(self.step_seconds)


def tag_token_counts(collate):
    """The collator, with each batch carrying how many of its tokens are real (not padding) and supervised, counted
    on the CPU where the batch is made: read on the GPU, they would cost a sync per micro-batch. Only tags: the
    counts are taken in `count_trained_tokens`, when the batch is trained."""

    def tagged(features):
        batch = collate(features)
        batch[REAL_TOKENS] = sum(len(f["input_ids"]) for f in features)
        batch[SUPERVISED_TOKENS] = int((batch["labels"][:, 1:] != IGNORE).sum())
        return batch

    return tagged


class TokenCount:
    """Tokens of the micro-batches trained while the timer measured: real, as the model saw them (padding
    included), and supervised (a next-token target)."""

    def __init__(self):
        self.batches = self.real = self.padded = self.supervised = 0


def count_trained_tokens(trainer, timer: StepTimer) -> TokenCount:
    """Wrap the trainer's `training_step` so it counts the batches it trains while `timer` is measuring."""
    counts = TokenCount()
    train_one = trainer.training_step

    def training_step(model, inputs, num_items_in_batch=None):
        real, supervised = inputs.pop(REAL_TOKENS, None), inputs.pop(SUPERVISED_TOKENS, None)
        if timer.measuring:
            counts.batches += 1
            ids = inputs["input_ids"]
            counts.padded += ids.numel()
            if real is None:  # an untagged collator: read from the batch, at the price of a sync on a GPU
                mask = inputs.get("attention_mask")
                real = int(mask.sum()) if mask is not None and mask.dim() == 2 else ids.numel()
                supervised = int((inputs["labels"][:, 1:] != IGNORE).sum())
            counts.real += real
            counts.supervised += supervised
        return train_one(model, inputs, num_items_in_batch)

    trainer.training_step = training_step
    return counts


def matmul_params(model) -> int:
    """N: the 2-D weights a token meets in matmuls, lm_head included, embeddings and LoRA factors not (a 4-bit
    weight is stored packed two to a byte, so its element count is doubled)."""
    return sum(
        p.numel() * (2 if getattr(p, "quant_type", None) else 1)
        for name, p in model.named_parameters()
        if p.dim() == 2 and "lora_" not in name and "embed" not in name
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def throughput(timer: StepTimer, counts: TokenCount, n_params: int, device_name: str | None) -> dict:
    """Step times, tokens/s and MFU (4·N and 6·N) of the measured window; MFU is None for an unknown device."""
    seconds = timer.measured_seconds
    out = {
        "first_step_s": timer.first_step_seconds,
        "measured_steps": len(timer.step_seconds),
        "measured_s": seconds,
        "median_step_s": statistics.median(timer.step_seconds) if timer.step_seconds else None,
        "p90_step_s": percentile(timer.step_seconds, 0.9) if timer.step_seconds else None,
        "batches": counts.batches,
        "tokens_per_s": counts.real / seconds if seconds else None,
        "supervised_tokens_per_s": counts.supervised / seconds if seconds else None,
        "padding_share": 1 - counts.real / counts.padded if counts.padded else None,
        "matmul_params": n_params,
        "device_name": device_name,
        "peak_tflops": peak_tflops(device_name) if device_name else None,
    }
    for basis in (4, 6):
        ok = out["peak_tflops"] and out["tokens_per_s"]
        out[f"mfu_{basis}n"] = out["tokens_per_s"] * basis * n_params / (out["peak_tflops"] * 1e12) if ok else None
    return out
