"""Prompts to sample answers from, for reinforcement fine-tuning (`train.method: grpo`, serve's `reinforcement` jobs).

A line is OpenAI's reinforcement fine-tuning format:

    {"messages": [{"role": "developer", "content": "..."}, {"role": "user", "content": "..."}],
     "reference_answer": "...", "any_other_field": ...}

The conversation ends with the user's turn; every other key of the line is kept as given and is the grader's
`item` (`{{item.reference_answer}}`). A supervised line, whose conversation ends with an assistant answer, is
read too: the answer is the example's own and reaches the grader as `item.answer`. The `developer` role is
read as `system`, as serve reads it in a chat request.
"""

from __future__ import annotations

from typing import Any

from tuneforge.data.records import Problem
from tuneforge.data.tools import check_tools
from tuneforge.data.validate import check_prompt, check_record


def read_prompt(record: Any, where: str) -> tuple[dict | None, list[Problem]]:
    """(record with `developer` read as `system`, every key kept; problems); None on an error."""
    if not isinstance(record, dict):
        return None, [Problem(where, "data_type", f"record is {type(record).__name__}, not an object")]
    messages = record.get("messages")
    if isinstance(messages, list):
        messages = [
            {**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m for m in messages
        ]
    out = {**record, "messages": messages}
    last = messages[-1] if isinstance(messages, list) and messages else None
    if isinstance(last, dict) and last.get("role") == "assistant":
        # a supervised example: its answer is item.answer; any other key stays for the grader, so none is "dropped"
        problems = [p for p in check_record(out, where) if p.code != "record_unrecognized_key"]
    else:
        problems = check_prompt(messages, where)
        if not problems and last.get("role") != "user":
            message = f"the conversation ends with a {last.get('role')!r} message; a prompt ends with the user's"
            problems.append(Problem(where, "prompt_must_end_with_user", message))
        if not problems:
            problems += check_tools(out, where)
    if any(p.severity == "error" for p in problems):
        return None, problems
    return out, problems


def prompt_only(messages: list[dict]) -> bool:
    """Whether a conversation is a prompt to answer (no final assistant answer to learn from)."""
    return bool(messages) and messages[-1].get("role") != "assistant"
