"""Tool calls in OpenAI's chat format: checks, the legacy `functions` form, rendering, and parsing answers back.

Training data and requests carry OpenAI's shapes: an assistant message with
`tool_calls` (`{id, type: "function", function: {name, arguments}}`, arguments a
JSON *string*), `tool` messages answering a call by `tool_call_id`, and a
top-level `tools` list of functions with JSON-schema `parameters`.

Rendering. A chat template that knows tools (its source uses `tools`, as
Llama-3.1's, Qwen2.5's and Mistral's do) gets them through `tools=`, with each
call's arguments decoded into an object, since those templates write them with
`tojson` (a string there would be encoded twice). A template without tools (the
builtin's ChatML) gets one convention, the `<tool_call>` style Qwen and Hermes
use, written into the messages themselves, the same in training and inference:

* the tools are listed in the system message, after its text, in a `# Tools`
  section: one JSON object per function inside `<tools></tools>`;
* an assistant call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  one block per call, after any text of the message;
* a tool's answer is its own turn (role `tool`, or `user` where the template
  has no such role) wrapped in `<tool_response></tool_response>`.

Parsing reads `<tool_call>` blocks (this convention and Qwen's), Llama-3.1's bare
`{"name": ..., "parameters": {...}}` and Mistral's `[TOOL_CALLS] [...]`.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from tuneforge.data.records import Problem

TOOLS_HEADER = (
    "# Tools\n\nYou can call the functions below. To call one, answer with "
    '<tool_call>{"name": <function name>, "arguments": <arguments as a JSON object>}</tool_call>, '
    "one block per call. Each result comes back inside <tool_response></tool_response>.\n<tools>\n"
)
CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


# --------------------------------------------------------------------------- checks


def check_tools(record: dict, where: str) -> list[Problem]:
    """OpenAI's rules for tools, tool calls and tool messages in one record (messages already well-formed)."""
    problems, names = _tool_list_problems(record, where)
    parallel = record.get("parallel_tool_calls")
    if "parallel_tool_calls" in record and not isinstance(parallel, bool):
        problems.append(Problem(where, "parallel_tool_calls_invalid", "'parallel_tool_calls' must be true or false"))
    open_calls: set[str] = set()  # ids of the calls made so far: a tool message must answer one of them
    for i, message in enumerate(record.get("messages") or [], 1):
        if not isinstance(message, dict):
            continue
        at = f"message {i}"
        if message.get("tool_calls") is not None:
            problems += _calls_problems(message, at, names, parallel, open_calls, where)
        elif message.get("role") == "tool":
            problems += _answer_problems(message, at, open_calls, where)
    return problems


def _tool_list_problems(record: dict, where: str) -> tuple[list[Problem], set[str] | None]:
    """The problems of the record's `tools` and the names of its functions; None when it lists no tools."""
    if "tools" not in record:
        return [], None
    tools = record["tools"]
    if not isinstance(tools, list):
        return [Problem(where, "tools_invalid", "'tools' must be a list of {type: function, function: {...}}")], None
    problems: list[Problem] = []
    names: set[str] = set()
    for i, tool in enumerate(tools, 1):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            text = f"tools item {i} must be {{'type': 'function', 'function': {{...}}}}"
            problems.append(Problem(where, "tools_invalid", text))
            continue
        if not isinstance(function.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", function["name"]):
            text = f"tools item {i} needs a name of letters, digits, _ or - (at most 64)"
            problems.append(Problem(where, "tools_invalid", text))
            continue
        names.add(function["name"])
        parameters = function.get("parameters")
        if parameters is not None and (
            not isinstance(parameters, dict) or parameters.get("type", "object") != "object"
        ):
            text = f"tools item {i} ({function['name']}): 'parameters' must be a JSON schema of type object"
            problems.append(Problem(where, "tools_invalid", text))
    return problems, names


def _calls_problems(
    message: dict, at: str, names: set[str] | None, parallel: Any, open_calls: set[str], where: str
) -> list[Problem]:
    """An assistant message's tool_calls; the ids of the calls it makes join open_calls."""
    calls = message["tool_calls"]
    if message.get("role") != "assistant":
        text = f"{at} ({message.get('role')}) has tool_calls; only the assistant calls tools"
        return [Problem(where, "tool_call_invalid", text)]
    if not isinstance(calls, list) or not calls:
        return [Problem(where, "tool_call_invalid", f"{at}: tool_calls must be a non-empty list")]
    problems = []
    if parallel is False and len(calls) > 1:
        text = f"{at} makes {len(calls)} calls but parallel_tool_calls is false"
        problems.append(Problem(where, "tool_call_invalid", text))
    for j, call in enumerate(calls, 1):
        problems += _call_problems(call, f"{at} call {j}", names, where)
        if isinstance(call, dict) and isinstance(call.get("id"), str):
            open_calls.add(call["id"])
    return problems


def _answer_problems(message: dict, at: str, open_calls: set[str], where: str) -> list[Problem]:
    """A tool message must name, by tool_call_id, a call an earlier assistant message made."""
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str):
        text = f"{at} (tool) has no tool_call_id naming the call it answers"
        return [Problem(where, "tool_call_id_missing", text)]
    if call_id not in open_calls:
        text = f"{at} answers tool call {call_id!r}, which no earlier assistant message made"
        return [Problem(where, "tool_call_id_unknown", text)]
    return []


def _call_problems(call: Any, at: str, names: set[str] | None, where: str) -> list[Problem]:
    if (
        not isinstance(call, dict)
        or call.get("type", "function") != "function"
        or not isinstance(call.get("function"), dict)
    ):
        return [
            Problem(where, "tool_call_invalid", f"{at} must be {{id, type: 'function', function: {{name, arguments}}}}")
        ]
    problems = []
    if not isinstance(call.get("id"), str) or not call["id"]:
        problems.append(Problem(where, "tool_call_invalid", f"{at} has no id"))
    function = call["function"]
    name = function.get("name")
    if not isinstance(name, str) or not name:
        problems.append(Problem(where, "tool_call_invalid", f"{at} has no function name"))
    elif names is not None and name not in names:
        problems.append(
            Problem(
                where,
                "tool_call_unknown_function",
                f"{at} calls {name!r}, which 'tools' does not list ({', '.join(sorted(names)) or 'none'})",
            )
        )
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        problems.append(
            Problem(
                where,
                "tool_call_arguments_not_json",
                f"{at}: arguments must be a JSON string (OpenAI's format), not {type(arguments).__name__}",
            )
        )
    else:
        try:
            if not isinstance(json.loads(arguments), dict):
                problems.append(
                    Problem(where, "tool_call_arguments_not_json", f"{at}: arguments must encode a JSON object")
                )
        except json.JSONDecodeError as exc:
            problems.append(
                Problem(
                    where,
                    "tool_call_arguments_not_json",
                    f"{at}: arguments are not JSON ({exc.msg} at column {exc.colno})",
                )
            )
    return problems


def from_legacy(record: dict) -> dict:
    """OpenAI's older function-calling form (`functions`, `function_call`, role `function`) in today's shape."""
    if "functions" not in record and not any(
        isinstance(m, dict) and ("function_call" in m or m.get("role") == "function")
        for m in record.get("messages") or []
    ):
        return record
    out = {k: v for k, v in record.items() if k != "functions"}
    if isinstance(record.get("functions"), list):
        out["tools"] = [{"type": "function", "function": f} for f in record["functions"]]
    messages: list = []
    last_call: dict[str, str] = {}
    for n, message in enumerate(record.get("messages") or []):
        if not isinstance(message, dict):
            messages.append(message)
            continue
        message = dict(message)
        if "function_call" in message:
            call = message.pop("function_call")
            call_id = f"call_{n}"
            if isinstance(call, dict):
                last_call[call.get("name")] = call_id
            message["tool_calls"] = [{"id": call_id, "type": "function", "function": call}]
            if not message.get("content"):
                message["content"] = None
        elif message.get("role") == "function":
            message = {
                "role": "tool",
                "tool_call_id": last_call.get(message.get("name"), "call_unknown"),
                "content": message.get("content"),
            }
        messages.append(message)
    out["messages"] = messages
    return out


# --------------------------------------------------------------------------- rendering


def uses_tools(messages: list[dict], tools: list | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def native_view(messages: list[dict]) -> list[dict]:
    """For a template that knows tools: each call's arguments as an object, as the template's `tojson` expects."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            message = {**message, "tool_calls": [_decoded(call) for call in message["tool_calls"]]}
            if message.get("content") is None:
                message["content"] = ""
        out.append(message)
    return out


def _decoded(call: dict) -> dict:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return {**call, "function": function}


def convention_view(messages: list[dict], tools: list | None, tool_role: str = "tool") -> list[dict]:
    """For a template without tools: tools, calls and results written into the messages' text."""
    out = [dict(m) for m in messages]
    if tools:
        listing = (
            TOOLS_HEADER
            + "".join(json.dumps(t.get("function", t), ensure_ascii=False) + "\n" for t in tools)
            + "</tools>"
        )
        if out and out[0].get("role") == "system":
            out[0]["content"] = f"{out[0].get('content') or ''}\n\n{listing}".lstrip()
        else:
            out.insert(0, {"role": "system", "content": listing})
    for message in out:
        if message.get("tool_calls"):
            blocks = "\n".join(call_block(call) for call in message.pop("tool_calls"))
            text = message.get("content") or ""
            message["content"] = f"{text}\n{blocks}" if text.strip() else blocks
        elif message.get("role") == "tool":
            message.pop("tool_call_id", None)
            message.update(role=tool_role, content=f"<tool_response>\n{message.get('content') or ''}\n</tool_response>")
    return out


def call_block(call: dict) -> str:
    function = _decoded(call)["function"]
    return (
        "<tool_call>\n"
        + json.dumps({"name": function.get("name"), "arguments": function.get("arguments")}, ensure_ascii=False)
        + "\n</tool_call>"
    )


# --------------------------------------------------------------------------- parsing


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(the text outside the calls, or None; OpenAI-shaped tool_calls) from a generated answer."""
    calls = []
    stripped = text.strip()
    if "<tool_call>" in stripped:
        for body in CALL_BLOCK.findall(stripped):
            found = _call_from_json(body)
            if found:
                calls.append(found)
        rest = CALL_BLOCK.sub("", stripped).strip()
        return (rest or None), calls
    if stripped.startswith("[TOOL_CALLS]"):
        try:
            items = json.loads(stripped[len("[TOOL_CALLS]") :].strip())
        except json.JSONDecodeError:
            return text, []
        calls = [
            c for c in (_call_from_json(json.dumps(i)) for i in (items if isinstance(items, list) else [items])) if c
        ]
        return None, calls
    if stripped.startswith("{") and '"name"' in stripped:
        found = _call_from_json(stripped.removeprefix("<|python_tag|>"))
        if found:
            return None, [found]
    return text, []


def _call_from_json(body: str) -> dict | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def same_call(a: dict, b: dict) -> tuple[bool, bool]:
    """(same function, same function and arguments equal as JSON) for two OpenAI tool calls."""
    fa, fb = a.get("function") or {}, b.get("function") or {}
    if fa.get("name") != fb.get("name"):
        return False, False
    try:
        return True, json.loads(fa.get("arguments") or "{}") == json.loads(fb.get("arguments") or "{}")
    except (TypeError, json.JSONDecodeError):
        return True, False
