"""What generation takes and gives (Settings, Answer), and where a system name's weights are, without torch.

The engines (transformers, vLLM), the batcher, `systems` and the server share these,
so naming systems and building requests needs no model and no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tuneforge.errors import TuneforgeError

if TYPE_CHECKING:
    from tuneforge.run import RunDir


@dataclass
class Settings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    tools: list | None = None  # OpenAI-format functions the model may call
    tool_choice: str | dict = "auto"  # auto, none, required, or {"type": "function", "function": {"name": ...}}
    logprobs: int | None = None  # per generated token its logprob and this many alternatives (0..20); None: none
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit at every step (-100..100)
    response_format: dict | None = None  # {"type": "json_object"} or {"type": "json_schema", "json_schema": {...}}

    @property
    def calls_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def shapes_logits(self) -> bool:
        """Whether this request reads or changes the logits (engine/logits.py): logprobs, logit_bias, a grammar."""
        return self.logprobs is not None or bool(self.logit_bias) or self.response_format is not None


class Piece(str):
    """A streamed piece of text, with the logprobs of the tokens that made it when they were asked for."""

    logprobs: list[dict] | None = None


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop", "length", or "tool_calls"
    sources: list = field(default_factory=list)  # retrieved passages (rag.retriever.Hit) for +rag systems
    tool_calls: list | None = None  # OpenAI-shaped calls parsed from the answer (text is then what was said besides)
    logprobs: list[dict] | None = None  # OpenAI's logprobs.content items, one per generated token, when asked for


def prompt_text(encoder, messages: list[dict], settings: Settings | None) -> str:
    """The inference prompt; with tools, listed the template's way, and when a call is required (tool_choice
    "required" or a named function) the start of the call already written."""
    tools = settings.tools if settings is not None and settings.calls_tools else None
    text = encoder.render(messages, add_generation_prompt=True, tools=tools)
    return text + encoder.call_prefix(tools, settings.tool_choice) if tools else text


def finished_answer(
    encoder, text: str, prompt_tokens: int, completion_tokens: int, finish: str, settings: Settings
) -> Answer:
    """The Answer for generated text; with tools, any calls in it parsed out (finish reason tool_calls)."""
    if settings.calls_tools:
        from tuneforge.data.tools import parse_tool_calls

        content, calls = parse_tool_calls(encoder.call_prefix(settings.tools, settings.tool_choice) + text)
        if calls:
            return Answer((content or "").strip(), prompt_tokens, completion_tokens, "tool_calls", tool_calls=calls)
    return Answer(text.strip(), prompt_tokens, completion_tokens, finish)


def system_source(name: str, run: RunDir) -> tuple[str | None, str | None]:
    """(adapter folder, merged folder) for a system name; (None, None) is the base model."""
    if name == "base":
        return None, None
    if name == "finetuned":
        adapter = run.sub("adapter")
        if not (adapter / "adapter_config.json").exists():
            merged = run.sub("merged")
            if (merged / "config.json").exists():
                return None, str(merged)
            raise TuneforgeError(
                f"system 'finetuned': no adapter in {adapter.resolve()} (nor a merged model); run `tuneforge train` "
                "first, or name the run with --run-dir"
            )
        return str(adapter), None
    if name == "previous":  # the adapter a feedback round started from (feedback/rounds.py keeps it)
        import json

        try:
            folder = json.loads(run.sub("adapters", "previous.json").read_text(encoding="utf-8"))["path"]
        except (OSError, ValueError, KeyError):
            raise TuneforgeError(
                "system 'previous': this run has not had a feedback round yet (data.feedback: true keeps the "
                "adapter it started from)"
            ) from None
        return folder, None
    kind, _, path = name.partition(":")
    if kind == "adapter" and (Path(path) / "adapter_config.json").exists():
        return path, None
    if kind == "merged" and (Path(path) / "config.json").exists():
        return None, path
    raise TuneforgeError(f"unknown or missing system {name!r}; use base, finetuned, adapter:<dir> or merged:<dir>")


def available_systems(run: RunDir) -> list[str]:
    """The systems a run can answer with right now: base, and finetuned once there is an adapter or merged model."""
    found = ["base"]
    for name in ("previous", "finetuned"):
        try:
            system_source(name, run)
        except TuneforgeError:
            continue
        found.append(name)
    return found
