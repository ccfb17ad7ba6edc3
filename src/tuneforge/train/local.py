"""`tuneforge train` with `train.backend: local`: LoRA / QLoRA SFT on this machine (`train.method: dpo` is dpo.py).

setup   check settings, tokenize the prepared data, pack rows, load the base model, add adapters
train   TRL's SFTTrainer (our loss, collator and callbacks), resuming from a complete checkpoint
finish  save adapter + tokenizer + chat template + generation config, plot, record a summary
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tuneforge.errors import TuneforgeError
from tuneforge.train.attention import PackedAttention, packed_attention, use_packed_attention
from tuneforge.train.common import (
    Setup,
    add_adapters,  # noqa: F401  (tests import it from here)
    apply_checkpointing,
    base_eval_identity,
    keep_trainable_fp32,
    kept_adapter,
    parameter_counts,
    print_plan,
    resume_point,
    run_training,
    set_up,
    trainer_arguments,
    training_callbacks,
    world_size,
)
from tuneforge.train.kernels import compile_as_set

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.data.plan import TrainingPlan
    from tuneforge.run import RunDir


def train_local(
    experiment: Experiment, run: RunDir, resume: bool = False, progress: bool = True, callbacks: list | None = None
) -> dict[str, Any]:
    """SFT: the module docstring's setup, train and finish. The summary it records, or the finished run's."""
    from tuneforge.train.finish import finish, summarize
    from tuneforge.train.trainer import ForgeTrainer

    # ------------------------------------------------------------------ setup
    setup = set_up(experiment, run)
    data = sft_data(setup)
    training = data.training
    args = sft_config(experiment, run, setup.plan, training, data.labelled, bool(data.valid_rows))
    fingerprint = setup.fingerprint(training)
    resume_from, done = resume_point(run, experiment.train, resume, fingerprint)
    if done is not None:
        return done
    model = setup.load_model()
    trainable, total = parameter_counts(model)
    metrics, callbacks = training_callbacks(run, experiment.train, fingerprint, trainable, resume_from, callbacks)
    args.disable_tqdm = not progress
    label_eval = _label_eval(setup, data, resume_from)
    kernel = packed_attention(setup.plan, training.packing, padded_calls=label_eval is not None)
    use_packed_attention(model, kernel)
    compilation = compile_as_set(model, experiment.train.compile, setup.plan.device)
    collator = _collator(setup, training, kernel)
    trainer = ForgeTrainer(
        model=model,
        args=args,
        train_dataset=_as_dataset(data.train_rows),
        eval_dataset=_as_dataset(data.valid_rows) if data.valid_rows else None,
        processing_class=setup.tokenizer,
        data_collator=collator,
        callbacks=callbacks,
        label_eval=label_eval,
        label_offsets=data.offsets,
        prompt_loss_weight=training.prompt_loss_weight,
    )
    metrics.trainer = trainer
    keep_trainable_fp32(trainer.model, setup.plan.dtype)
    checkpointing = apply_checkpointing(trainer, setup, training.micro_batch_size * data.longest, trainable)
    headline = (
        f"training on {setup.plan.describe()}: {len(data.train_tokens)} examples, "
        f"{trainable:,} of {total:,} parameters trainable"
    )
    notes = [kernel.describe(), checkpointing.describe(), compilation.describe(), *_label_notes(data, label_eval)]
    print_plan(headline, training, notes)

    # ------------------------------------------------------------------ train
    labels = data.labels if data.labelled else None
    identity = base_eval_identity(setup, fingerprint, training, args.per_device_eval_batch_size, labels)
    trained = run_training(trainer, run, resume_from, bool(data.valid_rows), identity)

    # ------------------------------------------------------------------ finish
    summary = summarize(trained, setup, training, metrics.records, (trainable, total), kernel.kind, data.train_examples)
    summary["activation_checkpointing"] = checkpointing.describe()
    if data.adjustment:
        summary["label_adjustment"] = data.adjustment
    if data.valid_rows:
        summary.update(kept_adapter(trainer, metrics.records, label_eval))
    return finish(trainer, setup, summary, metrics.records)


@dataclass
class SftData:
    """The prepared splits as SFT trains on them: tokenized, packed into rows, planned, with the label settings."""

    train_tokens: list[tuple[list[int], list[int]]]
    train_examples: list
    valid_examples: list
    train_rows: list
    valid_rows: list
    labels: list[str]  # every label of either split
    labelled: bool  # labels on every valid example: evaluations score them (LabelEval)
    training: TrainingPlan
    offsets: dict[int, float] | None  # train.label_adjustment, see label_offsets
    adjustment: str

    @property
    def longest(self) -> int:
        """Tokens in the longest training row: a micro-batch holds at most micro_batch_size of them."""
        return max((len(row.input_ids) for row in self.train_rows), default=1)


def sft_data(setup: Setup) -> SftData:
    """Tokenize both splits, plan the training from them, and pack the rows that plan asks for."""
    from tuneforge.data.packing import build_rows
    from tuneforge.data.prepared import load_prepared

    experiment, max_length = setup.experiment, setup.experiment.data.max_length
    train_tokens, train_examples = tokenize(setup.encoder, load_prepared(setup.data_dir, "train"), max_length)
    valid_tokens, valid_examples = tokenize(setup.encoder, load_prepared(setup.data_dir, "valid"), max_length)
    if not train_tokens:
        raise TuneforgeError("the prepared training data has no example with trainable tokens")
    labels = sorted({e.label for e in train_examples + valid_examples if e.label is not None})
    labelled = experiment.data.label is not None and bool(labels) and all(e.label is not None for e in valid_examples)
    training = training_plan(experiment, train_tokens, labelled, bool(valid_tokens))
    weights = label_weights(train_examples, experiment.train.label_weights)
    train_rows = build_rows(train_tokens, max_length, training.packing, experiment.seed, weights)
    valid_rows = build_rows(valid_tokens, max_length, training.packing, experiment.seed)
    tau = experiment.train.label_adjustment
    offsets, adjustment = label_offsets(train_tokens, train_examples, tau) if labelled else (None, "")
    return SftData(
        train_tokens,
        train_examples,
        valid_examples,
        train_rows,
        valid_rows,
        labels,
        labelled,
        training,
        offsets,
        adjustment,
    )


def _collator(setup: Setup, training: TrainingPlan, kernel: PackedAttention):
    from tuneforge.train.batching import Collator, mask_dtype

    plan = setup.plan
    return Collator(
        setup.tokenizer.pad_token_id,
        kernel.collation,
        mask_dtype=mask_dtype(plan.device, plan.dtype),
        prompt_targets=training.prompt_loss_weight > 0,
    )


def _label_eval(setup: Setup, data: SftData, resume_from):
    """With labels, each evaluation also scores the valid examples by label likelihood; None without."""
    if not (data.labelled and data.valid_examples):
        return None
    from tuneforge.train.label_eval import LabelEval

    label_eval = LabelEval(setup.encoder, data.valid_examples, data.labels, setup.experiment.data.max_length)
    if resume_from is not None:
        label_eval.restore_state(resume_from)
    return label_eval


def _label_notes(data: SftData, label_eval) -> list[str]:
    notes = []
    if label_eval is not None:
        notes.append(
            f"each evaluation also scores the {len(data.valid_examples)} valid examples by label likelihood "
            f"(majority-class floor {label_eval.majority_accuracy:.3f})"
        )
    if data.adjustment:
        notes.append(data.adjustment)
    return notes


def sft_config(experiment: Experiment, run: RunDir, plan, training: TrainingPlan, labelled: bool, has_valid: bool):
    """The trainer configuration from the resolved training plan; `train.extra_args` is checked here, before any
    model loads."""
    from trl import SFTConfig

    base = trainer_arguments(
        experiment,
        run,
        plan,
        training,
        labelled,
        has_valid,
        SFTConfig,
        dict(
            # unpacked rows of similar length share a batch, so little compute goes to padding
            train_sampling_strategy="random" if training.packing else "group_by_length",
            remove_unused_columns=False,  # the collator needs seq_lens
            dataset_kwargs={"skip_prepare_dataset": True},  # rows are tokenized, masked and packed by tuneforge
            max_length=experiment.data.max_length,
            packing=False,
        ),
    )
    try:
        return SFTConfig(**base)
    except (TypeError, ValueError) as exc:
        raise TuneforgeError(f"train.extra_args: {exc}") from None


def tokenize(encoder, examples, max_length: int) -> tuple[list[tuple[list[int], list[int]]], list]:
    """(input_ids, labels) per training sequence with something to learn, cut to max_length if the data was prepared
    with a larger one, and the example each came from (an example is several sequences on a template that renders
    earlier turns differently once later ones follow: `ChatEncoder.units`)."""
    out, kept = [], []
    for example, sequences in zip(
        examples, encoder.encode_examples([e.messages for e in examples], [e.extra.get("tools") for e in examples])
    ):
        if any(len(s.input_ids) > max_length for s in sequences):
            _, sequences = encoder.fit(example.messages, max_length, "truncate", example.extra.get("tools"))
        for encoded in sequences:
            if encoded.n_trainable:
                out.append((encoded.input_ids, encoded.labels()))
                kept.append(example)
    return out, kept


def label_weights(examples, mode: str) -> list[float] | None:
    """Per-example loss weights for train.label_weights: balanced gives each class the same total weight, mean 1."""
    labels = [e.label for e in examples]
    if mode == "none" or any(label is None for label in labels):
        return None
    from collections import Counter

    counts = Counter(labels)
    return [len(labels) / (len(counts) * counts[label]) for label in labels]


def label_offsets(tokens, examples, tau: float) -> tuple[dict[int, float] | None, str]:
    """train.label_adjustment: each label's first answer token and tau x log(its share of the training labels), with
    a line saying what was done. None when off, or when labels share their first token (no logit tells them apart)."""
    labels = [e.label for e in examples]
    if not tau or any(label is None for label in labels):
        return None, ""
    from collections import Counter

    from tuneforge.train.batching import IGNORE

    first: dict[str, set[int]] = {}
    for (_, targets), label in zip(tokens, labels):
        first.setdefault(label, set()).add(next(t for t in targets if t != IGNORE))
    ids = {label: found.pop() for label, found in first.items() if len(found) == 1}
    if len(ids) < len(first) or len(set(ids.values())) < len(ids):
        return None, "label_adjustment is off: some labels do not start with a token of their own"
    counts = Counter(labels)
    offsets = {ids[label]: tau * math.log(counts[label] / len(labels)) for label in ids}
    shares = ", ".join(f"{label} {counts[label] / len(labels):.0%}" for label in sorted(ids))
    return offsets, f"label_adjustment {tau:g}: rare labels' logits are lowered less in training ({shares})"


def training_plan(experiment: Experiment, tokens, labelled: bool, has_valid: bool) -> TrainingPlan:
    from tuneforge.data.plan import plan_training

    return plan_training(
        experiment.train,
        [len(ids) for ids, _ in tokens],
        [sum(x != -100 for x in labels) for _, labels in tokens],
        labelled,
        experiment.data.max_length,
        experiment.seed,
        world_size(),
        has_valid,
    )


def _as_dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(
        [
            {
                "input_ids": r.input_ids,
                "labels": r.labels,
                "seq_lens": r.seq_lens,
                "weights": r.weights,
                "length": len(r.input_ids),
            }
            for r in rows
        ]
    )
