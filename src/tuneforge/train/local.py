"""`tuneforge train` with `train.backend: local`: LoRA / QLoRA SFT on this machine.

setup   check settings, tokenize the prepared data, pack rows, load the base model, add adapters
train   TRL's SFTTrainer (our loss, collator and callbacks), resuming from a complete checkpoint
finish  save adapter + tokenizer + chat template + generation config, plot, record a summary
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from tuneforge.errors import TuneforgeError


def _checkpointing_args(config_class, enabled: bool) -> dict[str, Any]:
    """Gradient checkpointing under the name this transformers uses (5.x calls it activation checkpointing)."""
    fields = config_class.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def sft_config(experiment, run, plan, training, labelled: bool, has_valid: bool):
    """The trainer configuration from the resolved training plan; `train.extra_args` is checked here, before any model loads."""
    from trl import SFTConfig

    t = experiment.train
    if t.keep_best and has_valid and training.save_every % training.eval_every:
        raise TuneforgeError(f"train.keep_best needs a checkpoint at an evaluation: train.save_every ({training.save_every}) "
                             f"must be a multiple of train.eval_every ({training.eval_every}); set both to auto, or keep_best: false")
    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.schedule]
    keep_best = t.keep_best and has_valid
    base: dict[str, Any] = dict(
        output_dir=str(run.sub("checkpoints")),
        per_device_train_batch_size=training.micro_batch_size,
        per_device_eval_batch_size=training.micro_batch_size,
        gradient_accumulation_steps=training.grad_accum,
        learning_rate=training.lr,
        lr_scheduler_type=schedule,
        warmup_steps=math.ceil(t.warmup_ratio * training.steps),
        max_grad_norm=t.max_grad_norm,  # 0 turns clipping off
        weight_decay=t.weight_decay,
        optim="paged_adamw_8bit" if t.optimizer == "paged_adamw_8bit" else ("adamw_torch_fused" if plan.device == "cuda" else "adamw_torch"),
        num_train_epochs=training.epochs,
        max_steps=t.max_steps or -1,
        logging_steps=1,  # every step: metrics.jsonl, and the non-finite guard runs before each save
        eval_strategy="steps" if has_valid else "no",
        eval_steps=training.eval_every,
        save_strategy="steps",
        save_steps=training.save_every,
        save_total_limit=t.keep_checkpoints,  # the best checkpoint is kept besides these
        load_best_model_at_end=keep_best,
        metric_for_best_model=("eval_selection" if labelled else "eval_loss") if keep_best else None,
        greater_is_better=labelled if keep_best else None,
        # unpacked rows of similar length share a batch, so little compute goes to padding
        train_sampling_strategy="random" if training.packing else "group_by_length",
        seed=experiment.seed,
        data_seed=experiment.seed,
        bf16=(plan.device == "cuda" and plan.dtype == "bfloat16") or plan.autocast == "bfloat16",
        fp16=plan.device == "cuda" and plan.dtype == "float16",  # fp16 gets a loss scaler from the Trainer
        use_cpu=plan.device == "cpu",
        **_checkpointing_args(SFTConfig, t.gradient_checkpointing),
        report_to="none",  # tensorboard and W&B are added as callbacks with our paths
        remove_unused_columns=False,  # the collator needs seq_lens
        dataset_kwargs={"skip_prepare_dataset": True},  # rows are tokenized, masked and packed by tuneforge
        prediction_loss_only=True,
        max_length=experiment.data.max_length,
        packing=False,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        save_only_model=False,  # optimizer, scheduler and RNG states are needed to resume exactly
    )
    unknown = [k for k in t.extra_args if k not in SFTConfig.__dataclass_fields__]
    if unknown:
        from tuneforge.config_errors import did_you_mean

        fields = list(SFTConfig.__dataclass_fields__)
        raise TuneforgeError("; ".join(f"train.extra_args.{key}: not an SFTConfig option" + did_you_mean(key, fields) for key in unknown))
    try:
        return SFTConfig(**{**base, **t.extra_args})
    except (TypeError, ValueError) as exc:
        raise TuneforgeError(f"train.extra_args: {exc}") from None


def tokenize(encoder, examples, max_length: int) -> tuple[list[tuple[list[int], list[int]]], list]:
    """(input_ids, labels) per training sequence with something to learn, cut to max_length if the data was prepared
    with a larger one, and the example each came from (an example is several sequences on a template that renders
    earlier turns differently once later ones follow: `ChatEncoder.units`)."""
    out, kept = [], []
    for example, sequences in zip(examples, encoder.encode_examples([e.messages for e in examples])):
        if any(len(s.input_ids) > max_length for s in sequences):
            _, sequences = encoder.fit(example.messages, max_length, "truncate")
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


def training_plan(experiment, tokens, labelled: bool):
    from tuneforge.data.plan import plan_training

    return plan_training(experiment.train, [len(ids) for ids, _ in tokens], [sum(x != -100 for x in labels) for _, labels in tokens],
                         labelled, experiment.data.max_length, experiment.seed, world_size())


def data_fingerprint(experiment, run, training, quantization: str = "none") -> dict[str, Any]:
    """What a checkpoint depends on: resuming with any of it changed would not continue the same run
    (the data and its batching, the optimizer's schedule, the adapter's shape, the base's weights)."""
    from tuneforge.atomic import file_sha256

    t = experiment.train
    return {
        "lr": training.lr,
        "epochs": training.epochs,
        "steps": training.steps,
        "lora": experiment.lora.model_dump(mode="json"),
        "full_finetune": t.full_finetune,
        "quantization": quantization,
        "train_sha256": file_sha256(run.sub("data", "train.jsonl")),
        "valid_sha256": file_sha256(run.sub("data", "valid.jsonl")),
        "micro_batch_size": training.micro_batch_size,
        "grad_accum": training.grad_accum,
        "max_length": experiment.data.max_length,
        "packing": training.packing,
        "label_weights": t.label_weights,
        "seed": experiment.seed,
        "world_size": world_size(),
        "model": experiment.model.ref,
    }


def add_adapters(model, experiment, plan):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from tuneforge.models import keep_4bit_layers_differentiable

    t, lora = experiment.train, experiment.lora
    if t.full_finetune:
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    if plan.quantization != "none":
        keep_4bit_layers_differentiable(model)  # see models.py: gradients must flow through frozen 4-bit layers
        # fp32 norms and input grads for checkpointing through frozen quantized layers
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.dora,
        use_rslora=lora.rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def keep_trainable_fp32(model, compute_dtype: str) -> int:
    """Trainable parameters back in fp32 unless the device computes in bf16; returns how many were cast.

    TRL casts a quantized model's trainable parameters to bf16, QLoRA's recipe for bf16 GPUs. On an fp16 device
    (T4) the grad scaler then fails on bf16 gradients ("_amp_foreach_non_finite_check_and_unscale_cuda" not
    implemented for 'BFloat16', TRL issue #4901), and with fp32 compute (CPU) bf16 adapters only lose precision.
    The optimizer is built later, so it sees the fp32 parameters."""
    import torch

    if compute_dtype == "bfloat16":
        return 0
    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def finished_run(run, checkpoint: Path) -> dict[str, Any] | None:
    """The recorded summary, marked `already_trained`, when the run already trained every step its checkpoints
    planned and saved its adapter: a resume then has nothing to do, and says so instead of training again."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    summary = run.read_manifest().get("train")
    planned = state.get("max_steps") or 0
    if not summary or not planned or summary.get("steps", 0) < planned or not (run.sub("adapter") / "adapter_config.json").exists():
        return None
    return {**summary, "already_trained": True}


def train_local(experiment, run, resume: bool = False, progress: bool = True, callbacks: list | None = None) -> dict[str, Any]:
    import torch
    from transformers.integrations import TensorBoardCallback

    from tuneforge.data.chat import ChatEncoder
    from tuneforge.data.prepare import load_prepared
    from tuneforge.data.records import common_system_prompt
    from tuneforge.models import load_model, load_tokenizer, materialize, plan_device, resolve
    from tuneforge.train import callbacks as cb
    from tuneforge.data.packing import build_rows
    from tuneforge.train.batching import Collator, attention_mode
    from tuneforge.train.finish import finish
    from tuneforge.train.trainer import ForgeTrainer

    t = experiment.train
    plan = plan_device(experiment.model)
    if t.optimizer == "paged_adamw_8bit" and plan.device != "cuda":
        raise TuneforgeError("train.optimizer: paged_adamw_8bit needs a CUDA GPU; use adamw on CPU")
    data_dir = run.sub("data")
    if not (data_dir / "train.jsonl").exists():
        raise TuneforgeError(f"no prepared data in {data_dir}; run `tuneforge prepare` first (or `tuneforge run`)")

    # ------------------------------------------------------------------ setup
    location = materialize(resolve(experiment.model.ref))
    tokenizer = load_tokenizer(experiment.model, location)
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

    fingerprint = data_fingerprint(experiment, run, training, plan.quantization)
    checkpoints = run.sub("checkpoints")
    resume_from = None
    if resume or t.resume == "auto":
        resume_from = cb.latest_complete_checkpoint(checkpoints)
        if resume_from is None and resume:
            raise TuneforgeError(f"--resume: no complete checkpoint under {checkpoints}")
        if resume_from is not None:
            cb.check_resumable(resume_from, fingerprint)
            done = finished_run(run, resume_from)
            if done is not None:
                return done

    torch.manual_seed(experiment.seed)  # adapter initialisation
    model = load_model(experiment.model, plan, location)
    model.config.use_cache = False
    model = add_adapters(model, experiment, plan)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    mode = attention_mode(plan.attention, training.packing)
    collator = Collator(tokenizer.pad_token_id, mode, mask_dtype=getattr(torch, plan.dtype))
    trainer_ref: dict[str, Any] = {}
    metrics_cb = cb.MetricsLog(run.sub("metrics.jsonl"), trainer_ref, resume_step=_step_of(resume_from))
    bytes_needed = trainable * 4 * 4 * (t.keep_checkpoints + 1) + (64 << 20)  # weights + Adam moments, per checkpoint kept (and the best)
    callbacks = [metrics_cb, cb.FiniteWeights(), cb.CheckpointMarker(checkpoints, fingerprint, bytes_needed), *(callbacks or [])]
    if is_main_process():
        from torch.utils.tensorboard import SummaryWriter

        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(str(run.sub("tensorboard")))))
    if t.wandb_project:
        try:
            from transformers.integrations import WandbCallback
        except ImportError:
            raise TuneforgeError("train.wandb_project needs the wandb package (pip install wandb)") from None
        os.environ.setdefault("WANDB_PROJECT", t.wandb_project)
        callbacks.append(WandbCallback())
    args.disable_tqdm = not progress
    label_eval = None
    if labelled and valid_examples:
        from tuneforge.train.label_eval import LabelEval

        label_eval = LabelEval(encoder, valid_examples, labels, max_length)
    trainer = ForgeTrainer(
        model=model,
        args=args,
        train_dataset=_as_dataset(train_rows),
        eval_dataset=_as_dataset(valid_rows) if valid_rows else None,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=callbacks,
        label_eval=label_eval,
    )
    trainer_ref["trainer"] = trainer
    keep_trainable_fp32(trainer.model, plan.dtype)
    if is_main_process():
        print(f"training on {plan.describe()}: {len(train_tokens)} examples, {trainable:,} of {total:,} parameters trainable")
        print("training plan (auto values chosen from the data; prepare's report.md says the same):")
        for line in training.describe():
            print(f"  {line}")
        for warning in training.warnings:
            print(f"warning: {warning}")
        if label_eval is not None:
            print(f"  each evaluation also scores the {len(valid_examples)} valid examples by label likelihood "
                  f"(majority-class floor {label_eval.majority_accuracy:.3f})")

    # ------------------------------------------------------------------ train
    base_metrics = None
    if resume_from is None and valid_rows:
        base_metrics = trainer.evaluate()  # the base model's loss (and valid accuracy), logged as step 0
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
    if valid_rows:
        summary.update(kept_adapter(trainer, records, label_eval))
    if is_main_process():
        finish(trainer, tokenizer, encoder, experiment, run, summary, records, plan.quantization)
    return summary


def _as_dataset(rows):
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": r.input_ids, "labels": r.labels, "seq_lens": r.seq_lens, "weights": r.weights,
                               "length": len(r.input_ids)} for r in rows])


def kept_adapter(trainer, records: list[dict], label_eval) -> dict[str, Any]:
    """Which step's adapter is kept and why, with its valid metrics (the trainer has loaded the best one when keep_best)."""
    last_step = trainer.state.global_step
    best = trainer.state.best_global_step if trainer.args.load_best_model_at_end else None
    if best is None or trainer.state.best_model_checkpoint is None:
        kept, why = last_step, "the last step (train.keep_best is off)" if not trainer.args.load_best_model_at_end else "the last step"
    else:
        kept = best
        why = (f"best valid accuracy of {len([r for r in records if 'eval_accuracy' in r and r['step'] > 0])} evaluations (ties: lower valid loss)"
               if label_eval is not None else "lowest valid loss of the evaluations")
    kept_record = next((r for r in records if r.get("step") == kept and "eval_loss" in r), None)
    if kept_record is None:  # no evaluation at the kept step: measure it now
        kept_record = trainer.evaluate()
    out: dict[str, Any] = {"kept_step": kept, "kept_because": why, "final_eval_loss": kept_record["eval_loss"]}
    if label_eval is not None:
        base = _from_log(records, 0, "eval_accuracy")
        out.update(valid_accuracy=kept_record.get("eval_accuracy"), valid_macro_f1=kept_record.get("eval_macro_f1"),
                   base_valid_accuracy=base, majority_accuracy=label_eval.majority_accuracy, majority_label=label_eval.majority_label)
        if out["valid_accuracy"] is not None and out["valid_accuracy"] <= label_eval.majority_accuracy:
            out["warning"] = (f"valid accuracy {out['valid_accuracy']:.3f} is at or below always answering {label_eval.majority_label!r} "
                              f"({label_eval.majority_accuracy:.3f}): the model learned little more than how common each label is. "
                              "Give it more optimizer steps (train.batch_size / epochs: auto) or more examples of the rare labels")
    return out


def _step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.split("-")[-1]) if checkpoint else 0


def _from_log(records: list[dict], step: int, key: str) -> float | None:
    found = next((r for r in records if r.get("step") == step and key in r), None)
    return found[key] if found else None
