"""Feedback as training data: OpenAI-format supervised and preference JSONL, and KTO's rated answers, deduplicated
and validated.

    supervised (sft.jsonl)         contributed examples, corrections (the corrected text), thumbs-up answers
    preference (preference.jsonl)  a vote's winner over its loser; a correction over the answer it corrected;
                                   a thumbs-up answer over a thumbs-down one to the same conversation
    kto (kto.jsonl)                every thumb: its answer, labelled true (thumbs-up) or false (thumbs-down)

These are the files `prepare` reads (`data.format: messages` / `preference` / `kto`);
OpenAI's fine-tuning API accepts the first two. For SFT and DPO, ties, `both_bad`
votes and thumbs-down answers without a better answer to pair with teach nothing
and are left out; KTO learns from a lone thumbs-down too. Any line that fails the
checks `prepare` applies is left out (each counted in the result). When the same
training line comes from several records it is written once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneforge.atomic import atomic_write_jsonl


def _reply(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _prompt(messages: list[dict]) -> list[dict]:
    """The conversation up to the answer: what the answer was asked for, without an answer of its own at the end."""
    out = [dict(m) for m in messages]
    while out and out[-1].get("role") == "assistant":
        out.pop()
    return out


def supervised(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    lines = []
    for r in records:
        if r["kind"] == "contribution":
            lines.append({"messages": _prompt(r["messages"]) + [_reply(r["answer"])]})
        elif r["kind"] == "correction":
            lines.append({"messages": _prompt(r["messages"]) + [_reply(r["corrected"])]})
        elif r["kind"] == "thumb" and r["value"] == "up":
            lines.append({"messages": _prompt(r["messages"]) + [_reply(r["answer"]["text"])]})
    return lines


def preference(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    lines = []

    def pair(messages, better: str, worse: str):
        lines.append(
            {
                "input": {"messages": _prompt(messages)},
                "preferred_output": [_reply(better)],
                "non_preferred_output": [_reply(worse)],
            }
        )

    thumbs: dict[str, dict[str, list[str]]] = {}
    for r in records:
        if r["kind"] == "vote" and r["verdict"] in ("left", "right"):
            winner, loser = (r["left"], r["right"]) if r["verdict"] == "left" else (r["right"], r["left"])
            pair(r["messages"], winner["text"], loser["text"])
        elif r["kind"] == "correction":
            pair(r["messages"], r["corrected"], r["answer"]["text"])
        elif r["kind"] == "thumb":
            key = json.dumps(_prompt(r["messages"]), sort_keys=True)
            thumbs.setdefault(key, {"up": [], "down": [], "messages": r["messages"]})[r["value"]].append(
                r["answer"]["text"]
            )
    for found in thumbs.values():
        for better in dict.fromkeys(found["up"]):
            for worse in dict.fromkeys(found["down"]):
                pair(found["messages"], better, worse)
    return lines


def kto(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per thumb: the conversation with the judged answer, `label` true for a thumbs-up, false for down."""
    return [
        {"messages": _prompt(r["messages"]) + [_reply(r["answer"]["text"])], "label": r["value"] == "up"}
        for r in records
        if r["kind"] == "thumb"
    ]


def _valid(lines: list[dict], kind: str) -> tuple[list[dict], int, int]:
    """(the unique lines that pass prepare's checks, how many duplicates, how many invalid)."""
    from tuneforge.data.preference import read_pair
    from tuneforge.data.unpaired import read_unpaired
    from tuneforge.data.validate import check_record

    kept, seen, duplicates, invalid = [], set(), 0, 0
    for n, line in enumerate(lines, start=1):
        key = json.dumps(line, sort_keys=True)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        if kind == "preference":
            parsed, problems = read_pair(line, f"feedback pair {n}")
            bad = parsed is None or any(p.severity == "error" or p.code == "preference_same_outputs" for p in problems)
        elif kind == "kto":
            parsed, problems = read_unpaired(line, f"feedback answer {n}")
            bad = parsed is None
        else:
            bad = any(p.severity == "error" for p in check_record(line, f"feedback example {n}"))
        if bad:
            invalid += 1
            continue
        kept.append(line)
    return kept, duplicates, invalid


def export(records: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    """Write sft.jsonl, preference.jsonl and kto.jsonl into `folder` (atomically); what went where."""
    result: dict[str, Any] = {}
    for kind, lines, name in (
        ("supervised", supervised(records), "sft.jsonl"),
        ("preference", preference(records), "preference.jsonl"),
        ("kto", kto(records), "kto.jsonl"),
    ):
        kept, duplicates, invalid = _valid(lines, kind)
        atomic_write_jsonl(folder / name, kept)
        result[kind] = {"path": str(folder / name), "lines": len(kept), "duplicates": duplicates, "invalid": invalid}
    return result
