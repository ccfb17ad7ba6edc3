"""What flows through preparation: examples, and the problems found in them."""

from __future__ import annotations

from collections import Counter
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
    rejected: dict[str, Any] | None = None  # a preference pair's non-preferred answer (messages[-1] is the preferred)
    extra: dict[str, Any] = field(default_factory=dict)  # record-level keys kept as given: tools, parallel_tool_calls
    desirable: bool | None = None  # an unpaired (KTO) example's label: its final answer is desirable or not

    def openai_record(self) -> dict[str, Any]:
        """The example in OpenAI's fine-tuning format: supervised, or a preference pair; an unpaired (KTO) example
        keeps its `label` beside the messages."""
        if self.rejected is not None:
            source: dict[str, Any] = {"messages": self.messages[:-1], **self.extra}
            return {"input": source, "preferred_output": [self.messages[-1]], "non_preferred_output": [self.rejected]}
        if self.desirable is not None:
            return {"messages": self.messages, "label": self.desirable, **self.extra}
        return {"messages": self.messages, **self.extra}

    @classmethod
    def from_openai(
        cls, record: dict[str, Any], id: str, where: str, label: str | None = None, meta: dict[str, Any] | None = None
    ) -> Example:
        """An example back from `openai_record`'s format (a prepared split)."""
        if "input" in record:
            source = dict(record["input"])
            messages = source.pop("messages") + record["preferred_output"]
            return cls(messages, id, where, label, meta or {}, rejected=record["non_preferred_output"][0], extra=source)
        desirable = record.get("label") if isinstance(record.get("label"), bool) else None
        # a KTO example's true/false label is its own field; any other label (a reinforcement item's) stays as given
        extra = {k: v for k, v in record.items() if k != "messages" and not (k == "label" and desirable is not None)}
        return cls(record["messages"], id, where, label, meta or {}, extra=extra, desirable=desirable)

    def grader_item(self, answer: str | None) -> dict[str, Any]:
        """What a grader reads as `item`: every key of the line (OpenAI's item is the line), and `label` and
        `answer` (the reference answer, None for a prompt) where the line has none of its own."""
        return {"label": self.label, "answer": answer, **self.meta, **self.extra}

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

    found = Counter(
        m[0]["content"]
        for m in conversations
        if m and m[0].get("role") == "system" and isinstance(m[0].get("content"), str) and m[0]["content"].strip()
    )
    return found.most_common(1)[0][0] if found else None


@dataclass
class Raw:
    """A record as read from a source, before it is turned into messages."""

    where: str
    data: Any = None
    problem: Problem | None = None


def label_counts(examples: list[Example]) -> dict[str, int] | None:
    labels = [e.label for e in examples if e.label is not None]
    return dict(sorted(Counter(labels).items())) if labels else None


def label_summary(examples: list[Example]) -> dict[str, Any] | None:
    """Counts per label, and the accuracy of always answering the most common one: the floor every system must beat."""
    counts = label_counts(examples)
    if not counts:
        return None
    majority = max(counts, key=lambda k: (counts[k], k))
    return {
        "counts": counts,
        "majority_label": majority,
        "majority_accuracy": round(counts[majority] / sum(counts.values()), 4),
    }
