"""`tuneforge train` with `train.backend: local`: LoRA / QLoRA SFT on this machine.

setup   check settings, tokenize the prepared data, pack rows, load the base model, add adapters
train   TRL's SFTTrainer (our loss, collator and callbacks), resuming from a complete checkpoint
finish  save adapter + tokenizer + chat template + generation config, plot, record a summary
"""

from __future__ import annotations

import math
import time
from typing import Any

from tuneforge.errors import TuneforgeError
from tuneforge.train.common import (  # noqa: F401  (re-exported: the CLI and tests import them from here)
    add_adapters, base_evaluation, check_can_train, data_fingerprint, full_weights, is_main_process, keep_trainable_fp32, kept_adapter,
    prepare_for_fsdp_evaluation, print_plan, resume_point, trainer_arguments, training_callbacks, world_size, _from_log,
)


def sft_config(experiment, run, plan, training, labelled: bool, has_valid: bool):
    """The trainer configuration from the resolved training plan; `train.extra_args` is checked here, before any model loads."""
    from trl import SFTConfig

    base = trainer_arguments(experiment, run, plan, training, labelled, has_valid, SFTConfig, dict(
        # unpacked rows of similar length share a batch, so little compute goes to padding
        train_sampling_strategy="random" if training.packing else "group_by_length",
        remove_unused_columns=False,  # the collator needs seq_lens
        dataset_kwargs={"skip_prepare_dataset": True},  # rows are tokenized, masked and packed by tuneforge
        max_length=experiment.data.max_length,
        packing=False,
    ))
    try:
        return SFTConfig(**base)
    except (TypeError, ValueError) as exc:
        raise TuneforgeError(f"train.extra_args: {exc}") from None


def tokenize(encoder, examples, max_length: int) -> tuple[list[tuple[list[int], list[int]]], list]:
    """(input_ids, labels) per training sequence with something to learn, cut to max_length if the data was prepared
    with a larger one, and the example each came from (an example is several sequences on a template that renders
    earlier turns differently once later ones follow: `ChatEncoder.units`)."""
    out, kept = [], []
    for example, sequences in zip(examples, encoder.encode_examples([e.messages for e in examples], [e.extra.get("tools") for e in examples])):
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


def training_plan(experiment, tokens, labelled: bool):
    from tuneforge.data.plan import plan_training

    return plan_training(experiment.train, [len(ids) for ids, _ in tokens], [sum(x != -100 for x in labels) for _, labels in tokens],
                         labelled, experiment.data.max_length, experiment.seed, world_size())


def train_local(experiment, run, resume: bool = False, progress: bool = True, callbacks: list | None = None) -> dict[str, Any]:
    if experiment.train.method == "dpo":
        from tuneforge.train.dpo import train_dpo

        return train_dpo(experiment, run, resume, progress, callbacks)
    import torch

    from tuneforge.data.chat import ChatEncoder
    from tuneforge.data.prepared import load_prepared
    from tuneforge.data.records import common_system_prompt
    from tuneforge.models import load_model, load_tokenizer, materialize, plan_device, resolve
    from tuneforge.train import callbacks as cb
    from tuneforge.data.packing import build_rows
    from tuneforge.train.batching import Collator, attention_mode, mask_dtype
    from tuneforge.train.finish import finish
    from tuneforge.train.trainer import ForgeTrainer

    t = experiment.train
    plan = plan_device(experiment.model)
    data_dir = check_can_train(experiment, plan, run)
    from tuneforge.train.dpo import init_adapter_folder

    start_adapter = init_adapter_folder(experiment)  # continue an earlier run's adapter

    # ------------------------------------------------------------------ setup
    location = materialize(resolve(experiment.model.ref))
    tokenizer = load_tokenizer(experiment.model, start_adapter or location)
    encoder = ChatEncoder(tokenizer)
    max_length = experiment.data.max_length
    train_tokens, train_examples = tokenize(encoder, load_prepared(data_dir, "train"), max_length)
    valid_tokens, valid_examples = tokenize(encoder, load_prepared(data_dir, "valid"), max_length)
    if not train_tokens:
        raise TuneforgeError("the prepared training data has no example with trainable tokens")
    labels = sorted({e.label for e in train_examples + valid_examples if e.label is not None})
    labelled = experiment.data.label is not None and bool(labels) and all(e.label is not None for e in valid_examples)
    training = training_plan(experiment, train_tokens, labelled)
    train_rows = build_rows(train_tokens, max_length, training.packing, experiment.seed, label_weights(train_examples, t.label_weights))
    valid_rows = build_rows(valid_tokens, max_length, training.packing, experiment.seed)
    args = sft_config(experiment, run, plan, training, labelled, bool(valid_rows))

    fingerprint = {**data_fingerprint(experiment, run, training, plan.quantization),
                   "init_adapter": str(start_adapter) if start_adapter else None}
    resume_from, done = resume_point(run, t, resume, fingerprint)
    if done is not None:
        return done

    torch.manual_seed(experiment.seed)  # adapter initialisation
    model = load_model(experiment.model, plan, location)
    model.config.use_cache = False
    model = add_adapters(model, experiment, plan, start_adapter)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    mode = attention_mode(plan.attention, training.packing)
    collator = Collator(tokenizer.pad_token_id, mode, mask_dtype=mask_dtype(plan.device, plan.dtype),
                        prompt_targets=training.prompt_loss_weight > 0)
    trainer_ref, metrics_cb, callbacks = training_callbacks(run, t, fingerprint, trainable, resume_from, callbacks)
    args.disable_tqdm = not progress
    offsets, adjustment = label_offsets(train_tokens, train_examples, t.label_adjustment) if labelled else (None, "")
    label_eval = None
    if labelled and valid_examples:
        from tuneforge.train.label_eval import LabelEval

        label_eval = LabelEval(encoder, valid_examples, labels, max_length)
        if resume_from is not None:
            label_eval.restore_state(resume_from)
    trainer = ForgeTrainer(
        model=model,
        args=args,
        train_dataset=_as_dataset(train_rows),
        eval_dataset=_as_dataset(valid_rows) if valid_rows else None,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=callbacks,
        label_eval=label_eval,
        label_offsets=offsets,
        prompt_loss_weight=training.prompt_loss_weight,
    )
    trainer_ref["trainer"] = trainer
    keep_trainable_fp32(trainer.model, plan.dtype)
    print_plan(f"training on {plan.describe()}: {len(train_tokens)} examples, {trainable:,} of {total:,} parameters trainable", training)
    if is_main_process():
        if label_eval is not None:
            print(f"  each evaluation also scores the {len(valid_examples)} valid examples by label likelihood "
                  f"(majority-class floor {label_eval.majority_accuracy:.3f})")
        if adjustment:
            print(f"  {adjustment}")

    # ------------------------------------------------------------------ train
    prepare_for_fsdp_evaluation(trainer)
    base_metrics = None
    if resume_from is None and valid_rows:  # the base model's loss (and valid accuracy), logged as step 0
        identity = None if start_adapter else {
            "model": experiment.model.model_dump(mode="json"), "quantization": plan.quantization, "dtype": plan.dtype,
            "valid_sha256": fingerprint["valid_sha256"], "max_length": max_length, "packing": training.packing,
            "eval_batch": args.per_device_eval_batch_size, "labels": labels if labelled else None, "dora": experiment.lora.dora,
            "full_finetune": t.full_finetune, "world_size": world_size()}
        base_metrics = base_evaluation(trainer, run, identity)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started

    # ------------------------------------------------------------------ finish
    records = metrics_cb.records
    supervised = cb.sum_over_ranks(trainer.supervised_tokens)  # each process counted its own share
    summary = {
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3),
        "plan": training.to_json(),
        "train_loss": result.training_loss,
        "base_eval_loss": base_metrics["eval_loss"] if base_metrics else _from_log(records, 0, "eval_loss"),
        "final_eval_loss": None,  # the kept adapter's, below, when there is a valid split
        "seconds": round(seconds, 1),
        "supervised_tokens": supervised,
        "supervised_tokens_per_s": round(supervised / max(seconds, 1e-9), 1),
        "trainable_params": trainable,
        "total_params": total,
        "device": plan.describe(),
        "attention_mode": mode,
        "resumed_from": resume_from.name if resume_from else None,
        "system_prompt": common_system_prompt([e.messages for e in train_examples]),
    }
    if adjustment:
        summary["label_adjustment"] = adjustment
    if valid_rows:
        summary.update(kept_adapter(trainer, records, label_eval))
    weights = full_weights(trainer)  # under FSDP every process takes part in gathering them
    if is_main_process():
        finish(trainer, tokenizer, encoder, experiment, run, summary, records, plan.quantization, weights)
    return summary


def _as_dataset(rows):
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": r.input_ids, "labels": r.labels, "seq_lens": r.seq_lens, "weights": r.weights,
                               "length": len(r.input_ids)} for r in rows])

