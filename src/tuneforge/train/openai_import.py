"""`tuneforge import-openai`: an OpenAI fine-tuning job becomes a local experiment, ready to run.

For each job (one id, or every job of the account with --all): its training and
validation files are downloaded, and an experiment YAML is written beside them with
the same method, hyperparameters, suffix and seed on an open model the user names
(the builtin by default), and an eval that compares `openai:<fine_tuned_model>`
with the local `finetuned`, so parity can be measured while the hosted model still
answers.

    imported/<name>/train.jsonl, valid.jsonl   the job's files, byte for byte
    imported/<name>/experiment.yaml            tuneforge run imported/<name>/experiment.yaml

The key comes from OPENAI_API_KEY (and the endpoint from OPENAI_BASE_URL or
--base-url); neither is written anywhere.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from tuneforge.atomic import atomic_write_bytes, atomic_write_text
from tuneforge.errors import TuneforgeError

BUILTIN = "builtin:smollm2-135m-instruct"


def client(base_url: str | None = None):
    try:
        import openai
    except ImportError:
        raise TuneforgeError("import-openai needs the openai package: pip install 'tuneforge[openai]'") from None
    if not os.environ.get("OPENAI_API_KEY"):
        raise TuneforgeError("import-openai reads the account's key from OPENAI_API_KEY; set it in the environment")
    return openai.OpenAI(base_url=base_url or os.environ.get("OPENAI_BASE_URL") or None, max_retries=3)


def experiment_name(job: dict[str, Any]) -> str:
    """The suffix when the job had one (a name its team chose), else the job id; safe as a run-directory name."""
    base = job.get("user_provided_suffix") or job["id"]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._")
    return name or job["id"]


def method_of(job: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(supervised | dpo | reinforcement, its hyperparameters) from the job's method, or from the older top-level
    hyperparameters."""
    method = job.get("method") or {"type": "supervised"}
    kind = method.get("type") or "supervised"
    if kind not in ("supervised", "dpo", "reinforcement"):
        raise TuneforgeError(
            f"job {job['id']}: method {kind!r} has no local counterpart "
            "(tuneforge trains supervised, dpo and reinforcement)"
        )
    if kind == "reinforcement" and not (method.get("reinforcement") or {}).get("grader"):
        raise TuneforgeError(f"job {job['id']}: its reinforcement method carries no grader")
    given = ((method.get(kind) or {}).get("hyperparameters")) or job.get("hyperparameters") or {}
    return kind, {k: v for k, v in given.items() if v is not None}


def experiment_yaml(job: dict[str, Any], model: str, has_valid: bool) -> str:
    """The experiment file for a job, with a comment for each mapped setting."""
    kind, hp = method_of(job)
    local = {"dpo": "dpo", "reinforcement": "grpo"}.get(kind, "sft")
    hosted = job.get("fine_tuned_model") or f"(no fine-tuned model: the job {job.get('status')})"
    lines = [
        f"# Imported from OpenAI fine-tuning job {job['id']} by `tuneforge import-openai`",
        f"#   hosted: {job.get('model')} -> {hosted}",
        f"#   method {kind}, hyperparameters {hp or 'auto'}, trained tokens {job.get('trained_tokens')}",
        f"name: {experiment_name(job)}",
        f"seed: {job.get('seed') if job.get('seed') is not None else 42}",
        "",
        "model:",
        f"  ref: {model}",
        "",
        "data:",
        "  train: train.jsonl",
    ]
    if has_valid:
        lines.append("  valid: valid.jsonl")
    if kind == "dpo":
        lines.append("  format: preference")
    lines += ["", "train:", "  backend: local", f"  method: {local}"]
    if isinstance(hp.get("n_epochs"), int):
        lines.append(f"  epochs: {hp['n_epochs']}                     # n_epochs")
    if isinstance(hp.get("batch_size"), int):
        lines.append(
            f"  batch_size: {hp['batch_size']}                 "
            "# batch_size: examples per optimizer step, as OpenAI counts them"
        )
    multiplier = hp.get("learning_rate_multiplier")
    if isinstance(multiplier, (int, float)):
        lines.append(
            f"  lr_multiplier: {multiplier}              "
            "# learning_rate_multiplier: times the LoRA rate tuneforge picks for the data"
        )
    if kind == "dpo" and isinstance(hp.get("beta"), (int, float)):
        lines += ["  dpo:", f"    beta: {hp['beta']}"]
    grader = (job["method"].get("reinforcement") or {}).get("grader") if kind == "reinforcement" else None
    if grader is not None:
        lines += _reinforcement_lines(hp, grader)
    lines += ["", "eval:"]
    if grader is not None:  # the job's grader scores every system's answers, the hosted model's too
        lines.append(f"  graders: [{json.dumps(grader, ensure_ascii=False)}]")
    if has_valid and kind != "dpo":
        lines.append(
            "  data: valid.jsonl               # the job's validation file: the hosted model saw no training on it"
        )
    systems = ["base", "finetuned"]
    if job.get("fine_tuned_model") and kind != "dpo":
        systems.append(f"openai:{job['fine_tuned_model']}")
        lines.append(
            "  # the hosted model answers while it lasts: the report shows whether the local one does the job as well"
        )
    lines.append(f"  systems: [{', '.join(systems)}]")
    return "\n".join(lines) + "\n"


def _reinforcement_lines(hp: dict[str, Any], grader: dict[str, Any]) -> list[str]:
    """train.eval_every and train.grpo from a reinforcement job's hyperparameters and its grader."""
    from tuneforge.config import GRPOSettings

    lines = []
    if isinstance(hp.get("eval_interval"), int):
        lines.append(f"  eval_every: {hp['eval_interval']}                 # eval_interval")
    lines += ["  grpo:", f"    grader: {json.dumps(grader, ensure_ascii=False)}"]
    multiplier = hp.get("compute_multiplier")
    if isinstance(multiplier, (int, float)):
        settings = GRPOSettings()
        generations = settings.generations_for(multiplier)
        lines.append(
            f"    generations: {generations}               "
            f"# compute_multiplier {multiplier} x {settings.generations} per prompt"
        )
    if isinstance(hp.get("eval_samples"), int):
        lines.append(f"    eval_generations: {hp['eval_samples']}          # eval_samples")
    effort = hp.get("reasoning_effort")
    if effort not in (None, "default"):
        lines.append(f"    # reasoning_effort {effort}: not carried over (the open model is no reasoning model)")
    return lines


def import_jobs(
    job_id: str | None, every: bool, out: Path, model: str = BUILTIN, base_url: str | None = None, force: bool = False
) -> list[Path]:
    """Download each job's files and write its experiment; the experiment files written."""
    import openai

    api = client(base_url)
    try:
        if every:
            jobs = [j.model_dump(mode="json") for j in api.fine_tuning.jobs.list(limit=100)]
        elif job_id:
            jobs = [api.fine_tuning.jobs.retrieve(job_id).model_dump(mode="json")]
        else:
            raise TuneforgeError("name a job id (ftjob-...) or pass --all")
    except openai.APIStatusError as exc:
        raise TuneforgeError(f"the fine-tuning API answered {exc.status_code}: {exc.message}") from None
    except openai.APIConnectionError as exc:
        raise TuneforgeError(f"cannot reach the fine-tuning API at {api.base_url}: {exc}") from None
    written = []
    for job in jobs:
        method_of(job)  # refuse what cannot be run here before downloading anything
        folder = out / experiment_name(job)
        target = folder / "experiment.yaml"
        if target.exists() and not force:
            raise TuneforgeError(f"{target} exists; pass --force to write it again")
        try:
            for key, name in (("training_file", "train.jsonl"), ("validation_file", "valid.jsonl")):
                if job.get(key):
                    atomic_write_bytes(folder / name, api.files.content(job[key]).read())
        except openai.APIStatusError as exc:
            raise TuneforgeError(
                f"job {job['id']}: downloading its files failed ({exc.status_code}: {exc.message})"
            ) from None
        atomic_write_text(target, experiment_yaml(job, model, bool(job.get("validation_file"))))
        print(
            f"imported {job['id']} ({job.get('status')}, {job.get('fine_tuned_model') or 'no model'}) -> {target}",
            flush=True,
        )
        written.append(target)
    if not written:
        print("no fine-tuning jobs in this account", flush=True)
    return written
