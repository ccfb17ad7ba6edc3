"""What the SFT and DPO recipes share: the setup (checked settings, prepared data, tokenizer, the model with its
adapters), processes, trainer arguments, resume fingerprints, the timed training and the kept adapter."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.errors import TuneforgeError

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.data.chat import ChatEncoder
    from tuneforge.data.plan import TrainingPlan
    from tuneforge.models import DevicePlan
    from tuneforge.run import RunDir


@dataclass
class Setup:
    """Where a recipe starts, before it reads its data: the device plan, the prepared data folder, the adapter it
    continues (train.init_adapter), the base model's files, and the tokenizer with its chat encoder."""

    experiment: Experiment
    run: RunDir
    plan: DevicePlan
    data_dir: Path
    start_adapter: Path | None
    location: str
    tokenizer: Any
    encoder: ChatEncoder

    def fingerprint(self, training: TrainingPlan, **method: Any) -> dict[str, Any]:
        """What a checkpoint of this run depends on: `data_fingerprint`, the method's own settings, the start."""
        return {
            **data_fingerprint(self.experiment, self.run, training, self.plan.quantization),
            **method,
            "init_adapter": str(self.start_adapter) if self.start_adapter else None,
        }

    def load_model(self):
        """The base model with adapters added (or every weight trainable), seeded so the adapters start the same."""
        import torch

        from tuneforge.models import load_model

        torch.manual_seed(self.experiment.seed)
        model = load_model(self.experiment.model, self.plan, self.location)
        model.config.use_cache = False
        return add_adapters(model, self.experiment, self.plan, self.start_adapter)


def set_up(experiment: Experiment, run: RunDir) -> Setup:
    """Refusals before anything loads, then the base model's files and the tokenizer (the starting adapter's when
    there is one: it was saved with the chat template that adapter learned)."""
    from tuneforge.data.chat import ChatEncoder
    from tuneforge.models import load_tokenizer, materialize, plan_device, resolve

    plan = plan_device(experiment.model)
    data_dir = check_can_train(experiment, plan, run)
    start_adapter = init_adapter_folder(experiment)  # continue an earlier run's adapter
    location = materialize(resolve(experiment.model.ref))
    tokenizer = load_tokenizer(experiment.model, start_adapter or location)
    return Setup(experiment, run, plan, data_dir, start_adapter, location, tokenizer, ChatEncoder(tokenizer))


def init_adapter_folder(experiment: Experiment) -> Path | None:
    """train.init_adapter as an adapter folder: the folder itself, or a run directory's adapter/."""
    value = experiment.train.init_adapter
    if not value:
        return None
    path = experiment.resolve_path(value)
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").exists():
            return candidate
    raise TuneforgeError(
        f"train.init_adapter: no adapter in {path} (nor in {path / 'adapter'}); point it at an adapter folder "
        "or at the run directory of an SFT run"
    )


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


@dataclass
class Trained:
    """What one `trainer.train` call leaves for the summary."""

    trainer: Any
    training_loss: float
    seconds: float
    base_metrics: dict[str, float] | None  # the base model's valid metrics before the first step; None on a resume
    resume_from: Path | None


def run_training(
    trainer, run: RunDir, resume_from: Path | None, has_valid: bool, identity: dict[str, Any] | None
) -> Trained:
    """The base model's valid metrics, logged as step 0 (a resumed run's log has them already), then the timed
    training. `identity`: see `base_evaluation`."""
    prepare_for_fsdp_evaluation(trainer)
    base_metrics = base_evaluation(trainer, run, identity) if resume_from is None and has_valid else None
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return Trained(trainer, result.training_loss, time.perf_counter() - started, base_metrics, resume_from)


def _checkpointing_args(config_class, enabled: bool) -> dict[str, Any]:
    """Gradient checkpointing under the name this transformers uses (5.x calls it activation checkpointing)."""
    fields = config_class.__dataclass_fields__
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


def logging_steps(device: str, save_every: int) -> int:
    """Every step on a CPU, where a step takes seconds. On a GPU a log line reads the loss back, which waits for the
    GPU to finish: every few steps instead, always at a save step, so metrics.jsonl's NaN check runs before any
    checkpoint is written."""
    if device != "cuda":
        return 1
    return max(n for n in range(1, 11) if save_every % n == 0)


def _loading(device: str) -> dict[str, Any]:
    """On a GPU, batches are collated by two worker processes into pinned memory while the GPU computes; on a CPU
    the workers would only take cores from the step."""
    if device != "cuda":
        return {"dataloader_num_workers": 0}
    return {"dataloader_num_workers": 2, "dataloader_pin_memory": True, "dataloader_persistent_workers": True}


def apply_checkpointing(trainer, setup: Setup, tokens: int, trainable: int):
    """train.gradient_checkpointing on the built trainer: as set, or (auto) from the activations measured on its
    model (train/memory.py). Before `trainer.train`, which enables it. The choice, to print with the plan."""
    from tuneforge.train.memory import choose_checkpointing

    choice = choose_checkpointing(
        setup.experiment.train.gradient_checkpointing, trainer.model, setup.plan, tokens, trainable
    )
    for key, value in choice.trainer_kwargs(type(trainer.args)).items():
        setattr(trainer.args, key, value)
    return choice


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def trainer_arguments(
    experiment: Experiment,
    run: RunDir,
    plan,
    training,
    labelled: bool,
    has_valid: bool,
    config_class,
    specific: dict[str, Any],
) -> dict[str, Any]:
    """What SFT and DPO configurations share (schedule, batching, evaluation, checkpoints, precision), then the
    method's `specific` settings, then `train.extra_args`, checked against `config_class`'s fields."""
    t = experiment.train
    if t.keep_best and has_valid and training.save_every % training.eval_every:
        raise TuneforgeError(
            f"train.keep_best needs a checkpoint at an evaluation: train.save_every ({training.save_every}) "
            f"must be a multiple of train.eval_every ({training.eval_every}); set both to auto, or keep_best: false"
        )
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
        optim="paged_adamw_8bit"
        if t.optimizer == "paged_adamw_8bit"
        else ("adamw_torch_fused" if plan.device == "cuda" else "adamw_torch"),
        num_train_epochs=training.epochs,
        max_steps=t.max_steps or -1,
        logging_steps=logging_steps(plan.device, training.save_every),
        eval_strategy="steps" if has_valid else "no",
        eval_steps=training.eval_every,
        save_strategy="steps",
        save_steps=training.save_every,
        save_total_limit=t.keep_checkpoints,  # the best checkpoint is kept besides these
        load_best_model_at_end=keep_best,
        metric_for_best_model=("eval_selection" if labelled else "eval_loss") if keep_best else None,
        greater_is_better=labelled if keep_best else None,
        seed=experiment.seed,
        data_seed=experiment.seed,
        bf16=(plan.device == "cuda" and plan.dtype == "bfloat16") or plan.autocast == "bfloat16",
        fp16=plan.device == "cuda" and plan.dtype == "float16",  # fp16 gets a loss scaler from the Trainer
        use_cpu=plan.device == "cpu",
        **_checkpointing_args(config_class, t.gradient_checkpointing is True),  # auto: apply_checkpointing
        logging_nan_inf_filter=False,  # its check reads the loss back every micro-batch; MetricsLog stops on NaN
        report_to="none",  # tensorboard and W&B are added as callbacks with our paths
        prediction_loss_only=True,
        ddp_find_unused_parameters=False,
        **_loading(plan.device),
        save_only_model=False,  # optimizer, scheduler and RNG states are needed to resume exactly
    )
    fields = list(config_class.__dataclass_fields__)
    unknown = [k for k in t.extra_args if k not in fields]
    if unknown:
        from tuneforge.config_errors import did_you_mean

        raise TuneforgeError(
            "; ".join(
                f"train.extra_args.{key}: not a {config_class.__name__} option" + did_you_mean(key, fields)
                for key in unknown
            )
        )
    return {**base, **specific, **t.extra_args}


def data_fingerprint(experiment: Experiment, run: RunDir, training, quantization: str = "none") -> dict[str, Any]:
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
        "label_adjustment": getattr(t, "label_adjustment", 0.0),
        **({"prompt_loss_weight": training.prompt_loss_weight} if training.prompt_loss_weight else {}),
        "seed": experiment.seed,
        "world_size": world_size(),
        "model": experiment.model.ref,
    }


def base_eval_identity(
    setup: Setup, fingerprint: dict[str, Any], training: TrainingPlan, eval_batch: int, labels: list[str] | None
) -> dict[str, Any] | None:
    """What the base model's valid metrics at step 0 depend on (`base_evaluation`'s cache key): the model, how it is
    loaded, the valid split and how it is batched and scored. None when training continues an earlier adapter: its
    step 0 is that adapter's, not the base's."""
    if setup.start_adapter:
        return None
    experiment = setup.experiment
    return {
        "model": experiment.model.model_dump(mode="json"),
        "quantization": setup.plan.quantization,
        "dtype": setup.plan.dtype,
        "valid_sha256": fingerprint["valid_sha256"],
        "max_length": experiment.data.max_length,
        "packing": training.packing,
        "eval_batch": eval_batch,
        "labels": labels,
        "dora": experiment.lora.dora,
        "full_finetune": experiment.train.full_finetune,
        "world_size": world_size(),
    }


def base_evaluation(trainer, run: RunDir, identity: dict[str, Any] | None) -> dict[str, float]:
    """The base model's valid metrics before the first step, logged as step 0.

    A sweep's points share them (run.base_eval_cache): a fresh LoRA adapter changes nothing at step 0, so points
    that differ only in how they train would each compute the same numbers. `identity` is what they depend on;
    None (training from an earlier adapter) always evaluates."""
    import hashlib

    folder = run.base_eval_cache
    if folder is None or identity is None:
        return trainer.evaluate()
    path = Path(folder) / f"step0-{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]}.json"
    if path.exists():
        metrics = json.loads(path.read_text(encoding="utf-8"))
        trainer.log(metrics)
        if is_main_process():
            print(f"the base model's valid metrics at step 0: the same as an earlier point's ({path.name})", flush=True)
        return metrics
    metrics = trainer.evaluate()
    if is_main_process():
        from tuneforge.atomic import atomic_write_json

        atomic_write_json(path, metrics)
    return metrics


def add_adapters(model, experiment: Experiment, plan, start: Path | None = None):
    """LoRA adapters on the base (or the full model, with full_finetune); `start`: continue training that adapter."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from tuneforge.models import keep_4bit_layers_differentiable

    t, lora = experiment.train, experiment.lora
    checkpointing = t.gradient_checkpointing is True  # auto is decided on the built trainer (apply_checkpointing)
    if t.full_finetune:
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    if plan.quantization != "none":
        keep_4bit_layers_differentiable(model)  # see models.py: gradients must flow through frozen 4-bit layers
        # What PEFT's prepare_model_for_kbit_training does, less its fp32 copies of the embeddings, head and norms
        # (+2.1 GB on an 8B): they stay frozen in the compute dtype the model was loaded in. Under FSDP that is also
        # what lets a wrapped block flatten its parameters into one tensor of one dtype.
        for param in model.parameters():
            param.requires_grad_(False)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    if start is not None:
        return PeftModel.from_pretrained(model, str(start), is_trainable=True)
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


def full_weights(trainer) -> dict | None:
    """Under FSDP the weights are sharded across processes: the full state dict, gathered with every process taking
    part (call it on all of them, before the main one saves). None otherwise: each process holds the whole model."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    return trainer.accelerator.get_state_dict(trainer.model)


def prepare_for_fsdp_evaluation(trainer) -> None:
    """Wrap the model in FSDP before the first evaluation, with PEFT's policy that wraps adapter layers on their own.

    The base model's evaluation runs before training, and the trainer's evaluation loop would wrap the model with the
    plain transformer-layer policy (the PEFT one is set only when training starts): frozen and trainable weights would
    then share a flat parameter, which FSDP refuses. Under cpu-RAM-efficient loading only the first process holds the
    weights until the wrapper syncs them, so the label scoring must run on the wrapped model too."""
    if not getattr(trainer, "is_fsdp_enabled", False) or len(trainer.accelerator._models):
        return
    from transformers.distributed.fsdp import update_fsdp_plugin_peft

    if hasattr(trainer.model, "peft_config"):
        update_fsdp_plugin_peft(trainer.model, trainer.accelerator)
    trainer.model = trainer.model_wrapped = trainer.accelerator.prepare(trainer.model)


def finished_run(run: RunDir, checkpoint: Path) -> dict[str, Any] | None:
    """The recorded summary, marked `already_trained`, when the run already trained every step its checkpoints
    planned and saved its adapter: a resume then has nothing to do, and says so instead of training again."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    summary = run.read_manifest().get("train")
    planned = state.get("max_steps") or 0
    if (
        not summary
        or not planned
        or summary.get("steps", 0) < planned
        or not (run.sub("adapter") / "adapter_config.json").exists()
    ):
        return None
    return {**summary, "already_trained": True}


def kept_adapter(trainer, records: list[dict], label_eval) -> dict[str, Any]:
    """Which step's adapter is kept and why, with its valid metrics (the trainer has loaded the best one when
    keep_best)."""
    last_step = trainer.state.global_step
    best = trainer.state.best_global_step if trainer.args.load_best_model_at_end else None
    if best is None or trainer.state.best_model_checkpoint is None:
        kept, why = (
            last_step,
            "the last step (train.keep_best is off)" if not trainer.args.load_best_model_at_end else "the last step",
        )
    else:
        kept = best
        if label_eval is None:
            why = "lowest valid loss of the evaluations"
        elif best == last_step:
            why = "the last evaluation: no earlier one labelled the valid split better beyond chance (sign test, 5%)"
        else:
            why = (
                f"its valid accuracy beat every later evaluation's beyond chance (sign test, 5%; "
                f"{len([r for r in records if 'eval_accuracy' in r and r['step'] > 0])} evaluations)"
            )
    kept_record = next((r for r in records if r.get("step") == kept and "eval_loss" in r), None)
    if kept_record is None:  # no evaluation at the kept step: measure it now
        kept_record = trainer.evaluate()
    out: dict[str, Any] = {"kept_step": kept, "kept_because": why, "final_eval_loss": kept_record["eval_loss"]}
    if label_eval is not None:
        base = logged_value(records, 0, "eval_accuracy")
        out.update(
            valid_accuracy=kept_record.get("eval_accuracy"),
            valid_macro_f1=kept_record.get("eval_macro_f1"),
            base_valid_accuracy=base,
            majority_accuracy=label_eval.majority_accuracy,
            majority_label=label_eval.majority_label,
        )
        if out["valid_accuracy"] is not None and out["valid_accuracy"] <= label_eval.majority_accuracy:
            out["warning"] = (
                f"valid accuracy {out['valid_accuracy']:.3f} is at or below "
                f"always answering {label_eval.majority_label!r} "
                f"({label_eval.majority_accuracy:.3f}): the model learned little more than how common each label is. "
                "Give it more optimizer steps (train.batch_size / epochs: auto) or more examples of the rare labels"
            )
    return out


def _step_of(checkpoint: Path | None) -> int:
    return int(checkpoint.name.split("-")[-1]) if checkpoint else 0


def logged_value(records: list[dict], step: int, key: str) -> float | None:
    """`key` as metrics.jsonl logged it at `step`, or None."""
    found = next((r for r in records if r.get("step") == step and key in r), None)
    return found[key] if found else None


def check_can_train(experiment: Experiment, plan, run: RunDir) -> Path:
    """Refusals before anything loads: an optimizer the device cannot run, no prepared data. The data folder."""
    if experiment.train.optimizer == "paged_adamw_8bit" and plan.device != "cuda":
        raise TuneforgeError("train.optimizer: paged_adamw_8bit needs a CUDA GPU; use adamw on CPU")
    data_dir = run.sub("data")
    if not (data_dir / "train.jsonl").exists():
        raise TuneforgeError(f"no prepared data in {data_dir}; run `tuneforge prepare` first (or `tuneforge run`)")
    return data_dir


def resume_point(
    run: RunDir, train, resume: bool, fingerprint: dict[str, Any]
) -> tuple[Path | None, dict[str, Any] | None]:
    """(the checkpoint to resume from, or None; the finished run's summary when there is nothing left to train)."""
    from tuneforge.train import callbacks as cb

    if not (resume or train.resume == "auto"):
        return None, None
    checkpoints = run.sub("checkpoints")
    resume_from = cb.latest_complete_checkpoint(checkpoints)
    if resume_from is None and resume:
        raise TuneforgeError(f"--resume: no complete checkpoint under {checkpoints}")
    if resume_from is None:
        return None, None
    cb.check_resumable(resume_from, fingerprint)
    return resume_from, finished_run(run, resume_from)


def training_callbacks(
    run: RunDir, train, fingerprint: dict[str, Any], trainable: int, resume_from: Path | None, extra: list | None
):
    """(MetricsLog, every callback): metrics.jsonl, the finite guard, checkpoint markers with a disk check,
    TensorBoard on the main process, and W&B with train.wandb_project. The MetricsLog needs its `trainer` set once
    the trainer exists."""
    from transformers.integrations import TensorBoardCallback

    from tuneforge.train import callbacks as cb

    metrics_cb = cb.MetricsLog(run.sub("metrics.jsonl"), resume_step=_step_of(resume_from))
    # weights + Adam moments, per checkpoint kept (and the best)
    bytes_needed = trainable * 4 * 4 * (train.keep_checkpoints + 1) + (64 << 20)
    found = [
        metrics_cb,
        cb.FiniteWeights(),
        cb.CheckpointMarker(run.sub("checkpoints"), fingerprint, bytes_needed),
        *(extra or []),
    ]
    if is_main_process():
        from torch.utils.tensorboard import SummaryWriter

        found.append(TensorBoardCallback(tb_writer=SummaryWriter(str(run.sub("tensorboard")))))
    if getattr(train, "wandb_project", None):
        try:
            from transformers.integrations import WandbCallback
        except ImportError:
            raise TuneforgeError("train.wandb_project needs the wandb package (pip install wandb)") from None
        os.environ.setdefault("WANDB_PROJECT", train.wandb_project)
        found.append(WandbCallback())
    return metrics_cb, found


def print_plan(headline: str, training: TrainingPlan, notes: list[str] | tuple[str, ...] = ()) -> None:
    """On the main process: the headline, the training plan with its reasons and warnings, then the recipe's notes."""
    if is_main_process():
        print(headline)
        print("training plan (auto values chosen from the data; prepare's report.md says the same):")
        for line in training.describe():
            print(f"  {line}")
        for warning in training.warnings:
            print(f"warning: {warning}")
        for note in notes:
            print(f"  {note}")
