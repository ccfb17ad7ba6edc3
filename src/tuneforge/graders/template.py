"""OpenAI's grader templating: `{{item.field.sub}}`, `{{sample.output_text}}`, `{{sample.output_json.field}}`.

A reference names a path from `item` (the dataset record) or `sample` (the model's answer). A path that is not
there is an error, never an empty string: a misspelt field would otherwise grade every sample against nothing.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tuneforge.graders.errors import GraderError

REFERENCE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


def make_sample(sample: str | dict) -> dict:
    """The `sample` namespace OpenAI gives graders: the answer text, and that text parsed as JSON when it is
    JSON (None otherwise); a dict passes through with output_json added the same way when it has none."""
    if isinstance(sample, str):
        sample = {"output_text": sample}
    elif not isinstance(sample.get("output_text"), str):
        raise GraderError("sample_parse_error", "a sample needs output_text, a string")
    if "output_json" not in sample:
        try:
            parsed = json.loads(sample["output_text"])
        except ValueError:
            parsed = None
        sample = {**sample, "output_json": parsed}
    return sample


def lookup(path: str, sample: dict, item: Any) -> Any:
    """The value a dotted reference names; list elements by index (`item.answers.0`)."""
    head, *rest = path.split(".")
    if head not in ("item", "sample"):
        raise GraderError("invalid_variable_error", f"{{{{{path}}}}}: a reference starts with item. or sample.")
    value = item if head == "item" else sample
    for depth, key in enumerate(rest):
        if head == "sample" and depth == 0 and key == "output_json" and value.get("output_json") is None:
            raise GraderError("sample_parse_error", f"{{{{{path}}}}}: the sample is not JSON")
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.lstrip("-").isdigit() and -len(value) <= int(key) < len(value):
            value = value[int(key)]
        else:
            where = ".".join([head, *rest[:depth]])
            raise GraderError("invalid_variable_error", f"{{{{{path}}}}}: {where} has no {key!r}")
    return value


def as_text(value: Any) -> str:
    """A string as it is; anything else as JSON (numbers, true/false, null, objects)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(template: str, sample: dict, item: Any) -> str:
    """The template with every reference replaced by its value."""
    return REFERENCE.sub(lambda m: as_text(lookup(m.group(1), sample, item)), template)
