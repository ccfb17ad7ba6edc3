"""The engine: batched greedy answers equal one-at-a-time answers, in input order, stopping at end-of-turn."""

from __future__ import annotations

import pytest
import torch

from tuneforge.infer.engine import Answer, Engine, Settings


@pytest.fixture()
def engine(tiny_llama, tiny_tokenizer):
    return Engine(tiny_llama, tiny_tokenizer, "base")


CHATS = [
    [{"role": "user", "content": "What is two plus two?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello world to the thermostat schedule"}],
    [{"role": "user", "content": "Capital?"}],
    [{"role": "user", "content": "The capital of France is Paris. Classify the sentiment of a review: positive"}],
]


def test_batched_equals_one_at_a_time_and_keeps_order(engine):
    settings = Settings(max_new_tokens=12)
    batched = engine.generate(CHATS, settings, batch_size=3)
    single = [engine.generate([chat], settings, batch_size=1)[0] for chat in CHATS]
    assert [a.text for a in batched] == [a.text for a in single]
    assert [a.prompt_tokens for a in batched] == [len(engine.prompt_ids(c)) for c in CHATS]


def test_stops_at_end_of_turn_and_reports_why(engine):
    eot = engine.encoder.end_of_turn_id
    answer = engine._answer([5, 6, eot, 7], 10, Settings())
    assert answer.completion_tokens == 2 and answer.finish_reason == "stop"
    assert engine._answer([5, 6, 7], 10, Settings()).finish_reason == "length"
    cut = engine._answer(engine.tokenizer("hello world", add_special_tokens=False)["input_ids"], 3, Settings(stop=(" world",)))
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
