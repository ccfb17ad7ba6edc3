"""The engine: batched greedy answers equal one-at-a-time answers, in input order, stopping at end-of-turn."""

from __future__ import annotations

import threading

import pytest

from tuneforge.engine.batcher import Batcher
from tuneforge.engine.transformers import Answer, Engine, Settings


@pytest.fixture()
def engine(talking_llama, tiny_tokenizer):
    return Engine(talking_llama, tiny_tokenizer, "base")


CHATS = [
    [{"role": "user", "content": "What is two plus two?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello world to the thermostat schedule"},
    ],
    [{"role": "user", "content": "Capital?"}],
    [{"role": "user", "content": "The capital of France is Paris. Classify the sentiment of a review: positive"}],
]


def test_batched_equals_one_at_a_time_and_keeps_order(engine):
    settings = Settings(max_new_tokens=12)
    batched = engine.generate(CHATS, settings, batch_size=3)
    single = [engine.generate([chat], settings, batch_size=1)[0] for chat in CHATS]
    assert [a.text for a in batched] == [a.text for a in single]
    # real, different answers to compare
    assert len({a.text for a in single}) == len(CHATS) and all(a.text for a in single)
    assert [a.prompt_tokens for a in batched] == [len(engine.prompt_ids(c)) for c in CHATS]


def test_stops_at_end_of_turn_and_reports_why(engine):
    eot = engine.encoder.end_of_turn_id
    answer = engine._answer([5, 6, eot, 7], 10, Settings())
    assert answer.completion_tokens == 2 and answer.finish_reason == "stop"
    assert engine._answer([5, 6, 7], 10, Settings()).finish_reason == "length"
    cut = engine._answer(
        engine.tokenizer("hello world", add_special_tokens=False)["input_ids"], 3, Settings(stop=(" world",))
    )
    assert cut.text == "hello" and cut.finish_reason == "stop"


def test_stream_pieces_add_up_to_the_answer(engine):
    pieces = list(engine.stream(CHATS[0], Settings(max_new_tokens=10)))
    final = pieces[-1]
    assert isinstance(final, Answer)
    assert "".join(pieces[:-1]).strip() == final.text
    assert final.text == engine.generate([CHATS[0]], Settings(max_new_tokens=10))[0].text


def test_sampling_is_seeded(engine):
    a = engine.generate(CHATS[:2], Settings(max_new_tokens=8, temperature=1.0, seed=5))
    b = engine.generate(CHATS[:2], Settings(max_new_tokens=8, temperature=1.0, seed=5))
    assert [x.text for x in a] == [x.text for x in b]
    other = engine.generate(CHATS[:2], Settings(max_new_tokens=8, temperature=1.0, seed=6))
    assert [x.text for x in other] != [x.text for x in a]  # the seed, not a fixed path, decides the sample


def _concurrently(calls):
    """Run the callables on threads started together; results in order."""
    results: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i):
        start.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def _first_batch_waits_for(monkeypatch, count: int) -> None:
    """The batcher's first batch starts only once `count` requests are queued, so callers started together share it
    however slowly their threads reach the queue on a busy machine (the batcher's own wait is 20-100 ms). Patched before
    `engine.batcher()` starts the worker thread; the batcher's own grouping then decides what goes together."""
    original = Batcher._next_batch
    first = [True]

    def gated(self):
        if first[0]:
            with self.ready:
                self.ready.wait_for(lambda: len(self.waiting) >= count, timeout=60)  # submit() notifies on each request
            first[0] = False
        return original(self)

    monkeypatch.setattr(Batcher, "_next_batch", gated)


def _finishes(call, seconds: float = 60):
    """call() on a thread; fails if it has not returned within `seconds` (a deadlock), else its result or its error."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # re-raised here, on the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s: a deadlock"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_concurrent_callers_share_batches_and_get_their_own_answers(engine, monkeypatch):
    budgets = [12, 3, 7, 12] * 2
    chats = CHATS * 2
    alone = [engine.generate([c], Settings(max_new_tokens=b), batch_size=1)[0] for c, b in zip(chats, budgets)]
    _first_batch_waits_for(monkeypatch, len(chats))
    batcher = engine.batcher()
    together = _concurrently(
        [lambda c=c, b=b: engine.answer(c, Settings(max_new_tokens=b)) for c, b in zip(chats, budgets)]
    )
    assert batcher.batches == 1  # all eight greedy requests, with their different budgets, in one generate call
    assert [a.text for a in together] == [a.text for a in alone]  # greedy: batching changes no answer
    assert [a.completion_tokens for a in together] == [a.completion_tokens for a in alone]
    assert [a.finish_reason for a in together] == [a.finish_reason for a in alone]


def test_concurrent_streams_each_add_up_to_their_answer(engine, monkeypatch):
    _first_batch_waits_for(monkeypatch, len(CHATS))
    batcher = engine.batcher()
    streams = _concurrently([lambda c=c: list(engine.stream(c, Settings(max_new_tokens=10))) for c in CHATS])
    assert batcher.batches == 1  # the four streams shared one generate call
    for chat, pieces in zip(CHATS, streams):
        assert isinstance(pieces[-1], Answer) and all(isinstance(p, str) for p in pieces[:-1])
        assert "".join(pieces[:-1]).strip() == pieces[-1].text
        assert pieces[-1].text == engine.generate([chat], Settings(max_new_tokens=10), batch_size=1)[0].text


def test_a_stop_string_ends_its_row_only_and_is_never_streamed(engine, monkeypatch):
    free = engine.generate([CHATS[0]], Settings(max_new_tokens=12))[0].text
    stop = free.split()[1] if len(free.split()) > 1 else free[2:4]
    _first_batch_waits_for(monkeypatch, 2)
    batcher = engine.batcher()
    stopped, other = _concurrently(
        [
            lambda: list(engine.stream(CHATS[0], Settings(max_new_tokens=12, stop=(stop,)))),
            lambda: engine.answer(CHATS[2], Settings(max_new_tokens=12)),
        ]
    )
    assert batcher.batches == 1  # one batch: the stop string ended one row of it, not the generate call
    assert stopped[-1].finish_reason == "stop" and stop not in "".join(stopped[:-1])
    assert "".join(stopped[:-1]).strip() == stopped[-1].text == free[: free.index(stop)].strip()
    assert other.text == engine.generate([CHATS[2]], Settings(max_new_tokens=12))[0].text


def test_a_caller_that_leaves_ends_its_row_and_an_error_reaches_every_caller(engine, monkeypatch):
    # computed before anything can hang
    expected = {n: engine.generate([CHATS[2]], Settings(max_new_tokens=n))[0] for n in (3, 4)}
    stream = engine.stream(CHATS[0], Settings(max_new_tokens=200))
    first = next(stream)
    assert isinstance(first, str)
    stream.close()  # the client hung up
    # the model is free again, and answers as it does alone
    answer = _finishes(lambda: engine.answer(CHATS[2], Settings(max_new_tokens=4)))
    assert (answer.text, answer.completion_tokens) == (expected[4].text, expected[4].completion_tokens)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine.model, "generate", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        _finishes(lambda: list(engine.stream(CHATS[0], Settings(max_new_tokens=5))))  # ends with the error, not hanging
    monkeypatch.undo()
    answer = _finishes(lambda: engine.answer(CHATS[2], Settings(max_new_tokens=3)))  # and the lock was released
    assert (answer.text, answer.completion_tokens) == (expected[3].text, expected[3].completion_tokens)
