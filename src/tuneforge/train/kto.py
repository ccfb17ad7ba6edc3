"""`train.method: kto`: answers rated desirable or undesirable, with TRL's KTO trainer, on the same LoRA / QLoRA
stack as SFT and DPO.

The answers come from prepare (`data.format: kto`): each is a conversation whose final assistant turn is rated by
the record's `label` (true: desirable, a thumbs-up; false: undesirable, a thumbs-down). No pair is needed, which
is what a support bot's feedback mostly is. tuneforge tokenizes them with its own ChatEncoder, so the prompt is
exactly the inference prompt; TRL's own tokenization is skipped.

The reference is the model with the starting adapter, as with DPO: a frozen copy (`ref`) of `train.init_adapter`
when given, else of the fresh adapter (the base); checkpoints keep it in ref/, so a resumed run trains against the
same one (tests/unit/test_resume_kto.py). KTO moves desirable answers' log-ratio against it above a KL
estimate and undesirable ones below; the KL estimate pairs each prompt with the next answer of its micro-batch,
so a micro-batch holds at least two answers and the answers are shuffled once, with the seed, and then read in
order. When one class is rarer its loss is weighted up (`train.kto` weights auto), as the KTO paper recommends.

metrics.jsonl gains `reward_margin` (desirable minus undesirable rewards, beta times the log-ratio), the rewards
of each class (`reward_chosen`: desirable, `reward_rejected`: undesirable) and `kl`, per step and at evaluations.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trl import KTOConfig, KTOTrainer

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
from tuneforge.train.preference_common import CountsCompletionTokens, answer_span, drop_reference, kept_margin

if TYPE_CHECKING:
    from tuneforge.config import Experiment, KTOSettings
    from tuneforge.data.plan import TrainingPlan
    from tuneforge.run import RunDir

BALANCED = (1.0, 4 / 3)  # the KTO paper's range for desirable_weight x desirables / (undesirable_weight x undesirables)


def train_kto(
    experiment: Experiment, run: RunDir, resume: bool = False, progress: bool = True, callbacks: list | None = None
) -> dict[str, Any]:
    """KTO: setup (rated answers, plan, class weights, the model with adapters), train (TRL's KTO trainer), finish
    (as SFT's). The summary it records, or the finished run's."""
    from datasets import Dataset

    from tuneforge.data.prepared import load_prepared
    from tuneforge.train.finish import finish, summarize

    # ------------------------------------------------------------------ setup
    t = experiment.train
    setup = set_up(experiment, run)
    train_rows, train_examples = answer_rows(setup.encoder, load_prepared(setup.data_dir, "train"))
    valid_rows, _ = answer_rows(setup.encoder, load_prepared(setup.data_dir, "valid"))
    if not train_rows:
        raise TuneforgeError("the prepared training data has no rated answer to learn from")
    training = kto_plan(experiment, train_rows, bool(valid_rows))
    weights = class_weights(t.kto, sum(r["label"] for r in train_rows), sum(not r["label"] for r in train_rows))
    args = kto_config(experiment, run, setup.plan, training, weights, bool(valid_rows))
    fingerprint = setup.fingerprint(training, method="kto", kto={**t.kto.model_dump(mode="json"), **weights.resolved})
    resume_from, done = resume_point(run, t, resume, fingerprint)
    if done is not None:
        return done
    model = setup.load_model()
    compilation = compile_as_set(model, t.compile, setup.plan.device)
    metrics, callbacks = training_callbacks(run, t, fingerprint, parameter_counts(model)[0], resume_from, callbacks)
    args.disable_tqdm = not progress
    micro = training.micro_batch_size
    trainer = ForgeKTOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(with_kl_answers(shuffled(train_rows, experiment.seed), micro)),
        eval_dataset=Dataset.from_list(with_kl_answers(valid_rows, micro)) if valid_rows else None,
        processing_class=setup.tokenizer,
        callbacks=callbacks,
    )
    metrics.trainer = trainer
    keep_trainable_fp32(trainer.model, setup.plan.dtype)
    params = parameter_counts(trainer.model)  # the trainer's model holds TRL's frozen copy of a starting adapter too
    reference = f"the starting adapter {setup.start_adapter}" if setup.start_adapter else "the base model (adapter off)"
    longest = max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in train_rows)
    checkpointing = apply_checkpointing(trainer, setup, micro * longest, params[0])
    print_plan(
        f"KTO on {setup.plan.describe()}: {weights.desirable_count} desirable and {weights.undesirable_count} "
        f"undesirable answers, beta {t.kto.beta}, reference {reference}; {params[0]:,} of {params[1]:,} parameters "
        "trainable",
        training,
        [weights.describe(), checkpointing.describe(), compilation.describe()],
    )

    # ------------------------------------------------------------------ train
    trained = run_training(trainer, run, resume_from, bool(valid_rows), identity=None)

    # ------------------------------------------------------------------ finish
    summary = {
        **_kto_summary(setup, weights, metrics.records),
        **summarize(trained, setup, training, metrics.records, params, "padded", train_examples),
    }
    if valid_rows:
        summary.update(kept_adapter(trainer, metrics.records, None))
        summary.update(kept_margin(metrics.records, summary["kept_step"]))
    drop_reference(trainer.model)
    return finish(trainer, setup, summary, metrics.records)


class ForgeKTOTrainer(CountsCompletionTokens, KTOTrainer):
    """TRL's KTO trainer on answers tuneforge has tokenized (and paired with their KL answers), counting the answer
    tokens it trains on."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # prompt_ids / completion_ids / KL_completion_ids / label already, from answer_rows


@dataclass
class ClassWeights:
    """The loss weight of each class, as set or chosen for the counts, and why."""

    desirable: float
    undesirable: float
    desirable_count: int
    undesirable_count: int
    reason: str

    @property
    def resolved(self) -> dict[str, float]:
        return {"desirable_weight": self.desirable, "undesirable_weight": self.undesirable}

    def describe(self) -> str:
        return f"desirable_weight {self.desirable:g}, undesirable_weight {self.undesirable:g}: {self.reason}"


def class_weights(settings: KTOSettings, desirable: int, undesirable: int) -> ClassWeights:
    """train.kto's weights, `auto` ones chosen so desirable_weight x desirables / (undesirable_weight x undesirables)
    is 1 (rounded into the KTO paper's [1, 4/3]): the rarer class is weighted up, the other keeps 1."""
    d, u = settings.desirable_weight, settings.undesirable_weight
    if not desirable or not undesirable:
        only = "desirable" if desirable else "undesirable"
        return ClassWeights(
            1.0 if d == "auto" else d, 1.0 if u == "auto" else u, desirable, undesirable, f"only {only} answers"
        )
    if d == "auto" and u == "auto" and desirable <= undesirable:
        d, u = math.ceil(1000 * undesirable / desirable) / 1000, 1.0
    elif d == "auto" and u == "auto":
        d, u = 1.0, math.floor(1000 * desirable / undesirable) / 1000
    elif d == "auto":
        d = math.ceil(1000 * u * undesirable / desirable) / 1000
    elif u == "auto":
        u = math.floor(1000 * d * desirable / undesirable) / 1000
    ratio = d * desirable / (u * undesirable)
    chosen = settings.desirable_weight == "auto" or settings.undesirable_weight == "auto"
    counts = f"{desirable} desirable, {undesirable} undesirable"
    if chosen and desirable == undesirable:
        reason = f"{counts}: as many of each, so both weigh 1"
    elif chosen:
        reason = f"{counts}: the rarer class weighted up, so the classes weigh {ratio:.3f} to 1 (KTO paper: 1 to 4/3)"
    elif BALANCED[0] <= ratio <= BALANCED[1]:
        reason = f"set in the experiment file; {counts} weigh {ratio:.3f} to 1 (KTO paper: 1 to 4/3)"
    else:
        reason = (
            f"set in the experiment file; warning: {counts} weigh {ratio:.3f} to 1, outside the KTO paper's "
            "1 to 4/3 (auto balances them)"
        )
    return ClassWeights(d, u, desirable, undesirable, reason)


def kto_plan(experiment: Experiment, rows: list[dict], has_valid: bool) -> TrainingPlan:
    """The training plan from the rated answers: each row is one prompt and its answer."""
    from tuneforge.data.plan import plan_training

    lengths = [len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows]
    answers = [len(r["completion_ids"]) for r in rows]
    return plan_training(
        experiment.train, lengths, answers, False, experiment.data.max_length, experiment.seed, world_size(), has_valid
    )


def kto_config(
    experiment: Experiment, run: RunDir, plan, training: TrainingPlan, weights: ClassWeights, has_valid: bool
) -> KTOConfig:
    """The trainer configuration from the resolved plan; `train.extra_args` is checked here, before any model loads."""
    t = experiment.train
    specific = dict(
        beta=t.kto.beta,
        desirable_weight=weights.desirable,
        undesirable_weight=weights.undesirable,
        max_length=experiment.data.max_length,
        precompute_ref_log_probs=False,
        remove_unused_columns=False,
        train_sampling_strategy="sequential",  # each answer's KL partner is fixed in its micro-batch (with_kl_answers)
    )
    arguments = trainer_arguments(experiment, run, plan, training, False, has_valid, KTOConfig, specific)
    try:
        return KTOConfig(**arguments)
    except (TypeError, ValueError) as exc:
        raise TuneforgeError(f"train.extra_args: {exc}") from None


def answer_rows(encoder, examples) -> tuple[list[dict], list]:
    """{"prompt_ids", "completion_ids", "label"} per rated answer that keeps at least one answer token."""
    rows, kept = [], []
    for example in examples:
        if example.desirable is None:
            raise TuneforgeError(
                f"{example.where}: not a rated answer; train.method: kto needs data.format: kto "
                "(records with 'label': true or false)"
            )
        (encoded,) = encoder.encode_many([example.messages], [example.extra.get("tools")])
        start, end = answer_span(encoded)
        if start >= end:
            continue
        rows.append(
            {
                "prompt_ids": encoded.input_ids[:start],
                "completion_ids": encoded.input_ids[start:end],
                "label": example.desirable,
            }
        )
        kept.append(example)
    return rows, kept


def shuffled(rows: list[dict], seed: int) -> list[dict]:
    """The rows in one seeded random order: KTO reads them in order (its micro-batches fix the KL partners), and a
    file sorted by label would otherwise give micro-batches of one class."""
    out = list(rows)
    random.Random(seed).shuffle(out)
    return out


def with_kl_answers(rows: list[dict], micro_batch: int) -> list[dict]:
    """Each row with `KL_completion_ids`: the answer before it in its micro-batch (the first takes the last), so the
    KL estimate asks each prompt about an answer that was not given to it, as TRL's own preparation does."""
    out = []
    for start in range(0, len(rows), micro_batch):
        chunk = rows[start : start + micro_batch]
        partners = [chunk[-1]["completion_ids"]] + [r["completion_ids"] for r in chunk[:-1]]
        out += [{**row, "KL_completion_ids": partner} for row, partner in zip(chunk, partners)]
    return out


def _kto_summary(setup, weights: ClassWeights, records: list[dict]) -> dict[str, Any]:
    """KTO's own keys of the run summary, before the ones SFT records too."""
    trained = [r for r in records if "reward_margin" in r]
    return {
        "method": "kto",
        "beta": setup.experiment.train.kto.beta,
        "desirable_weight": weights.desirable,
        "undesirable_weight": weights.undesirable,
        "desirable_answers": weights.desirable_count,
        "undesirable_answers": weights.undesirable_count,
        "init_adapter": str(setup.start_adapter) if setup.start_adapter else None,
        "first_reward_margin": trained[0]["reward_margin"] if trained else None,
        "last_reward_margin": trained[-1]["reward_margin"] if trained else None,
    }
