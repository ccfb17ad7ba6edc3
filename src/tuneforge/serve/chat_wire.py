"""What `POST /v1/chat/completions` accepts and returns: the request model, the checks it cannot say (messages and
tools as prepare checks training data, the parameters this server does not honour), and the completion shapes.
No state: server.py runs the requests these parse.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from tuneforge.engine.generation import Answer, Settings
from tuneforge.serve.bounds import Limits, check_asked
from tuneforge.serve.errors import ApiError

Temperature = Annotated[float, Field(ge=0.0, le=2.0, strict=True)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, strict=True)]
Positive = Annotated[StrictInt, Field(ge=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


# OpenAI parameters this server does not honour: a 400 naming the parameter unless it holds the value that changes
# nothing (listed), so no client believes it got what it asked for
UNSUPPORTED: dict[str, tuple] = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
    "functions": (),
    "function_call": (),
}


MAX_CHOICES = 8  # `n`: each choice is a row of its own in the batch, so n costs n answers' time
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
MAX_BIAS = 100  # OpenAI's bound on a logit_bias value, either way
# honoured by systems on the transformers engine only (engine/logits.py); elsewhere a 400 naming the parameter
LOGIT_OPTIONS = ("logprobs", "logit_bias", "response_format")


@dataclass
class Chat:
    """A parsed chat request: what to ask which model, with which settings, how many times, and how to answer."""

    model: str
    messages: list[dict]
    settings: Settings
    asked: int | None  # max_tokens as given (None: unset; the settings hold the cap until `bounds.fit` knows more)
    n: int = 1
    stream: bool = False
    include_usage: bool = False  # streaming: end with a usage chunk

    def choices(self) -> list[Settings]:
        """Each choice's settings: a seed given is choice 0's, and the next choices take the next seeds (else they
        would all sample the same answer)."""
        seed = self.settings.seed
        if seed is None:
            return [self.settings] * self.n
        return [replace(self.settings, seed=seed + i if seed + i < 2**64 else seed - i) for i in range(self.n)]


class ChatRequest(BaseModel):
    """The chat-completions body: the types here, the meaning (roles, tool calls) in `parse_request`. A parameter
    OpenAI does not know is a 400 as OpenAI words it; one it knows that this server does not honour, a 400 from
    `parse_request` (UNSUPPORTED)."""

    model_config = ConfigDict(extra="forbid")
    model: Annotated[StrictStr, Field(min_length=1)]
    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]
    temperature: Temperature | None = None
    top_p: Probability | None = None
    max_tokens: Positive | None = None
    max_completion_tokens: Positive | None = None
    stop: StrictStr | Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(max_length=4)] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), lt=2**64)] | None = None  # what torch.manual_seed takes
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    # OpenAI's bookkeeping, which changes no answer: accepted
    user: StrictStr | None = None
    metadata: dict[str, StrictStr] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_CHOICES)] | None = None
    # honoured by transformers-engine systems (check_honoured)
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    # known, not honoured (UNSUPPORTED)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    modalities: list[Any] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None


def parse_request(request: ChatRequest, limits: Limits = Limits()) -> Chat:
    """What the request models cannot say: the messages and tools as prepare checks training data; the settings."""
    from tuneforge.data.validate import check_prompt, text_content

    body = request.model_dump(exclude_unset=True)
    _check_unicode(body, "")
    for name, neutral in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise ApiError(
                400,
                f"'{name}' is not supported by this server (tuneforge serve): leave it out",
                name,
                "unsupported_parameter",
            )
    # OpenAI's newer name for the system role; the chat templates know `system`
    messages = [{**m, "role": "system"} if m.get("role") == "developer" else m for m in text_content(request.messages)]
    problems = [p for p in check_prompt(messages, "messages") if p.severity == "error"]
    if problems:  # the checks prepare applies to training data, so what trains is what is served
        raise ApiError(400, "; ".join(f"[{p.code}] {p.message}" for p in problems), "messages")
    tools, tool_choice = parse_tools(body, messages)
    stop = request.stop or ()
    asked = request.max_completion_tokens or request.max_tokens
    check_asked(asked, "max_completion_tokens" if request.max_completion_tokens else "max_tokens", limits)
    settings = Settings(
        max_new_tokens=asked or limits.max_tokens,
        temperature=0.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        tools=tools,
        tool_choice=tool_choice,
        **logit_options(request),
    )
    if request.stream_options is not None and not request.stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return Chat(request.model, messages, settings, asked, request.n or 1, bool(request.stream), include_usage)


def logit_options(request: ChatRequest) -> dict:
    """logprobs / top_logprobs, logit_bias and response_format checked as OpenAI checks them, as Settings fields."""
    if request.top_logprobs is not None and not request.logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    bias: dict[int, float] = {}
    for key, value in (request.logit_bias or {}).items():
        if not key.isdigit():
            raise ApiError(400, f"'logit_bias' key {key!r} is not a token id", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -MAX_BIAS <= value <= MAX_BIAS:
            raise ApiError(400, f"'logit_bias' value for {key!r} must be a number from -100 to 100", "logit_bias")
        bias[int(key)] = float(value)
    return {
        "logprobs": (request.top_logprobs or 0) if request.logprobs else None,
        "logit_bias": bias or None,
        "response_format": _response_format(request.response_format),
    }


def _response_format(given: dict[str, Any] | None) -> dict | None:
    """None for plain text; else the json_object or json_schema format, its shape checked."""
    kind = (given or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise ApiError(400, "'response_format.type' must be text, json_object or json_schema", "response_format")
    spec = given.get("json_schema") if given else None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ApiError(400, "'response_format.json_schema' needs a 'name'", "response_format.json_schema")
    if not isinstance(spec.get("schema", {}), dict) or not isinstance(spec.get("strict", False), (bool, type(None))):
        raise ApiError(
            400, "'response_format.json_schema' takes a 'schema' object and 'strict' true or false", "response_format"
        )
    return {"type": "json_schema", "json_schema": dict(spec)}


def check_honoured(model: str, settings: Settings, system) -> None:
    """A 400 naming the first of logprobs, logit_bias and response_format asked of a system that cannot honour it
    (vLLM, hosted openai: systems), a token id a bias names outside the vocabulary, a schema that cannot compile."""
    given = (settings.logprobs is not None, bool(settings.logit_bias), settings.response_format is not None)
    asked = [name for name, on in zip(LOGIT_OPTIONS, given) if on]
    if not asked:
        return
    engine = getattr(system, "engine", None)  # hosted systems have none
    if not getattr(engine, "shapes_logits", False):
        raise ApiError(
            400,
            f"'{asked[0]}' is not supported for model '{model}': only systems on the transformers engine honour "
            "logprobs, logit_bias and response_format (not model.engine: vllm, not hosted openai: systems); "
            "leave it out",
            asked[0],
            "unsupported_parameter",
        )
    vocab = engine.vocab_size
    for token in settings.logit_bias or {}:
        if token >= vocab:
            raise ApiError(
                400, f"'logit_bias' key '{token}' is not a token id of model '{model}' (0 to {vocab - 1})", "logit_bias"
            )
    if settings.response_format is not None:
        try:
            engine.grammars().compile(settings.response_format)
        except ValueError as exc:
            raise ApiError(400, f"'response_format' schema cannot be enforced: {exc}", "response_format") from None
        except ImportError:
            raise ApiError(
                400,
                "'response_format' needs xgrammar on the server (pip install 'tuneforge[structured]')",
                "response_format",
                "unsupported_parameter",
            ) from None


def _check_unicode(value: Any, where: str) -> None:
    """A 400 naming the first string with a lone surrogate (JSON allows "\\ud800"; no tokenizer takes it)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = f"\\u{ord(value[exc.start]):04x}"
            raise ApiError(400, f"Invalid value for '{where}': a lone surrogate ({bad}) is not text", where) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key, where)
            _check_unicode(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_unicode(item, f"{where}.{index}")


def parse_tools(body: dict[str, Any], messages: list[dict]) -> tuple[list | None, str | dict]:
    """`tools` and `tool_choice` checked as OpenAI checks them; tool calls and answers in the messages too."""
    from tuneforge.data.tools import check_tools

    tools = body.get("tools")
    record: dict[str, Any] = {"messages": messages}
    if tools is not None:
        record["tools"] = tools
    if "parallel_tool_calls" in body:
        record["parallel_tool_calls"] = body["parallel_tool_calls"]
    problems = [p for p in check_tools(record, "request") if p.code != "tool_call_unknown_function"]
    if problems:
        param = "tools" if problems[0].code in ("tools_invalid", "parallel_tool_calls_invalid") else "messages"
        raise ApiError(400, "; ".join(f"[{p.code}] {p.message}" for p in problems), param)
    if tools == []:
        raise ApiError(400, "'tools' must not be empty; leave it out instead", "tools")
    choice = body.get("tool_choice", "auto" if tools else "none")
    names = {t["function"]["name"] for t in tools or []}
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise ApiError(400, f"'tool_choice' names function {name!r}, which 'tools' does not list", "tool_choice")
    elif choice not in ("none", "auto", "required"):
        raise ApiError(
            400,
            "'tool_choice' must be none, auto, required, or {'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    elif choice != "none" and not tools:
        raise ApiError(400, f"'tool_choice' {choice!r} needs 'tools'", "tool_choice")
    return tools or None, choice


def message_of(answer: Answer) -> dict:
    """The assistant message of an answer: its text, or its tool calls."""
    message: dict[str, Any] = {"role": "assistant", "content": answer.text, "refusal": None}
    if answer.tool_calls:
        message.update(content=answer.text or None, tool_calls=answer.tool_calls)
    return message


def usage(answers: list[Answer]) -> dict:
    """The prompt once, every choice's completion."""
    prompt, completion = answers[0].prompt_tokens, sum(a.completion_tokens for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sources(answer: Answer) -> dict:
    """+rag systems: what was retrieved, beside the answer (an extra field the OpenAI types keep)."""
    return {"sources": [h.to_json() for h in answer.sources]} if answer.sources else {}


def logprobs_of(content: list[dict] | None) -> dict | None:
    """OpenAI's `logprobs` of a choice or a chunk: its tokens' logprobs, when asked for."""
    return None if content is None else {"content": content, "refusal": None}


def completion(model: str, answers: list[Answer]) -> dict:
    return {
        **sources(answers[0]),
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": message_of(a),
                "finish_reason": a.finish_reason,
                "logprobs": logprobs_of(a.logprobs),
            }
            for i, a in enumerate(answers)
        ],
        "usage": usage(answers),
    }
