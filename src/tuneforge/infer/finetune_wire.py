"""What the fine-tuning endpoints accept and return, apart from the jobs themselves.

Request parsing and validation (JSON bodies, multipart uploads, hyperparameters,
uploaded JSONL), cursor pages for list endpoints, ids, and the mapping of a job's
hyperparameters onto the server experiment's local trainer. No threads, no state:
`finetune_api` holds the files and jobs and calls these.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from tuneforge.infer.api_errors import ApiError

MIN_EXAMPLES = 10  # OpenAI refuses training files with fewer examples; so do we, to behave alike
TERMINAL = ("succeeded", "failed", "cancelled")
HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")


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


def local_train_section(train, hyperparameters: dict[str, Any], has_validation: bool) -> dict[str, Any]:
    """The server experiment's local train section with a job's hyperparameters applied ("auto" keeps the experiment's value).

    n_epochs -> epochs, batch_size -> batch_size (examples per optimizer step, as OpenAI counts it),
    learning_rate_multiplier -> a multiple of train.lr (of the auto rate when train.lr is auto).
    A server started with train.max_steps keeps that cap: it bounds every job.
    """
    section = train.model_dump()
    section.update(backend="local", resume="never", wandb_project=None)
    if hyperparameters.get("n_epochs", "auto") != "auto":
        section["epochs"] = hyperparameters["n_epochs"]
    if hyperparameters.get("batch_size", "auto") != "auto":
        section.update(batch_size=hyperparameters["batch_size"], grad_accum="auto")  # the job's batch wins over the server's split
    if hyperparameters.get("learning_rate_multiplier", "auto") != "auto":
        from tuneforge.data.plan import auto_lr

        section["lr"] = (auto_lr(train) if train.lr == "auto" else train.lr) * hyperparameters["learning_rate_multiplier"]
    if not has_validation:  # the trainer refuses to evaluate on nothing
        section["extra_args"] = {**section["extra_args"], "eval_strategy": "no"}
    return section


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, bytes) of a multipart/form-data body."""
    from email.parser import BytesParser
    from email.policy import HTTP

    if not content_type.startswith("multipart/form-data"):
        raise ApiError(400, "uploads must be multipart/form-data with 'file' and 'purpose' fields")
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise ApiError(400, "could not read the multipart body")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def read_examples(path: Path, filename: str, param: str) -> list[dict[str, Any]]:
    """The chat records of an uploaded JSONL file stored at `path`; JobFailed naming the first bad line of `filename`."""
    from tuneforge.data.sources import read_json_records
    from tuneforge.data.validate import check_record

    records = []
    for raw in read_json_records(path, filename):
        errors = [raw.problem] if raw.problem is not None else [p for p in check_record(raw.data, raw.where) if p.severity == "error"]
        if errors:
            raise JobFailed("invalid_file_format", f"{errors[0]}", param)
        records.append({"messages": raw.data["messages"]})
    return records


def hyperparameter(key: str, value: Any) -> Any:
    if value == "auto":
        return value
    if key == "learning_rate_multiplier":
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 10:
            return float(value)
        raise ApiError(400, f"{key} must be 'auto' or a number in (0, 10]", f"method.supervised.hyperparameters.{key}")
    high = 50 if key == "n_epochs" else 256
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= high:
        return value
    raise ApiError(400, f"{key} must be 'auto' or an integer from 1 to {high}", f"method.supervised.hyperparameters.{key}")


def json_body(body: bytes) -> dict:
    try:
        parsed = json.loads(body or b"null")
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"We could not parse the JSON body of your request: {exc.msg}") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return parsed


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
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return {"object": "list", "data": page, "has_more": len(items) > limit,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}
