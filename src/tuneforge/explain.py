"""`tuneforge config --explain`: every key of the experiment file, its type, default and description."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tuneforge.config import Experiment
from tuneforge.config_errors import backend_tag, models_in


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = " | ".join(_type_name(a) for a in args if a is not type(None))
        return names + (" | null" if type(None) in args else "")
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sections = models_in(field.annotation)
        default = "(required)" if field.default is PydanticUndefined else repr(field.default)
        if sections and typing.get_origin(field.annotation) is dict:  # sweep.params: any key, each a list or a range
            rows.append((key, "mapping of dotted key -> list | range", default, field.description or ""))
            rows.extend(_rows(sections[0], f"{key}.<key>."))
            continue
        if sections:
            optional = field.default is None
            if len(sections) == 1:
                rows.append((key, "section" + (", optional" if optional else ""), "", field.description or ""))
                rows.extend(_rows(sections[0], key + "."))
            else:  # the train section: one block of keys per backend
                rows.append((key, "section", "", field.description or ""))
                for variant in sections:
                    rows.append((f"{key}  [backend: {backend_tag(variant)}]", "", "", ""))
                    rows.extend(_rows(variant, key + "."))
            continue
        rows.append((key, _type_name(field.annotation), default, field.description or ""))
    return rows


def explain() -> str:
    rows = _rows(Experiment, "")
    width = max(len(r[0]) for r in rows) + 2
    lines = []
    for key, type_name, default, description in rows:
        if not type_name and not default:
            lines.append(f"\n{key}")
            continue
        head = f"{key:<{width}}{type_name}" + (f" = {default}" if default else "")
        lines.append(head)
        if description:
            lines.append(f"{'':<{width}}  {description}")
    return "\n".join(lines)
