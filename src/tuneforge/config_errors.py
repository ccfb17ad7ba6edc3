"""Validation errors of the experiment file, in the user's words.

Pydantic locates an error by a path through the schema, which includes union tags
(`local`, `list[str]`). This turns it into the dotted key the user wrote, the line
it is on, the offending value, what is allowed, and a did-you-mean for typos.
"""

from __future__ import annotations

import re
import typing
from typing import Any

from pydantic import BaseModel, ValidationError


def did_you_mean(word: str, options: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, Union, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found.extend(models_in(arg))
    return found


def _resolve_loc(loc: tuple, root: type[BaseModel]) -> tuple[list[str], list[str] | None]:
    """Turn a pydantic error location into the user's dotted key.

    Returns the key parts and, when the location ends inside a section, the field
    names that section allows (for did-you-mean). Union tags that pydantic puts into
    locations (`local`, `openai`, `list[str]`) are dropped from the key.
    """
    models: list[type[BaseModel]] = [root]
    parts: list[str] = []
    allowed: list[str] | None = sorted(root.model_fields)
    for item in loc:
        if isinstance(item, int):
            parts.append(str(item))
            continue
        owner = next((m for m in models if item in m.model_fields), None)
        if owner is not None:
            parts.append(item)
            inner = models_in(owner.model_fields[item].annotation)
            models = inner
            allowed = sorted({f for m in inner for f in m.model_fields}) or None
            continue
        tagged = [m for m in models if backend_tag(m) == item]
        if tagged:  # discriminated-union tag: narrow to that variant, keep the key as is
            models = tagged
            allowed = sorted(tagged[0].model_fields)
            continue
        if models and not any(item in m.model_fields for m in models) and allowed is not None and _looks_like_key(item):
            parts.append(item)  # an unknown key the user wrote
            allowed_here = allowed
            return parts, allowed_here
        # a union-variant label such as "list[str]" or "literal['all-linear']": not part of the key
    return parts, None


def backend_tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("backend")
    if field is None:
        return None
    args = typing.get_args(field.annotation)
    return args[0] if args else None


def _looks_like_key(item: str) -> bool:
    return not any(ch in item for ch in "[]'(")


def describe_errors(
    exc: ValidationError,
    root: type[BaseModel],
    lines: dict[tuple[str, ...], int],
    overridden: dict[tuple[str, ...], str],
) -> list[str]:
    """One line per problem: where, the dotted key, the value, what is allowed, a did-you-mean.
    `overridden`: keys set from outside the file's text, each with the words that say where (an override, a sweep
    point)."""
    details: dict[str, list[str]] = {}
    values: dict[str, str] = {}
    where: dict[str, str] = {}
    for err in exc.errors(include_url=False):
        parts, allowed = _resolve_loc(err["loc"], root)
        key = ".".join(parts) or "experiment"
        kind = err["type"]
        value = err.get("input")
        if kind == "extra_forbidden":
            section = ".".join(parts[:-1])
            detail = f"unknown key{' in ' + section if section else ''}" + did_you_mean(parts[-1], allowed or [])
            if allowed:
                detail += f" (allowed: {', '.join(allowed)})"
        elif kind == "missing":
            detail = "required key is missing"
        elif kind in ("value_error", "assertion_error"):
            detail = err["msg"].removeprefix("Value error, ")
            if not isinstance(value, (dict, list)):  # a field's own check: show what was written
                values[key] = repr(value)
        elif kind == "union_tag_invalid":  # a discriminated section (train) with an unknown tag: name the tag's key
            ctx = err.get("ctx", {})
            tag_key = ctx.get("discriminator", "").strip("'")
            choices = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
            tag = ctx.get("tag")
            parts = [*parts, tag_key] if tag_key else parts
            key = ".".join(parts)
            detail = f"allowed: {', '.join(choices)}" + (did_you_mean(tag, choices) if isinstance(tag, str) else "")
            values[key] = repr(tag)
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            choices = re.findall(r"'([^']*)'", expected)
            detail = f"allowed: {expected}" + (did_you_mean(value, choices) if isinstance(value, str) else "")
            values[key] = repr(value)
        else:
            detail = err["msg"][0].lower() + err["msg"][1:]
            values[key] = repr(value)
        if detail not in details.setdefault(key, []):
            details[key].append(detail)
        tup = tuple(parts)
        if tup in overridden:
            where[key] = overridden[tup]
        elif tup in lines:
            where[key] = f"line {lines[tup]}: "
        elif tup[:-1] in lines:
            where[key] = f"line {lines[tup[:-1]]}: "
    out = []
    for key, found in details.items():
        got = f"got {values[key]}; " if key in values else ""
        out.append(f"{where.get(key, '')}{key}: {got}{' or '.join(found)}")
    return out
