"""Dynamic batching: requests that wait for one model share its forward passes.

A server thread per connection hands its chat to `Batcher.submit`; one worker
thread per base model (shared by the base and every adapter on it, engine/pool.py)
takes every waiting request that can share a `generate` call (greedy with greedy,
sampling with the same temperature and top-p; a seeded request runs alone so its
seed means what it says) and runs them as one left-padded batch, each row with its
own system's adapter (PEFT's mixed-adapter batches). Each row keeps its own budget, stop strings and end-of-turn:
a per-row stopping rule ends a row early while the others go on, and a per-row
streamer hands each row's text to its caller as it is generated. A caller that
goes away (a client hanging up) ends its row only.

Requests that arrive while a batch runs form the next batch, so under load the
batch grows to `max_batch` and the model's passes are shared. An idle model
waits `window_s` (20 ms) after a request arrives, and again while more keep
arriving (at most `max_wait_s`, 100 ms), so clients that start together are not
split into a batch of one and a batch of the rest.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tuneforge.engine.generation import Answer, Piece, Settings
from tuneforge.engine.logits import RowLogits, logprob_entry


@dataclass
class Request:
    engine: Any  # the system asking: its adapter on the shared base, its tokenizer and end-of-turn
    prompt: list[int]
    settings: Settings
    streaming: bool
    pieces: queue.Queue = field(default_factory=queue.Queue)  # str pieces, then the Answer (or an exception)
    cancelled: bool = False

    @property
    def key(self) -> tuple:
        """Requests with the same key can share one generate call: the same sampling, the same stop and pad ids, and
        adapters that PEFT can mix in one batch (any plain LoRA adapters and the base; others each alone)."""
        s, engine = self.settings, self.engine
        shared = (tuple(engine.stop_ids), engine.tokenizer.pad_token_id, None if engine.mixable else engine.adapter)
        if s.temperature <= 0:
            return ("greedy", *shared)
        if s.seed is not None:
            return ("seeded", id(self))
        return ("sample", s.temperature, s.top_p, *shared)


class Row:
    """One request's place in a running batch: the ids it produced, the text it streamed, whether it ended."""

    def __init__(self, request: Request):
        self.request = request
        self.engine = request.engine
        self.ids: list[int] = []
        self.done = False
        self.emitted = ""
        self.watch_text = request.streaming or bool(request.settings.stop)
        format_ = request.settings.response_format
        self.matcher = self.engine.grammars().matcher(format_) if format_ is not None else None  # a JSON grammar
        self.pending: torch.Tensor | None = None  # this step's logprobs (RowLogits), for the token picked next
        self.entries: list[dict] = []  # the logprobs of the tokens said so far, when asked for
        self.sent = 0  # entries streamed so far

    def take(self, token: int) -> None:
        if self.done:
            return
        if self.request.cancelled:
            self.done = True
            return
        self.ids.append(token)
        if self.pending is not None and token not in self.engine.stop_ids:
            top = self.request.settings.logprobs
            self.entries.append(logprob_entry(self.engine.tokenizer, self.pending, token, top))
        self.pending = None
        if self.matcher is not None and not self.matcher.is_terminated():
            self.matcher.accept_token(token)
        if token in self.engine.stop_ids or len(self.ids) >= self.request.settings.max_new_tokens:
            self.done = True
        if self.watch_text and token not in self.engine.stop_ids:
            self._text(final=False)

    def flush(self) -> None:
        """After the batch: stream what was held back (a possible start of a stop string, half a character)."""
        if self.request.streaming and not self.request.cancelled:
            self._text(final=True)

    def _text(self, final: bool) -> None:
        ids = [t for t in self.ids if t not in self.engine.stop_ids]
        text = self.engine.tokenizer.decode(ids, skip_special_tokens=True)
        stops = self.request.settings.stop
        cut = min((text.index(s) for s in stops if s in text), default=None)
        if cut is not None:
            text, self.done = text[:cut], True
        elif not final:
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                return
            held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - held]  # it may be the start of a stop string
        if not text.startswith(self.emitted):
            return  # the tokenizer re-spelled earlier text; the final Answer has it right
        piece, self.emitted = text[len(self.emitted) :], text
        if piece and self.request.streaming:
            piece = Piece(piece)
            if self.request.settings.logprobs is not None:
                piece.logprobs, self.sent = self.entries[self.sent :], len(self.entries)
            self.request.pieces.put(piece)


class RowStreamer:
    """transformers' streamer protocol for a whole batch: put() gets the prompt once, then one token per row per
    step."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.view(-1).tolist()):
            row.take(token)

    def end(self) -> None:
        pass


class RowsDone:
    """A stopping criterion that ends each row on its own: budget reached, stop string seen, caller gone."""

    def __init__(self, rows: list[Row], width: int):
        self.rows = rows
        self.width = width

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        produced = input_ids.shape[1] - self.width
        flags = [
            row.done or row.request.cancelled or produced >= row.request.settings.max_new_tokens for row in self.rows
        ]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class Batcher:
    """Groups concurrent requests for the systems of one base model (engine/pool.py) into batched generate calls."""

    def __init__(self, base, max_batch: int = 16, window_s: float = 0.02, max_wait_s: float = 0.1):
        self.base = base
        self.max_batch = max_batch
        self.window_s = window_s  # an idle model waits this long for company after a request arrives...
        self.max_wait_s = max_wait_s  # ...and again while more keep arriving, up to this in all
        self.waiting: list[Request] = []
        self.ready = threading.Condition()
        self.batches = 0  # generate calls run, for tests and benchmarks
        self.rows_run = 0
        self.worker = threading.Thread(target=self._work, name=f"batcher-{base.name}", daemon=True)
        self.worker.start()

    def submit(self, engine, prompt: list[int], settings: Settings, streaming: bool) -> Request:
        request = Request(engine, prompt, settings, streaming)
        with self.ready:
            self.waiting.append(request)
            self.ready.notify()
        return request

    def answer(self, engine, prompt: list[int], settings: Settings) -> Answer:
        request = self.submit(engine, prompt, settings, streaming=False)
        item = request.pieces.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def stream(self, engine, prompt: list[int], settings: Settings) -> Iterator[str | Answer]:
        request = self.submit(engine, prompt, settings, streaming=True)
        try:
            while True:
                item = request.pieces.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Answer):
                    return
        finally:
            request.cancelled = True  # a caller that stops reading ends its row (no-op once answered)

    # ------------------------------------------------------------------ worker

    def _next_batch(self) -> list[Request]:
        with self.ready:
            while not self.waiting:
                self.ready.wait()
        # let requests that arrive together go together: clients started at once reach the server spread over
        # tens of milliseconds, and a batch of one that starts first makes the rest wait a whole generation
        started, seen = time.perf_counter(), -1
        while True:
            with self.ready:
                count = len(self.waiting)
            if count >= self.max_batch or count == seen or time.perf_counter() - started >= self.max_wait_s:
                break
            seen = count
            time.sleep(self.window_s)
        with self.ready:
            key = self.waiting[0].key
            batch = [r for r in self.waiting if r.key == key and not r.cancelled][: self.max_batch]
            chosen = {id(r) for r in batch}
            self.waiting = [r for r in self.waiting if id(r) not in chosen and not r.cancelled]
        return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                continue
            try:
                answers = self.run(batch)
            except BaseException as exc:  # every caller in the batch hears of it; the model stays usable
                for request in batch:
                    request.pieces.put(exc)
                continue
            for request, answer in zip(batch, answers):
                request.pieces.put(answer)

    def run(self, batch: list[Request]) -> list[Answer]:
        """One generate call for the batch, each row with its own system's adapter; each row ends on its own."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        engine = batch[0].engine  # the batch's stop and pad ids are every row's (Request.key)
        rows = [Row(r) for r in batch]
        width = max(len(r.prompt) for r in batch)
        pad = engine.tokenizer.pad_token_id
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, request in enumerate(batch):
            ids[i, width - len(request.prompt) :] = torch.tensor(request.prompt)
            mask[i, width - len(request.prompt) :] = 1
        first = batch[0].settings
        shared = Settings(
            max_new_tokens=max(r.settings.max_new_tokens for r in batch),
            temperature=first.temperature,
            top_p=first.top_p,
            seed=first.seed,
        )  # stop strings are per row, in RowsDone; logprobs, bias and grammars too, in RowLogits
        shaping = any(r.settings.shapes_logits for r in batch)  # else the logits are left as generate makes them
        logits = {"logits_processor": LogitsProcessorList([RowLogits(rows)])} if shaping else {}
        with self.base.lock:
            extra = self.base.prepare([r.engine.adapter for r in batch]) if engine.pooled else {}
            if shared.seed is not None:
                torch.manual_seed(shared.seed)
            with torch.no_grad():
                self.base.model.generate(
                    input_ids=ids.to(self.base.device),
                    attention_mask=mask.to(self.base.device),
                    streamer=RowStreamer(rows),
                    stopping_criteria=StoppingCriteriaList([RowsDone(rows, width)]),
                    **engine._generate_kwargs(shared),
                    **extra,
                    **logits,
                )
        self.batches += 1
        self.rows_run += len(batch)
        for row in rows:
            row.flush()
        answers = [row.engine._answer(row.ids, len(row.request.prompt), row.request.settings) for row in rows]
        for row, answer in zip(rows, answers):
            if row.request.settings.logprobs is not None:
                answer.logprobs = row.entries[: answer.completion_tokens]
        return answers
