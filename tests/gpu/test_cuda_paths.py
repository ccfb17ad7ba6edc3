"""What only a CUDA GPU can show: bitsandbytes' CUDA 4-bit kernels and the batcher on the device."""

from __future__ import annotations

import threading

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.integration]

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?",
             "What does a thermostat do?", "Give me a synonym for happy.", "Who wrote Romeo and Juliet?"]


@pytest.fixture(scope="module")
def engine(smollm_location):
    from tuneforge.config import ModelSection
    from tuneforge.infer.engine import Engine
    from tuneforge.models import load_model, load_tokenizer, plan_device

    section = ModelSection(ref=str(smollm_location), quantization="4bit")
    plan = plan_device(section)
    assert plan.device == "cuda"
    return Engine(load_model(section, plan, smollm_location), load_tokenizer(section, smollm_location), "base")


def test_batched_greedy_answers_equal_one_at_a_time_on_cuda_4bit(engine):
    from tuneforge.infer.engine import Settings

    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    settings = Settings(max_new_tokens=24)
    alone = [engine.generate([c], settings, batch_size=1)[0].text for c in chats]
    assert engine.generate(chats, settings, batch_size=len(chats))[0].text == alone[0]
    answers: list = [None] * len(chats)
    start = threading.Barrier(len(chats))

    def ask(i):
        start.wait()
        answers[i] = engine.answer(chats[i], settings).text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(chats))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert answers == alone and all(alone)
