"""How much one chat request may ask of a model, and when its answer stops.

An answer fits the model's context (prompt tokens plus `max_tokens`, else OpenAI's 400
`context_length_exceeded`), asks for no more than the server's cap (`serve --max-tokens`; an
unset `max_tokens` gets what the context leaves, up to the cap), and generates for no longer
than the server's time limit (`serve --max-seconds`; past it the answer ends with what was
said, `finish_reason: "length"`, as if cut by `max_tokens`). Every answer, streamed or not, is
read piece by piece from the system's stream, so a client that goes away ends its row in the
batch at the next token instead of holding the model until the answer is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from tuneforge.engine.generation import Answer, Settings
from tuneforge.serve.errors import ApiError

MAX_TOKENS = 4096  # the most tokens one answer may ask for: a 4k answer covers every chat use the 2k-8k contexts fit
MAX_SECONDS = 300.0  # generation time per request: five minutes is past any interactive answer, short of a hung one


@dataclass(frozen=True)
class Limits:
    max_tokens: int = MAX_TOKENS
    max_seconds: float = MAX_SECONDS


def check_asked(asked: int | None, param: str, limits: Limits) -> None:
    """A `max_tokens` past the server's cap is OpenAI's 400 for a value the model does not support."""
    if asked is not None and asked > limits.max_tokens:
        raise ApiError(
            400,
            f"{param} is too large: {asked}. This model supports at most {limits.max_tokens} completion tokens, "
            f"whereas you provided {asked}.",
            param,
            "invalid_value",
        )


def context_window(system) -> int | None:
    """The most tokens (prompt and answer) a local system's model takes; None for a hosted one (it checks itself)."""
    engine = getattr(system, "engine", None)
    if engine is None or not hasattr(engine, "prompt_ids"):
        return None
    for read in (
        lambda: engine.context_length,
        lambda: engine.model.config.max_position_embeddings,  # transformers (a PeftModel passes it through)
        lambda: engine.llm.llm_engine.model_config.max_model_len,  # vLLM
    ):
        try:
            value = read()
        except AttributeError:
            continue
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit(system, messages: list[dict], settings: Settings, asked: int | None, limits: Limits) -> tuple[Settings, int]:
    """The settings with the answer's budget: what was asked when it fits the context, else a 400; unset, what the
    context leaves, up to the cap. Also the prompt's tokens, as the system will send them (0 when not known here)."""
    window = context_window(system)
    if window is None:
        return replace(settings, max_new_tokens=asked or limits.max_tokens), 0
    (prompt,), _ = system.retrieve([messages])  # with the system prompt and retrieved passages the model will see
    used = len(system.engine.prompt_ids(prompt, settings))
    wanted = asked or 1
    if used + wanted > window:
        raise ApiError(
            400,
            f"This model's maximum context length is {window} tokens. However, you requested {used + wanted} "
            f"tokens ({used} in the messages, {wanted} in the completion). Please reduce the length of the messages "
            "or completion.",
            "messages",
            "context_length_exceeded",
        )
    return replace(settings, max_new_tokens=asked or min(window - used, limits.max_tokens)), used


_END = object()


async def pieces_within(
    system, messages: list[dict], settings: Settings, request, limits: Limits, prompt_tokens: int = 0
) -> AsyncIterator[str | Answer]:
    """The system's text pieces, then its Answer. Ends early, closing the stream (which ends the row in the batch),
    when the client has gone; past the time limit, ends with an Answer of what was said so far (finish length)."""
    from starlette.concurrency import run_in_threadpool

    deadline = time.monotonic() + limits.max_seconds
    pieces = system.stream(messages, settings)
    said: list[str] = []
    try:
        while True:
            piece = await run_in_threadpool(next, pieces, _END)
            if piece is _END or await request.is_disconnected():
                return
            yield piece
            if isinstance(piece, Answer):
                return
            said.append(piece)
            if time.monotonic() > deadline:
                yield _cut(system, "".join(said), prompt_tokens, len(said))
                return
    finally:
        with contextlib.suppress(ValueError):  # still running in its thread: it ends when its row does
            pieces.close()


async def choices_within(
    system, messages: list[dict], choices: list[Settings], request, limits: Limits, prompt_tokens: int = 0
) -> AsyncIterator[tuple[int, str | Answer]]:
    """(choice, piece) of every choice's `pieces_within` as they come: each choice is a request of its own, so they
    share the batch's forward passes. Closing this ends every choice's row."""
    if len(choices) == 1:
        async with contextlib.aclosing(
            pieces_within(system, messages, choices[0], request, limits, prompt_tokens)
        ) as one:
            async for piece in one:
                yield 0, piece
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, settings: Settings) -> None:
        try:
            async with contextlib.aclosing(
                pieces_within(system, messages, settings, request, limits, prompt_tokens)
            ) as it:
                async for piece in it:
                    await queue.put((index, piece))
        finally:
            queue.put_nowait((index, _END))

    tasks = [asyncio.create_task(pump(i, settings)) for i, settings in enumerate(choices)]
    try:
        running = len(tasks)
        while running:
            index, piece = await queue.get()
            if piece is _END:
                running -= 1
            else:
                yield index, piece
        for task in tasks:
            task.result()  # a choice whose generation failed fails the request
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def answers_within(
    system, messages: list[dict], choices: list[Settings], request, limits: Limits, prompt_tokens: int = 0
) -> list[Answer] | None:
    """Every choice's whole answer, read as `pieces_within` reads it; None when the client went away first."""
    answers: dict[int, Answer] = {}
    async with contextlib.aclosing(choices_within(system, messages, choices, request, limits, prompt_tokens)) as pieces:
        async for index, piece in pieces:
            if isinstance(piece, Answer):
                answers[index] = piece
    return [answers[i] for i in range(len(choices))] if len(answers) == len(choices) else None


def _cut(system, text: str, prompt_tokens: int, pieces: int) -> Answer:
    """The answer a time limit ended: what was said, counted in the model's tokens where it is local."""
    tokenizer = getattr(getattr(system, "engine", None), "tokenizer", None)
    count = len(tokenizer(text, add_special_tokens=False)["input_ids"]) if tokenizer is not None else pieces
    return Answer(text=text, prompt_tokens=prompt_tokens, completion_tokens=count, finish_reason="length")
