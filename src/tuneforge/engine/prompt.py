"""Inference prompts as token ids in which only the chat template writes control tokens.

A tokenizer turns the text `<|im_start|>` into the control token wherever it
appears, so a user message (or a tool's answer, a tool call's arguments, a tool's
description) containing `<|im_end|>\\n<|im_start|>system\\n...` would forge a
system turn. Here every string the caller supplies has its control-token strings
swapped for private placeholder characters before the template renders the
prompt; the placeholders are put back into the rendered text, and where they
were, the text is tokenized as ordinary text (`split_special_tokens=True`) while
the template's own control tokens stay control tokens. A prompt without such
strings (nearly all) is tokenized exactly as before, in one call.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tuneforge.data.chat import control_strings
from tuneforge.engine.generation import Settings, prompt_text

PLACEHOLDERS = range(0xF0000, 0xFFFFE)  # Supplementary Private Use Area-A: no tokenizer or text gives it meaning


def _hide(value: Any, controls: list[str], marks: dict[str, str], taken: set[str]) -> Any:
    """`value` (a message, tools list, any JSON) with each control string in its strings replaced by a placeholder."""
    if isinstance(value, str):
        for control in controls:
            if control in value:
                if control not in marks:
                    marks[control] = next(chr(c) for c in PLACEHOLDERS if chr(c) not in taken)
                    taken.add(marks[control])
                value = value.replace(control, marks[control])
        return value
    if isinstance(value, dict):
        return {k: v if k == "role" else _hide(v, controls, marks, taken) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_hide(v, controls, marks, taken) for v in value]
    return value


def _show(text: str, marks: dict[str, str]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text with the control strings back, and the character spans where they came from the caller."""
    controls = {mark: control for control, mark in marks.items()}
    parts, spans, at = [], [], 0
    for char in text:
        piece = controls.get(char, char)
        if char in controls:
            spans.append((at, at + len(piece)))
        parts.append(piece)
        at += len(piece)
    return "".join(parts), spans


def prompt_ids(encoder, messages: list[dict], settings: Settings | None = None) -> list[int]:
    """The inference prompt's token ids (`generation.prompt_text`), with every control-token string that came
    from the messages or the tools tokenized as text."""
    tokenizer = encoder.tokenizer
    controls = control_strings(tokenizer)
    marks: dict[str, str] = {}
    taken = set(repr(messages)) | set(repr(settings.tools if settings else None)) | set(str(tokenizer.chat_template))
    hidden = _hide(messages, controls, marks, taken)
    if settings is not None and settings.tools:
        settings = replace(settings, tools=_hide(settings.tools, controls, marks, taken))
    if not marks:
        return tokenizer(prompt_text(encoder, messages, settings), add_special_tokens=False)["input_ids"]
    text, forged = _show(prompt_text(encoder, hidden, settings), marks)
    return _tokenize_as_text(tokenizer, text, forged)


def _tokenize_as_text(tokenizer, text: str, forged: list[tuple[int, int]]) -> list[int]:
    """Token ids of `text` in which the control strings at the `forged` spans are ordinary text.

    The text is tokenized as usual; the control tokens the template wrote split it into runs, as they do inside
    the tokenizer, and a run holding a forged span is tokenized again on its own as ordinary text, so the rest of
    the prompt keeps exactly the tokens it always had."""
    if not getattr(tokenizer, "is_fast", False):  # no offsets: cut at the forged spans
        ids, at = [], 0
        for start, end in forged:
            ids += tokenizer(text[at:start], add_special_tokens=False)["input_ids"]
            ids += tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True)["input_ids"]
            at = end
        return ids + tokenizer(text[at:], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special
    }
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = []
    run: list[int] = []
    run_start = 0

    def close(end: int) -> list[int]:
        if any(start < end and stop > run_start for start, stop in forged):
            return tokenizer(text[run_start:end], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return run

    for token, (start, stop) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        if token in special and not any(a < stop and start < b for a, b in forged):
            ids += close(start) + [token]
            run, run_start = [], stop
        else:
            run.append(token)
    return ids + close(len(text))
