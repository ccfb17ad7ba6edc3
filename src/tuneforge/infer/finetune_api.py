"""OpenAI's fine-tuning endpoints on `tuneforge serve`, backed by the local trainer.

    POST /v1/files                          upload a JSONL file (multipart, purpose fine-tune)
    GET  /v1/files, /v1/files/{id}, /v1/files/{id}/content
    DELETE /v1/files/{id}                   refused while an unfinished job uses it
    POST /v1/fine_tuning/jobs               validating_files -> queued -> running -> succeeded | failed | cancelled
    GET  /v1/fine_tuning/jobs               newest first, `after` / `limit`
    GET  /v1/fine_tuning/jobs/{id}, .../events, .../checkpoints
    POST /v1/fine_tuning/jobs/{id}/cancel

One job trains at a time, on a worker thread fed by a queue. A job runs
`train_local` in its own run folder (runs/<name>/api/jobs/<id>/) with the
uploaded file as its prepared data, the server experiment's model and LoRA
settings, and the job's hyperparameters mapped onto the local trainer
(`local_train_section`). The model it produces answers on /v1/chat/completions
under its `ft:` id. Files and jobs are kept in runs/<name>/api/, so a restarted
server still lists them and serves their models.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tuneforge.atomic import atomic_write_bytes, atomic_write_json, atomic_write_jsonl
from tuneforge.infer.finetune_wire import (HYPERPARAMETERS, MIN_EXAMPLES, TERMINAL, JobFailed, hyperparameter, json_body,
                                           local_train_section, new_id, page, parse_multipart, read_examples,
                                           short_model_name)
from tuneforge.infer.api_errors import ApiError


class JobCancelled(Exception):
    pass


class Job:
    """One fine-tuning job: the object the API returns, its events and checkpoints, and a cancel flag."""

    def __init__(self, obj: dict[str, Any], events: list[dict] | None = None, checkpoints: list[dict] | None = None):
        self.obj = obj
        self.events = events or []  # oldest first
        self.checkpoints = checkpoints or []
        self.cancel = threading.Event()

    @property
    def id(self) -> str:
        return self.obj["id"]


def fine_tuning_routes(experiment, run, served) -> dict[str, Any]:
    """The fine-tuning API's routes for a server's Served systems (server.serve's `routes`), by path prefix."""
    fine_tuning = FineTuningApi(experiment, run, served)
    return {"/v1/files": fine_tuning.handle, "/v1/fine_tuning/": fine_tuning.handle}


class FineTuningApi:
    """The files and jobs of one server, the worker that trains them, and the HTTP routes over both."""

    def __init__(self, experiment, run, served):
        self.experiment, self.run, self.served = experiment, run, served
        self.root = run.sub("api")
        self.lock = threading.RLock()
        self.files: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, Job] = {}
        self.queue: queue.Queue[str] = queue.Queue()
        self._load()
        threading.Thread(target=self._work, name="fine-tuning worker", daemon=True).start()

    # ------------------------------------------------------------------ storage

    def _file_path(self, file_id: str) -> Path:
        return self.root / "files" / f"{file_id}.jsonl"

    def _job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def _save(self, job: Job) -> None:
        with self.lock:
            atomic_write_json(self._job_dir(job.id) / "job.json", {"job": job.obj, "events": job.events, "checkpoints": job.checkpoints})

    def _load(self) -> None:
        """Read back files and jobs; a job the last server was training failed with it, waiting ones wait again."""
        for meta in sorted((self.root / "files").glob("*.json")):
            obj = json.loads(meta.read_text(encoding="utf-8"))
            self.files[obj["id"]] = obj
        saved = [json.loads(p.read_text(encoding="utf-8")) for p in (self.root / "jobs").glob("*/job.json")]
        for state in sorted(saved, key=lambda s: s["job"]["created_at"]):
            job = Job(state["job"], state["events"], state["checkpoints"])
            self.jobs[job.id] = job
            status = job.obj["status"]
            if status == "running":
                self._fail(job, JobFailed("server_restarted", "the server stopped while this job was training; create the job again"))
            elif status in ("validating_files", "queued"):
                self._set_status(job, "validating_files", "the server restarted; validating the files again")
                threading.Thread(target=self._validate, args=(job,), daemon=True).start()
            elif status == "succeeded":
                self._register(job)

    # ------------------------------------------------------------------ job state

    def _event(self, job: Job, message: str, level: str = "info", data: dict | None = None, kind: str = "message") -> None:
        with self.lock:
            job.events.append({"id": new_id("ftevent"), "object": "fine_tuning.job.event", "created_at": int(time.time()),
                               "level": level, "message": message, "data": data or {}, "type": kind})
            self._save(job)

    def _set_status(self, job: Job, status: str, message: str, level: str = "info") -> None:
        with self.lock:
            if job.obj["status"] == "cancelled":  # a cancel wins over whatever the worker was about to say
                return
            job.obj["status"] = status
            job.obj["estimated_finish"] = None  # only a running job has one (set as its steps go by)
            if status in TERMINAL:
                job.obj["finished_at"] = int(time.time())
            self._event(job, message, level)

    def _fail(self, job: Job, failure: JobFailed) -> None:
        with self.lock:
            if job.obj["status"] == "cancelled":
                return
            job.obj["error"] = {"code": failure.code, "message": failure.message, "param": failure.param}
            self._set_status(job, "failed", f"Fine-tuning job failed: {failure.message}", "error")

    def _register(self, job: Job) -> None:
        """Serve the job's model (and its checkpoint names) on /v1/chat/completions."""
        adapter = self._job_dir(job.id) / "adapter"
        if (adapter / "adapter_config.json").exists():
            system = f"adapter:{adapter.resolve()}"
            self.served.systems.aliases[job.obj["fine_tuned_model"]] = system
            for checkpoint in job.checkpoints:
                self.served.systems.aliases[checkpoint["fine_tuned_model_checkpoint"]] = system

    # ------------------------------------------------------------------ the work

    def _validate(self, job: Job) -> None:
        try:
            for key in ("training_file", "validation_file"):
                file_id = job.obj[key]
                if file_id:
                    examples = read_examples(self._file_path(file_id), self.files[file_id]["filename"], key)
                    if key == "training_file" and len(examples) < MIN_EXAMPLES:
                        raise JobFailed("invalid_n_examples", f"Training file has {len(examples)} example(s), but must have at least {MIN_EXAMPLES} examples", key)
        except JobFailed as failure:
            self._fail(job, failure)
            return
        self._set_status(job, "queued", "Files validated, job queued")
        self.queue.put(job.id)

    def _work(self) -> None:
        while True:
            job = self.jobs[self.queue.get()]
            if job.obj["status"] != "queued":
                continue  # cancelled while it waited
            try:
                self._train(job)
            except JobCancelled:
                self._event(job, "Training stopped: the job was cancelled")
            except JobFailed as failure:
                self._fail(job, failure)
            except Exception as exc:  # one broken job must not stop the worker
                self._fail(job, JobFailed("training_failed", f"{type(exc).__name__}: {exc}"))

    def _train(self, job: Job) -> None:
        from tuneforge.config import Experiment, LocalTrain
        from tuneforge.run import RunDir
        from tuneforge.train.local import train_local

        self._set_status(job, "running", "Fine-tuning job started")
        if job.cancel.is_set():
            raise JobCancelled
        folder = self._job_dir(job.id)
        has_validation = bool(job.obj["validation_file"])
        base_train = self.experiment.train if isinstance(self.experiment.train, LocalTrain) else LocalTrain()
        raw = self.experiment.model_dump(mode="json")
        raw.update(train=local_train_section(base_train, job.obj["hyperparameters"], has_validation), seed=job.obj["seed"])
        experiment = Experiment.model_validate(raw)
        experiment._source = self.experiment._source
        run = RunDir(experiment, folder).start("fine-tuning job")
        for split, key in (("train", "training_file"), ("valid", "validation_file")):
            file_id = job.obj[key]
            examples = read_examples(self._file_path(file_id), self.files[file_id]["filename"], key) if file_id else []
            atomic_write_jsonl(run.sub("data", f"{split}.jsonl"), examples)
            atomic_write_jsonl(run.sub("data", f"{split}.meta.jsonl"),
                               ({"id": f"{file_id}:{n}", "source": f"{file_id} example {n}"} for n in range(1, len(examples) + 1)))
        t = experiment.train
        self._event(job, f"Training {experiment.model.ref} with epochs={t.epochs}, batch_size={t.batch_size}, "
                         f"lr={t.lr}" + (f", max_steps={t.max_steps} (server cap)" if t.max_steps else ""))
        summary = train_local(experiment, run, progress=False, callbacks=[_progress_callback(self, job)])

        with self.lock:
            if job.cancel.is_set():
                raise JobCancelled
            parts = ["ft", short_model_name(self.experiment.model.ref), "tuneforge", job.obj.get("user_provided_suffix") or "", job.id.split("-", 1)[1][:8]]
            model_id = ":".join(parts)
            metrics = {"step": summary["steps"], "train_loss": summary["train_loss"]}
            if summary["final_eval_loss"] is not None:
                metrics.update(valid_loss=summary["final_eval_loss"], full_valid_loss=summary["final_eval_loss"])
            job.checkpoints.append({"id": new_id("ftckpt"), "object": "fine_tuning.job.checkpoint", "created_at": int(time.time()),
                                    "fine_tuned_model_checkpoint": f"{model_id}:ckpt-step-{summary['steps']}",
                                    "fine_tuning_job_id": job.id, "metrics": metrics, "step_number": summary["steps"]})
            job.obj.update(fine_tuned_model=model_id, trained_tokens=summary["supervised_tokens"])
            self._register(job)
            self._event(job, f"New fine-tuned model created: {model_id}")
            self._set_status(job, "succeeded", "The job has successfully completed")

    # ------------------------------------------------------------------ HTTP

    def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict]:
        url = urlsplit(path)
        parts = [p for p in url.path.split("/") if p][1:]  # without "v1"
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        route = (method, parts[0] if parts else "", len(parts))
        if parts[:1] == ["files"]:
            if route == ("POST", "files", 1):
                return 200, self.upload(headers.get("Content-Type") or "", body)
            if route == ("GET", "files", 1):
                return 200, page(sorted(self.files.values(), key=lambda f: f["created_at"], reverse=query.get("order", "desc") == "desc"),
                                  query, 10_000, lambda f: query.get("purpose") in (None, f["purpose"]))
            if route == ("GET", "files", 2):
                return 200, self._file(parts[1])
            if route == ("DELETE", "files", 2):
                return 200, self.delete_file(parts[1])
            if route == ("GET", "files", 3) and parts[2] == "content":
                self._file(parts[1])
                return 200, self._file_path(parts[1]).read_bytes()
        elif parts[:2] == ["fine_tuning", "jobs"]:
            rest = parts[2:]
            if method == "POST" and not rest:
                return 200, self.create(json_body(body))
            if method == "GET" and not rest:
                return 200, page(sorted((j.obj for j in self.jobs.values()), key=lambda o: o["created_at"], reverse=True), query, 20)
            job = self._job(rest[0]) if rest else None
            if job is not None and method == "GET" and len(rest) == 1:
                return 200, job.obj
            if job is not None and method == "GET" and rest[1:] == ["events"]:
                return 200, page(list(reversed(job.events)), query, 20)
            if job is not None and method == "GET" and rest[1:] == ["checkpoints"]:
                return 200, page(list(reversed(job.checkpoints)), query, 10)
            if job is not None and method == "POST" and rest[1:] == ["cancel"]:
                return 200, self.cancel(job)
        raise ApiError(404, f"Unknown path {method} {url.path}", code="not_found")

    def upload(self, content_type: str, body: bytes) -> dict:
        fields = parse_multipart(content_type, body)
        purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace")
        if purpose != "fine-tune":
            raise ApiError(400, f"purpose must be 'fine-tune' on this server, got {purpose!r}", "purpose")
        if "file" not in fields:
            raise ApiError(400, "the upload has no 'file' field", "file", "missing_required_parameter")
        filename, data = fields["file"]
        obj = {"id": new_id("file"), "object": "file", "bytes": len(data), "created_at": int(time.time()), "filename": filename or "upload.jsonl",
               "purpose": purpose, "status": "processed", "expires_at": None, "status_details": None}
        atomic_write_bytes(self._file_path(obj["id"]), data)
        atomic_write_json(self._file_path(obj["id"]).with_suffix(".json"), obj)
        with self.lock:
            self.files[obj["id"]] = obj
        return obj

    def delete_file(self, file_id: str) -> dict:
        """Forget an upload; refused while a job that has not finished still needs it."""
        with self.lock:
            self._file(file_id)
            users = [job.id for job in self.jobs.values() if job.obj["status"] not in TERMINAL
                     and file_id in (job.obj["training_file"], job.obj["validation_file"])]
            if users:
                raise ApiError(400, f"File {file_id} is in use by fine-tuning job {users[0]}; cancel it or wait for it to finish", "id", "file_in_use")
            del self.files[file_id]
        for path in (self._file_path(file_id).with_suffix(".json"), self._file_path(file_id)):
            path.unlink(missing_ok=True)  # the metadata first: a half-deleted file is never read back as present
        return {"id": file_id, "object": "file", "deleted": True}

    def create(self, body: dict[str, Any]) -> dict:
        model = body.get("model")
        accepted = ("base", self.experiment.model.ref, short_model_name(self.experiment.model.ref))
        if not isinstance(model, str) or not model:
            raise ApiError(400, "you must provide a model parameter", "model", "missing_required_parameter")
        if model not in accepted:
            raise ApiError(400, f"Model {model} is not available for fine-tuning on this server; use one of {', '.join(accepted)}", "model", "model_not_available")
        for key in ("training_file", "validation_file"):
            value = body.get(key)
            if (key == "training_file" or value is not None) and value not in self.files:
                raise ApiError(400, f"invalid {key}: {value}", key, "invalid_file_id" if value else "missing_required_parameter")
        method = body.get("method") or {"type": "supervised", "supervised": {"hyperparameters": body.get("hyperparameters") or {}}}
        if not isinstance(method, dict) or method.get("type") != "supervised":
            raise ApiError(400, "only method.type 'supervised' is supported by this server", "method.type")
        given = ((method.get("supervised") or {}).get("hyperparameters")) or {}
        hyperparameters = {key: hyperparameter(key, given.get(key, "auto")) for key in HYPERPARAMETERS}
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or len(suffix) > 64 or ":" in suffix):
            raise ApiError(400, "suffix must be a string of at most 64 characters without ':'", "suffix")
        seed = body.get("seed", self.experiment.seed)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ApiError(400, "seed must be an integer", "seed")
        metadata = body.get("metadata")
        if metadata is not None and (not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())):
            raise ApiError(400, "metadata must map strings to strings", "metadata")
        obj = {
            "id": new_id("ftjob"), "object": "fine_tuning.job", "created_at": int(time.time()), "error": None,
            "fine_tuned_model": None, "finished_at": None, "hyperparameters": hyperparameters, "model": model,
            "organization_id": "org-tuneforge", "result_files": [], "seed": seed, "status": "validating_files",
            "trained_tokens": None, "training_file": body["training_file"], "validation_file": body.get("validation_file"),
            "estimated_finish": None, "integrations": body.get("integrations") or [], "metadata": metadata,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}, "user_provided_suffix": suffix,
        }
        job = Job(obj)
        with self.lock:
            self.jobs[job.id] = job
            self._event(job, f"Created fine-tuning job: {job.id}")
            if obj["integrations"]:
                self._event(job, "integrations (e.g. W&B) are recorded but not run by tuneforge serve", "warn")
        threading.Thread(target=self._validate, args=(job,), daemon=True).start()
        return obj

    def cancel(self, job: Job) -> dict:
        with self.lock:
            if job.obj["status"] in ("succeeded", "failed"):
                raise ApiError(400, f"Job {job.id} has already {job.obj['status']}", code="invalid_request")
            if job.obj["status"] != "cancelled":
                job.cancel.set()
                self._set_status(job, "cancelled", "The job was cancelled")
            return job.obj

    def _job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"Could not find fine-tuning job: {job_id}", "fine_tuning_job_id", "not_found")
        return job

    def _file(self, file_id: str) -> dict:
        if file_id not in self.files:
            raise ApiError(404, f"No such File object: {file_id}", "id", "not_found")
        return self.files[file_id]


def _progress_callback(api: FineTuningApi, job: Job):
    """Training logs become `metrics` events; a cancel stops training at the next step."""
    from transformers import TrainerCallback

    class JobProgress(TrainerCallback):
        started = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.first_step = time.monotonic(), state.global_step

        def on_step_begin(self, args, state, control, **kwargs):
            if job.cancel.is_set():
                raise JobCancelled

        def on_step_end(self, args, state, control, **kwargs):
            done = state.global_step - self.first_step
            if done > 0 and state.max_steps:  # the mean step time so far, times the steps left
                left = (time.monotonic() - self.started) / done * (state.max_steps - state.global_step)
                with api.lock:
                    if job.obj["status"] == "running":
                        job.obj["estimated_finish"] = int(time.time() + left)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            data: dict[str, Any] = {"step": state.global_step, "total_steps": state.max_steps}
            if "loss" in logs:
                data["train_loss"] = float(logs["loss"])
                if "mean_token_accuracy" in logs:
                    data["train_mean_token_accuracy"] = float(logs["mean_token_accuracy"])
            if "eval_loss" in logs:
                data["valid_loss"] = float(logs["eval_loss"])
            if len(data) > 2:
                losses = ", ".join(f"{k.replace('_', ' ')}={v:.4f}" for k, v in data.items() if k.endswith("loss"))
                where = f"Step {state.global_step}/{state.max_steps}" if state.max_steps else "Before training"  # the base model's eval
                api._event(job, f"{where}: {losses}", data=data, kind="metrics")

    return JobProgress()
