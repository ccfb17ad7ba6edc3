"""Preference pairs (for DPO): OpenAI's format and TRL's, read into one shape and checked.

OpenAI's preference fine-tuning line:

    {"input": {"messages": [...], "tools": [...], "parallel_tool_calls": ...},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

(older files say `preferred_completion` / `non_preferred_completion`). TRL's:
`{"prompt": ..., "chosen": ..., "rejected": ...}`, where the prompt is a list of
messages or a string (one user turn) and each answer a list holding one assistant
message or a string.

Both become the conversation `input messages + [preferred]` (checked by the same
rules as supervised examples) plus the rejected assistant message; `prepare` writes
them back in OpenAI's format, which `train.backend: openai` uploads as it is.
"""

from __future__ import annotations

from typing import Any

from tuneforge.data.records import Problem
from tuneforge.data.validate import check_record

OPENAI_KEYS = {"input", "preferred_output", "non_preferred_output", "preferred_completion", "non_preferred_completion"}
TRL_KEYS = {"prompt", "chosen", "rejected"}
PASSTHROUGH = ("id", "label", "meta")


def looks_like_pair(record: Any) -> bool:
    return isinstance(record, dict) and (
        "input" in record
        and ("preferred_output" in record or "preferred_completion" in record)
        or {"chosen", "rejected"} <= record.keys()
    )


def read_pair(record: Any, where: str) -> tuple[dict | None, list[Problem]]:
    """(record as {"messages": input + [preferred], "rejected": message, "tools"?...}, problems); None on an error."""
    if not isinstance(record, dict):
        return None, [Problem(where, "data_type", f"record is {type(record).__name__}, not an object")]
    if "input" in record or "preferred_output" in record or "preferred_completion" in record:
        return _openai(record, where)
    if TRL_KEYS & record.keys():
        return _trl(record, where)
    return None, [
        Problem(where, "preference_missing_input", f"no 'input' (OpenAI) or 'prompt' (TRL); keys: {sorted(record)[:8]}")
    ]


def _openai(record: dict, where: str) -> tuple[dict | None, list[Problem]]:
    problems = []
    source = record.get("input")
    if not isinstance(source, dict):
        return None, [Problem(where, "preference_missing_input", "'input' must be an object with a 'messages' list")]
    messages = source.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, [Problem(where, "preference_empty_input", "'input.messages' must be a non-empty list of messages")]
    outputs = {}
    for side, legacy in (
        ("preferred_output", "preferred_completion"),
        ("non_preferred_output", "non_preferred_completion"),
    ):
        key = side if side in record else legacy
        if key not in record:
            problems.append(Problem(where, "preference_missing_output", f"no {side!r} (nor {legacy!r})"))
            continue
        outputs[side] = _one_assistant(record[key], key, where, problems)
    for key in record:
        if key not in OPENAI_KEYS and key not in PASSTHROUGH:
            problems.append(
                Problem(
                    where, "record_unrecognized_key", f"key {key!r} is not part of the format and is dropped", "warning"
                )
            )
    extra = {k: source[k] for k in ("tools", "parallel_tool_calls") if k in source}
    return _finish(messages, outputs, extra, record, where, problems)


def _trl(record: dict, where: str) -> tuple[dict | None, list[Problem]]:
    problems = []
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}] if prompt.strip() else []
    elif isinstance(prompt, list):
        messages = prompt
    elif "prompt" not in record:
        return None, [
            Problem(
                where,
                "preference_missing_input",
                "no 'prompt'; TRL's implicit-prompt pairs are not read: give the prompt apart",
            )
        ]
    else:
        messages = []
    if not messages:
        return None, [Problem(where, "preference_empty_input", "'prompt' is empty")]
    outputs = {}
    for side, key in (("preferred_output", "chosen"), ("non_preferred_output", "rejected")):
        if key not in record:
            problems.append(Problem(where, "preference_missing_output", f"no {key!r}"))
            continue
        value = record[key]
        if isinstance(value, str):
            value = [{"role": "assistant", "content": value}]
        outputs[side] = _one_assistant(value, key, where, problems)
    for key in record:
        if key not in TRL_KEYS and key not in PASSTHROUGH and key != "tools":
            problems.append(
                Problem(
                    where, "record_unrecognized_key", f"key {key!r} is not part of the format and is dropped", "warning"
                )
            )
    extra = {"tools": record["tools"]} if "tools" in record else {}
    return _finish(messages, outputs, extra, record, where, problems)


def _one_assistant(value: Any, key: str, where: str, problems: list[Problem]) -> dict | None:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or len(value) != 1:
        count = len(value) if isinstance(value, list) else type(value).__name__
        problems.append(
            Problem(where, "preference_output_count", f"{key!r} must hold exactly one assistant message, not {count}")
        )
        return None
    message = value[0]
    if not isinstance(message, dict) or message.get("role") != "assistant":
        role = message.get("role") if isinstance(message, dict) else type(message).__name__
        problems.append(
            Problem(
                where,
                "preference_output_not_assistant",
                f"{key!r} holds a message from {role!r}; it must be the assistant's",
            )
        )
        return None
    content = message.get("content")
    if not message.get("tool_calls") and (not isinstance(content, str) or not content.strip()):
        problems.append(Problem(where, "preference_empty_output", f"{key!r} has empty or non-text content"))
        return None
    return dict(message)


def _finish(messages: list, outputs: dict, extra: dict, record: dict, where: str, problems: list[Problem]):
    ends_with_answer = isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"
    if ends_with_answer:
        problems.append(
            Problem(
                where,
                "preference_input_ends_with_assistant",
                "the input's last message is the assistant's; it must end where the answer is asked for "
                "(a user or tool turn)",
            )
        )
    preferred, rejected = outputs.get("preferred_output"), outputs.get("non_preferred_output")
    if preferred is not None:
        shape = {"messages": [*messages, preferred], **extra}
        said = {"last_not_assistant"} | ({"role_order"} if ends_with_answer else set())  # the same fault, named once
        problems += [p for p in check_record(shape, where) if p.code not in said]
    if preferred is not None and rejected is not None and _text(preferred) == _text(rejected):
        problems.append(
            Problem(
                where,
                "preference_same_outputs",
                "the preferred and non-preferred outputs are the same: nothing to learn",
                "warning",
            )
        )
    if any(p.severity == "error" for p in problems) or preferred is None or rejected is None:
        return None, problems
    out = {"messages": [dict(m) for m in messages] + [preferred], "rejected": rejected, **extra}
    out.update({k: record[k] for k in PASSTHROUGH if k in record})
    return out, problems


def _text(message: dict) -> str:
    return str(message.get("content") or "") + str(message.get("tool_calls") or "")


def pair_sides(messages: list[dict], rejected: dict, prompt: list[dict] | None = None) -> list[list[dict]]:
    """The preferred and non-preferred conversations, earlier assistant turns as context (weight 0): only the
    final answers are what DPO compares. `prompt` replaces messages[:-1] (a shortened one)."""
    context = [
        {**m, "weight": 0} if m.get("role") == "assistant" else m for m in (messages[:-1] if prompt is None else prompt)
    ]
    return [context + [messages[-1]], context + [rejected]]


def fit_pair(encoder, messages: list[dict], rejected: dict, max_length: int, policy: str, tools: list | None = None):
    """(prompt messages, [preferred, non-preferred] encoded); with `truncate`, the shared prompt is shortened once
    for the longer side, so both answers follow the same prompt."""
    sides = pair_sides(messages, rejected)
    encoded = encoder.encode_many(sides, [tools, tools])
    longest = max(range(2), key=lambda i: len(encoded[i].input_ids))
    if len(encoded[longest].input_ids) <= max_length or policy != "truncate":
        return messages[:-1], encoded
    shortened, _ = encoder.fit(sides[longest], max_length, "truncate", tools)
    prompt = [
        {**given, "content": cut["content"]} if "content" in cut else given  # the cut text, the message as given
        for given, cut in zip(messages[:-1], shortened[:-1])
    ]
    encoded = encoder.encode_many(pair_sides(messages, rejected, prompt), [tools, tools])
    for side in encoded:
        if len(side.input_ids) > max_length:
            side.input_ids, side.supervised = side.input_ids[:max_length], side.supervised[:max_length]
        side.truncated = True
    return prompt, encoded
