"""`tuneforge generate`: batched answers from one system for a JSONL file of prompts.

read prompts (a `prompt` string, or `messages` without a trailing reference answer; optional `tools`)
  -> check them as prepare and serve do -> group by tools list -> generate in batches -> write JSONL
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.atomic import atomic_write_jsonl
from tuneforge.data.sources import read_json_records
from tuneforge.data.tools import check_tools
from tuneforge.data.validate import check_prompt, text_content
from tuneforge.engine.generation import Answer, Settings
from tuneforge.errors import TuneforgeError

if TYPE_CHECKING:
    from tuneforge.systems import Systems

SHOWN_PROBLEMS = 30

Prompt = tuple[dict[str, Any], list[dict[str, Any]]]  # (the input record, the messages to answer)


def read_prompts(path: Path) -> list[Prompt]:
    """Every prompt in the file, checked together: one error lists every invalid prompt, and nothing is generated."""
    prompts, problems = [], []
    for raw in read_json_records(path, str(path)):
        if raw.problem is not None:
            raise TuneforgeError(str(raw.problem))
        record = raw.data
        messages = _messages(record, raw.where)
        problems.extend(p for p in check_prompt(messages, raw.where) if p.severity == "error")
        if isinstance(record.get("tools"), list):  # the functions this prompt may call, as in training data
            found = check_tools({"messages": messages, "tools": record["tools"]}, raw.where)
            problems.extend(p for p in found if p.code != "tool_call_unknown_function")
        prompts.append((record, messages))
    if problems:
        listing = "\n".join(f"  {p}" for p in problems[:SHOWN_PROBLEMS])
        raise TuneforgeError(f"{len(problems)} invalid prompts in {path}; nothing was generated\n{listing}")
    return prompts


def _messages(record: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    if isinstance(record, dict) and isinstance(record.get("messages"), list) and record["messages"]:
        messages = text_content(record["messages"])
        last = messages[-1]
        if isinstance(last, dict) and last.get("role") == "assistant":  # a reference answer: ask for a new one
            messages = messages[:-1]
        return messages
    raise TuneforgeError(f"{where}: needs a 'prompt' string or a 'messages' list")


def answer_all(
    systems: Systems, system: str, prompts: list[Prompt], settings: Settings, batch_size: int
) -> list[Answer]:
    """One answer per prompt, in input order; prompts that share a tools list share generate calls."""
    answers: list[Answer | None] = [None] * len(prompts)
    groups: dict[str, list[int]] = {}
    for i, (record, _) in enumerate(prompts):
        groups.setdefault(json.dumps(record.get("tools"), sort_keys=True), []).append(i)
    for indices in groups.values():
        tools = prompts[indices[0]][0].get("tools") or None
        batch = [prompts[i][1] for i in indices]
        found = systems.get(system).generate(
            batch, replace(settings, tools=tools), batch_size=batch_size, progress=True
        )
        for i, answer in zip(indices, found):
            answers[i] = answer
    return answers  # type: ignore[return-value]  (every index was filled)


def write_answers(path: Path, system: str, prompts: list[Prompt], answers: list[Answer]) -> int:
    """Each input record with the system, its answer, why it stopped, and any tool calls and sources."""
    rows = []
    for (record, _), answer in zip(prompts, answers):
        row = {**record, "system": system, "answer": answer.text, "finish_reason": answer.finish_reason}
        if answer.tool_calls:
            row["tool_calls"] = answer.tool_calls
        if answer.sources:
            row["sources"] = [hit.to_json() for hit in answer.sources]
        rows.append(row)
    atomic_write_jsonl(path, rows)
    return len(rows)
