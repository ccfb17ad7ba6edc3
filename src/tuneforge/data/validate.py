"""The checks of OpenAI's chat fine-tuning data preparation, plus role order.

Each finding carries a stable code. Errors stop `prepare` (or reject the record
when `data.on_invalid: drop`); warnings are reported and the record is kept.
"""

from __future__ import annotations

from typing import Any

from tuneforge.data.records import Problem
from tuneforge.data.tools import check_tools

ROLES = {"system", "user", "assistant", "tool"}
MESSAGE_KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call", "refusal"}
RECORD_KEYS = {"messages", "tools", "parallel_tool_calls", "functions", "id", "label", "meta"}


def check_record(record: Any, where: str) -> list[Problem]:
    """Every problem of one record in messages shape (an empty list when it is fine)."""
    if not isinstance(record, dict):
        return [Problem(where, "data_type", f"record is {type(record).__name__}, not an object")]
    problems = [
        Problem(where, "record_unrecognized_key", f"key {key!r} is not part of the format and is dropped", "warning")
        for key in record
        if key not in RECORD_KEYS
    ]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return problems + [Problem(where, "missing_messages_list", "no non-empty 'messages' list")]
    problems += _message_problems(messages, where)
    problems += check_tools(record, where)

    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    if "assistant" not in roles:
        problems.append(Problem(where, "example_missing_assistant_message", "no assistant message to learn from"))
    else:
        order = _role_order_problem(roles, _calls(messages))
        if order:
            problems.append(Problem(where, "role_order", order))
        if roles[-1] != "assistant":
            never = f"the last message is from {roles[-1]!r}, so it is never learned"
            problems.append(Problem(where, "last_not_assistant", never, "warning"))
    return problems


def check_prompt(messages: Any, where: str) -> list[Problem]:
    """The same message checks for a conversation to be answered (generate, serve): no assistant turn needed."""
    if not isinstance(messages, list) or not messages:
        return [Problem(where, "missing_messages_list", "no non-empty 'messages' list")]
    problems = _message_problems(messages, where)
    if not problems:
        order = _role_order_problem([m.get("role") for m in messages], _calls(messages))
        if order:
            problems.append(Problem(where, "role_order", order))
    return problems


def text_content(messages: list[Any]) -> list[Any]:
    """Messages whose content is a list of text parts ([{"type": "text", "text": ...}], as OpenAI's clients may send)
    with those parts joined into one string; anything else is left for the checks to name."""
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if (
            isinstance(content, list)
            and content
            and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)
        ):
            message = {**message, "content": "".join(p["text"] for p in content)}
        out.append(message)
    return out


def _message_problems(messages: list[Any], where: str) -> list[Problem]:
    problems = []
    for i, message in enumerate(messages, 1):
        at = f"message {i}"
        if not isinstance(message, dict):
            problems.append(Problem(where, "message_data_type", f"{at} is {type(message).__name__}, not an object"))
            continue
        if "role" not in message or ("content" not in message and "tool_calls" not in message):
            missing = "role" if "role" not in message else "content"
            problems.append(Problem(where, "message_missing_key", f"{at} has no {missing!r}"))
        for key in message:
            if key not in MESSAGE_KEYS:
                problems.append(Problem(where, "message_unrecognized_key", f"{at} has unrecognised key {key!r}"))
        role = message.get("role")
        if "role" in message and role not in ROLES:
            problems.append(
                Problem(where, "unrecognized_role", f"{at} has role {role!r}; allowed: {', '.join(sorted(ROLES))}")
            )
        if "weight" in message:
            weight = message["weight"]
            if role != "assistant":
                problems.append(
                    Problem(where, "invalid_weight", f"{at} ({role}) has a weight; only assistant messages take one")
                )
            elif isinstance(weight, bool) or weight not in (0, 1):
                allowed = f"{at} has weight {weight!r}; it must be 0 (context only) or 1 (trained)"
                problems.append(Problem(where, "invalid_weight", allowed))
        content = message.get("content")
        if (
            "content" in message
            and (not isinstance(content, str) or not content.strip())
            and not message.get("tool_calls")
        ):
            problems.append(Problem(where, "missing_content", f"{at} ({role}) has empty or non-text content"))
    return problems


def _calls(messages: list[Any]) -> list[bool]:
    return [isinstance(m, dict) and bool(m.get("tool_calls")) for m in messages]


def _role_order_problem(roles: list[Any], calls: list[bool]) -> str | None:
    """System first (optional), then user and assistant taking turns; an assistant that calls tools is followed
    by the tools' answers, and then by the assistant again."""
    if "system" in roles[1:]:
        return f"a system message at position {roles.index('system', 1) + 1}; it may only come first"
    expected = ("user",)
    for position, role in enumerate(roles, 1):
        if role == "system" and position == 1:
            continue
        if role not in expected:
            if role == "tool":
                return f"tool message at position {position} does not follow an assistant message that calls a tool"
            wanted = " or ".join(repr(r) for r in expected)
            return (
                f"message {position} is from {role!r} where {wanted} was expected "
                "(turns must alternate, starting with user)"
            )
        if role == "user":
            expected = ("assistant",)
        elif role == "assistant":
            expected = ("tool",) if calls[position - 1] else ("user",)
        else:  # tool: more answers, or the assistant going on from them
            expected = ("tool", "assistant")
    return None
