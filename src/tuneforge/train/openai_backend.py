"""`tuneforge train` with `train.backend: openai`: a hosted fine-tuning job, started and watched from here.

check   re-check every line of the prepared data (the `train` verb prepares it first) in OpenAI's chat format,
        confirm the cost estimate
submit  upload train/valid (purpose fine-tune) and create the job, tagged with a key of config + data,
        so running `train` again re-attaches to the job instead of starting a second one
watch   events to the console, metrics to metrics.jsonl, ids and status to openai_job.json;
        Ctrl-C leaves the job running, --cancel cancels it

The API key is read from OPENAI_API_KEY only and is never written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from tuneforge.atomic import atomic_write_json, atomic_write_jsonl, read_jsonl
from tuneforge.errors import TuneforgeError

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.run import RunDir

STATE = "openai_job.json"
TERMINAL = ("succeeded", "failed", "cancelled")
MAX_BACKOFF = 300.0  # seconds between polls when the API keeps failing
MAX_NETWORK_FAILURES = 20  # in a row, with backoff: well over an hour before giving up on watching
# event data key -> the metrics.jsonl key the local trainer writes for the same quantity
METRIC_KEYS = {
    "train_loss": "loss",
    "valid_loss": "eval_loss",
    "train_mean_token_accuracy": "token_accuracy",
    "valid_mean_token_accuracy": "eval_token_accuracy",
    "full_valid_loss": "full_eval_loss",
    "full_valid_mean_token_accuracy": "full_eval_token_accuracy",
}


class NeedsConfirmation(TuneforgeError):
    """The estimate was not accepted: no terminal to ask on and no --yes."""

    exit_code = 2


def job_key(experiment: Experiment, data_sha256: dict[str, str]) -> str:
    """What makes two `train` runs the same job: the model, the train section, the seed and the data."""
    train = experiment.train.model_dump(
        mode="json", exclude={"poll_seconds", "price_per_1m_tokens"}
    )  # watching and estimating only
    payload = {"model": experiment.model.ref, "train": train, "seed": experiment.seed, "data": data_sha256}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def job_request(experiment: Experiment, key: str, training_file: str, validation_file: str | None) -> dict[str, Any]:
    """The keyword arguments of `fine_tuning.jobs.create` for this experiment."""
    t = experiment.train
    hyperparameters = {"n_epochs": t.epochs, "batch_size": t.batch_size, "learning_rate_multiplier": t.lr_multiplier}
    request: dict[str, Any] = {
        "model": t.model,
        "training_file": training_file,
        "method": (
            {"type": "dpo", "dpo": {"hyperparameters": {**hyperparameters, "beta": t.dpo.beta}}}
            if t.method == "dpo"
            else {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
        ),
        "seed": experiment.seed,
        "metadata": {**t.metadata, "tuneforge_experiment": experiment.name, "tuneforge_key": key},
    }
    if validation_file:
        request["validation_file"] = validation_file
    if t.suffix:
        request["suffix"] = t.suffix
    if t.wandb_project:
        request["integrations"] = [{"type": "wandb", "wandb": {"project": t.wandb_project}}]
    return request


def make_client(experiment: Experiment):
    """An OpenAI client for train.base_url; the key comes from the environment and nowhere else."""
    try:
        import openai
    except ImportError:
        raise TuneforgeError("train.backend: openai needs the openai client: pip install 'tuneforge[openai]'") from None
    from tuneforge.hosted import openai_base_url

    base_url = openai_base_url(experiment)
    key = os.environ.get("OPENAI_API_KEY")
    if not key:
        if base_url is None or "api.openai.com" in base_url:
            raise TuneforgeError(
                "OPENAI_API_KEY is not set. Export it in your shell; tuneforge reads the key from the environment only"
            )
        key = "no-key-set"  # an OpenAI-compatible server of your own may not check it
    return openai.OpenAI(api_key=key, base_url=base_url, max_retries=5, timeout=120)


def check_prepared(run: RunDir) -> None:
    """Every line of the prepared files in OpenAI's chat format, or an error naming each bad file and line."""
    from tuneforge.data.preference import looks_like_pair, read_pair
    from tuneforge.data.sources import read_json_records
    from tuneforge.data.validate import check_record

    problems = []
    for name in ("train.jsonl", "valid.jsonl"):
        for raw in read_json_records(run.sub("data", name)):
            if raw.problem is not None:
                found = [raw.problem]
            elif looks_like_pair(raw.data):  # a preference pair, for method dpo
                found = read_pair(raw.data, raw.where)[1]
            else:
                found = check_record(raw.data, raw.where)
            problems += [str(p) for p in found if p.severity == "error"]
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:30]) + (
            f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
        )
        raise TuneforgeError(
            f"{len(problems)} problems in the prepared data in {run.sub('data')}; nothing was uploaded:\n{shown}"
        )


def confirm(estimate: dict[str, Any], yes: bool, stdin=None) -> None:
    """Print the cost estimate and ask y/N; without a terminal only --yes accepts it."""
    stdin = stdin or sys.stdin
    print(
        f"OpenAI fine-tuning estimate: {estimate['model']}, "
        f"{estimate['n_epochs']} epochs ({estimate['n_epochs_source']}), "
        f"{estimate['billed_tokens']:,} billed tokens, about ${estimate['estimated_cost_usd']:.2f} "
        f"at ${estimate['price_per_1m_tokens']}/1M tokens ({estimate['note']})",
        flush=True,
    )
    if yes:
        return
    if not stdin.isatty():
        raise NeedsConfirmation("no terminal to confirm the cost estimate on; pass --yes to accept it")
    print("Upload the data and start the job? [y/N] ", end="", flush=True)
    if stdin.readline().strip().lower() not in ("y", "yes"):
        raise TuneforgeError("not confirmed; nothing was uploaded")


def read_state(run: RunDir) -> dict[str, Any]:
    try:
        return json.loads(run.sub(STATE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_state(run: RunDir, state: dict[str, Any]) -> None:
    state["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic_write_json(run.sub(STATE), state)


def train_openai(
    experiment: Experiment, run: RunDir, report: dict[str, Any] | None, yes: bool = False, cancel: bool = False
) -> int:
    """Start this config's job, or re-attach to it, and watch it; the exit code. `report`: prepare's, of the data the
    caller has just prepared into `run` (None to cancel, which needs no data)."""
    client = make_client(experiment)
    if cancel:
        return cancel_job(client, run)
    check_prepared(run)
    key = job_key(experiment, report["sha256"])
    state = read_state(run)
    job = find_job(client, state, key)
    if job is not None:
        print(f"re-attached to job {job.id} ({'already ' if job.status in TERMINAL else ''}{job.status})", flush=True)
        if state.get("job_id") != job.id:  # found by its key in the job list
            state = {"key": key, "job_id": job.id, "base_url": str(client.base_url), "model": experiment.train.model}
            atomic_write_jsonl(run.sub("metrics.jsonl"), [])
    else:
        confirm(report["openai"], yes)
        state = submit(client, experiment, run, key, report)
    return watch(client, experiment, run, state)


def find_job(client, state: dict[str, Any], key: str):
    """This config's job: the one recorded in openai_job.json, else one listed with its key; None to start anew."""
    import openai

    if state.get("key") == key and state.get("job_id"):
        try:
            job = client.fine_tuning.jobs.retrieve(state["job_id"])
        except openai.NotFoundError:
            return None
        if job.status in ("failed", "cancelled"):
            print(f"the previous job {job.id} {job.status}; starting a new one", flush=True)
            return None
        return job
    for job in client.fine_tuning.jobs.list(limit=50).data:  # a job created just before an interruption
        if (job.metadata or {}).get("tuneforge_key") == key and job.status not in ("failed", "cancelled"):
            return job
    return None


def submit(client, experiment: Experiment, run: RunDir, key: str, report: dict[str, Any]) -> dict[str, Any]:
    files = {}
    for split in ("train", "valid"):
        path = run.sub("data", f"{split}.jsonl")
        if path.stat().st_size:
            with open(path, "rb") as fh:
                files[split] = client.files.create(
                    file=(f"{experiment.name}-{split}.jsonl", fh), purpose="fine-tune"
                ).id
            print(f"uploaded {path.name} as {files[split]}", flush=True)
    state = {
        "key": key,
        "base_url": str(client.base_url),
        "model": experiment.train.model,
        "training_file": files["train"],
        "validation_file": files.get("valid"),
        "data_sha256": report["sha256"],
        "estimate": report["openai"],
        "job_id": None,
    }
    write_state(run, state)  # a create cut short is found again by its key in the job list
    job = client.fine_tuning.jobs.create(**job_request(experiment, key, files["train"], files.get("valid")))
    print(f"created job {job.id} ({job.status})", flush=True)
    state["job_id"] = job.id
    _update(state, job)
    write_state(run, state)
    atomic_write_jsonl(run.sub("metrics.jsonl"), [])  # this job's metrics, not a previous one's
    return state


def _update(state: dict[str, Any], job) -> None:
    state.update(
        job_id=job.id,
        status=job.status,
        fine_tuned_model=job.fine_tuned_model,
        trained_tokens=job.trained_tokens,
        created_at=job.created_at,
        finished_at=job.finished_at,
        error=job.error.model_dump() if job.error and job.error.code else None,
    )


def watch(client, experiment: Experiment, run: RunDir, state: dict[str, Any]) -> int:
    import openai

    job_id, poll = state["job_id"], experiment.train.poll_seconds
    metrics = {r["step"]: r for r in read_jsonl(run.sub("metrics.jsonl"))}
    failures = 0
    try:
        while True:
            try:
                job = client.fine_tuning.jobs.retrieve(job_id)
                events = new_events(client, job_id, state.get("last_event_id"))
                failures = 0
            except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as exc:
                failures += 1
                if failures > MAX_NETWORK_FAILURES:
                    raise TuneforgeError(
                        f"lost contact with {client.base_url} ({exc}); the job may still be running: "
                        f"run the same `tuneforge train` again to re-attach"
                    ) from None
                delay = min(poll * 2**failures, MAX_BACKOFF)
                print(
                    f"cannot reach the API ({type(exc).__name__}); retrying in {delay:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                time.sleep(delay)
                continue
            for event in events:
                stamp = datetime.fromtimestamp(event.created_at).strftime("%H:%M:%S")
                print(f"[{stamp}] {event.message}", flush=True)
                if event.type == "metrics" and isinstance(event.data, dict) and "step" in event.data:
                    record = metrics.setdefault(int(event.data["step"]), {"step": int(event.data["step"])})
                    record.update({METRIC_KEYS[k]: v for k, v in event.data.items() if k in METRIC_KEYS})
            if events:
                state["last_event_id"] = events[-1].id
                atomic_write_jsonl(run.sub("metrics.jsonl"), [metrics[s] for s in sorted(metrics)])
            _update(state, job)
            write_state(run, state)
            if job.status in TERMINAL:
                return finish(client, experiment, run, state, job)
            time.sleep(poll)
    except KeyboardInterrupt:
        write_state(run, state)
        again = f"tuneforge train {experiment._source or '<file>'} --run-dir {run.path}"
        print(
            f"\nstopped watching; job {job_id} keeps running on {client.base_url}.\n"
            f"  re-attach: {again}\n  cancel:    {again} --cancel",
            file=sys.stderr,
            flush=True,
        )
        return 130


def new_events(client, job_id: str, last_seen: str | None) -> list:
    """Events after `last_seen`, oldest first (the API lists newest first and pages backwards)."""
    fresh = []
    for event in client.fine_tuning.jobs.list_events(job_id, limit=100):
        if event.id == last_seen:
            break
        fresh.append(event)
    return fresh[::-1]


def finish(client, experiment: Experiment, run: RunDir, state: dict[str, Any], job) -> int:
    import openai

    try:
        checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    except openai.NotFoundError:  # providers without the checkpoints endpoint
        checkpoints = []
    state["checkpoints"] = [
        {
            "id": c.id,
            "step": c.step_number,
            "model": c.fine_tuned_model_checkpoint,
            "metrics": c.metrics.model_dump(exclude_none=True),
        }
        for c in checkpoints
    ]
    write_state(run, state)
    run.record(
        "openai_job",
        {k: state.get(k) for k in ("job_id", "status", "model", "fine_tuned_model", "trained_tokens", "error")},
    )
    for c in state["checkpoints"]:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in c["metrics"].items() if k.endswith("loss"))
        print(f"checkpoint at step {c['step']}: {c['model']}" + (f" ({losses})" if losses else ""))
    if job.status == "succeeded":
        print(
            f"job {job.id} succeeded: fine-tuned model {job.fine_tuned_model} "
            f"(system openai:{job.fine_tuned_model} in eval, demo and serve); state in {run.sub(STATE)}"
        )
        return 0
    if job.status == "failed":
        error = state.get("error") or {}
        print(
            f"job {job.id} failed: [{error.get('code')}] {error.get('message')} (param: {error.get('param')})",
            file=sys.stderr,
        )
        return 1
    print(f"job {job.id} was cancelled", file=sys.stderr)
    return 1


def cancel_job(client, run: RunDir) -> int:
    state = read_state(run)
    if not state.get("job_id"):
        raise TuneforgeError(f"no OpenAI job is recorded in {run.sub(STATE)}; nothing to cancel")
    job = client.fine_tuning.jobs.retrieve(state["job_id"])
    if job.status in TERMINAL:
        print(f"job {job.id} already {job.status}; nothing to cancel")
    else:
        job = client.fine_tuning.jobs.cancel(job.id)
        print(f"cancelled job {job.id} ({job.status})")
    _update(state, job)
    write_state(run, state)
    return 0
