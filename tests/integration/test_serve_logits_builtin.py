"""OpenAI parity on the real builtin SmolLM2 (issue 31 item 9): `tuneforge serve`'s app listening on a socket, asked
through the official openai client for answers held to a JSON schema and to a JSON object, and for logprobs,
streamed and not; every response parsed by the client's own types."""

from __future__ import annotations

import json
import socket
import threading
import time

import jsonschema
import openai
import pytest

from tuneforge.config import Experiment
from tuneforge.run import RunDir
from tuneforge.serve.server import Served, create_app

pytestmark = pytest.mark.integration

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40}},
    "required": ["city", "country"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "What is the capital of France? Answer in JSON with the city and its country."}]


@pytest.fixture(scope="module")
def client(smollm_location, tmp_path_factory):
    import uvicorn

    experiment = Experiment.model_validate(
        {"name": "server", "model": {"ref": str(smollm_location), "quantization": "none", "device": "cpu"}}
    )
    served = Served(experiment, RunDir(experiment, tmp_path_factory.mktemp("serve") / "run"), system_prompt="")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(served), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="unused", max_retries=0)
    server.should_exit = True
    thread.join(30)
    sock.close()


def test_json_schema_and_json_object_answers_parse(client):
    schema = {"type": "json_schema", "json_schema": {"name": "capital", "schema": CITY, "strict": True}}
    held = client.chat.completions.create(model="base", messages=ASK, max_tokens=80, response_format=schema)
    value = json.loads(held.choices[0].message.content)
    jsonschema.validate(value, CITY)
    assert held.choices[0].finish_reason == "stop"
    free = client.chat.completions.create(
        model="base", messages=ASK, max_tokens=80, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(free.choices[0].message.content), dict)


def test_logprobs_streamed_and_not_match_the_answer(client):
    ask = {"model": "base", "messages": ASK, "max_tokens": 12, "logprobs": True, "top_logprobs": 5}
    answer = client.chat.completions.create(**ask)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 5 for t in content)
    assert all(t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)  # greedy
    chunks = list(client.chat.completions.create(stream=True, **ask))
    streamed = [t for c in chunks for choice in c.choices if choice.logprobs for t in choice.logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)
