"""score_model and label_model: the grader's messages, rendered, answered by a model, the reply read as a score.

The model is whatever the caller passes: a callable taking chat messages and returning the reply's text, a
tuneforge system (`Systems.get(name)`: local, an adapter, or `openai:`), or a mapping from the grader's `model`
name to either. OpenAI constrains its grader model's reply to a JSON schema; a local model has no such switch, so
the expected form is said in words at the end of the last message, and the reply is read leniently: JSON with
"result" (OpenAI's field) or "score"/"label", else the reply itself. A reply that still gives no single score in
range (or no single label among `labels`) is a model_grader_parse_error, never a guess.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from tuneforge.graders.errors import GraderError
from tuneforge.graders.template import render

Ask = Callable[[list[dict]], str]
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


@dataclass
class Reply:
    text: str
    prompt_tokens: int = 0  # 0 where the model does not say (a plain callable)
    completion_tokens: int = 0


def messages(grader: Any, sample: dict, item: Any) -> list[dict]:
    """The grader's input messages with every template filled, as plain chat messages (text content)."""
    rendered = []
    for message in grader.input:
        parts = message.content if isinstance(message.content, list) else [message.content]
        texts = [part if isinstance(part, str) else part.text for part in parts]
        rendered.append({"role": message.role, "content": "\n".join(render(t, sample, item) for t in texts)})
    return rendered


def ask(model, grader: Any, chat: list[dict]) -> Reply:
    """The model's reply to the chat; any failure of the model itself is a model_grader_server_error."""
    if isinstance(model, Mapping):
        if grader.model not in model:
            raise GraderError("model_grader_server_error", f"no system is given for the grader model {grader.model!r}")
        model = model[grader.model]
    if model is None:
        raise GraderError("model_grader_server_error", f"{grader.type} grader {grader.name!r} needs a model to ask")
    try:
        if hasattr(model, "generate"):  # a tuneforge system
            answer = model.generate([chat], _settings(grader))[0]
            return Reply(answer.text, answer.prompt_tokens, answer.completion_tokens)
        return Reply(str(model(chat)))
    except Exception as exc:  # the model's failure is this sample's grader error, whatever raised it
        raise GraderError("model_grader_server_error", f"{type(exc).__name__}: {exc}") from None


def _settings(grader: Any):
    from tuneforge.engine.generation import Settings

    sampling = getattr(grader, "sampling_params", None)
    if sampling is None:
        return Settings()
    chosen = {
        "max_new_tokens": sampling.max_completions_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
    }
    return Settings(**{k: v for k, v in chosen.items() if v is not None})


def with_instruction(chat: list[dict], instruction: str) -> list[dict]:
    """The chat with the reply's expected form said at the end of its last user message (or a new one)."""
    if chat and chat[-1]["role"] == "user":
        return [*chat[:-1], {**chat[-1], "content": f"{chat[-1]['content']}\n\n{instruction}"}]
    return [*chat, {"role": "user", "content": instruction}]


def _field(text: str, keys: tuple[str, ...]) -> Any:
    """The reply's value: a JSON object's first present key, a bare JSON value, else the text itself."""
    text = text.strip()
    fenced = FENCE.match(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return text
    if isinstance(value, dict):
        return next((value[k] for k in keys if k in value), text)
    return value


def parse_score(text: str, low: float, high: float) -> float:
    value = _field(text, ("result", "score"))
    if isinstance(value, str):
        found = NUMBER.findall(value)
        if len(found) != 1:
            raise GraderError("model_grader_parse_error", f"the grader model's reply gives no single score: {text!r}")
        value = found[0]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise GraderError("model_grader_parse_error", f"the grader model's reply gives no score: {text!r}")
    score = float(value)
    if not low <= score <= high:
        raise GraderError("model_grader_parse_error", f"the grader model scored {score}, outside [{low}, {high}]")
    return score


def parse_label(text: str, labels: list[str]) -> str:
    value = _field(text, ("result", "label"))
    if not isinstance(value, str):
        raise GraderError("model_grader_parse_error", f"the grader model's reply gives no label: {text!r}")
    bare = value.strip().strip("\"'.!").strip()
    exact = [label for label in labels if label.lower() == bare.lower()]
    if exact:
        return exact[0]
    named = [label for label in labels if re.search(rf"(?<!\w){re.escape(label)}(?!\w)", value, re.IGNORECASE)]
    if len(named) != 1:
        raise GraderError("model_grader_parse_error", f"the grader model's reply names no single label: {text!r}")
    return named[0]


def score_model(grader: Any, sample: dict, item: Any, model) -> tuple[float, Reply]:
    low, high = grader.range or (0.0, 1.0)
    instruction = f'Reply with JSON only: {{"result": <a number from {low:g} to {high:g}>}}'
    reply = ask(model, grader, with_instruction(messages(grader, sample, item), instruction))
    return parse_score(reply.text, low, high), reply


def label_model(grader: Any, sample: dict, item: Any, model) -> tuple[float, Reply]:
    choices = ", ".join(json.dumps(label) for label in grader.labels)
    instruction = f'Reply with JSON only: {{"result": <one of {choices}>}}'
    reply = ask(model, grader, with_instruction(messages(grader, sample, item), instruction))
    return (1.0 if parse_label(reply.text, grader.labels) in grader.passing_labels else 0.0), reply
