"""Bounded chat requests on `serve`'s real app: the context and the server's cap (a tiny random Llama, through the
official openai client), a client that leaves, the time limit, and the 429 before a stream starts (a slow system
that counts what it generated, served under a name of its own)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from tuneforge.config import Experiment
from tuneforge.engine.generation import Answer
from tuneforge.run import RunDir
from tuneforge.serve.bounds import Limits
from tuneforge.serve.server import MAX_WAITING, Served, create_app

HI = [{"role": "user", "content": "hi"}]


class Slow:
    """A system that says a word every 10 ms, up to `words`, and records how far it got and whether it was closed."""

    def __init__(self, words: int = 3000):
        self.words, self.said, self.closed = words, 0, threading.Event()

    def stream(self, messages, settings):
        try:
            for _ in range(self.words):
                time.sleep(0.01)
                self.said += 1
                yield "word "
            yield Answer("word " * self.words, 3, self.words, "stop")
        finally:
            self.closed.set()

    def generate(self, conversations, settings, batch_size=16, progress=False):  # how a plain answer was asked once
        return [list(self.stream(conversations[0], settings))[-1]]


def _served(tmp_path, ref: str = "builtin:smollm2-135m-instruct", **limits) -> Served:
    experiment = Experiment.model_validate({"name": "server", "model": {"ref": ref}})
    return Served(experiment, RunDir(experiment, tmp_path / "server"), system_prompt="", limits=Limits(**limits))


def _slow(served: Served, words: int = 3000) -> Slow:
    slow = Slow(words)
    served.register("slow", "base", "default")  # listed to the default project...
    served.systems.systems["slow"] = slow  # ...and answered by the slow system, not a loaded model
    return slow


@contextlib.contextmanager
def _listening(served: Served) -> Iterator[str]:
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(served), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            assert thread.is_alive() and time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.mark.slow
def test_prompt_and_max_tokens_must_fit_the_context_and_the_servers_cap(tmp_path, tiny_model_dir):
    served = _served(tmp_path, str(tiny_model_dir), max_tokens=200)  # the tiny Llama's context: 256 tokens
    client = openai.OpenAI(
        base_url="http://localhost/v1", api_key="unused", max_retries=0, http_client=TestClient(create_app(served))
    )
    engine = served.systems.get("base").engine
    long = [{"role": "user", "content": "The capital of France is Paris. " * 40}]
    used = len(engine.prompt_ids(long))
    assert used > 256
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="base", messages=long, max_tokens=5)
    error = refused.value.body
    assert refused.value.code == "context_length_exceeded" and error["param"] == "messages"
    assert f"maximum context length is 256 tokens. However, you requested {used + 5} tokens" in error["message"]

    medium = [{"role": "user", "content": "The capital of France is Paris. " * 15}]
    room = 256 - len(engine.prompt_ids(medium))
    assert 0 < room < 200
    with pytest.raises(openai.BadRequestError, match="context length") as refused:
        client.chat.completions.create(model="base", messages=medium, max_tokens=room + 1)
    fits = client.chat.completions.create(model="base", messages=medium, max_tokens=room)
    assert fits.usage.prompt_tokens + fits.usage.completion_tokens <= 256
    unset = client.chat.completions.create(model="base", messages=medium)  # what the context leaves
    assert unset.usage.completion_tokens <= room

    for asked in (201, 10**30):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="base", messages=HI, max_tokens=asked)
        assert refused.value.code == "invalid_value" and refused.value.param == "max_tokens"
        assert "at most 200 completion tokens" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="base", messages=HI, max_completion_tokens=201)
    assert refused.value.param == "max_completion_tokens"


def test_a_plain_answer_whose_client_leaves_stops_generating(tmp_path):
    served = _served(tmp_path)
    slow = _slow(served)
    with _listening(served) as url:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up after half a second and hangs up
            httpx.post(f"{url}/chat/completions", json={"model": "slow", "messages": HI}, timeout=0.5)
        assert slow.closed.wait(5), "the answer kept generating for a client that left"
        said = slow.said
        time.sleep(0.3)
        assert slow.said == said < 300  # stopped at once, not after 3000 words
        assert served.waiting == 0  # its place in the queue given back


def test_an_answer_past_the_time_limit_ends_with_what_was_said(tmp_path):
    served = _served(tmp_path, max_seconds=0.3)
    slow = _slow(served)
    client = TestClient(create_app(served), base_url="http://localhost")
    started = time.monotonic()
    plain = client.post("/v1/chat/completions", json={"model": "slow", "messages": HI}).json()
    assert time.monotonic() - started < 3 and slow.closed.is_set() and slow.said < 100
    choice = plain["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith("word word")
    assert plain["usage"]["completion_tokens"] > 0
    streamed = client.post("/v1/chat/completions", json={"model": "slow", "messages": HI, "stream": True})
    assert '"finish_reason": "length"' in streamed.text and streamed.text.endswith("data: [DONE]\n\n")


def test_a_request_refused_for_load_is_a_429_with_retry_after_before_any_stream_starts(tmp_path):
    served = _served(tmp_path)
    _slow(served, words=3)
    client = TestClient(create_app(served), base_url="http://localhost")
    served.waiting = MAX_WAITING
    for stream in (False, True):
        full = client.post("/v1/chat/completions", json={"model": "slow", "messages": HI, "stream": stream})
        assert full.status_code == 429 and full.headers["retry-after"] == "1", stream
        assert full.json()["error"]["code"] == "rate_limit_exceeded"
    served.waiting = 0

    entered = []

    class FillsUp(Served):
        """The queue fills the moment this request takes its place: a second place is never there."""

        def enter(self, places=1):
            if entered:
                self.waiting = MAX_WAITING  # others took every place since
            entered.append(True)
            super().enter(places)

    served.__class__ = FillsUp
    streamed = client.post("/v1/chat/completions", json={"model": "slow", "messages": HI, "stream": True})
    assert streamed.status_code == 200 and "rate_limit" not in streamed.text and "[DONE]" in streamed.text
    assert served.waiting == 0


class Broken:
    def stream(self, messages, settings):
        raise FileNotFoundError(
            2, "No such file or directory", "/srv/tuneforge/runs/secret/adapter/adapter_config.json"
        )
        yield


def test_a_server_fault_names_no_server_path(tmp_path):
    served = _served(tmp_path)
    served.register("broken", "base", "default")
    served.systems.systems["broken"] = Broken()
    client = TestClient(create_app(served), base_url="http://localhost", raise_server_exceptions=False)
    fault = client.post("/v1/chat/completions", json={"model": "broken", "messages": HI})
    assert fault.status_code == 500 and fault.json()["error"]["type"] == "server_error"
    assert "/srv/tuneforge" not in fault.text and "adapter_config.json" in fault.json()["error"]["message"]


def test_an_out_of_range_seed_or_a_lone_surrogate_is_a_400(tmp_path, tiny_model_dir):
    client = TestClient(create_app(_served(tmp_path, str(tiny_model_dir))), base_url="http://localhost")
    for body, param in [
        ({"seed": 2**64, "temperature": 1.0}, "seed"),
        ({"seed": -(2**63) - 1, "temperature": 1.0}, "seed"),
        ({"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages.0.content"),
        ({"user": "\udfff"}, "user"),
    ]:
        refused = client.post(
            "/v1/chat/completions",
            content=json.dumps({"model": "base", "messages": HI, "max_tokens": 2, **body}),
            headers={"Content-Type": "application/json"},
        )
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, (body, refused.text)
    seeded = {"model": "base", "messages": HI, "max_tokens": 2, "seed": 2**64 - 1, "temperature": 1.0}
    assert client.post("/v1/chat/completions", json=seeded).status_code == 200  # the largest seed torch takes


def test_parameters_this_server_does_not_honour_are_400s_naming_them(tmp_path):
    served = _served(tmp_path)
    _slow(served, words=3)
    client = openai.OpenAI(
        base_url="http://localhost/v1", api_key="unused", max_retries=0, http_client=TestClient(create_app(served))
    )
    for given in [{"presence_penalty": 0.5}, {"reasoning_effort": "low"}, {"frequency_penalty": 1.0}]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="slow", messages=HI, **given)
        assert refused.value.param == next(iter(given)) and refused.value.code == "unsupported_parameter", given
    # honoured by transformers-engine systems (test_logits_options.py), refused by one without that engine
    for given in [
        {"logprobs": True},
        {"logprobs": True, "top_logprobs": 3},
        {"logit_bias": {"50256": -100}},
        {"response_format": {"type": "json_object"}},
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="slow", messages=HI, **given)
        assert refused.value.param == next(iter(given)) and refused.value.code == "unsupported_parameter", given
        assert "transformers engine" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="slow", messages=HI, n=9)  # past MAX_CHOICES
    assert refused.value.param == "n"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="slow", messages=HI, extra_body={"top_k": 5})  # not OpenAI's either
    assert refused.value.param == "top_k" and refused.value.code == "unknown_parameter"
    neutral = client.chat.completions.create(
        model="slow",
        messages=HI,
        n=1,
        logprobs=False,
        logit_bias={},
        response_format={"type": "text"},
        presence_penalty=0,
        user="ann",
        metadata={"team": "a"},
        store=False,
    )
    assert neutral.choices[0].message.content.startswith("word")


def test_the_developer_role_is_the_system_role(tmp_path, tiny_model_dir):
    served = _served(tmp_path, str(tiny_model_dir))
    client = openai.OpenAI(
        base_url="http://localhost/v1", api_key="unused", max_retries=0, http_client=TestClient(create_app(served))
    )

    def ask(role: str):
        return client.chat.completions.create(
            model="base", messages=[{"role": role, "content": "Be brief."}, *HI], max_tokens=8, temperature=0
        )

    developer, system = ask("developer"), ask("system")
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens
    assert developer.choices[0].message.content == system.choices[0].message.content


def test_n_choices_each_sampled_on_its_own_seed_streamed_or_not(tmp_path, talking_llama, tiny_tokenizer):
    folder = tmp_path / "talking"
    talking_llama.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    client = openai.OpenAI(
        base_url="http://localhost/v1",
        api_key="unused",
        max_retries=0,
        http_client=TestClient(create_app(_served(tmp_path, str(folder)))),
    )
    ask = {"model": "base", "messages": HI, "max_tokens": 12, "temperature": 1.0, "seed": 7}
    three = client.chat.completions.create(n=3, **ask)
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = [c.message.content for c in three.choices]
    assert len(set(texts)) > 1  # each choice samples on its own seed
    alone = [client.chat.completions.create(**{**ask, "seed": 7 + i}) for i in range(3)]
    assert texts == [a.choices[0].message.content for a in alone]  # choice i: what seed 7 + i gives alone
    assert three.usage.prompt_tokens == alone[0].usage.prompt_tokens  # the prompt counts once
    assert three.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)

    streamed = list(client.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **ask))
    said, finished = {i: "" for i in range(3)}, {}
    for chunk in streamed:
        for choice in chunk.choices:
            said[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert all(said.values()) and sorted(finished) == [0, 1, 2]  # every choice streamed and ended
    assert streamed[-1].usage.total_tokens == three.usage.total_tokens
