"""`train.method: grpo`: online reinforcement learning with TRL's GRPO trainer, rewarded by an OpenAI-format grader.

Each prepared example becomes a prompt (its turns before the last answer) and an `item`: every other field of the
record, with `label` (data.label's value) and `answer` (the example's own last answer, a reference). For each prompt
the policy samples `train.grpo.generations` completions with the run's own model; the grader scores each
(`{{sample.output_text}}` against `{{item.label}}`, say), and each completion's advantage is its reward less its
group's mean. The same LoRA / QLoRA stack, run directory, resume, guards, plot and plan as SFT and DPO; the starting
adapter (`train.init_adapter`, typically an SFT run) is both where the policy starts and the KL reference.

metrics.jsonl gains `reward` (mean over the step's completions), `reward_<grader>` per named sub-grader,
`reward_std` (the spread of the step's rewards), `groups_without_signal` (the share of groups whose completions all
scored the same, which teach nothing), `kl` and `completion_length`, per step
and at each evaluation (`eval_` prefixed: the valid prompts sampled the same way).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from trl import GRPOConfig, GRPOTrainer

from tuneforge.errors import TuneforgeError
from tuneforge.train.common import (
    apply_checkpointing,
    keep_trainable_fp32,
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
from tuneforge.train.preference_common import CountsCompletionTokens

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.data.plan import TrainingPlan
    from tuneforge.run import RunDir
    from tuneforge.systems import GraderModels


def train_grpo(
    experiment: Experiment, run: RunDir, resume: bool = False, progress: bool = True, callbacks: list | None = None
) -> dict[str, Any]:
    """Reinforcement fine-tuning: setup (prompts and items, the grader, plan, the model with adapters), train (TRL's
    GRPO trainer), finish (as SFT's). The summary it records, or the finished run's."""
    from datasets import Dataset

    from tuneforge.data.prepared import load_prepared
    from tuneforge.train.finish import finish, summarize

    # ------------------------------------------------------------------ setup
    t = experiment.train
    setup = set_up(experiment, run)
    train_examples = load_prepared(setup.data_dir, "train")
    train_rows = prompt_rows(train_examples, setup.tokenizer)
    valid_rows = prompt_rows(load_prepared(setup.data_dir, "valid"), setup.tokenizer)
    grader, grader_reason = grader_for(experiment, train_rows)
    training = grpo_plan(experiment, len(train_rows), bool(valid_rows))
    args = grpo_config(experiment, run, setup.plan, training, bool(valid_rows))
    fingerprint = setup.fingerprint(training, method="grpo", grpo={**t.grpo.model_dump(mode="json"), "grader": grader})
    resume_from, done = resume_point(run, t, resume, fingerprint)
    if done is not None:
        return done
    model = setup.load_model()
    compilation = compile_as_set(model, t.compile, setup.plan.device)
    metrics, callbacks = training_callbacks(run, t, fingerprint, parameter_counts(model)[0], resume_from, callbacks)
    args.disable_tqdm = not progress
    reward = GraderReward(grader, grader_models(experiment, run))
    trainer = ForgeGRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(valid_rows) if valid_rows else None,
        processing_class=setup.tokenizer,
        callbacks=callbacks,
    )
    metrics.trainer = trainer
    keep_trainable_fp32(trainer.model, setup.plan.dtype)
    params = parameter_counts(trainer.model)
    longest = max(r["prompt_tokens"] for r in train_rows) + t.grpo.max_completion_tokens
    checkpointing = apply_checkpointing(trainer, setup, args.per_device_train_batch_size * longest, params[0])
    print_plan(
        f"GRPO on {setup.plan.describe()}: {len(train_rows)} prompts x {t.grpo.generations} completions, "
        f"beta {t.grpo.beta}, {t.grpo.loss_type} loss; {params[0]:,} of {params[1]:,} parameters trainable",
        training,
        [f"reward: {grader_reason}", _rollouts(experiment), checkpointing.describe(), compilation.describe()],
    )

    # ------------------------------------------------------------------ train
    trained = run_training(trainer, run, resume_from, bool(valid_rows), identity=None)

    # ------------------------------------------------------------------ finish
    summary = {
        **_grpo_summary(setup, grader, metrics.records, reward),
        **summarize(trained, setup, training, metrics.records, params, "padded", train_examples),
    }
    return finish(trainer, setup, summary, metrics.records)


class ForgeGRPOTrainer(CountsCompletionTokens, GRPOTrainer):
    """TRL's GRPO trainer, counting the completion tokens it trains on."""


class GraderReward:
    """A TRL reward function that scores each completion with an OpenAI-format grader. A grader that fails on a
    sample scores it 0, as OpenAI does, and the failure is counted (`errors`). `models`: what score_model and
    label_model graders ask (a mapping from the grader's model name to a system)."""

    def __init__(self, grader: dict[str, Any], models=None):
        from tuneforge.graders import validate_grader

        self.grader = validate_grader(grader)
        self.models = models
        self.__name__ = str(self.grader.name)  # TRL logs rewards/<name>/mean
        self.errors = 0
        self.scored = 0

    def __call__(self, prompts, completions, item, **_kwargs) -> list[float]:
        from tuneforge.graders import grade

        scores = []
        for completion, packed in zip(completions, item):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            result = grade(self.grader, {"output_text": text.strip()}, json.loads(packed), model=self.models)
            self.errors += result.error is not None
            self.scored += 1
            scores.append(float(result.score))
        return scores


def grader_models(experiment: Experiment, run: RunDir) -> GraderModels:
    """The run's systems for model graders, the Systems built only when a grader first asks."""
    from tuneforge.systems import GraderModels, Systems

    built: list[Systems] = []

    def get(name: str):
        if not built:
            built.append(Systems(experiment, run, build_index=False))
        return built[0].get(name)

    return GraderModels(get)


def prompt_rows(examples, tokenizer) -> list[dict[str, Any]]:
    """{"prompt": the turns before the last answer, "item": the record's fields as JSON, "prompt_tokens"} per
    example. The item holds every key of the line (OpenAI's reinforcement format), `label` and `answer` (the
    example's own last answer, None for a prompt-only line) where the line has none of its own."""
    rows = []
    for example in examples:
        turns = example.messages
        if turns and turns[-1]["role"] == "assistant":
            answer, turns = turns[-1].get("content") or "", turns[:-1]
        else:
            answer = None
        if not turns or turns[-1]["role"] != "user":
            raise TuneforgeError(f"{example.where}: train.method: grpo needs a prompt that ends with a user turn")
        item = example.grader_item(answer)
        prompt = [{"role": m["role"], "content": m.get("content") or ""} for m in turns]
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        rows.append({"prompt": prompt, "item": json.dumps(item), "prompt_tokens": tokens})
    return rows


def grader_for(experiment: Experiment, rows: list[dict]) -> tuple[dict[str, Any], str]:
    """train.grpo.grader, checked; without one and with labels, the answer must equal the label."""
    from tuneforge.graders import validate_grader

    grader = experiment.train.grpo.grader
    if grader is None:
        if not rows or any(json.loads(r["item"]).get("label") is None for r in rows):
            raise TuneforgeError(
                "train.grpo.grader: none is set and the data has no label on every example; give an OpenAI grader, "
                "e.g. {type: string_check, name: label, input: '{{sample.output_text}}', "
                "reference: '{{item.label}}', operation: eq}"
            )
        grader = {
            "type": "string_check",
            "name": "label",
            "input": "{{sample.output_text}}",
            "reference": "{{item.label}}",
            "operation": "eq",
        }
        return grader, "auto: data.label, the answer must equal the example's label (string_check eq)"
    try:
        parsed = validate_grader(grader)
    except (TuneforgeError, ValueError) as exc:
        raise TuneforgeError(f"train.grpo.grader: {exc}") from None
    return grader, f"train.grpo.grader: {parsed.type} grader {parsed.name!r}"


def grpo_plan(experiment: Experiment, prompts: int, has_valid: bool) -> TrainingPlan:
    """Prompts per step, epochs and the rate (data.plan.plan_grpo, which prepare's report prints too)."""
    from tuneforge.data.plan import plan_grpo

    return plan_grpo(experiment.train, prompts, world_size(), has_valid)


def grpo_config(experiment: Experiment, run: RunDir, plan, training: TrainingPlan, has_valid: bool) -> GRPOConfig:
    """The trainer configuration from the plan: a micro-batch is one prompt's group (per_device_train_batch_size =
    generations), one optimizer step accumulates `batch_size` groups."""
    g = experiment.train.grpo
    specific = dict(
        num_generations=g.generations,
        max_completion_length=g.max_completion_tokens,
        temperature=g.temperature,
        beta=g.beta,
        loss_type=g.loss_type,
        remove_unused_columns=False,
        metric_for_best_model="eval_reward" if has_valid and experiment.train.keep_best else None,
        greater_is_better=True if has_valid and experiment.train.keep_best else None,
        log_completions=False,
    )
    if g.eval_generations is not None:  # an evaluation micro-batch is one prompt's group, as in training
        specific.update(num_generations_eval=g.eval_generations, per_device_eval_batch_size=g.eval_generations)
    arguments = trainer_arguments(experiment, run, plan, training, False, has_valid, GRPOConfig, specific)
    try:
        return GRPOConfig(**arguments)
    except (TypeError, ValueError) as exc:
        raise TuneforgeError(f"train.extra_args: {exc}") from None


def _rollouts(experiment: Experiment) -> str:
    """Which engine samples the completions, said so that model.engine: vllm is not silently passed over."""
    if getattr(experiment.model, "engine", "transformers") == "vllm":
        return (
            "rollouts: sampled by the training model itself (transformers); model.engine: vllm serves the other "
            "verbs, and vLLM rollouts with LoRA requests are not built yet"
        )
    return "rollouts: sampled by the training model itself, adapter on (transformers generate)"


def _grpo_summary(setup, grader: dict, records: list[dict], reward: GraderReward) -> dict[str, Any]:
    """GRPO's own keys of the run summary."""
    t = setup.experiment.train
    trained = [r for r in records if "reward" in r]
    evaluated = [r for r in records if "eval_reward" in r]
    return {
        "method": "grpo",
        "grader": grader,
        "generations": t.grpo.generations,
        "beta": t.grpo.beta,
        "loss_type": t.grpo.loss_type,
        "init_adapter": str(setup.start_adapter) if setup.start_adapter else None,
        "first_reward": trained[0]["reward"] if trained else None,
        "last_reward": trained[-1]["reward"] if trained else None,
        "base_valid_reward": evaluated[0]["eval_reward"] if evaluated else None,
        "valid_reward": evaluated[-1]["eval_reward"] if evaluated else None,
        "grader_errors": reward.errors,
        "graded": reward.scored,
    }
