"""What flows through preparation: examples, and the problems found in them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class Problem:
    """One finding about one record, named by its place and a stable code."""

    where: str  # "conversations.jsonl line 12" or "reviews.csv row 7"
    code: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.where}: [{self.code}] {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"where": self.where, "code": self.code, "message": self.message, "severity": self.severity}


@dataclass
class Example:
    """A chat example in OpenAI's fine-tuning shape, plus where it came from."""

    messages: list[dict[str, Any]]
    id: str
    where: str
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # filled in by tokenization
    n_tokens: int = 0  # of its longest training sequence
    n_trainable: int = 0  # over all its training sequences
    # (tokens, trainable) per training sequence: one, or one per assistant turn where the template needs it
    sequences: list[tuple[int, int]] = field(default_factory=list)
    truncated: bool = False
    missing_eot: bool = False

    def openai_record(self) -> dict[str, Any]:
        return {"messages": self.messages}

    def meta_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"id": self.id, "source": self.where}
        if self.label is not None:
            record["label"] = self.label
        if self.meta:
            record["meta"] = self.meta
        return record


def common_system_prompt(conversations) -> str | None:
    """The system prompt most training conversations open with (None when none has one)."""
    from collections import Counter

    found = Counter(m[0]["content"] for m in conversations
                    if m and m[0].get("role") == "system" and isinstance(m[0].get("content"), str) and m[0]["content"].strip())
    return found.most_common(1)[0][0] if found else None


@dataclass
class Raw:
    """A record as read from a source, before it is turned into messages."""

    where: str
    data: Any = None
    problem: Problem | None = None
