"""`tuneforge serve` on loopback, driven by the official `openai` client."""

from __future__ import annotations

import threading
from pathlib import Path

import openai
import pytest

from tests.live import answers_models, free_port, running

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm_location):
    workdir = tmp_path_factory.mktemp("serve")
    port = free_port()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
    with running(
        ["serve", str(REPO / "configs" / "quickstart.yaml"), "--port", str(port), "--run-dir", str(workdir / "run")],
        workdir,
        answers_models(client),
    ):
        yield client


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# many likely answers: samples with different seeds differ
OPEN_QUESTION = [{"role": "user", "content": "Write one sentence about the sea."}]


def test_lists_models(server):
    # no adapter in this run yet; the quickstart has a rag section, so base+rag is served too
    assert [m.id for m in server.models.list().data] == ["base", "base+rag"]


def test_rag_system_answers_with_its_sources(server):
    question = [{"role": "user", "content": "Which colours is the Kestrel K2 available in?"}]
    reply = server.chat.completions.create(model="base+rag", messages=question, max_tokens=32)
    sources = reply.model_extra["sources"]  # beside the OpenAI fields; the client keeps it
    assert sources and sources[0]["source"] == "product-overview.md"
    assert {"chunk_id", "score", "text"} <= set(sources[0])
    plain = server.chat.completions.create(model="base", messages=question, max_tokens=32)
    assert "sources" not in (plain.model_extra or {})
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens + 100  # the passages went into the prompt


def test_non_streamed_answer(server):
    reply = server.chat.completions.create(model="base", messages=QUESTION, max_tokens=24, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0


def test_streamed_answer(server):
    chunks = list(server.chat.completions.create(model="base", messages=QUESTION, max_tokens=24, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert len(chunks) > 3 and chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_streamed_usage_and_rag_sources(server):
    chunks = list(
        server.chat.completions.create(
            model="base", messages=QUESTION, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0 and last.usage.prompt_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(server.chat.completions.create(model="base", messages=QUESTION, max_tokens=8, stream=True))
    assert all(c.choices and c.usage is None for c in plain)  # no usage chunk unless asked
    question = [{"role": "user", "content": "Which colours is the Kestrel K2 available in?"}]
    chunks = list(server.chat.completions.create(model="base+rag", messages=question, max_tokens=8, stream=True))
    final = chunks[-1]
    assert final.choices[0].finish_reason in ("stop", "length")
    # a streamed +rag answer names its sources too
    assert final.model_extra["sources"][0]["source"] == "product-overview.md"
    assert all("sources" not in (c.model_extra or {}) for c in chunks[:-1])


def test_stop_and_seed(server):
    free = server.chat.completions.create(model="base", messages=QUESTION, max_tokens=24).choices[0]
    assert "Paris" in free.message.content  # without a stop string this prompt is answered with Paris...
    stopped = server.chat.completions.create(model="base", messages=QUESTION, max_tokens=24, stop=["Paris"]).choices[0]
    assert "Paris" not in stopped.message.content  # ...so here the stop string is what keeps it out
    assert stopped.message.content == free.message.content[: free.message.content.index("Paris")].strip()
    assert stopped.finish_reason == "stop"

    def sample(seed: int) -> str:
        reply = server.chat.completions.create(
            model="base", messages=OPEN_QUESTION, max_tokens=12, temperature=1.0, top_p=0.9, seed=seed
        )
        return reply.choices[0].message.content

    first = sample(7)
    assert sample(7) == first  # the same seed, the same sample
    assert sample(8) != first  # the seed, not a fixed (greedy) path, decides the sample


def test_errors_are_openai_shaped_and_the_server_keeps_serving(server):
    with pytest.raises(openai.NotFoundError) as info:
        server.chat.completions.create(model="gpt-nope", messages=QUESTION)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        server.chat.completions.create(model="base", messages=QUESTION, temperature=5)
    assert info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        server.chat.completions.create(model="base", messages=[{"role": "human", "content": "hi"}])
    assert "[unrecognized_role]" in info.value.message  # the same check prepare applies to training data
    reply = server.chat.completions.create(model="base", messages=QUESTION, max_tokens=24)
    assert "Paris" in reply.choices[0].message.content
    # the content as a list of parts, as the client may send it
    parts = [{"role": "user", "content": [{"type": "text", "text": QUESTION[0]["content"]}]}]
    reply = server.chat.completions.create(model="base", messages=parts, max_tokens=24)
    assert "Paris" in reply.choices[0].message.content


def test_concurrent_requests_queue_safely(server):
    results: list[str] = []
    errors: list[Exception] = []

    def ask():
        try:
            reply = server.chat.completions.create(model="base", messages=QUESTION, max_tokens=16)
            results.append(reply.choices[0].message.content)
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3 and len(set(results)) == 1
