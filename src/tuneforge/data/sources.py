"""Where data comes from: files, folders, globs or hub datasets, and their format."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

from tuneforge.data.preference import looks_like_pair
from tuneforge.data.records import Problem, Raw
from tuneforge.errors import TuneforgeError

TABLE_SUFFIXES = {".csv", ".tsv", ".tab", ".parquet"}
JSON_SUFFIXES = {".jsonl", ".json"}
DATA_SUFFIXES = TABLE_SUFFIXES | JSON_SUFFIXES


def locate(spec: str, base_dir: Path, key: str) -> list[Path] | str:
    """Files named by a path, folder or glob (relative to the experiment file), or a hub dataset name."""
    path = Path(spec).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise TuneforgeError(f"{key}: folder {path} holds no {', '.join(sorted(DATA_SUFFIXES))} files")
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise TuneforgeError(f"{key}: the pattern {spec} matches no file")
        return files
    if path.suffix.lower() in DATA_SUFFIXES or spec.startswith((".", "/", "~")):
        raise TuneforgeError(f"{key}: file {path} does not exist")
    return spec  # a hub dataset name


def load_hub(name: str, key: str) -> list[dict]:
    """Rows of a hub dataset's train split; a clear error when the hub cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise TuneforgeError(f"{key}: {name!r} is not a local file or folder, and the hub is off (HF_HUB_OFFLINE=1)")
    try:
        import datasets

        dataset = datasets.load_dataset(name, split="train")
    except Exception as exc:  # network errors, missing datasets and auth failures all end here
        raise TuneforgeError(
            f"{key}: {name!r} is not a local file or folder, "
            f"and loading it from the hub failed: {str(exc).splitlines()[0]}"
        ) from None
    return [dict(row) for row in dataset]


def detect_format(path: Path | None, first: dict | None, has_template: bool, key: str) -> str:
    """messages, alpaca, sharegpt, preference, kto or table, from the suffix and the first record."""
    if path is not None and path.suffix.lower() in TABLE_SUFFIXES:
        return "table"
    if isinstance(first, dict):
        if isinstance(first.get("label"), bool) and ("messages" in first or "completion" in first):
            return "kto"  # an answer rated true or false (a class label is a name, never a boolean)
        if "messages" in first:
            return "messages"
        if "conversations" in first:
            return "sharegpt"
        if "instruction" in first and "output" in first:
            return "alpaca"
        if looks_like_pair(first):
            return "preference"
        if has_template:
            return "table"
        raise TuneforgeError(
            f"{key}: cannot tell the format of {path or 'the dataset'}: its first record has keys {sorted(first)[:8]}; "
            "set data.format, or data.template to map its columns"
        )
    return "table" if has_template else "messages"


def read_json_records(path: Path, name: str | None = None) -> Iterator[Raw]:
    """Records of a .jsonl (one per line) or .json (an array) file, each with its place; bad lines become problems.

    Places are named after `name` (default: the file's name), e.g. for an upload stored under another name.
    """
    name = name or path.name
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield Raw(
                f"{name} byte {exc.start}", problem=Problem(f"{name} byte {exc.start}", "bad_utf8", "not UTF-8 text")
            )
            return
        except json.JSONDecodeError as exc:
            where = f"{name} line {exc.lineno}"
            yield Raw(where, problem=Problem(where, "invalid_json", json_error(exc)))
            return
        items = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(items, list):
            yield Raw(name, problem=Problem(name, "data_type", "a .json file must hold an array of records"))
            return
        for i, item in enumerate(items, 1):
            yield Raw(f"{name} item {i}", item)
        return
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            where = f"{name} line {number}"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Raw(where, problem=Problem(where, "bad_utf8", f"not UTF-8 text (byte {exc.start} of the line)"))
                continue
            if not text.strip():
                continue
            try:
                # without its line break: a line cut short would otherwise be blamed on column 1 past the break
                yield Raw(where, json.loads(text.rstrip("\r\n")))
            except json.JSONDecodeError as exc:
                yield Raw(where, problem=Problem(where, "invalid_json", json_error(exc)))


def json_error(exc: json.JSONDecodeError) -> str:
    """The decoder's message with its column ("Expecting ',' delimiter at column 15"); Python's messages that end
    in "at" ("Unterminated string starting at") take the column directly."""
    return f"{exc.msg}{'' if exc.msg.endswith(' at') else ' at'} column {exc.colno}"


def first_record(path: Path) -> dict | None:
    for raw in read_json_records(path):
        if raw.problem is None:
            return raw.data if isinstance(raw.data, dict) else None
    return None
