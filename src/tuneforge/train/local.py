"""`tuneforge train` with `train.backend: local`: LoRA / QLoRA SFT on this machine.

setup   check settings, tokenize the prepared data, pack rows, load the base model, add adapters
train   TRL's SFTTrainer (our loss, collator and callbacks), resuming from a complete checkpoint
finish  save adapter + tokenizer + chat template + generation config, plot, record a summary
"""

from __future__ import annotations

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


def sft_config(experiment, run, plan, steps_total: int):
    """The trainer configuration; `train.extra_args` is checked here, before any model loads."""
    from trl import SFTConfig

    t = experiment.train
    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.schedule]
    base: dict[str, Any] = dict(
        output_dir=str(run.sub("checkpoints")),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type=schedule,
        warmup_steps=math.ceil(t.warmup_ratio * steps_total),
        max_grad_norm=t.max_grad_norm,  # 0 turns clipping off
        weight_decay=t.weight_decay,
        optim="paged_adamw_8bit" if t.optimizer == "paged_adamw_8bit" else ("adamw_torch_fused" if plan.device == "cuda" else "adamw_torch"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        logging_steps=1,  # every step: metrics.jsonl, and the non-finite guard runs before each save
        eval_strategy="steps",
        eval_steps=t.eval_every,
        save_strategy="steps",
        save_steps=t.save_every,
        save_total_limit=t.keep_checkpoints,
        seed=experiment.seed,
        data_seed=experiment.seed,
        bf16=plan.device == "cuda" and plan.dtype == "bfloat16",
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


def tokenize(encoder, examples, max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example, cut to max_length if the data was prepared with a larger one."""
    out = []
    for example, encoded in zip(examples, encoder.encode_many([e.messages for e in examples])):
        if len(encoded.input_ids) > max_length:
            _, encoded = encoder.fit(example.messages, max_length, "truncate")
        if encoded.n_trainable:
            out.append((encoded.input_ids, encoded.labels()))
    return out


def data_fingerprint(experiment, run) -> dict[str, Any]:
    """What a checkpoint depends on: resuming with any of it changed would not continue the same run."""
    from tuneforge.atomic import file_sha256

    t = experiment.train
    return {
        "train_sha256": file_sha256(run.sub("data", "train.jsonl")),
        "valid_sha256": file_sha256(run.sub("data", "valid.jsonl")),
        "micro_batch_size": t.micro_batch_size,
        "grad_accum": t.grad_accum,
        "max_length": experiment.data.max_length,
        "packing": t.packing,
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


def train_local(experiment, run, resume: bool = False, progress: bool = True, callbacks: list | None = None) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers.integrations import TensorBoardCallback

    from tuneforge.data.chat import ChatEncoder
    from tuneforge.data.prepare import load_prepared
    from tuneforge.models import load_model, load_tokenizer, materialize, plan_device, resolve
    from tuneforge.train import callbacks as cb
    from tuneforge.train.batching import Collator, attention_mode, build_rows
    from tuneforge.train.finish import finish
    from tuneforge.train.trainer import ForgeTrainer

    t = experiment.train
    plan = plan_device(experiment.model)
    if t.optimizer == "paged_adamw_8bit" and plan.device != "cuda":
        raise TuneforgeError("train.optimizer: paged_adamw_8bit needs a CUDA GPU; use adamw on CPU")
    data_dir = run.sub("data")
    if not (data_dir / "train.jsonl").exists():
        raise TuneforgeError(f"no prepared data in {data_dir}; run `tuneforge prepare` first (or `tuneforge run`)")
    fingerprint = data_fingerprint(experiment, run)
    checkpoints = run.sub("checkpoints")
    resume_from = None
    if resume or t.resume == "auto":
        resume_from = cb.latest_complete_checkpoint(checkpoints)
        if resume_from is None and resume:
            raise TuneforgeError(f"--resume: no complete checkpoint under {checkpoints}")
        if resume_from is not None:
            cb.check_resumable(resume_from, fingerprint)

    # ------------------------------------------------------------------ setup
    location = materialize(resolve(experiment.model.ref))
    tokenizer = load_tokenizer(experiment.model, location)
    encoder = ChatEncoder(tokenizer)
    max_length = experiment.data.max_length
    train_tokens = tokenize(encoder, load_prepared(data_dir, "train"), max_length)
    valid_tokens = tokenize(encoder, load_prepared(data_dir, "valid"), max_length)
    if not train_tokens:
        raise TuneforgeError("the prepared training data has no example with trainable tokens")
    train_rows = build_rows(train_tokens, max_length, t.packing, experiment.seed)
    valid_rows = build_rows(valid_tokens, max_length, t.packing, experiment.seed)
    per_step = t.micro_batch_size * t.grad_accum * world_size()
    steps_total = t.max_steps or math.ceil(math.ceil(len(train_rows) / (t.micro_batch_size * world_size())) / t.grad_accum * t.epochs)
    args = sft_config(experiment, run, plan, steps_total)

    torch.manual_seed(experiment.seed)  # adapter initialisation
    model = load_model(experiment.model, plan, location)
    model.config.use_cache = False
    model = add_adapters(model, experiment, plan)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    mode = attention_mode(plan.attention, t.packing)
    collator = Collator(tokenizer.pad_token_id, mode, mask_dtype=getattr(torch, plan.dtype))
    as_dataset = lambda rows: Dataset.from_list([{"input_ids": r.input_ids, "labels": r.labels, "seq_lens": r.seq_lens} for r in rows])  # noqa: E731
    trainer_ref: dict[str, Any] = {}
    metrics_cb = cb.MetricsLog(run.sub("metrics.jsonl"), trainer_ref, resume_step=_step_of(resume_from))
    bytes_needed = trainable * 4 * 4 * t.keep_checkpoints + (64 << 20)  # weights + grads-free Adam moments, per checkpoint kept
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
    trainer = ForgeTrainer(
        model=model,
        args=args,
        train_dataset=as_dataset(train_rows),
        eval_dataset=as_dataset(valid_rows) if valid_rows else None,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=callbacks,
    )
    trainer_ref["trainer"] = trainer
    if is_main_process():
        print(
            f"training on {plan.describe()}: {len(train_tokens)} examples in {len(train_rows)} "
            f"{'packed rows' if t.packing else 'rows'}, {per_step} rows per step, about {steps_total} steps; "
            f"{trainable:,} of {total:,} parameters trainable"
        )

    # ------------------------------------------------------------------ train
    base_eval = None
    if resume_from is None and valid_rows:
        base_eval = trainer.evaluate()["eval_loss"]  # the base model's loss, logged as step 0
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    final_eval = _final_eval(trainer, metrics_cb.records) if valid_rows else None

    # ------------------------------------------------------------------ finish
    summary = {
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3),
        "train_loss": result.training_loss,
        "base_eval_loss": base_eval if base_eval is not None else _base_eval_from_log(metrics_cb.records),
        "final_eval_loss": final_eval,
        "seconds": round(seconds, 1),
        "supervised_tokens": trainer.supervised_tokens,
        "supervised_tokens_per_s": round(trainer.supervised_tokens / max(seconds, 1e-9), 1),
        "trainable_params": trainable,
        "total_params": total,
        "device": plan.describe(),
        "attention_mode": mode,
        "resumed_from": resume_from.name if resume_from else None,
    }
    if is_main_process():
        finish(trainer, tokenizer, encoder, experiment, run, summary, metrics_cb.records)
    return summary


def _final_eval(trainer, records: list[dict]) -> float:
    """The eval loss at the last step: the trainer's own when it evaluated there, else a fresh one."""
    last = records[-1] if records else {}
    if last.get("step") == trainer.state.global_step and "eval_loss" in last:
        return last["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def _step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.split("-")[-1]) if checkpoint else 0


def _base_eval_from_log(records: list[dict]) -> float | None:
    first = next((r for r in records if r.get("step") == 0 and "eval_loss" in r), None)
    return first["eval_loss"] if first else None
