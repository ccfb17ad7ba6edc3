"""`train.method: dpo`: preference tuning with TRL's DPO trainer, on the same LoRA / QLoRA stack as SFT.

Pairs come from prepare (`data.format: preference`). tuneforge tokenizes them with
its own ChatEncoder, so the prompt is exactly the inference prompt and each answer
is what the template writes for it (its end-of-turn token included); earlier
assistant turns of the prompt are context. TRL's own tokenization is skipped.

The reference policy is the model with the starting adapter: a copy of
`train.init_adapter` (an SFT run's adapter) when given, so DPO moves away from that
SFT policy and not from the bare base; else the base itself.

metrics.jsonl gains `reward_margin` (mean of beta times the chosen-minus-rejected
log-ratio against the reference) and `preference_accuracy` (share of pairs whose
preferred answer wins), per step and at each evaluation.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tuneforge.errors import TuneforgeError

REFERENCE = "ref"  # the name TRL gives the frozen copy of a starting adapter


def pair_rows(encoder, examples, max_length: int) -> tuple[list[dict], list]:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} per pair that fits (or is cut to fit) max_length."""
    from tuneforge.data.preference import fit_pair

    rows, kept = [], []
    for example in examples:
        if example.rejected is None:
            raise TuneforgeError(f"{example.where}: not a preference pair; train.method: dpo needs data.format: preference")
        _, encoded = fit_pair(encoder, example.messages, example.rejected, max_length, "truncate", example.extra.get("tools"))
        (chosen_start, chosen_end), (rejected_start, rejected_end) = (_answer(e) for e in encoded)
        start = min(chosen_start, rejected_start, _common_prefix(encoded[0].input_ids, encoded[1].input_ids))
        chosen = encoded[0].input_ids[start:chosen_end]
        rejected = encoded[1].input_ids[start:rejected_end]
        if not chosen or not rejected:
            continue
        rows.append({"prompt_ids": encoded[0].input_ids[:start], "chosen_ids": chosen, "rejected_ids": rejected})
        kept.append(example)
    return rows, kept


def _answer(encoded) -> tuple[int, int]:
    positions = [i for i, keep in enumerate(encoded.supervised) if keep]
    if not positions:
        return len(encoded.input_ids), len(encoded.input_ids)
    return positions[0], positions[-1] + 1


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def init_adapter_folder(experiment) -> Path | None:
    """train.init_adapter as an adapter folder: the folder itself, or a run directory's adapter/."""
    value = experiment.train.init_adapter
    if not value:
        return None
    path = experiment.resolve_path(value)
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").exists():
            return candidate
    raise TuneforgeError(f"train.init_adapter: no adapter in {path} (nor in {path / 'adapter'}); point it at an adapter folder "
                         "or at the run directory of an SFT run")


def dpo_trainer_class():
    from trl import DPOTrainer

    class ForgeDPOTrainer(DPOTrainer):
        """TRL's DPO trainer on pairs tuneforge has tokenized, counting the answer tokens it trains on."""

        supervised_tokens = 0

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # prompt_ids / chosen_ids / rejected_ids already, from pair_rows

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training and "completion_mask" in inputs:
                self.supervised_tokens += int(inputs["completion_mask"].sum())
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    return ForgeDPOTrainer


def train_dpo(experiment, run, resume: bool = False, progress: bool = True, callbacks: list | None = None) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from trl import DPOConfig

    from tuneforge.data.chat import ChatEncoder
    from tuneforge.data.plan import plan_training
    from tuneforge.data.prepared import load_prepared
    from tuneforge.data.records import common_system_prompt
    from tuneforge.models import load_model, load_tokenizer, materialize, plan_device, resolve
    from tuneforge.train import callbacks as cb
    from tuneforge.train.finish import finish
    from tuneforge.train.common import (add_adapters, check_can_train, data_fingerprint, full_weights, is_main_process, keep_trainable_fp32,
                                        kept_adapter, prepare_for_fsdp_evaluation, print_plan, resume_point, trainer_arguments, training_callbacks, world_size, _from_log)

    t = experiment.train
    plan = plan_device(experiment.model)
    data_dir = check_can_train(experiment, plan, run)
    start_adapter = init_adapter_folder(experiment)

    location = materialize(resolve(experiment.model.ref))
    tokenizer = load_tokenizer(experiment.model, start_adapter or location)
    encoder = ChatEncoder(tokenizer)
    max_length = experiment.data.max_length
    train_rows, train_pairs = pair_rows(encoder, load_prepared(data_dir, "train"), max_length)
    valid_rows, _ = pair_rows(encoder, load_prepared(data_dir, "valid"), max_length)
    if not train_rows:
        raise TuneforgeError("the prepared training data has no preference pair to learn from")
    lengths = [2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in train_rows]
    answers = [len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in train_rows]
    training = plan_training(t, lengths, answers, False, max_length, experiment.seed, world_size())
    arguments = trainer_arguments(experiment, run, plan, training, False, bool(valid_rows), DPOConfig, dict(
        beta=t.dpo.beta, loss_type=[t.dpo.loss_type], max_length=max_length, precompute_ref_log_probs=False,
        padding_free=False, remove_unused_columns=False, train_sampling_strategy="random"))
    try:
        args = DPOConfig(**arguments)
    except (TypeError, ValueError) as exc:
        raise TuneforgeError(f"train.extra_args: {exc}") from None

    fingerprint = {**data_fingerprint(experiment, run, training, plan.quantization), "method": "dpo",
                   "dpo": t.dpo.model_dump(mode="json"), "init_adapter": str(start_adapter) if start_adapter else None}
    resume_from, done = resume_point(run, t, resume, fingerprint)
    if done is not None:
        return done

    torch.manual_seed(experiment.seed)
    model = load_model(experiment.model, plan, location)
    model.config.use_cache = False
    model = add_adapters(model, experiment, plan, start_adapter)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer_ref, metrics_cb, callbacks = training_callbacks(run, t, fingerprint, trainable, resume_from, callbacks)
    args.disable_tqdm = not progress
    trainer = dpo_trainer_class()(
        model=model, args=args, train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(valid_rows) if valid_rows else None, processing_class=tokenizer, callbacks=callbacks,
    )
    trainer_ref["trainer"] = trainer
    keep_trainable_fp32(trainer.model, plan.dtype)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    reference = f"the starting adapter {start_adapter}" if start_adapter else "the base model (adapter off)"
    print_plan(f"DPO on {plan.describe()}: {len(train_rows)} pairs, beta {t.dpo.beta}, {t.dpo.loss_type} loss, reference {reference}; "
               f"{trainable:,} of {total:,} parameters trainable", training)

    prepare_for_fsdp_evaluation(trainer)
    base_metrics = trainer.evaluate() if resume_from is None and valid_rows else None  # the reference: margin 0
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started

    records = metrics_cb.records
    supervised = cb.sum_over_ranks(trainer.supervised_tokens)
    trained = [r for r in records if "reward_margin" in r]
    summary = {
        "method": "dpo",
        "beta": t.dpo.beta,
        "loss_type": t.dpo.loss_type,
        "init_adapter": str(start_adapter) if start_adapter else None,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3),
        "plan": training.to_json(),
        "train_loss": result.training_loss,
        "first_reward_margin": trained[0]["reward_margin"] if trained else None,
        "last_reward_margin": trained[-1]["reward_margin"] if trained else None,
        "base_eval_loss": base_metrics["eval_loss"] if base_metrics else _from_log(records, 0, "eval_loss"),
        "final_eval_loss": None,
        "seconds": round(seconds, 1),
        "supervised_tokens": supervised,
        "supervised_tokens_per_s": round(supervised / max(seconds, 1e-9), 1),
        "trainable_params": trainable,
        "total_params": total,
        "device": plan.describe(),
        "attention_mode": "padded",
        "resumed_from": resume_from.name if resume_from else None,
        "system_prompt": common_system_prompt([e.messages for e in train_pairs]),
    }
    if valid_rows:
        summary.update(kept_adapter(trainer, records, None))
        kept = next((r for r in records if r.get("step") == summary["kept_step"] and "eval_reward_margin" in r), None)
        if kept is not None:
            summary.update(valid_reward_margin=kept["eval_reward_margin"], valid_preference_accuracy=kept.get("eval_preference_accuracy"))
    if REFERENCE in getattr(trainer.model, "peft_config", {}):
        trainer.model.delete_adapter(REFERENCE)  # the frozen copy is the starting adapter: not part of the result
    weights = full_weights(trainer)  # under FSDP every process takes part in gathering them
    if is_main_process():
        finish(trainer, tokenizer, encoder, experiment, run, summary, records, plan.quantization, weights)
    return summary
