"""`train.method: dpo`: preference tuning with TRL's DPO trainer, on the same LoRA / QLoRA stack as SFT.

Pairs come from prepare (`data.format: preference`). tuneforge tokenizes them with
its own ChatEncoder, so the prompt is exactly the inference prompt and each answer
is what the template writes for it (its end-of-turn token included); earlier
assistant turns of the prompt are context. TRL's own tokenization is skipped.

The reference policy is the model with the starting adapter: a copy of
`train.init_adapter` (an SFT run's adapter) when given, so DPO moves away from that
SFT policy and not from the bare base; else the base itself. Either way TRL keeps a
frozen copy of the adapter as training starts (`ref`; a fresh adapter's lora_B
is 0, so its copy computes the base). Checkpoints save it in ref/ and a
resume loads it back from there, so a resumed run keeps the reference it started
with (tests/unit/test_resume_dpo.py).

metrics.jsonl gains `reward_margin` (mean of beta times the chosen-minus-rejected
log-ratio against the reference) and `preference_accuracy` (share of pairs whose
preferred answer wins), per step and at each evaluation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trl import DPOConfig, DPOTrainer

from tuneforge.errors import TuneforgeError
from tuneforge.train.common import (
    apply_checkpointing,
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
from tuneforge.train.preference_common import (
    CountsCompletionTokens,
    answer_span,
    common_prefix,
    drop_reference,
    kept_margin,
)

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.data.plan import TrainingPlan
    from tuneforge.run import RunDir


def train_dpo(
    experiment: Experiment, run: RunDir, resume: bool = False, progress: bool = True, callbacks: list | None = None
) -> dict[str, Any]:
    """Preference tuning: setup (pairs, plan, the model with adapters), train (TRL's DPO trainer), finish (as SFT's).
    The summary it records, or the finished run's."""
    from datasets import Dataset

    from tuneforge.data.prepared import load_prepared
    from tuneforge.train.finish import finish, summarize

    # ------------------------------------------------------------------ setup
    t, max_length = experiment.train, experiment.data.max_length
    setup = set_up(experiment, run)
    train_rows, train_pairs = pair_rows(setup.encoder, load_prepared(setup.data_dir, "train"), max_length)
    valid_rows, _ = pair_rows(setup.encoder, load_prepared(setup.data_dir, "valid"), max_length)
    if not train_rows:
        raise TuneforgeError("the prepared training data has no preference pair to learn from")
    training = dpo_plan(experiment, train_rows, bool(valid_rows))
    args = dpo_config(experiment, run, setup.plan, training, bool(valid_rows))
    fingerprint = setup.fingerprint(training, method="dpo", dpo=t.dpo.model_dump(mode="json"))
    resume_from, done = resume_point(run, t, resume, fingerprint)
    if done is not None:
        return done
    model = setup.load_model()
    compilation = compile_as_set(model, t.compile, setup.plan.device)
    metrics, callbacks = training_callbacks(run, t, fingerprint, parameter_counts(model)[0], resume_from, callbacks)
    args.disable_tqdm = not progress
    trainer = ForgeDPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(valid_rows) if valid_rows else None,
        processing_class=setup.tokenizer,
        callbacks=callbacks,
    )
    metrics.trainer = trainer
    keep_trainable_fp32(trainer.model, setup.plan.dtype)
    params = parameter_counts(trainer.model)  # the trainer's model holds TRL's frozen copy of a starting adapter too
    reference = f"the starting adapter {setup.start_adapter}" if setup.start_adapter else "the base model (adapter off)"
    # a micro-batch runs both answers of each pair
    longest = max(2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"]) for row in train_rows)
    checkpointing = apply_checkpointing(trainer, setup, training.micro_batch_size * longest, params[0])
    print_plan(
        f"DPO on {setup.plan.describe()}: {len(train_rows)} pairs, beta {t.dpo.beta}, {t.dpo.loss_type} loss, "
        f"reference {reference}; {params[0]:,} of {params[1]:,} parameters trainable",
        training,
        [checkpointing.describe(), compilation.describe()],
    )

    # ------------------------------------------------------------------ train
    # step 0: the policy is its own reference (margin 0); identity None: evaluated here, never a sweep's cached metrics
    trained = run_training(trainer, run, resume_from, bool(valid_rows), identity=None)

    # ------------------------------------------------------------------ finish
    summary = {
        **_dpo_summary(setup, metrics.records),
        **summarize(trained, setup, training, metrics.records, params, "padded", train_pairs),
    }
    if valid_rows:
        summary.update(kept_adapter(trainer, metrics.records, None))
        summary.update(kept_margin(metrics.records, summary["kept_step"]))
    drop_reference(trainer.model)
    return finish(trainer, setup, summary, metrics.records)


class ForgeDPOTrainer(CountsCompletionTokens, DPOTrainer):
    """TRL's DPO trainer on pairs tuneforge has tokenized, counting the answer tokens it trains on."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # prompt_ids / chosen_ids / rejected_ids already, from pair_rows


def dpo_plan(experiment: Experiment, rows: list[dict], has_valid: bool) -> TrainingPlan:
    """The training plan from the pairs: each step reads a pair's prompt twice and both its answers."""
    from tuneforge.data.plan import plan_training

    lengths = [2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows]
    answers = [len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows]
    return plan_training(
        experiment.train, lengths, answers, False, experiment.data.max_length, experiment.seed, world_size(), has_valid
    )


def dpo_config(experiment: Experiment, run: RunDir, plan, training: TrainingPlan, has_valid: bool) -> DPOConfig:
    """The trainer configuration from the resolved plan; `train.extra_args` is checked here, before any model loads."""
    t = experiment.train
    specific = dict(
        beta=t.dpo.beta,
        loss_type=[t.dpo.loss_type],
        max_length=experiment.data.max_length,
        precompute_ref_log_probs=False,
        padding_free=False,
        remove_unused_columns=False,
        train_sampling_strategy="random",
    )
    arguments = trainer_arguments(experiment, run, plan, training, False, has_valid, DPOConfig, specific)
    try:
        return DPOConfig(**arguments)
    except (TypeError, ValueError) as exc:
        raise TuneforgeError(f"train.extra_args: {exc}") from None


def _dpo_summary(setup, records: list[dict]) -> dict[str, Any]:
    """DPO's own keys of the run summary, before the ones SFT records too."""
    t = setup.experiment.train
    trained = [r for r in records if "reward_margin" in r]
    return {
        "method": "dpo",
        "beta": t.dpo.beta,
        "loss_type": t.dpo.loss_type,
        "init_adapter": str(setup.start_adapter) if setup.start_adapter else None,
        "first_reward_margin": trained[0]["reward_margin"] if trained else None,
        "last_reward_margin": trained[-1]["reward_margin"] if trained else None,
    }


def pair_rows(encoder, examples, max_length: int) -> tuple[list[dict], list]:
    """{"prompt_ids", "chosen_ids", "rejected_ids"} per pair that fits (or is cut to fit) max_length."""
    from tuneforge.data.preference import fit_pair

    rows, kept = [], []
    for example in examples:
        if example.rejected is None:
            raise TuneforgeError(
                f"{example.where}: not a preference pair; train.method: dpo needs data.format: preference"
            )
        _, encoded = fit_pair(
            encoder, example.messages, example.rejected, max_length, "truncate", example.extra.get("tools")
        )
        (chosen_start, chosen_end), (rejected_start, rejected_end) = (answer_span(e) for e in encoded)
        start = min(chosen_start, rejected_start, common_prefix(encoded[0].input_ids, encoded[1].input_ids))
        chosen = encoded[0].input_ids[start:chosen_end]
        rejected = encoded[1].input_ids[start:rejected_end]
        if not chosen or not rejected:
            continue
        rows.append({"prompt_ids": encoded[0].input_ids[:start], "chosen_ids": chosen, "rejected_ids": rejected})
        kept.append(example)
    return rows, kept
