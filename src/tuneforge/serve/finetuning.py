"""OpenAI's fine-tuning API on `tuneforge serve`, run by the local trainer.

    POST   /v1/files                        upload a JSONL file (multipart, purpose fine-tune), streamed to disk
    GET    /v1/files, /v1/files/{id}, /v1/files/{id}/content
    DELETE /v1/files/{id}                   refused while an unfinished job uses it
    POST   /v1/fine_tuning/jobs             method supervised, dpo or reinforcement; validating_files -> queued ->
                                            running -> succeeded | failed | cancelled, and paused
    POST   /v1/fine_tuning/alpha/graders/run, .../validate   a grader run on one sample, or checked
    GET    /v1/fine_tuning/jobs             newest first, `after` / `limit`, `metadata[k]=v` filters
    GET    /v1/fine_tuning/jobs/{id}, .../events, .../checkpoints
    POST   /v1/fine_tuning/jobs/{id}/cancel, .../pause, .../resume

State lives in SQLite (serve/store.py); uploaded bytes in runs/<name>/api/files/.
Every file and job belongs to the project of the API key that made it, and no
other key can see, read, use, delete or cancel it; `ft:` models are served to
their project alone.

A worker thread takes queued jobs one at a time (`Store.claim_job`, so several
server processes over one run folder never train the same job). A job runs
`train_local` (`train_dpo` for method dpo, `train_grpo` with the job's grader for reinforcement) in its own run
folder (api/jobs/<id>/) with the uploaded file as its
prepared data, the server experiment's model and LoRA settings, and the job's
hyperparameters mapped onto the local trainer (`local_train_section`). Each
checkpoint the trainer writes becomes `ft:...:ckpt-step-N`, a model chat can use.
Pause saves a checkpoint at the next step and stops; resume continues from it
with `train --resume`'s guarantee (the same result as never stopping). A server
killed mid-job continues that job from its newest checkpoint when it starts again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from starlette.requests import Request

from tuneforge.atomic import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_jsonl
from tuneforge.serve.errors import ApiError, readable
from tuneforge.serve.keys import ApiKeys, project_of
from tuneforge.serve.store import Store
from tuneforge.serve.wire import (
    MIN_EXAMPLES,
    TERMINAL,
    GraderRunRequest,
    GraderValidateRequest,
    JobFailed,
    JobRequest,
    local_train_section,
    new_id,
    page,
    read_examples,
    short_model_name,
    step_metrics_csv,
    upload_name,
)

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.run import RunDir

# OpenAI's fine-tunable base models, dated or not (gpt-4o-mini-2024-07-18, gpt-4.1-2025-04-14, gpt-3.5-turbo-0125...)
OPENAI_BASES = re.compile(
    r"^(gpt-4o-mini|gpt-4o|gpt-4\.1|gpt-4\.1-mini|gpt-4\.1-nano|gpt-3\.5-turbo|o4-mini)(-\d{4}(-\d{2}-\d{2})?)?$"
    r"|^(babbage|davinci)-002$"
)
ACTIVE = ("validating_files", "queued", "running", "paused")
MAX_UNFINISHED = 16  # jobs a project may have waiting or training at once; more get 429
ORPHAN_AGE_S = 60  # an upload's temporary file untouched this long lost its server (a copy writes it every ms)
CHECKPOINT_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)


class JobCancelled(Exception):
    pass


class JobPaused(Exception):
    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


def fine_tuning_router(
    experiment: Experiment, run: RunDir, served, keys: ApiKeys | None = None, python_graders: bool = False
) -> list:
    """The fine-tuning API's FastAPI routers for a server's Served systems (server.serve's `routers`)."""
    return [Platform(experiment, run, served, keys, python_graders=python_graders).router()]


class Platform:
    """The files and jobs of one run folder, the worker that trains them, and the HTTP routes over both."""

    def __init__(
        self,
        experiment: Experiment,
        run: RunDir,
        served,
        keys: ApiKeys | None = None,
        max_unfinished: int = MAX_UNFINISHED,
        worker: bool = True,
        python_graders: bool = False,
    ):
        self.experiment, self.run, self.served = experiment, run, served
        self.python_graders = python_graders  # serve --allow-python-graders: a client's code runs on this machine
        self.root = run.sub("api")
        for folder in (self.root, self.root / "files", self.root / "jobs"):
            _private(folder)  # uploads, jobs and the database: for this server's user alone
        _remove_orphans(self.root / "files")
        self.store = Store(self.root / "platform.sqlite3")
        self.max_unfinished = max_unfinished
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.wake = threading.Event()
        if keys is not None:
            self.store.record_projects(keys.entries)
        self._recover()
        if worker:
            threading.Thread(target=self._work, name="fine-tuning worker", daemon=True).start()

    # ------------------------------------------------------------------ places

    def _file_path(self, file_id: str) -> Path:
        return self.root / "files" / f"{file_id}.jsonl"

    def _job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    # ------------------------------------------------------------------ job state

    def _event(
        self, job_id: str, message: str, level: str = "info", data: dict | None = None, kind: str = "message"
    ) -> None:
        self.store.add_event(
            job_id,
            {
                "id": new_id("ftevent"),
                "object": "fine_tuning.job.event",
                "created_at": int(time.time()),
                "level": level,
                "message": message,
                "data": data or {},
                "type": kind,
            },
        )

    def _status(
        self, job_id: str, status: str, message: str, level: str = "info", request: str | None | bool = False, **changes
    ) -> dict | None:
        """Move a job to `status` with an event; a cancelled job stays cancelled whatever the worker was about to say.
        `request` (a pending pause or cancel) is the store's column, not a key of the job object."""
        changes = {"status": status, "estimated_finish": None, **changes}  # only a running job has an estimate
        if status in TERMINAL:
            changes["finished_at"] = int(time.time())
        obj = self.store.update_job(job_id, changes, unless=("cancelled",), request=request)
        if obj is not None:
            self._event(job_id, message, level)
        return obj

    def _fail(self, job_id: str, failure: JobFailed) -> None:
        self._status(
            job_id,
            "failed",
            f"Fine-tuning job failed: {failure.message}",
            "error",
            error={"code": failure.code, "message": failure.message, "param": failure.param},
        )

    def _register(self, name: str, adapter: Path, project: str) -> None:
        if (adapter / "adapter_config.json").exists():
            self.served.register(name, f"adapter:{adapter.resolve()}", project)

    def _recover(self) -> None:
        """After a restart: serve every finished model and checkpoint again, validate what was being validated, and
        put back in the queue a job whose server died while training it (it continues from its newest checkpoint)."""
        from tuneforge.train.callbacks import latest_complete_checkpoint

        for row in self.store.jobs_with_status(*ACTIVE, "succeeded", "failed", "cancelled"):
            for checkpoint, path in self.store.checkpoints(row["id"]):
                self._register(checkpoint["fine_tuned_model_checkpoint"], path, row["project"])
            obj = row["obj"]
            if obj["status"] == "succeeded":
                self._register(obj["fine_tuned_model"], self._job_dir(row["id"]) / "adapter", row["project"])
            elif obj["status"] == "validating_files":
                threading.Thread(target=self._validate, args=(row["id"],), daemon=True).start()
            elif obj["status"] == "running" and not _alive(row["worker"]):
                latest = latest_complete_checkpoint(self._job_dir(row["id"]) / "checkpoints")
                where = (
                    f"continues from its checkpoint at step {latest.name.split('-')[-1]}"
                    if latest
                    else "starts again from the beginning"
                )
                if self.store.update_job(
                    row["id"], {"status": "queued", "estimated_finish": None}, unless=TERMINAL, worker=None
                ):
                    self._event(
                        row["id"],
                        f"The server stopped while this job was training; it is queued again and {where}",
                        "warn",
                    )

    # ------------------------------------------------------------------ the work

    def _validate(self, job_id: str) -> None:
        """Check a job's files; whatever happens the job leaves validating_files: queued, or failed saying why."""
        try:
            obj = self.store.job_row(job_id)["obj"]
            for key in ("training_file", "validation_file"):
                if obj[key]:
                    self._check_file(obj[key], key, obj["method"]["type"])
        except JobFailed as failure:
            self._fail(job_id, failure)
            return
        except Exception as exc:  # nothing may leave a job validating forever, across restarts too
            self._fail(job_id, JobFailed("invalid_file", f"the job's files could not be checked: {readable(exc)}"))
            return
        queued = self.store.update_job(job_id, {"status": "queued"}, only=("validating_files",))
        if queued is not None:
            self._event(job_id, "Files validated, job queued")
            self.wake.set()

    def _check_file(self, file_id: str, key: str, method: str) -> None:
        """JobFailed naming `key` when the file is gone, unreadable, malformed or too small."""
        meta = self.store.file(file_id)
        if meta is None:
            raise JobFailed("invalid_file", f"{key} {file_id} was deleted", key)
        try:
            examples = read_examples(self._file_path(file_id), meta["filename"], key, method)
        except JobFailed:
            raise
        except Exception as exc:  # a line nested past the JSON reader's depth, the stored bytes gone from disk...
            raise JobFailed("invalid_file", f"{key} {file_id} ({meta['filename']}): {readable(exc)}", key) from None
        if key == "training_file" and len(examples) < MIN_EXAMPLES:
            raise JobFailed(
                "invalid_n_examples",
                f"Training file has {len(examples)} example(s), but must have at least {MIN_EXAMPLES} examples",
                key,
            )

    def _work(self) -> None:
        while True:
            job_id = self.store.claim_job(self.worker_id)
            if job_id is None:
                self.wake.wait(2.0)  # also looks again now and then: another process may have queued one
                self.wake.clear()
                continue
            try:
                self._train(job_id)
            except JobCancelled:
                self._event(job_id, "Training stopped: the job was cancelled")
            except JobPaused as paused:
                self._status(
                    job_id,
                    "paused",
                    f"Fine-tuning job paused after step {paused.step}; resume continues from its checkpoint",
                    request=None,
                )
            except JobFailed as failure:
                self._fail(job_id, failure)
            except Exception as exc:  # one broken job must not stop the worker
                self._fail(job_id, JobFailed("training_failed", readable(exc)))
            finally:
                gc.collect()  # the trainer and its model go now, before the next job loads its own

    def _job_experiment(self, row: dict) -> Experiment:
        from tuneforge.config import Experiment, LocalTrain

        obj, extra = row["obj"], row["extra"]
        method = obj["method"]["type"]
        base_train = self.experiment.train if isinstance(self.experiment.train, LocalTrain) else LocalTrain()
        chosen = obj["method"][method]
        section = local_train_section(
            base_train, chosen["hyperparameters"], bool(obj["validation_file"]), method, chosen.get("grader")
        )
        if extra.get("init_adapter"):
            section["init_adapter"] = extra["init_adapter"]
        wandb = _wandb_settings(obj)
        if wandb is not None and _has_wandb():
            section["wandb_project"] = wandb["project"]
        raw = self.experiment.model_dump(mode="json")
        raw.update(train=section, seed=obj["seed"])
        experiment = Experiment.model_validate(raw)
        experiment._source = self.experiment._source
        return experiment

    def _train(self, job_id: str) -> None:
        from tuneforge.run import RunDir
        from tuneforge.train.callbacks import JobProgress, latest_complete_checkpoint

        row = self.store.job_row(job_id)
        obj, project, model_id = row["obj"], row["project"], row["extra"]["model_id"]
        experiment = self._job_experiment(row)
        folder = self._job_dir(job_id)
        run = RunDir(experiment, folder).start("fine-tuning job")
        _private(folder)
        resume_from = latest_complete_checkpoint(run.sub("checkpoints"))
        if resume_from is None:
            for split, key in (("train", "training_file"), ("valid", "validation_file")):
                file_id = obj[key]
                meta = self.store.file(file_id) if file_id else None
                examples = (
                    read_examples(self._file_path(file_id), meta["filename"], key, obj["method"]["type"])
                    if meta
                    else []
                )
                atomic_write_jsonl(run.sub("data", f"{split}.jsonl"), examples)
                atomic_write_jsonl(
                    run.sub("data", f"{split}.meta.jsonl"),
                    ({"id": f"{file_id}:{n}", "source": f"{file_id} example {n}"} for n in range(1, len(examples) + 1)),
                )
            if obj["method"]["type"] == "supervised":
                _check_lengths(experiment, run)
            self._event(job_id, "Fine-tuning job started")
        else:
            self._event(
                job_id, f"Fine-tuning job resumed from its checkpoint at step {resume_from.name.split('-')[-1]}"
            )
        if self.store.request_of(job_id) == "cancel":
            raise JobCancelled
        t = experiment.train
        self._event(
            job_id,
            f"Training {experiment.model.ref} ({obj['method']['type']}) with epochs={t.epochs}, "
            f"batch_size={t.batch_size}, lr={t.lr}"
            + (f", max_steps={t.max_steps} (the server's step count)" if t.max_steps else ""),
        )
        from tuneforge.train import recipe

        train = recipe(experiment.train.method)
        progress = JobProgress(_TrainingJob(self, job_id, model_id, project), run.sub("checkpoints"))
        with _wandb(self, job_id, obj):
            summary = train(experiment, run, resume=resume_from is not None, progress=False, callbacks=[progress])

        if self.store.request_of(job_id) == "cancel":
            raise JobCancelled
        records = (
            [json.loads(line) for line in run.sub("metrics.jsonl").read_text().splitlines()]
            if run.sub("metrics.jsonl").exists()
            else []
        )
        result = self._add_file(
            step_metrics_csv(records, obj["method"]["type"]), "step_metrics.csv", "fine-tune-results", project
        )
        self._register(model_id, run.sub("adapter"), project)
        kept = summary.get("kept_step")
        if kept is not None and kept != summary["steps"]:
            self._event(
                job_id,
                f"The model is the checkpoint of step {kept}: {summary.get('kept_because', 'the best evaluation')}",
            )
        self._event(job_id, f"New fine-tuned model created: {model_id}")
        self._status(
            job_id,
            "succeeded",
            "The job has successfully completed",
            fine_tuned_model=model_id,
            trained_tokens=summary["supervised_tokens"],
            result_files=[result["id"]],
        )

    def _add_checkpoint(self, job_id: str, model_id: str, project: str, step: int, source: Path, metrics: dict) -> None:
        """A trainer checkpoint as an OpenAI checkpoint: its adapter copied beside the job (the trainer rotates its own
        folders away), listed, and served as `<model>:ckpt-step-N`."""
        target = self._job_dir(job_id) / "ckpt" / f"step-{step}"
        if not target.exists():
            with atomic_dir(target) as tmp:
                for name in CHECKPOINT_FILES:
                    if (source / name).exists():
                        shutil.copy2(source / name, tmp / name)
        name = f"{model_id}:ckpt-step-{step}"
        self.store.add_checkpoint(
            job_id,
            {
                "id": f"ftckpt-{job_id.split('-', 1)[1][:12]}{step:08d}",
                "object": "fine_tuning.job.checkpoint",
                "created_at": int(time.time()),
                "fine_tuned_model_checkpoint": name,
                "fine_tuning_job_id": job_id,
                "metrics": {"step": step, **metrics},
                "step_number": step,
            },
            target,
        )
        self._register(name, target, project)
        self._event(job_id, f"Checkpoint created at step {step}")

    def _add_file(self, data: bytes, filename: str, purpose: str, project: str) -> dict:
        obj = _file_object(new_id("file"), len(data), filename, purpose)
        os.chmod(atomic_write_bytes(self._file_path(obj["id"]), data), 0o600)
        self.store.add_file(obj, project)
        return obj

    # ------------------------------------------------------------------ requests

    def create(self, request: JobRequest, project: str) -> dict:
        if request.method is not None and request.method.reinforcement is not None:
            self.checked_grader(request.method.reinforcement.grader, "method.reinforcement.grader")
        hosted, init_adapter = self._base_of(request, project)
        for key in ("training_file", "validation_file"):
            value = getattr(request, key)
            if value is not None and self.store.file(value, project) is None:
                raise ApiError(400, f"invalid {key}: {value}", key, "invalid_file_id")
        job_id = new_id("ftjob")
        model_id = ":".join(
            [
                "ft",
                short_model_name(self.experiment.model.ref),
                "tuneforge",
                request.suffix or "",
                job_id.split("-", 1)[1][:8],
            ]
        )
        obj = _job_object(request, job_id, self.experiment.seed if request.seed is None else request.seed)
        if not self.store.add_job(
            obj, project, {"model_id": model_id, "init_adapter": init_adapter}, self.max_unfinished
        ):
            raise ApiError(
                429,
                f"This project already has {self.max_unfinished} unfinished fine-tuning jobs; wait for one to "
                "finish or cancel one",
                code="rate_limit_exceeded",
                kind="rate_limit_error",
            )
        self._event(job_id, f"Created fine-tuning job: {job_id}")
        if hosted:
            self._event(
                job_id,
                f"{request.model} is OpenAI's model: this server fine-tunes {self.experiment.model.ref} in its place",
            )
        if obj["integrations"] and not _has_wandb():
            self._event(
                job_id,
                "wandb is not installed on this server: the integration is recorded on the job but nothing is logged",
                "warn",
            )
        threading.Thread(target=self._validate, args=(job_id,), daemon=True).start()
        return obj

    def _base_of(self, request: JobRequest, project: str) -> tuple[bool, str | None]:
        """(whether the model asked for is one of OpenAI's, the adapter to start from): the served model, an OpenAI
        model trained here on the served one in its place, or one of the project's own ft: models, whose adapter
        training continues; any other model is refused."""
        accepted = ("base", self.experiment.model.ref, short_model_name(self.experiment.model.ref))
        # client code written for OpenAI runs unchanged: trained here on the served model
        hosted = bool(OPENAI_BASES.match(request.model))
        if request.model in accepted or hosted:
            return hosted, None
        system = self.served.systems.aliases.get(request.model)
        if not request.model.startswith("ft:") or system is None or self.served.owners.get(request.model) != project:
            raise ApiError(
                400,
                f"Model {request.model} is not available for fine-tuning on this server; use one of "
                f"{', '.join(accepted)} or one of your ft: models",
                "model",
                "model_not_available",
            )
        return hosted, system.split(":", 1)[1]  # continue from that model's adapter

    def cancel(self, job_id: str, project: str) -> dict:
        obj = self._job(job_id, project)
        if obj["status"] in ("succeeded", "failed"):
            raise ApiError(400, f"Job {job_id} has already {obj['status']}", code="invalid_request")
        if obj["status"] == "cancelled":
            return obj
        changed = self.store.update_job(
            job_id,
            {"status": "cancelled", "estimated_finish": None, "finished_at": int(time.time())},
            unless=TERMINAL,
            request="cancel",
        )
        if changed is None:  # it finished meanwhile
            return self._job(job_id, project)
        self._event(job_id, "The job was cancelled")
        return changed

    def pause(self, job_id: str, project: str) -> dict:
        obj = self._job(job_id, project)
        if obj["status"] != "running":
            raise ApiError(
                400, f"Only a running job can be paused; job {job_id} is {obj['status']}", code="invalid_request"
            )
        changed = self.store.update_job(job_id, {}, only=("running",), request="pause")
        if changed is not None:
            self._event(job_id, "Pause requested: the job stops after a checkpoint at its next step")
        return self._job(job_id, project)

    def resume(self, job_id: str, project: str) -> dict:
        obj = self._job(job_id, project)
        if obj["status"] != "paused":
            raise ApiError(
                400, f"Only a paused job can be resumed; job {job_id} is {obj['status']}", code="invalid_request"
            )
        changed = self.store.update_job(job_id, {"status": "queued"}, only=("paused",), request=None)
        if changed is not None:
            self._event(job_id, "Fine-tuning job resumed: queued to continue from its checkpoint")
            self.wake.set()
        return self._job(job_id, project)

    def delete_file(self, file_id: str, project: str) -> dict:
        """Forget an upload; refused while a job that has not finished still needs it."""
        self._file(file_id, project)

        def in_use(db) -> str | None:
            row = db.execute(
                "SELECT id FROM jobs WHERE status IN (?, ?, ?, ?) AND (json_extract(obj, '$.training_file') = ? "
                "OR json_extract(obj, '$.validation_file') = ?) LIMIT 1",
                (*ACTIVE, file_id, file_id),
            ).fetchone()
            return row[0] if row else None

        user = self.store.delete_file(file_id, in_use)
        if user is not None:
            raise ApiError(
                400,
                f"File {file_id} is in use by fine-tuning job {user}; cancel it or wait for it to finish",
                "id",
                "file_in_use",
            )
        self._file_path(file_id).unlink(missing_ok=True)  # the row first: a half-deleted file is never listed
        return {"id": file_id, "object": "file", "deleted": True}

    def _job(self, job_id: str, project: str) -> dict:
        obj = self.store.job(job_id, project)
        if obj is None:
            raise ApiError(404, f"Could not find fine-tuning job: {job_id}", "fine_tuning_job_id", "not_found")
        return obj

    def _file(self, file_id: str, project: str) -> dict:
        obj = self.store.file(file_id, project)
        if obj is None:
            raise ApiError(404, f"No such File object: {file_id}", "id", "not_found")
        return obj

    def run_grader(self, request: GraderRunRequest, project: str) -> dict:
        """OpenAI's graders/run: the grader's reward for one answer to one item, with its errors and timing. Model
        graders ask the models this project is served (base, ft: models...) or OpenAI's by their own names."""
        from tuneforge.graders import grade, run_response
        from tuneforge.systems import GraderModels

        models = GraderModels(lambda name: self.served.get(name, project))
        parsed = self.checked_grader(request.grader, "grader")
        return run_response(grade(parsed, request.model_sample, request.item, model=models))

    def checked_grader(self, grader: dict, param: str) -> Any:
        """The grader validated, or a 400 naming every bad field; python graders only where the server allows them
        (they run the client's code on this machine)."""
        from tuneforge.graders import InvalidGrader, validate_grader

        try:
            parsed = validate_grader(grader)
        except InvalidGrader as exc:
            raise ApiError(400, "Invalid grader: " + "; ".join(exc.problems), param, "invalid_grader") from None
        if not self.python_graders and _has_python(parsed):
            raise ApiError(
                400,
                "python graders run their code on this server, which does not accept them; start it with "
                "`tuneforge serve --allow-python-graders` to allow them (their sandbox limits time, memory, disk and "
                "network, not what files they can read)",
                param,
                "python_grader_not_allowed",
            )
        return parsed

    # ------------------------------------------------------------------ HTTP

    def router(self):
        from fastapi import APIRouter, Depends
        from fastapi.responses import FileResponse
        from starlette.concurrency import run_in_threadpool

        api = APIRouter()
        Project = Depends(project_of)

        @api.post("/v1/fine_tuning/alpha/graders/validate")
        def validate_grader(body: GraderValidateRequest, project: str = Project):
            from tuneforge.graders.response import as_dict

            return {"grader": as_dict(self.checked_grader(body.grader, "grader"))}

        @api.post("/v1/fine_tuning/alpha/graders/run")
        async def run_grader(body: GraderRunRequest, project: str = Project):
            return await run_in_threadpool(self.run_grader, body, project)

        @api.post("/v1/files")
        async def upload(request: Request, project: str = Project):
            return await self._upload(request, project)

        @api.get("/v1/files")
        def list_files(request: Request, project: str = Project):
            query = dict(request.query_params)
            return page(
                self.store.files(project, query.get("purpose"), query.get("order", "desc") == "desc"), query, 10_000
            )

        @api.get("/v1/files/{file_id}")
        def get_file(file_id: str, project: str = Project):
            return self._file(file_id, project)

        @api.delete("/v1/files/{file_id}")
        def delete_file(file_id: str, project: str = Project):
            return self.delete_file(file_id, project)

        @api.get("/v1/files/{file_id}/content")
        def file_content(file_id: str, project: str = Project):
            self._file(file_id, project)
            return FileResponse(self._file_path(file_id), media_type="application/octet-stream")

        @api.post("/v1/fine_tuning/jobs")
        async def create_job(body: JobRequest, project: str = Project):
            return await run_in_threadpool(self.create, body, project)

        @api.get("/v1/fine_tuning/jobs")
        def list_jobs(request: Request, project: str = Project):
            query = dict(request.query_params)
            metadata = {
                k[len("metadata[") : -1]: v
                for k, v in request.query_params.multi_items()
                if k.startswith("metadata[") and k.endswith("]")
            }
            jobs = self.store.jobs(project, metadata)
            if query.get("metadata") == "null":
                jobs = [j for j in jobs if not j.get("metadata")]
            return page(jobs, query, 20)

        @api.get("/v1/fine_tuning/jobs/{job_id}")
        def get_job(job_id: str, project: str = Project):
            return self._job(job_id, project)

        @api.get("/v1/fine_tuning/jobs/{job_id}/events")
        def list_events(job_id: str, request: Request, project: str = Project):
            self._job(job_id, project)
            return page(self.store.events(job_id), dict(request.query_params), 20)

        @api.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
        def list_checkpoints(job_id: str, request: Request, project: str = Project):
            self._job(job_id, project)
            return page([c for c, _ in self.store.checkpoints(job_id)], dict(request.query_params), 10)

        @api.post("/v1/fine_tuning/jobs/{job_id}/cancel")
        def cancel_job(job_id: str, project: str = Project):
            return self.cancel(job_id, project)

        @api.post("/v1/fine_tuning/jobs/{job_id}/pause")
        def pause_job(job_id: str, project: str = Project):
            return self.pause(job_id, project)

        @api.post("/v1/fine_tuning/jobs/{job_id}/resume")
        def resume_job(job_id: str, project: str = Project):
            return self.resume(job_id, project)

        return api

    async def _upload(self, request, project: str) -> dict:
        """A multipart upload, streamed: the parser spools the file part to disk as it arrives (the body limit stops it
        past --max-upload-mb), then its bytes are moved into the store atomically and only then get a row."""
        from starlette.concurrency import run_in_threadpool
        from starlette.formparsers import MultiPartException, MultiPartParser

        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "uploads must be multipart/form-data with 'file' and 'purpose' fields")
        try:
            form = await MultiPartParser(request.headers, request.stream(), max_files=1, max_fields=8).parse()
        except MultiPartException as exc:
            raise ApiError(400, f"could not read the multipart body: {exc.message}") from None
        try:
            purpose = form.get("purpose")
            if purpose != "fine-tune":
                raise ApiError(400, f"purpose must be 'fine-tune' on this server, got {purpose!r}", "purpose")
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "the upload has no 'file' field", "file", "missing_required_parameter")
            file_id = new_id("file")
            size = await run_in_threadpool(_store_bytes, upload.file, self._file_path(file_id))
        finally:
            await form.close()
        obj = _file_object(file_id, size, upload_name(upload.filename), purpose)
        self.store.add_file(obj, project)
        return obj


def _has_python(parsed: Any) -> bool:
    """Whether a validated grader is, or holds within a multi grader, a python grader."""
    from tuneforge.graders import Multi

    if isinstance(parsed, Multi):
        return any(_has_python(sub) for sub in parsed.graders.values())
    return parsed.type == "python"


def _job_object(request: JobRequest, job_id: str, seed: int) -> dict:
    """A new job as the API shows it, validating its files."""
    method = request.resolved_method()
    hyperparameters = {
        k: method[method["type"]]["hyperparameters"][k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")
    }
    return {
        "id": job_id,
        "object": "fine_tuning.job",
        "created_at": int(time.time()),
        "error": None,
        "fine_tuned_model": None,
        "finished_at": None,
        "hyperparameters": hyperparameters,
        "model": request.model,
        "organization_id": "org-tuneforge",
        "result_files": [],
        "seed": seed,
        "status": "validating_files",
        "trained_tokens": None,
        "training_file": request.training_file,
        "validation_file": request.validation_file,
        "estimated_finish": None,
        "integrations": [i.model_dump(exclude_none=True) for i in request.integrations or []],
        "metadata": request.metadata,
        "method": method,
        "user_provided_suffix": request.suffix,
    }


def _file_object(file_id: str, size: int, filename: str, purpose: str) -> dict:
    """A stored file as the API shows it (no expires_at or status_details: the schema allows them absent, not null)."""
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": int(time.time()),
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
    }


def _store_bytes(source, target: Path) -> int:
    """Copy a spooled upload into the store through a temporary file and a rename: present whole or not at all."""
    source.seek(0)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
    os.chmod(target, 0o600)  # in a folder only this user may enter, so never readable by others meanwhile
    return size


def _private(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)


def _remove_orphans(files: Path) -> None:
    """The temporary files of uploads whose server was killed while it stored them (named as atomic_path names
    them); one still being written by another server over this run folder is younger than ORPHAN_AGE_S."""
    now = time.time()
    for tmp in files.glob(".*.tmp"):
        with contextlib.suppress(OSError):  # another server removed it first
            if tmp.is_file() and now - tmp.stat().st_mtime > ORPHAN_AGE_S:
                tmp.unlink()


def _alive(worker: str | None) -> bool:
    """Whether the process that claimed a job still runs (another machine's: assumed so)."""
    if not worker:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return False  # this process is starting: whatever it claimed before, it claimed in an earlier life
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_lengths(experiment: Experiment, run) -> None:
    """JobFailed saying how many examples are too long, the longest and the limit, when the trainer would find no
    token to learn from once each example is cut to the server's data.max_length."""
    from tuneforge.data.chat import ChatEncoder
    from tuneforge.data.prepared import load_prepared
    from tuneforge.models import load_tokenizer, materialize, resolve
    from tuneforge.train.local import tokenize

    start = experiment.train.init_adapter
    tokenizer = load_tokenizer(experiment.model, start or materialize(resolve(experiment.model.ref)))
    encoder, limit = ChatEncoder(tokenizer), experiment.data.max_length
    examples = load_prepared(run.sub("data"), "train")
    if tokenize(encoder, examples, limit)[0]:
        return
    encoded = encoder.encode_examples([e.messages for e in examples], [e.extra.get("tools") for e in examples])
    lengths = [max(len(s.input_ids) for s in sequences) for sequences in encoded if sequences]
    longer = sum(n > limit for n in lengths)
    if longer:
        raise JobFailed(
            "invalid_training_file",
            f"No training example fits this server's limit of {limit} tokens (data.max_length) with a token to "
            f"learn from: {longer} of {len(examples)} examples are longer (the longest: {max(lengths)} tokens). "
            "Shorten them, or start the server with a larger data.max_length.",
            "training_file",
        )


def _has_wandb() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def _wandb_settings(obj: dict) -> dict | None:
    """The job's wandb integration settings (project, name, entity, tags), or None without one."""
    return next((i["wandb"] for i in obj.get("integrations") or [] if i.get("type") == "wandb"), None)


def _wandb_key() -> bool:
    """Whether this server can log in to W&B: WANDB_API_KEY, or the netrc entry `wandb login` writes."""
    import netrc
    from urllib.parse import urlsplit

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


@contextlib.contextmanager
def _wandb(platform: Platform, job_id: str, obj: dict):
    """A job's wandb integration: the trainer logs to that project (WANDB_MODE and the login come from the server's
    environment). Without a W&B key the job logs offline into its own folder and says how to sync it, rather than
    fail at its start; without wandb installed the integration stays recorded and nothing is logged."""
    settings = _wandb_settings(obj)
    if settings is None or not _has_wandb():
        yield
        return
    offline = os.environ.get("WANDB_MODE") not in ("offline", "disabled", "dryrun") and not _wandb_key()
    values = {
        "WANDB_PROJECT": settings["project"],
        "WANDB_NAME": settings.get("name") or job_id,
        "WANDB_RUN_ID": job_id,
        "WANDB_RESUME": "allow",
        "WANDB_ENTITY": settings.get("entity"),
        "WANDB_TAGS": ",".join(settings.get("tags") or []) or None,
        "WANDB_LOG_MODEL": "false",
    }
    if offline:
        folder = platform._job_dir(job_id)
        values.update(WANDB_MODE="offline", WANDB_DIR=str(folder))
        platform._event(
            job_id,
            f"This server has no W&B API key: the job logs offline into api/jobs/{job_id}/wandb in the server's run "
            f"folder; once a key is set (wandb login), `wandb sync api/jobs/{job_id}/wandb/offline-run-*` there "
            "uploads it",
            "warn",
        )
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value:
            os.environ[key] = value
        else:
            os.environ.pop(key, None)
    platform._event(job_id, f"Logging to Weights & Biases project {settings['project']} (run {values['WANDB_NAME']})")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclasses.dataclass
class _TrainingJob:
    """One job as its training callback (train.callbacks.JobProgress) sees it: the callback stops the training by
    raising this module's exceptions, which `Platform._work` catches."""

    platform: Platform
    job_id: str
    model_id: str
    project: str

    def request(self) -> str | None:
        return self.platform.store.request_of(self.job_id)

    def stop_cancelled(self) -> NoReturn:
        raise JobCancelled

    def stop_paused(self, step: int) -> NoReturn:
        raise JobPaused(step)

    def estimate(self, finish: int) -> None:
        self.platform.store.update_job(self.job_id, {"estimated_finish": finish}, only=("running",))

    def metrics(self, message: str, data: dict[str, Any]) -> None:
        self.platform._event(self.job_id, message, data=data, kind="metrics")

    def checkpoint(self, step: int, folder: Path, metrics: dict[str, float]) -> None:
        self.platform._add_checkpoint(self.job_id, self.model_id, self.project, step, folder, metrics)
