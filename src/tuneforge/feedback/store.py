"""Feedback records: what users of the demo said about answers, kept under runs/<name>/feedback/.

Four kinds, each one JSON line in `feedback.jsonl`:

    thumb         {value: up | down, answer: {...}}                    a Chat answer judged
    correction    {answer: {...}, corrected: "the better answer"}      a Chat answer rewritten
    vote          {verdict: left | right | tie | both_bad, left: {...}, right: {...}}   two Compare answers
    contribution  {answer: "the ideal answer"}                         a prompt and its ideal answer

Every record also holds `messages` (the conversation the answer was asked for,
system prompt included), `settings` (temperature, max tokens), `login` (the
demo's login, when it has one), `time` and an `id`. An answer is
`{system, identity, text, sources}`: `identity` names exactly which model answered
(the adapter's file hash for local adapters, the model id for hosted ones), so votes
for two versions of `finetuned` never mix.

Appends are safe with several users and processes at once and on a crash: each
record is one write of one whole line under an exclusive lock, fsynced before the
call returns. A crash mid-write can only leave a partial last line with no newline;
readers skip it, and the next append starts on a fresh line, so nothing already
written is ever lost or spliced.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from tuneforge.errors import TuneforgeError

KINDS = ("thumb", "correction", "vote", "contribution")
VERDICTS = ("left", "right", "tie", "both_bad")
FILENAME = "feedback.jsonl"


def _answer_problem(answer: Any, key: str) -> str | None:
    if (
        not isinstance(answer, dict)
        or not isinstance(answer.get("text"), str)
        or not isinstance(answer.get("system"), str)
    ):
        return f"'{key}' must be an object with the answering 'system' and its 'text'"
    return None


def check(record: dict[str, Any]) -> None:
    """Refuse a record that could not be summarised or exported, naming the key."""
    kind = record.get("kind")
    if kind not in KINDS:
        raise TuneforgeError(f"feedback 'kind' must be one of {', '.join(KINDS)}, not {kind!r}")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise TuneforgeError("feedback 'messages' must be the conversation the answer was asked for")
    problem = None
    if kind in ("thumb", "correction"):
        problem = _answer_problem(record.get("answer"), "answer")
    if kind == "thumb" and record.get("value") not in ("up", "down"):
        problem = "a thumb's 'value' must be up or down"
    if kind == "correction" and not (isinstance(record.get("corrected"), str) and record["corrected"].strip()):
        problem = "a correction needs the 'corrected' answer's text"
    if kind == "vote":
        problem = _answer_problem(record.get("left"), "left") or _answer_problem(record.get("right"), "right")
        if problem is None and record.get("verdict") not in VERDICTS:
            problem = f"a vote's 'verdict' must be one of {', '.join(VERDICTS)}"
    if kind == "contribution" and not (isinstance(record.get("answer"), str) and record["answer"].strip()):
        problem = "a contribution needs its ideal 'answer' text"
    if problem:
        raise TuneforgeError(f"feedback {kind}: {problem}")


class FeedbackStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / FILENAME

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Check, stamp (id, time) and durably append one record; the record as stored."""
        record = {
            "id": f"fb-{uuid.uuid4().hex[:16]}",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **record,
        }
        check(record)
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a crash left half a line: start a fresh one
                line = b"\n" + line
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock
        return record

    def read(self) -> tuple[list[dict[str, Any]], list[str]]:
        """(the records, in the order written; problems: lines that could not be read, by line number)."""
        if not self.path.exists():
            return [], []
        records, problems = [], []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete = lines[:-1] if not data.endswith(b"\n") else lines  # an unterminated last line is a write cut short
        if not data.endswith(b"\n") and lines[-1].strip():
            problems.append(f"{self.path} line {len(lines)}: an unfinished write (skipped)")
        for n, raw in enumerate(complete, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                check(record)
            except (ValueError, TuneforgeError) as exc:
                problems.append(f"{self.path} line {n}: {exc}")
                continue
            records.append(record)
        return records, problems
