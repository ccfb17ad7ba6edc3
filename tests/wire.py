"""Response bodies checked against the official `openai` package's generated types, strictly.

`TheType.model_validate(body, strict=True)`, not the client's lenient parsing (which
builds objects without validating them): a required key missing, a null where the
type wants a value, or a string where it wants a number fails the test.
"""

from __future__ import annotations

from typing import Any


def checked(model, body: dict[str, Any]):
    return model.model_validate(body, strict=True)


def checked_page(model, body: dict[str, Any]) -> list:
    """A cursor page (`object: list`, `data`, `has_more`) whose every item is a valid `model`."""
    assert (
        body["object"] == "list" and isinstance(body["data"], list) and isinstance(body.get("has_more", False), bool)
    ), body
    return [checked(model, item) for item in body["data"]]


def checked_job(body: dict[str, Any]):
    """A fine-tuning job. The package's status Literal predates `paused` (pause and resume are newer endpoints than
    its types): a paused job is checked with every other key strict and its status asserted on its own."""
    from openai.types.fine_tuning import FineTuningJob

    if body.get("status") == "paused":
        checked(FineTuningJob, {**body, "status": "running"})
        return body
    return checked(FineTuningJob, body)
