"""What the fine-tuning endpoints accept and return, apart from the jobs themselves.

The request models of job creation (OpenAI's `fine_tuning.jobs.create` body,
methods supervised, dpo and reinforcement), the check of uploaded JSONL, cursor pages for list
endpoints, ids, upload names, the step-metrics result file, and the mapping of a
job's hyperparameters onto the server experiment's local trainer. No threads, no
state: `finetuning` holds the files and jobs and calls these.
"""

from __future__ import annotations

import uuid
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator

from tuneforge.serve.errors import ApiError

MIN_EXAMPLES = 10  # OpenAI refuses training files with fewer examples; so do we, to behave alike
TERMINAL = ("succeeded", "failed", "cancelled")
HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")


Auto = Literal["auto"]
Epochs = Union[Auto, Annotated[StrictInt, Field(ge=1, le=50)]]
BatchSize = Union[Auto, Annotated[StrictInt, Field(ge=1, le=256)]]
Multiplier = Union[Auto, Annotated[float, Field(gt=0, le=10, strict=True)]]
Beta = Union[Auto, Annotated[float, Field(gt=0, le=2, strict=True)]]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SupervisedHyperparameters(Strict):
    n_epochs: Epochs = "auto"
    batch_size: BatchSize = "auto"
    learning_rate_multiplier: Multiplier = "auto"


class DpoHyperparameters(SupervisedHyperparameters):
    beta: Beta = "auto"


class SupervisedMethod(Strict):
    hyperparameters: SupervisedHyperparameters = SupervisedHyperparameters()


class DpoMethod(Strict):
    hyperparameters: DpoHyperparameters = DpoHyperparameters()


class ReinforcementHyperparameters(SupervisedHyperparameters):
    compute_multiplier: Union[Auto, Annotated[float, Field(gt=0, le=10, strict=True)]] = "auto"
    eval_interval: Union[Auto, Annotated[StrictInt, Field(ge=1)]] = "auto"
    eval_samples: Union[Auto, Annotated[StrictInt, Field(ge=1, le=64)]] = "auto"
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"

    @model_validator(mode="after")
    def _effort(self):
        if self.reasoning_effort != "default":
            raise ValueError(
                f"reasoning_effort {self.reasoning_effort!r}: the served model is not a reasoning model; "
                "leave it unset (default)"
            )
        return self


class ReinforcementMethod(Strict):
    grader: dict[str, Any]
    hyperparameters: ReinforcementHyperparameters = ReinforcementHyperparameters()

    @field_validator("grader")
    @classmethod
    def _grader(cls, grader: dict[str, Any]) -> dict[str, Any]:
        from tuneforge.graders import InvalidGrader, validate_grader

        try:
            validate_grader(grader)
        except InvalidGrader as exc:
            raise ValueError("; ".join(exc.problems)) from None
        return grader


class Method(Strict):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    reinforcement: ReinforcementMethod | None = None

    @model_validator(mode="after")
    def _reinforcement_has_grader(self):
        if self.type == "reinforcement" and self.reinforcement is None:
            raise ValueError("method.reinforcement with its grader is required for type reinforcement")
        return self


class Wandb(BaseModel):
    model_config = ConfigDict(extra="allow")
    project: Annotated[StrictStr, Field(min_length=1)]
    name: StrictStr | None = None
    entity: StrictStr | None = None
    tags: list[StrictStr] | None = None


class Integration(Strict):
    type: Literal["wandb"]
    wandb: Wandb


class JobRequest(Strict):
    """The body of POST /v1/fine_tuning/jobs, as OpenAI documents it: methods supervised, dpo and reinforcement."""

    model: Annotated[StrictStr, Field(min_length=1)]
    training_file: Annotated[StrictStr, Field(min_length=1)]
    validation_file: StrictStr | None = None
    hyperparameters: SupervisedHyperparameters | None = None  # the older place of method.supervised.hyperparameters
    method: Method | None = None
    suffix: Annotated[StrictStr, Field(max_length=64, pattern=r"^[^:]*$")] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2147483647)] | None = None
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[StrictStr, Field(max_length=512)]] | None = None
    integrations: list[Integration] | None = None

    @model_validator(mode="after")
    def _limits(self):
        if self.metadata is not None and len(self.metadata) > 16:
            raise ValueError("metadata holds at most 16 pairs")
        return self

    def resolved_method(self) -> dict[str, Any]:
        """method as the job echoes it: its type and every hyperparameter (auto where not given)."""
        method = self.method or Method(
            type="supervised",
            supervised=SupervisedMethod(hyperparameters=self.hyperparameters or SupervisedHyperparameters()),
        )
        if method.type == "reinforcement":
            chosen = method.reinforcement
            return {
                "type": "reinforcement",
                "reinforcement": {"grader": chosen.grader, "hyperparameters": chosen.hyperparameters.model_dump()},
            }
        if method.type == "dpo":
            given = (method.dpo or DpoMethod()).hyperparameters
        else:
            given = (method.supervised or SupervisedMethod()).hyperparameters
        return {"type": method.type, method.type: {"hyperparameters": given.model_dump()}}


class GraderValidateRequest(Strict):
    """The body of POST /v1/fine_tuning/alpha/graders/validate."""

    grader: dict[str, Any]


class GraderRunRequest(GraderValidateRequest):
    """The body of POST /v1/fine_tuning/alpha/graders/run: the grader, the model's answer and the dataset item."""

    model_sample: StrictStr
    item: Any = None


class JobFailed(Exception):
    """Why a job failed, in the shape OpenAI reports it on the job: a code, a message and the parameter at fault."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def short_model_name(ref: str) -> str:
    """builtin:smollm2-135m-instruct -> smollm2-135m-instruct; a folder or hub id -> its last part."""
    return ref.split(":", 1)[-1].rstrip("/").split("/")[-1]


def local_train_section(
    train,
    hyperparameters: dict[str, Any],
    has_validation: bool,
    method: str = "supervised",
    grader: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The server experiment's local train section with a job's hyperparameters applied ("auto" keeps the
    experiment's value).

    n_epochs -> epochs, batch_size -> batch_size (examples per optimizer step, as OpenAI counts it; prompts per
    step for reinforcement), learning_rate_multiplier -> train.lr_multiplier (a multiple of train.lr, or of the
    auto rate), beta -> train.dpo.beta. Reinforcement trains with GRPO (train.grpo): the job's grader is the
    reward, compute_multiplier scales the completions sampled per prompt (train.grpo.generations, at least 2),
    eval_interval -> train.eval_every, eval_samples -> train.grpo.eval_generations.
    A server started with train.max_steps keeps it: every job then runs that many steps (it overrides epochs).
    """
    section = train.model_dump()
    section.update(
        backend="local",
        resume="never",
        wandb_project=None,
        method={"dpo": "dpo", "reinforcement": "grpo"}.get(method, "sft"),
        init_adapter=None,
    )
    if method == "dpo" and hyperparameters.get("beta", "auto") != "auto":
        section["dpo"] = {**section["dpo"], "beta": hyperparameters["beta"]}
    if method == "reinforcement":
        grpo = {**section["grpo"], "grader": grader}
        if hyperparameters.get("compute_multiplier", "auto") != "auto":
            grpo["generations"] = train.grpo.generations_for(hyperparameters["compute_multiplier"])
        if hyperparameters.get("eval_samples", "auto") != "auto":
            grpo["eval_generations"] = hyperparameters["eval_samples"]
        if hyperparameters.get("eval_interval", "auto") != "auto":
            section["eval_every"] = hyperparameters["eval_interval"]
        section["grpo"] = grpo
    if hyperparameters.get("n_epochs", "auto") != "auto":
        section["epochs"] = hyperparameters["n_epochs"]
    if hyperparameters.get("batch_size", "auto") != "auto":
        section.update(
            batch_size=hyperparameters["batch_size"], grad_accum="auto"
        )  # the job's batch wins over the server's split
    if hyperparameters.get("learning_rate_multiplier", "auto") != "auto":
        # a multiple of the rate the plan resolves for the job's method and data (or of the server's train.lr)
        section["lr_multiplier"] = train.lr_multiplier * hyperparameters["learning_rate_multiplier"]
    if not has_validation:  # the trainer refuses to evaluate on nothing
        section["extra_args"] = {**section["extra_args"], "eval_strategy": "no"}
    return section


def read_examples(path: Path, filename: str, param: str, method: str = "supervised") -> list[dict[str, Any]]:
    """The records of an uploaded JSONL file stored at `path`, as prepared data: chat examples (supervised),
    preference pairs (dpo), tools kept, or prompts with every field for the grader (reinforcement); JobFailed
    naming the first bad line of `filename`."""
    from tuneforge.data.preference import read_pair
    from tuneforge.data.prompts import read_prompt
    from tuneforge.data.sources import read_json_records
    from tuneforge.data.tools import from_legacy
    from tuneforge.data.validate import check_record

    records = []
    for raw in read_json_records(path, filename):
        if raw.problem is not None:
            raise JobFailed("invalid_file_format", f"{raw.problem}", param)
        if method == "reinforcement":
            prompt, problems = read_prompt(raw.data, raw.where)
            errors = [p for p in problems if p.severity == "error"]
            if errors or prompt is None:
                raise JobFailed("invalid_file_format", f"{errors[0] if errors else raw.where}", param)
            records.append(prompt)
            continue
        if method == "dpo":
            pair, problems = read_pair(raw.data, raw.where)
            errors = [p for p in problems if p.severity == "error"]
            if errors or pair is None:
                raise JobFailed("invalid_file_format", f"{errors[0] if errors else raw.where}", param)
            source = {
                "messages": pair["messages"][:-1],
                **{k: pair[k] for k in ("tools", "parallel_tool_calls") if k in pair},
            }
            records.append(
                {
                    "input": source,
                    "preferred_output": [pair["messages"][-1]],
                    "non_preferred_output": [pair["rejected"]],
                }
            )
            continue
        record = from_legacy(raw.data) if isinstance(raw.data, dict) else raw.data
        errors = [p for p in check_record(record, raw.where) if p.severity == "error"]
        if errors:
            raise JobFailed("invalid_file_format", f"{errors[0]}", param)
        records.append({k: record[k] for k in ("messages", "tools", "parallel_tool_calls") if k in record})
    return records


def upload_name(name: str | None) -> str:
    """An upload's file name as shown back: its last path part, printable, never a path into the store."""
    base = PurePosixPath((name or "").replace("\\", "/")).name
    base = "".join(c for c in base if c.isprintable() and c not in '<>:"|?*')[:255].strip(". ")
    return base or "upload.jsonl"


def step_metrics_csv(records: list[dict[str, Any]], method: str = "supervised") -> bytes:
    """The job's result file: one row per logged training step, with OpenAI's columns; a reinforcement job's rows
    carry the rewards instead of token accuracy: the mean, its spread over the step's completions, each grader's
    mean, the KL to the starting policy, the completions' mean length and the validation reward."""
    if method == "reinforcement":
        graders = sorted({k for r in records for k in r if k.startswith("reward_") and k != "reward_std"})
        columns = ["train_loss", "train_reward_mean", "train_reward_std", *(f"train_{g}" for g in graders)]
        columns += ["kl", "completion_length", "valid_reward_mean"]
        keys = ["loss", "reward", "reward_std", *graders, "kl", "completion_length", "eval_reward"]
        valid_key = "eval_reward"
    else:
        columns = ["train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
        keys = ["loss", "token_accuracy", "eval_loss", None]
        valid_key = "eval_loss"
    valid = {r["step"]: r[valid_key] for r in records if valid_key in r}

    def cell(value) -> str:
        return "" if value is None else f"{value:.6g}"

    lines = [",".join(["step", *columns])]
    for r in records:
        if "loss" in r:
            values = [valid.get(r["step"]) if k == valid_key else (r.get(k) if k else None) for k in keys]
            lines.append(",".join([str(r["step"]), *map(cell, values)]))
    return ("\n".join(lines) + "\n").encode()


def page(items: list[dict], query: dict[str, str], default_limit: int, keep=lambda item: True) -> dict:
    """A cursor page: items after the one whose id is `after`, at most `limit` of them."""
    try:
        limit = max(1, min(int(query.get("limit", default_limit)), 10_000))
    except ValueError:
        raise ApiError(400, "limit must be an integer", "limit") from None
    items = [item for item in items if keep(item)]
    after = query.get("after")
    if after:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "has_more": len(items) > limit,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
    }
