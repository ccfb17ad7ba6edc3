"""A grader definition checked against the `openai` package's own types, every problem named by its field path.

A multi grader's `graders` is what OpenAI's guide writes, a mapping from the name the formula uses to a grader;
the openai package types it as one grader, so that form is taken too (the formula then uses that grader's name).
Beyond the types: no field the type does not have (a misspelt key would be ignored), a score range of two
increasing numbers, passing labels among the labels, text content only (tuneforge's systems read text), template
references that start with item. or sample., a python source that parses and defines grade, and a formula that
is arithmetic over the sub-graders' names. Multi graders do not nest, as in OpenAI's type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneforge.errors import TuneforgeError
from tuneforge.graders import formula
from tuneforge.graders.errors import GraderError, InvalidGrader
from tuneforge.graders.sandbox import check_source
from tuneforge.graders.template import REFERENCE

SINGLE = ("string_check", "text_similarity", "score_model", "label_model", "python")


@dataclass(frozen=True)
class Multi:
    """A validated multi grader: its sub-graders by the names its formula uses."""

    name: str
    calculate_output: str
    graders: dict[str, Any]
    type: str = "multi"


def _types() -> dict[str, type]:
    try:
        from openai.types import graders
    except ImportError:
        raise TuneforgeError(
            "graders are checked against the openai package: pip install 'tuneforge[openai]'"
        ) from None
    return {
        "string_check": graders.StringCheckGrader,
        "text_similarity": graders.TextSimilarityGrader,
        "score_model": graders.ScoreModelGrader,
        "label_model": graders.LabelModelGrader,
        "python": graders.PythonGrader,
        "multi": graders.MultiGrader,
    }


def validate_grader(grader: Any) -> Any:
    """The grader as a typed object (an openai grader model, or `Multi`); InvalidGrader listing every problem."""
    problems: list[str] = []
    parsed = _checked(grader, "", problems, nested=False)
    if problems:
        raise InvalidGrader(problems)
    return parsed


def _checked(grader: Any, path: str, problems: list[str], nested: bool) -> Any:
    """The parsed grader at `path` (a prefix such as "graders.name."), its problems added to `problems`."""
    from pydantic import ValidationError

    if hasattr(grader, "model_dump"):
        grader = grader.model_dump(by_alias=True, exclude_none=True)
    if not isinstance(grader, dict):
        problems.append(f"{path or 'grader'}: must be an object, not {type(grader).__name__}")
        return None
    allowed = SINGLE if nested else (*SINGLE, "multi")
    if grader.get("type") not in allowed:
        problems.append(f"{path}type: {grader.get('type')!r} is not one of {', '.join(allowed)}")
        return None
    if grader["type"] == "multi":
        return _multi(grader, path, problems)
    cls = _types()[grader["type"]]
    problems += [
        f"{path}{key}: no such field in a {grader['type']} grader" for key in grader if key not in cls.model_fields
    ]
    try:
        parsed = cls.model_validate(grader)
    except ValidationError as exc:
        problems += _described(exc, path)
        return None
    problems += [f"{path}{problem}" for problem in _meaning(parsed)]
    return parsed


def _described(exc, path: str) -> list[str]:
    """pydantic's errors as `field.path: message`, a union's attempts at every form said once."""
    found: dict[str, str] = {}
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        branch = next((i for i, part in enumerate(loc) if part[0].isupper() or "[" in part or part == "str"), None)
        if branch is not None:
            found.setdefault(".".join(loc[:branch]), "matches none of the forms this field takes")
        else:
            found.setdefault(".".join(loc), error["msg"])
    return [f"{path}{where}: {message}" for where, message in found.items()]


def _meaning(grader: Any) -> list[str]:
    """What the types allow but a grader cannot mean."""
    problems = []
    if grader.type == "score_model" and grader.range is not None:
        if len(grader.range) != 2 or not grader.range[0] < grader.range[1]:
            problems.append(f"range: must be two increasing numbers, not {grader.range}")
    if grader.type == "label_model":
        if not grader.labels:
            problems.append("labels: must name at least one label")
        problems += [
            f"passing_labels: {x!r} is not among labels" for x in grader.passing_labels if x not in grader.labels
        ]
    if grader.type == "python":
        problems += check_source(grader.source)
    for where, text in _templates(grader):
        if text is None:
            problems.append(f"{where}: only text content is taken (tuneforge's systems read text)")
            continue
        problems += [
            f"{where}: {{{{{ref}}}}} must start with item. or sample."
            for ref in REFERENCE.findall(text)
            if ref.split(".")[0] not in ("item", "sample")
        ]
    return problems


def _templates(grader: Any) -> list[tuple[str, str | None]]:
    """Every templated text of a grader with its field path; None for content that is not text (an image)."""
    if grader.type in ("string_check", "text_similarity"):
        return [("input", grader.input), ("reference", grader.reference)]
    if grader.type not in ("score_model", "label_model"):
        return []
    found = []
    for i, message in enumerate(grader.input):
        parts = message.content if isinstance(message.content, list) else [message.content]
        for j, part in enumerate(parts):
            where = f"input.{i}.content" + (f".{j}" if isinstance(message.content, list) else "")
            text = part if isinstance(part, str) else getattr(part, "text", None)
            found.append((where, text if isinstance(text, str) else None))
    return found


def _multi(grader: dict, path: str, problems: list[str]) -> Multi | None:
    unknown = [key for key in grader if key not in ("type", "name", "graders", "calculate_output")]
    problems += [f"{path}{key}: no such field in a multi grader" for key in unknown]
    for key in ("name", "calculate_output"):
        if not isinstance(grader.get(key), str):
            problems.append(f"{path}{key}: required, a string")
    subs = grader.get("graders")
    if isinstance(subs, dict) and "type" in subs:  # the openai package's form: one grader, known by its name
        subs = {subs.get("name"): subs}
    if not isinstance(subs, dict) or not subs:
        problems.append(f"{path}graders: required, an object of graders by the names the formula uses")
        return None
    parsed = {name: _checked(sub, f"{path}graders.{name}.", problems, nested=True) for name, sub in subs.items()}
    if isinstance(grader.get("calculate_output"), str):
        try:
            unknown = formula.names(grader["calculate_output"]) - set(parsed)
        except GraderError as exc:
            problems.append(f"{path}{exc}")
        else:
            if unknown:
                problems.append(f"{path}calculate_output: names no sub-grader: {', '.join(sorted(unknown))}")
    if len(problems):
        return None
    return Multi(grader["name"], grader["calculate_output"], parsed)
