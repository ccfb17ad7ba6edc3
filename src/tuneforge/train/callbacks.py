"""Trainer callbacks: metrics.jsonl, the non-finite guard, complete-checkpoint markers, disk check; a sweep's median
stopping rule and a fine-tuning job's progress (serve/finetuning.py)."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Protocol

import torch
from transformers import TrainerCallback

from tuneforge.atomic import atomic_write_json, atomic_write_jsonl
from tuneforge.errors import TuneforgeError

MARKER = "tuneforge_complete.json"
# GRPO (TRL's names): the mean reward, its spread, the share of groups that teach nothing, the KL to the reference,
# the completions' length
REINFORCEMENT_METRICS = {
    "reward": "reward",
    "reward_std": "reward_std",  # over all the step's completions, not within a group
    "frac_reward_zero_std": "groups_without_signal",  # groups whose completions all scored alike: no gradient
    "kl": "kl",
    "completions/mean_length": "completion_length",
}


def reinforcement_metrics(logs: dict[str, Any], training_line: bool) -> dict[str, float]:
    """GRPO's metrics as metrics.jsonl names them: REINFORCEMENT_METRICS, and `reward_<grader>` per reward function
    (TRL's rewards/<name>/mean); `eval_` prefixed at an evaluation."""
    found = {}
    for prefix in ("", "eval_"):
        if not prefix and not training_line:
            continue
        for theirs, ours in REINFORCEMENT_METRICS.items():
            if f"{prefix}{theirs}" in logs:
                found[f"{prefix}{ours}"] = float(logs[f"{prefix}{theirs}"])
        for key, value in logs.items():
            name = key.removeprefix(f"{prefix}rewards/")
            if key.startswith(f"{prefix}rewards/") and name.endswith("/mean") and name.count("/") == 1:
                found[f"{prefix}reward_{name.removesuffix('/mean')}"] = float(value)
    return found


PREFERENCE_METRICS = {
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "preference_accuracy",
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "kl": "kl",  # KTO's estimate of the policy's KL from its reference
}


class NonFiniteError(TuneforgeError):
    pass


def distributed():
    """torch.distributed when this is one of several processes of a run, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def sum_over_ranks(value: int) -> int:
    """The total of a per-process count over every process of a distributed run (the count itself when alone).
    Every process must call it at the same point."""
    dist = distributed()
    if dist is None:
        return value
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(total)
    return int(total.item())


def wait_for_every_rank() -> None:
    dist = distributed()
    if dist is not None:
        dist.barrier()


class MetricsLog(TrainerCallback):
    """One JSON line per logged step: loss, eval loss, lr, grad norm, supervised tokens and tokens/s (with DPO also
    the reward margin and preference accuracy).

    Also stops the run on a NaN or inf loss, naming the step. Logging happens every
    step, before that step's checkpoint is written, so a non-finite loss is caught
    before anything is saved.
    """

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        # the trainer counts the supervised tokens; it is built after its callbacks, so the recipe sets it here
        self.trainer = None
        self.records: list[dict[str, Any]] = []
        if resume_step and path.exists():  # keep what the resumed checkpoint had seen
            self.records = [
                r for r in map(json.loads, path.read_text().splitlines()) if r.get("step", 0) <= resume_step
            ]
        self._last_time = time.perf_counter()
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._last_time = time.perf_counter()
        self._last_tokens = sum_over_ranks(self.trainer.supervised_tokens)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        record: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            loss = float(logs["loss"])
            if not math.isfinite(loss):
                raise NonFiniteError(
                    f"the loss became {loss} at step {state.global_step}; "
                    "training stopped before saving anything from that step. "
                    "Lower train.lr, keep train.max_grad_norm on, or look for broken examples"
                )
            tokens = sum_over_ranks(self.trainer.supervised_tokens)  # every process's share of the batch
            now = time.perf_counter()
            record.update(
                loss=loss,
                lr=logs.get("learning_rate"),
                grad_norm=logs.get("grad_norm"),
                supervised_tokens=tokens,
                tokens_per_s=round((tokens - self._last_tokens) / max(now - self._last_time, 1e-9), 1),
            )
            if "mean_token_accuracy" in logs:
                record["token_accuracy"] = logs["mean_token_accuracy"]
            if "answer_loss" in logs and "prompt_loss" in logs:  # train.prompt_loss_weight: the objective adds the two
                record.update(loss=float(logs["answer_loss"]), prompt_loss=float(logs["prompt_loss"]))
            self._last_time, self._last_tokens = now, tokens
        for key in ("eval_loss", "eval_accuracy", "eval_macro_f1"):
            if key in logs:
                record[key] = float(logs[key])
        for prefix in ("", "eval_"):  # DPO (TRL's names): the reward margin and how often the preferred answer wins
            for theirs, ours in PREFERENCE_METRICS.items():
                if f"{prefix}{theirs}" in logs and (prefix or "loss" in logs):
                    record[f"{prefix}{ours}"] = float(logs[f"{prefix}{theirs}"])
        record.update(reinforcement_metrics(logs, "loss" in logs))
        if len(record) > 2:
            self.records.append(record)
            if state.is_world_process_zero:  # one writer: the main process
                atomic_write_jsonl(self.path, self.records)


class FiniteWeights(TrainerCallback):
    """Refuse to checkpoint weights that hold NaN or inf."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save or state.global_step == state.max_steps:
            bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
            if bad:
                raise NonFiniteError(
                    f"non-finite weights after step {state.global_step} (e.g. {bad[0]}); nothing was saved"
                )


class CheckpointMarker(TrainerCallback):
    """A checkpoint counts only once its marker exists; the marker also records what the run depends on."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any], bytes_needed: int):
        self.folder = folder
        self.fingerprint = fingerprint
        self.bytes_needed = bytes_needed

    def on_train_begin(self, args, state, control, **kwargs):
        self.folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.folder).free
        if free < self.bytes_needed:
            raise TuneforgeError(
                f"only {free / 2**30:.1f} GiB free under {self.folder}; "
                f"checkpoints need about {self.bytes_needed / 2**30:.1f} GiB"
            )

    def on_save(self, args, state, control, **kwargs):
        # every process writes its part of a checkpoint (the main one the weights and optimizer, each its RNG
        # state): the marker that makes it count comes after all of them, from the main process alone
        wait_for_every_rank()
        checkpoint = self.folder / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            atomic_write_json(checkpoint / MARKER, {**self.fingerprint, "step": state.global_step})


def latest_complete_checkpoint(folder: Path) -> Path | None:
    candidates = []
    for path in folder.glob("checkpoint-*"):
        if (path / MARKER).exists() and path.name.split("-")[-1].isdigit():
            candidates.append((int(path.name.split("-")[-1]), path))
    return max(candidates)[1] if candidates else None


def check_resumable(checkpoint: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse a resume whose data or batch settings differ from the checkpoint's."""
    saved = json.loads((checkpoint / MARKER).read_text())
    changed = [
        f"{key}: was {saved.get(key)!r}, now {value!r}" for key, value in fingerprint.items() if saved.get(key) != value
    ]
    if changed:
        raise TuneforgeError(
            f"cannot resume from {checkpoint.name}: "
            + "; ".join(changed)
            + ". Start a fresh run (without --resume) or restore the old settings"
        )


class MedianStop(TrainerCallback):
    """The median stopping rule of a sweep's points: stop once this point's best valid metric so far is behind the
    median of the finished points' best by the same epoch, by more than `margin` (relative for a loss).

    `finished` gives the finished points' metrics.jsonl records; it is read at each evaluation, since points running
    beside this one finish meanwhile."""

    def __init__(self, finished: Callable[[], list[list[dict]]], labelled: bool, margin: float):
        self.finished, self.margin = finished, margin
        self.key, self.higher = ("eval_accuracy", True) if labelled else ("eval_loss", False)
        self.mine: list[tuple[float, float]] = []
        self.reason: str | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(self.key)
        epoch = state.epoch or 0.0
        if value is None or epoch <= 0:
            return  # the base model's evaluation before the first step
        self.mine.append((epoch, float(value)))
        if len(self.mine) < 2:
            return
        peers = [b for b in (_best_until(r, self.key, self.higher, epoch) for r in self.finished()) if b is not None]
        if len(peers) < 2:
            return
        peers.sort()
        median = (peers[(len(peers) - 1) // 2] + peers[len(peers) // 2]) / 2
        best = max(v for _, v in self.mine) if self.higher else min(v for _, v in self.mine)
        behind = (median - best > self.margin) if self.higher else (best - median > self.margin * abs(median))
        if behind:
            name = self.key.removeprefix("eval_")
            self.reason = (
                f"valid {name} {best:.4f} at epoch {epoch:.2f} is behind the median {median:.4f} of "
                f"{len(peers)} finished points by more than {self.margin:g}{'' if self.higher else ' (relative)'}"
            )
            print(f"early stop: {self.reason}", flush=True)
            control.should_training_stop = True


def _best_until(records: list[dict], key: str, higher: bool, epoch: float) -> float | None:
    """A finished point's best value up to this epoch; None when it never got this far (it stopped early)."""
    if not records or max(r.get("epoch", 0.0) for r in records) < epoch - 1e-6:
        return None
    values = [r[key] for r in records if key in r and 0 < r.get("epoch", 0.0) <= epoch + 1e-6]
    if not values:
        return None
    return max(values) if higher else min(values)


class TrainingJob(Protocol):
    """One job of the fine-tuning API (serve/finetuning.py), as JobProgress sees it. Its stops raise the API's own
    exceptions, which the job's worker catches."""

    def request(self) -> str | None:
        """What the API asked of the job and it has not done yet: "cancel", "pause" or None."""

    def stop_cancelled(self) -> NoReturn:
        """Stop the training now: the job was cancelled."""

    def stop_paused(self, step: int) -> NoReturn:
        """Stop the training, its checkpoint at `step` saved: the job was paused."""

    def estimate(self, finish: int) -> None:
        """Record when the job should finish (Unix time)."""

    def metrics(self, message: str, data: dict[str, Any]) -> None:
        """Add a metrics event."""

    def checkpoint(self, step: int, folder: Path, metrics: dict[str, float]) -> None:
        """Publish the trainer's complete checkpoint of `step` as an API checkpoint."""


class JobProgress(TrainerCallback):
    """Training logs become a job's `metrics` events and each checkpoint an API checkpoint; cancel stops at the next
    step, pause at the checkpoint it asks for there; the estimated finish follows the mean step time."""

    def __init__(self, job: TrainingJob, checkpoints: Path):
        self.job, self.checkpoints = job, checkpoints
        self.pausing = False
        self.latest: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.monotonic(), state.global_step

    def on_step_begin(self, args, state, control, **kwargs):
        if self.job.request() == "cancel":
            self.job.stop_cancelled()

    def on_step_end(self, args, state, control, **kwargs):
        done = state.global_step - self.first_step
        if done > 0 and state.max_steps:  # the mean step time so far, times the steps left
            left = (time.monotonic() - self.started) / done * (state.max_steps - state.global_step)
            self.job.estimate(int(time.time() + left))
        if self.job.request() == "pause" and state.global_step < state.max_steps:
            control.should_save = True  # the checkpoint that resume continues from
            self.pausing = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        data: dict[str, Any] = {"step": state.global_step, "total_steps": state.max_steps}
        if "loss" in logs:
            data["train_loss"] = float(logs["loss"])
            if "mean_token_accuracy" in logs:
                data["train_mean_token_accuracy"] = float(logs["mean_token_accuracy"])
        if "eval_loss" in logs:
            data["valid_loss"] = float(logs["eval_loss"])
            if "eval_mean_token_accuracy" in logs:
                data["valid_mean_token_accuracy"] = float(logs["eval_mean_token_accuracy"])
        for name, value in reinforcement_metrics(logs, "loss" in logs).items():  # GRPO: rewards, KL, lengths
            name = f"valid_{name.removeprefix('eval_')}" if name.startswith("eval_") else f"train_{name}"
            data[name + ("_mean" if name.endswith("_reward") else "")] = value
        if len(data) > 2:
            self.latest.update({k: v for k, v in data.items() if k not in ("step", "total_steps")})
            shown = [k for k in data if k.endswith(("loss", "reward_mean"))]
            losses = ", ".join(f"{k.replace('_', ' ')}={data[k]:.4f}" for k in shown)
            # before the first step: the base model's evaluation
            where = f"Step {state.global_step}/{state.max_steps}" if state.max_steps else "Before training"
            self.job.metrics(f"{where}: {losses}", data)

    def on_save(self, args, state, control, **kwargs):
        # after the marker callback: the trainer's checkpoint is complete by now
        source = self.checkpoints / f"checkpoint-{state.global_step}"
        if source.is_dir():
            kept = ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy")
            kept += ("train_reward_mean", "valid_reward_mean")
            metrics = {k: self.latest[k] for k in kept if k in self.latest}
            if "valid_loss" in metrics:
                metrics["full_valid_loss"] = metrics["valid_loss"]
            self.job.checkpoint(state.global_step, source, metrics)
        if self.pausing:
            self.job.stop_paused(state.global_step)
