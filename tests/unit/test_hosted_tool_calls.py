"""An `openai:` system asked with tools, streamed and not, against a real HTTP server on 127.0.0.1 that speaks
OpenAI's chat-completions protocol (every body it sends checked against the `openai` package's types): the calls
come back whole from the stream as from a plain request, and reach `chat`'s history and `serve`'s SSE stream."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.wire import checked
from tuneforge.config import Experiment
from tuneforge.engine.generation import Answer, Settings
from tuneforge.run import RunDir
from tuneforge.systems import HostedSystem, parse

MODEL = "gpt-test"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
CALLS = [  # two calls in one answer (parallel tool calls), so the pieces must be told apart by index
    {"id": "call_paris", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {
        "id": "call_oslo",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'},
    },
]
AFTER_RESULTS = "Paris has 21 degrees and Oslo 15."  # the answer once the tools' results are in the conversation
ASK = [{"role": "user", "content": "Weather in Paris and Oslo?"}]


def _chunk(delta: dict, finish: str | None = None) -> dict:
    body = {
        "id": "chatcmpl-upstream",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "system_fingerprint": "fp_test",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    checked(ChatCompletionChunk, body)
    return body


def call_chunks() -> list[dict]:
    """The calls as OpenAI streams them: each call's first piece has its id, type, name and empty arguments, then
    its arguments come a few characters at a time; the last chunk has only the finish reason."""
    chunks = [_chunk({"role": "assistant", "content": None, "refusal": None})]
    for index, call in enumerate(CALLS):
        head = {**call, "function": {"name": call["function"]["name"], "arguments": ""}}
        chunks.append(_chunk({"tool_calls": [{"index": index, **head}]}))
        arguments = call["function"]["arguments"]
        for start in range(0, len(arguments), 5):
            chunks.append(
                _chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments[start : start + 5]}}]})
            )
    return [*chunks, _chunk({}, Upstream.finish_for_calls)]


def text_chunks(text: str) -> list[dict]:
    words = text.split(" ")
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    return [_chunk({"role": "assistant", "content": ""}), *(_chunk({"content": p}) for p in pieces), _chunk({}, "stop")]


def completion_body(calls_tools: bool) -> dict:
    message = {"role": "assistant", "content": None, "refusal": None, "annotations": []}
    message.update(tool_calls=CALLS) if calls_tools else message.update(content=AFTER_RESULTS)
    body = {
        "id": "chatcmpl-upstream",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": Upstream.finish_for_calls if calls_tools else "stop",
            }
        ],
        "usage": {"prompt_tokens": 40, "completion_tokens": 30, "total_tokens": 70},
    }
    checked(ChatCompletion, body)
    return body


class Upstream(BaseHTTPRequestHandler):
    """POST /v1/chat/completions: with tools and no tool results yet, the two calls; else a text answer."""

    requests: list[dict] = []
    finish_for_calls = "tool_calls"  # what OpenAI says; some compatible servers say stop

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(body)
        calls_tools = bool(body.get("tools")) and body["messages"][-1]["role"] != "tool"
        if not body.get("stream"):
            data = json.dumps(completion_body(calls_tools)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the stream ends when the connection closes, as after [DONE]
        for chunk in call_chunks() if calls_tools else text_chunks(AFTER_RESULTS):
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):  # quiet test output
        pass


@pytest.fixture
def upstream(monkeypatch) -> Iterator[str]:
    """The fake OpenAI endpoint's base URL; `openai:` systems find it through OPENAI_BASE_URL."""
    Upstream.requests, Upstream.finish_for_calls = [], "tool_calls"
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_streamed_answer_ends_with_the_same_tool_calls_as_a_plain_one(upstream):
    system = HostedSystem(parse(f"openai:{MODEL}"), upstream)
    settings = Settings(tools=TOOLS)
    (plain,) = system.generate([ASK], settings)
    assert plain.tool_calls == CALLS and plain.finish_reason == "tool_calls" and plain.text == ""
    *pieces, final = system.stream(ASK, settings)
    assert isinstance(final, Answer) and all(isinstance(p, str) for p in pieces)
    assert final.tool_calls == plain.tool_calls and final.finish_reason == "tool_calls" and final.text == plain.text
    asked = [(r["stream"], r["tools"], r["tool_choice"]) for r in Upstream.requests]
    assert asked == [(False, TOOLS, "auto"), (True, TOOLS, "auto")]


def test_calls_from_a_server_that_says_stop_still_finish_with_tool_calls(upstream):
    Upstream.finish_for_calls = "stop"
    system = HostedSystem(parse(f"openai:{MODEL}"), upstream)
    (plain,) = system.generate([ASK], Settings(tools=TOOLS))
    *_, final = system.stream(ASK, Settings(tools=TOOLS))
    assert [(a.finish_reason, a.tool_calls) for a in (plain, final)] == [("tool_calls", CALLS)] * 2


def test_a_streamed_answer_without_calls_has_none(upstream):
    system = HostedSystem(parse(f"openai:{MODEL}"), upstream)
    *pieces, final = system.stream(ASK, Settings())
    assert "".join(pieces) == AFTER_RESULTS == final.text
    assert final.tool_calls is None and final.finish_reason == "stop"


def test_chat_with_a_hosted_system_asks_for_each_calls_result_and_sends_them_back(upstream, tmp_path):
    from tuneforge.chat import chat_loop

    experiment = Experiment(name="hosted")
    stdin = io.StringIO('Weather in Paris and Oslo?\n{"temp_c": 21}\n{"temp_c": 15}\n/exit\n')
    stdout = io.StringIO()
    run = RunDir(experiment, tmp_path / "run")
    assert chat_loop(experiment, run, f"openai:{MODEL}", stdin, stdout, system_prompt="", tools=TOOLS) == 0
    out = stdout.getvalue()
    assert '(tool call) get_weather({"city": "Paris"})' in out and AFTER_RESULTS in out
    first, second = Upstream.requests
    assert first["stream"] and second["messages"] == [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": CALLS},
        {"role": "tool", "tool_call_id": "call_paris", "content": '{"temp_c": 21}'},
        {"role": "tool", "tool_call_id": "call_oslo", "content": '{"temp_c": 15}'},
    ]


@contextlib.contextmanager
def serving(experiment: Experiment, run: RunDir) -> Iterator[openai.OpenAI]:
    """`serve`'s app on a free loopback port, in this process, serving `hosted` as openai:gpt-test; the official
    client pointed at it."""
    import uvicorn

    from tuneforge.serve.keys import DEFAULT_PROJECT
    from tuneforge.serve.server import Served, create_app

    served = Served(experiment, run, system_prompt="")
    served.register("hosted", f"openai:{MODEL}", DEFAULT_PROJECT)
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
        port = sock.getsockname()[1]
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_serve_streams_a_hosted_systems_tool_calls_to_the_openai_client(upstream, tmp_path):
    experiment = Experiment(name="hosted")
    with serving(experiment, RunDir(experiment, tmp_path / "run")) as client:
        stream = client.chat.completions.create(model="hosted", messages=ASK, tools=TOOLS, stream=True)
        chunks = [checked(ChatCompletionChunk, chunk.to_dict()) for chunk in stream]
    calls: dict[int, dict] = {}  # the client's side of the protocol: pieces joined by index
    for chunk in chunks:
        for piece in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(piece.index, {"id": "", "type": "", "function": {"name": "", "arguments": ""}})
            call["id"] += piece.id or ""
            call["type"] += piece.type or ""
            if piece.function is not None:
                call["function"]["name"] += piece.function.name or ""
                call["function"]["arguments"] += piece.function.arguments or ""
    assert [calls[i] for i in sorted(calls)] == CALLS
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"] and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # a call, not text
    (request,) = Upstream.requests
    assert request["stream"] and request["tools"] == TOOLS
