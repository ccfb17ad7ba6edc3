"""The training plan: every `auto` knob of `train` chosen from the prepared data, each with its reason.

On small data, what decides whether fine-tuning learns is the number of optimizer updates, not the number of
passes. So the plan keeps the passes a dataset needs and makes the batch small enough to reach a minimum number of
steps; a large dataset gets a larger batch and fewer passes instead. Answers of a label's length also need a higher
rate, as each example teaches about one token. An explicit value in the experiment file always wins, and a plan
that gives too few steps to learn is named with the keys that change it. The measurements behind each constant
below are in docs/defaults.md.

prepare computes the plan for its report and train computes it again from the same prepared data, so the two
always agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from tuneforge.data.packing import pack

if TYPE_CHECKING:
    from tuneforge.config import LocalTrain

# Examples whose answers are this short (a label, a number, a yes/no) carry about one
# informative token each, so the number of updates is what they learn from.
SHORT_ANSWER_TOKENS = 16
MIN_STEPS_SHORT = 200  # short answers: fewer steps scored lower on real reviews, more scored no higher
MIN_STEPS_LONG = 60  # long answers: the support quickstart's eval loss flattens within 81 one-row steps
WARN_FRACTION = 0.5  # an explicit plan under half the minimum is warned about (26 and 50 steps both lost to TF-IDF)
TARGET_EPOCHS = 3.0  # OpenAI's auto too; on real reviews the third pass still raised held-out accuracy
MAX_EPOCHS = 10.0  # a tiny file is repeated to reach the minimum steps, but not without end
MAX_EXAMPLE_PASSES = 25_000  # past this many example passes, fewer epochs (OpenAI's auto caps there too)
MAX_BATCH = 32  # LoRA learns well at 8-32; larger batches only cut the number of updates
MICRO_BATCH_TOKENS = 8_192  # fits a 16 GB GPU with an 8B 4-bit base, and is a CPU's cache-friendly size
EVALS_PER_RUN = 5  # enough points to see a curve and pick the best checkpoint; each costs a pass over the valid split
LORA_LR = 2e-4  # long answers: hundreds of supervised tokens a step (the support quickstart's eval loss falls steadily)
SHORT_ANSWER_LORA_LR = 1e-3  # a label's length: 2e-4 underfit the reviews in 2 epochs, 1e-3 fit them
FULL_FINETUNE_LR = 2e-5  # every weight moves: ten times lower than LoRA's adapters
DPO_LORA_LR = 5e-5  # preference tuning starts from a policy that already answers well: a quarter of SFT's rate
GRPO_LORA_LR = DPO_LORA_LR  # on-policy updates from an SFT adapter, anchored by the KL term (not yet swept)
GRPO_PROMPTS_PER_STEP = 8  # auto batch of GRPO: prompts (groups of completions) per optimizer step
KTO_LORA_LR = DPO_LORA_LR  # the same kind of update against the same reference (TRL's defaults: 1e-6 full, both)
KTO_MIN_MICRO_BATCH = 2  # KTO estimates its KL term from each prompt paired with another answer of its micro-batch


@dataclass
class TrainingPlan:
    examples: int
    rows: int  # what one epoch iterates: examples, or packed rows
    packing: bool
    epochs: float
    batch_size: int  # rows per optimizer step, all processes together
    micro_batch_size: int
    grad_accum: int
    steps: int
    lr: float
    prompt_loss_weight: float
    eval_every: int
    save_every: int
    min_steps: int
    reasons: dict[str, str] = field(default_factory=dict)  # knob -> "set in the file" or why auto chose it
    warnings: list[str] = field(default_factory=list)
    evaluates: bool = True  # False without valid data: checkpoints (to resume from) but no evaluation
    completions: int = 0  # GRPO: completions sampled per prompt (a batch counts prompts); 0 for the other methods

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> list[str]:
        """One line per knob, as printed at the start of training and in prepare's report."""
        unit = "prompts" if self.completions else "packed rows" if self.packing else "examples"
        if self.completions:  # a micro-batch is one prompt's group of completions
            batch = (
                f"batch_size {self.batch_size} prompts per step, {self.completions} completions each "
                f"(one prompt's group a micro-batch, x grad_accum {self.grad_accum})"
            )
        else:
            batch = (
                f"batch_size {self.batch_size} {unit} per step (micro_batch_size {self.micro_batch_size} "
                f"x grad_accum {self.grad_accum})"
            )
        checkpoints = (
            f"eval_every {self.eval_every}, save_every {self.save_every}"
            if self.evaluates
            else f"save_every {self.save_every}, no evaluation"
        )
        return [
            f"packing {'on' if self.packing else 'off'}: {self.reasons['packing']}",
            f"epochs {self.epochs:g}: {self.reasons['epochs']}",
            f"{batch}: {self.reasons['batch_size']}",
            f"lr {self.lr:g}: {self.reasons['lr']}",
            f"prompt_loss_weight {self.prompt_loss_weight:g}: {self.reasons['prompt_loss_weight']}",
            f"{checkpoints}: {self.reasons['eval_every']}",
            f"= {self.steps} optimizer steps over {self.rows} {unit} a pass",
        ]


def _pow2_floor(value: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(value, 1)))))


SET_IN_FILE = "set in the experiment file"


def plan_training(
    train: LocalTrain,
    lengths: list[int],
    trainable: list[int],
    labelled: bool,
    max_length: int,
    seed: int,
    world_size: int = 1,
    has_valid: bool = True,
) -> TrainingPlan:
    """Resolve `train`'s auto values for examples of these token lengths and supervised-token counts (and valid
    data to evaluate on, or none)."""
    n = max(len(lengths), 1)
    median_trainable = sorted(trainable)[len(trainable) // 2] if trainable else 0
    reasons: dict[str, str] = {}
    packing, reasons["packing"] = _packing(train, lengths, labelled, max_length)
    rows = max(1, len(pack(lengths, max_length, seed))) if packing and lengths else n

    short = median_trainable <= SHORT_ANSWER_TOKENS
    min_steps = MIN_STEPS_SHORT if short else MIN_STEPS_LONG
    answers = f"{'short' if short else 'long'} answers (median {median_trainable} supervised tokens)"

    epochs, reasons["epochs"] = _epochs(train, n, rows, min_steps)
    batch, reasons["batch_size"] = _batch(train, rows, epochs, min_steps, answers, world_size)
    longest = max_length if packing else max(lengths, default=1)
    micro, accum = _micro_batches(train, batch, longest, world_size)
    batch = micro * accum * world_size  # what really runs
    steps_per_epoch = max(1, math.ceil(math.ceil(rows / (micro * world_size)) / accum))
    steps = train.max_steps or max(1, math.ceil(steps_per_epoch * epochs))

    lr, reasons["lr"] = _lr(train, short, answers)
    prompt_loss, reasons["prompt_loss_weight"] = _prompt_loss(train)
    (eval_every, save_every), reasons["eval_every"], unused = _evaluations(train, steps, has_valid)
    warnings = _warnings(steps, min_steps, answers) + unused
    return TrainingPlan(
        examples=n,
        rows=rows,
        packing=packing,
        epochs=epochs,
        batch_size=batch,
        micro_batch_size=micro,
        grad_accum=accum,
        steps=steps,
        lr=lr,
        prompt_loss_weight=prompt_loss,
        eval_every=eval_every,
        save_every=save_every,
        min_steps=min_steps,
        reasons=reasons,
        warnings=warnings,
        evaluates=has_valid,
    )


def _packing(train: LocalTrain, lengths: list[int], labelled: bool, max_length: int) -> tuple[bool, str]:
    median_length = sorted(lengths)[len(lengths) // 2] if lengths else 0
    if getattr(train, "method", "sft") == "dpo":
        return False, "preference pairs: each row is one pair, preferred and non-preferred side by side"
    if getattr(train, "method", "sft") == "kto":
        return False, "rated answers: each row is one answer, and its micro-batch's other answers give the KL term"
    if train.packing != "auto":
        return bool(train.packing), SET_IN_FILE
    if labelled:
        return False, "labelled data: one example per row, so each step's batch counts examples"
    if median_length > max_length / 2:
        return False, f"the median example ({median_length} tokens) fills over half of max_length {max_length}"
    return True, f"short examples (median {median_length} tokens) share rows of {max_length}"


def _epochs(train: LocalTrain, n: int, rows: int, min_steps: int) -> tuple[float, str]:
    if train.epochs != "auto":
        return float(train.epochs), SET_IN_FILE
    if n * TARGET_EPOCHS > MAX_EXAMPLE_PASSES:
        epochs = max(1.0, round(MAX_EXAMPLE_PASSES / n, 2))
        return epochs, f"{n} examples: capped at about {MAX_EXAMPLE_PASSES:,} example passes"
    if rows * TARGET_EPOCHS < min_steps:
        epochs = min(MAX_EPOCHS, float(math.ceil(min_steps / rows)))
        repeated = f"repeated to reach {min_steps} steps at batch 1 (at most {MAX_EPOCHS:g} epochs)"
        return epochs, f"only {rows} rows: {repeated}"
    return TARGET_EPOCHS, f"{TARGET_EPOCHS:g} passes (the default for {n} examples)"


def _batch(
    train: LocalTrain, rows: int, epochs: float, min_steps: int, answers: str, world_size: int
) -> tuple[int, str]:
    """Rows per optimizer step over all processes, before the micro-batches round it; at least one per process."""
    micro_explicit = train.micro_batch_size != "auto"
    if train.batch_size != "auto":
        batch, reason = int(train.batch_size), SET_IN_FILE
    elif micro_explicit and train.grad_accum != "auto":
        batch = int(train.micro_batch_size) * int(train.grad_accum) * world_size
        reason = "micro_batch_size x grad_accum, both set in the file"
    elif micro_explicit and int(train.micro_batch_size) * world_size >= _auto_batch(rows, epochs, min_steps):
        batch, reason = int(train.micro_batch_size) * world_size, "one micro-batch of the size set in the file"
    else:
        batch = _auto_batch(rows, epochs, min_steps)
        reason = f"{answers}: the largest power of two up to {MAX_BATCH} that still gives at least {min_steps} steps"
    return max(batch, world_size), reason


def _micro_batches(train: LocalTrain, batch: int, longest: int, world_size: int) -> tuple[int, int]:
    """(micro_batch_size, grad_accum) for the batch, with micro-batches of `longest`-token rows."""
    accum_explicit = train.grad_accum != "auto"
    if train.micro_batch_size != "auto":
        micro = int(train.micro_batch_size)
    elif accum_explicit:
        micro = max(1, max(1, batch // world_size) // int(train.grad_accum))
    else:
        per_process = max(1, batch // world_size)
        fits = _pow2_floor(MICRO_BATCH_TOKENS / max(longest, 1))
        # the largest micro-batch that fits and divides the batch, so the batch that runs is the one planned
        micro = max(d for d in range(1, min(per_process, fits) + 1) if per_process % d == 0)
    if getattr(train, "method", "sft") == "kto" and train.micro_batch_size == "auto":
        micro = max(micro, KTO_MIN_MICRO_BATCH)
    accum = int(train.grad_accum) if accum_explicit else max(1, math.ceil(batch / (micro * world_size)))
    return micro, accum


def _lr(train: LocalTrain, short: bool, answers: str) -> tuple[float, str]:
    if train.lr != "auto":
        lr, reason = float(train.lr), SET_IN_FILE
    else:
        lr = auto_lr(train, short)
        if train.full_finetune:
            reason = "full fine-tuning moves every weight: ten times below LoRA's rate"
        elif getattr(train, "method", "sft") == "dpo":
            reason = "DPO on LoRA: a quarter of SFT's rate, as it starts from a policy that already answers"
        elif getattr(train, "method", "sft") == "kto":
            reason = "KTO on LoRA: DPO's rate, the same kind of update against the same reference"
        else:
            reason = f"LoRA's rate for {answers}, with warmup, cosine decay and clipping"
    multiplier = getattr(train, "lr_multiplier", 1.0)
    if multiplier != 1.0:
        lr *= multiplier
        reason += f", times lr_multiplier {multiplier:g}"
    return lr, reason


def _prompt_loss(train: LocalTrain) -> tuple[float, str]:
    weight = float(getattr(train, "prompt_loss_weight", 0.0))
    if weight:
        return weight, SET_IN_FILE
    return (
        weight,
        "off: the answer's tokens alone are learnt (a loss on the prompt as well measured no better, and slower)",
    )


def plan_grpo(t: LocalTrain, prompts: int, processes: int = 1, has_valid: bool = True) -> TrainingPlan:
    """GRPO's plan: prompts per step, epochs and the rate; a micro-batch is one prompt's group of completions."""
    reasons: dict[str, str] = {"packing": "completions are sampled, one per row"}
    epochs = 1.0 if t.epochs == "auto" else float(t.epochs)
    reasons["epochs"] = SET_IN_FILE if t.epochs != "auto" else "one pass: each prompt is sampled afresh every time"
    if t.batch_size == "auto":
        batch = max(1, min(GRPO_PROMPTS_PER_STEP, prompts))
        reasons["batch_size"] = f"{batch} prompts a step (up to {GRPO_PROMPTS_PER_STEP}), each a group of completions"
    else:
        batch, reasons["batch_size"] = int(t.batch_size), SET_IN_FILE
    accum = max(1, math.ceil(batch / processes))
    steps = t.max_steps or max(1, math.ceil(prompts / (accum * processes) * epochs))
    lr = GRPO_LORA_LR if t.lr == "auto" else float(t.lr)
    reasons["lr"] = SET_IN_FILE if t.lr != "auto" else "GRPO on LoRA: DPO's rate, anchored by the KL term"
    lr *= t.lr_multiplier
    reasons["prompt_loss_weight"] = "not used by GRPO"
    (eval_every, save_every), reasons["eval_every"], unused = _evaluations(t, steps, has_valid)
    return TrainingPlan(
        examples=prompts,
        rows=prompts,
        packing=False,
        epochs=epochs,
        batch_size=accum * processes,
        micro_batch_size=t.grpo.generations,
        grad_accum=accum,
        steps=steps,
        lr=lr,
        prompt_loss_weight=0.0,
        eval_every=eval_every,
        save_every=save_every,
        min_steps=0,
        reasons=reasons,
        warnings=unused,
        evaluates=has_valid,
        completions=t.grpo.generations,
    )


def _evaluations(train: LocalTrain, steps: int, has_valid: bool) -> tuple[tuple[int, int], str, list[str]]:
    """(eval_every, save_every): a checkpoint at each evaluation, so the best one can be kept; its reason; and a
    warning for each evaluation setting the file gives that no valid data lets the run honour."""
    eval_every = int(train.eval_every) if train.eval_every != "auto" else max(1, math.ceil(steps / EVALS_PER_RUN))
    save_every = int(train.save_every) if train.save_every != "auto" else eval_every
    if not has_valid:
        unused = [
            f"train.{key} is set but there is no valid data to evaluate on: set data.valid or data.valid_split, "
            f"or take train.{key} out"
            for key in ("eval_every", "keep_best")
            if key in train.model_fields_set and getattr(train, key) not in ("auto", False)
        ]
        if train.save_every != "auto":
            return (eval_every, save_every), SET_IN_FILE, unused
        count = math.ceil(steps / save_every)
        reason = f"no valid data; {count} checkpoint{'s' if count != 1 else ''} a run to resume from"
        return (eval_every, save_every), reason, unused
    if train.eval_every != "auto" and train.save_every != "auto":
        return (eval_every, save_every), SET_IN_FILE, []
    count = math.ceil(steps / eval_every)  # what the run will do: fewer than EVALS_PER_RUN when it is short
    reason = f"{count} evaluation{'s' if count != 1 else ''} a run, a checkpoint at each so the best one can be kept"
    return (eval_every, save_every), reason, []


def _warnings(steps: int, min_steps: int, answers: str) -> list[str]:
    if steps >= WARN_FRACTION * min_steps:
        return []
    return [
        f"only {steps} optimizer step{'s' if steps != 1 else ''}: {answers} "
        f"learn from the number of updates, and under {min_steps} they "
        "barely do (on real reviews 26 steps scored below always answering the majority label). Lower "
        "train.batch_size (or micro_batch_size / grad_accum), raise train.epochs or train.max_steps, or set them "
        "to auto"
    ]


def auto_lr(train, short_answers: bool = False) -> float:
    if getattr(train, "method", "sft") == "dpo":
        return DPO_LORA_LR
    if getattr(train, "method", "sft") == "kto":
        return KTO_LORA_LR
    if train.full_finetune:
        return FULL_FINETUNE_LR
    return SHORT_ANSWER_LORA_LR if short_answers else LORA_LR


def _auto_batch(rows: int, epochs: float, min_steps: int) -> int:
    """The largest power of two up to MAX_BATCH whose steps over `epochs` passes of `rows` reach `min_steps`."""
    return min(MAX_BATCH, _pow2_floor(rows * epochs / min_steps))
