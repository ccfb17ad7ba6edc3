"""Streams answers from systems for the demo page, one system or several at once, timed.

Nothing here imports Gradio: the page only renders the `Reply` snapshots these yield.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tuneforge.engine.transformers import Answer, Settings
from tuneforge.errors import TuneforgeError

if TYPE_CHECKING:
    from tuneforge.systems import Systems


@dataclass
class Reply:
    """One system's answer so far; the clock starts before the system is loaded, as a user's does."""

    system: str
    text: str = ""
    started: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    total_s: float | None = None
    answer: Answer | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.answer is not None or self.error is not None

    def summary(self) -> str:
        if self.error:
            return f"{self.system}: error"
        if self.answer is None:
            doing = "generating…" if self.first_token_s is not None else "waiting for the model…"
            return f"{self.system}: {doing}"
        first = f"first token {self.first_token_s:.1f} s · " if self.first_token_s is not None else ""
        cut = " (cut at max tokens)" if self.answer.finish_reason == "length" else ""
        return f"{self.system}: {self.answer.completion_tokens} tokens{cut} · {first}done in {self.total_s:.1f} s"


def conversation(system_prompt: str, history: list[dict], message: str) -> list[dict]:
    """What the model sees: the preset's system prompt, the earlier turns, the new message."""
    head = [{"role": "system", "content": system_prompt.strip()}] if system_prompt.strip() else []
    return [*head, *history, {"role": "user", "content": message}]


def ask(get_system: Callable, name: str, messages: list[dict], settings: Settings) -> Iterator[Reply]:
    """The same Reply after each streamed piece (and once before, while the model loads); raises TuneforgeError."""
    reply = Reply(name)
    yield reply
    stream = get_system(name).stream(messages, settings)
    try:
        for item in stream:
            now = time.perf_counter() - reply.started
            if isinstance(item, Answer):
                reply.answer, reply.text, reply.total_s = item, item.text, now
            elif item:
                if reply.first_token_s is None:
                    reply.first_token_s = now
                reply.text += item
            yield reply
    finally:
        stream.close()


def ask_all(get_system: Callable, names: list[str], messages: list[dict], settings: Settings) -> Iterator[list[Reply]]:
    """All replies, after any of them changed; each system streams in its own thread.

    Systems on one model take turns (each engine generates one answer at a time). Closing
    this iterator (the page cancelled, the browser left) stops every stream at its next piece.
    """
    replies = [Reply(name) for name in names]
    changed: queue.Queue = queue.Queue()
    stop = threading.Event()

    def work(index: int) -> None:
        try:
            stream = ask(get_system, names[index], messages, settings)
            try:
                for reply in stream:
                    replies[index] = reply
                    changed.put(index)
                    if stop.is_set():
                        break
            finally:
                stream.close()
        except TuneforgeError as exc:
            replies[index].error = str(exc)
        except Exception as exc:  # one broken system must not take the other columns down
            traceback.print_exc()
            replies[index].error = f"{type(exc).__name__}: {exc}"
        finally:
            changed.put(None)

    threads = [
        threading.Thread(target=work, args=(i,), daemon=True, name=f"demo-{name}") for i, name in enumerate(names)
    ]
    for thread in threads:
        thread.start()
    running = len(threads)
    try:
        while running:
            item = changed.get()
            while True:  # render once for everything that arrived meanwhile
                running -= item is None
                try:
                    item = changed.get_nowait()
                except queue.Empty:
                    break
            yield list(replies)
    finally:
        stop.set()


def sources_markdown(hits: list) -> str:
    """The retrieved passages under a +rag answer: where each came from, its score, its text."""
    parts = []
    for number, hit in enumerate(hits, 1):
        # a passage's own headings would dwarf the answer; show them as plain text
        lines = ("\\" + line if line.startswith("#") else line for line in hit.text.strip().splitlines())
        quoted = "\n".join(f"> {line}" if line.strip() else ">" for line in lines)
        parts.append(f"**{number}. {hit.source}** · score {hit.score:.2f} · chunk `{hit.chunk_id}`\n\n{quoted}")
    return "\n\n".join(parts)


def answer_record(systems: Systems, name: str, answer: Answer) -> dict:
    """An answer as feedback keeps it: the system, exactly which model it was, the text, the retrieved passages."""
    return {
        "system": name,
        "identity": systems.identity(name),
        "text": answer.text,
        "sources": [h.to_json() for h in answer.sources],
    }
