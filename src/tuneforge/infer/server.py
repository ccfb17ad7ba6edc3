"""`tuneforge serve`: an OpenAI-compatible chat API over the run's systems.

    GET  /v1/models            base, finetuned (when the run has an adapter), +rag variants (with a rag section)
    POST /v1/chat/completions  stream or not (stream_options.include_usage); temperature, top_p, max_tokens, stop, seed
    /v1/files, /v1/fine_tuning/jobs...  OpenAI's fine-tuning API, trained locally (infer/finetune_api.py; the CLI
                                        hands its routes to `serve`, which knows routes only by path prefix)

Standard library HTTP (one thread per connection). Concurrent requests for one
model are batched together (infer/batcher.py), so they share its forward passes. Bad requests get OpenAI-shaped errors with 4xx
codes and the server keeps serving. Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from tuneforge.errors import TuneforgeError, describe_os_error
from tuneforge.infer.api_errors import ApiError
from tuneforge.infer.generation import Answer, Settings

MAX_BODY = 4 << 20  # bytes
MAX_WAITING = 32  # requests queued beyond this get 429
MAX_UPLOAD = 512 << 20  # bytes, for extra routes such as file uploads


class Served:
    """The run's systems as the API sees them: listed names, 404 for others, and a bounded queue."""

    def __init__(self, experiment, run, system_prompt: str | None = None, max_batch: int = 16):
        from tuneforge.systems import Systems

        self.systems = Systems(experiment, run, system_prompt=system_prompt, max_batch=max_batch)
        self.counter = threading.Lock()
        self.waiting = 0
        self.created = int(time.time())
        # extra routes (the fine-tuning API) registered by path prefix: handler(method, path, headers, body) -> (status, payload);
        # a dict payload is sent as JSON, bytes as they are
        self.routes: dict[str, Any] = {}

    @property
    def names(self) -> list[str]:
        return self.systems.available()

    def get(self, name: str):
        names = self.names
        if name not in names:
            raise ApiError(404, f"The model '{name}' does not exist; available: {', '.join(names)}", "model", "model_not_found")
        return self.systems.get(name)


def parse_request(body: dict[str, Any]) -> tuple[str, list[dict], Settings, bool | None]:
    """Validate a chat-completions body; raise ApiError naming the bad parameter.

    The last item is None for a plain answer, else (streaming) whether to end with a usage chunk."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter", "model", "missing_required_parameter")
    from tuneforge.data.validate import check_prompt, text_content

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", "messages")
    messages = text_content(messages)
    problems = [p for p in check_prompt(messages, "messages") if p.severity == "error"]
    if problems:  # the checks prepare applies to training data, so what trains is what is served
        raise ApiError(400, "; ".join(f"[{p.code}] {p.message}" for p in problems), "messages")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")

    def number(key: str, low: float, high: float, default: float) -> float:
        value = body.get(key)
        if value is None:
            return default
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise ApiError(400, f"'{key}' must be a number between {low} and {high}", key)
        return float(value)

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise ApiError(400, "'max_tokens' must be a positive integer", "max_tokens")
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or up to 4 strings", "stop")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ApiError(400, "'seed' must be an integer", "seed")
    tools, tool_choice = parse_tools(body, messages)
    settings = Settings(
        max_new_tokens=max_tokens or 256,
        temperature=number("temperature", 0.0, 2.0, 0.0),
        top_p=number("top_p", 0.0, 1.0, 1.0),
        seed=seed,
        stop=tuple(stop),
        tools=tools,
        tool_choice=tool_choice,
    )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise ApiError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise ApiError(400, "'stream_options' must be an object with a boolean 'include_usage'", "stream_options")
    return model, messages, settings, (bool((options or {}).get("include_usage")) if stream else None)


def parse_tools(body: dict[str, Any], messages: list[dict]) -> tuple[list | None, str | dict]:
    """`tools` and `tool_choice` checked as OpenAI checks them; tool calls and answers in the messages too."""
    from tuneforge.data.tools import check_tools

    tools = body.get("tools")
    record: dict[str, Any] = {"messages": messages}
    if tools is not None:
        record["tools"] = tools
    if "parallel_tool_calls" in body:
        record["parallel_tool_calls"] = body["parallel_tool_calls"]
    problems = [p for p in check_tools(record, "request") if p.code != "tool_call_unknown_function"]
    if problems:
        param = "tools" if problems[0].code in ("tools_invalid", "parallel_tool_calls_invalid") else "messages"
        raise ApiError(400, "; ".join(f"[{p.code}] {p.message}" for p in problems), param)
    if tools == []:
        raise ApiError(400, "'tools' must not be empty; leave it out instead", "tools")
    choice = body.get("tool_choice", "auto" if tools else "none")
    names = {t["function"]["name"] for t in tools or []}
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise ApiError(400, f"'tool_choice' names function {name!r}, which 'tools' does not list", "tool_choice")
    elif choice not in ("none", "auto", "required"):
        raise ApiError(400, "'tool_choice' must be none, auto, required, or {'type': 'function', 'function': {'name': ...}}", "tool_choice")
    elif choice != "none" and not tools:
        raise ApiError(400, f"'tool_choice' {choice!r} needs 'tools'", "tool_choice")
    return tools or None, choice


def message_of(answer: Answer) -> dict:
    """The assistant message of an answer: its text, or its tool calls."""
    message: dict[str, Any] = {"role": "assistant", "content": answer.text, "refusal": None}
    if answer.tool_calls:
        message.update(content=answer.text or None, tool_calls=answer.tool_calls)
    return message


def usage(answer: Answer) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens}


def sources(answer: Answer) -> dict:
    """+rag systems: what was retrieved, beside the answer (an extra field the OpenAI types keep)."""
    return {"sources": [h.to_json() for h in answer.sources]} if answer.sources else {}


def completion(model: str, answer: Answer) -> dict:
    return {**sources(answer),
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message_of(answer), "finish_reason": answer.finish_reason, "logprobs": None}],
        "usage": usage(answer),
    }


def make_handler(systems: Served):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "tuneforge"

        def _send(self, status: int, data: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _json(self, status: int, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _error(self, error: ApiError) -> None:
            self._json(error.status, error.body())

        def _route(self, method: str) -> bool:
            """Hand the request to a registered extra route; True when one took it."""
            for prefix, handler in systems.routes.items():
                if self.path.startswith(prefix):
                    try:
                        length = int(self.headers.get("Content-Length") or 0)
                        if length > MAX_UPLOAD:
                            raise ApiError(413, "request body too large")
                        status, payload = handler(method, self.path, self.headers, self.rfile.read(length) if length else b"")
                        if isinstance(payload, bytes):  # a file's content, sent as stored
                            self._send(status, payload, "application/octet-stream")
                        else:
                            self._json(status, payload)
                    except ApiError as error:
                        self._error(error)
                    except Exception as exc:  # keep serving whatever one request did
                        self._error(ApiError(500, f"internal error: {exc}", kind="server_error"))
                    return True
            return False

        def do_GET(self):
            if self._route("GET"):
                return
            if self.path.rstrip("/") == "/v1/models":
                data = [{"id": n, "object": "model", "created": systems.created, "owned_by": "tuneforge"} for n in systems.names]
                self._json(200, {"object": "list", "data": data})
            elif self.path.startswith("/v1/models/"):
                name = self.path.split("/v1/models/", 1)[1]
                if name in systems.names:
                    self._json(200, {"id": name, "object": "model", "created": systems.created, "owned_by": "tuneforge"})
                else:
                    self._error(ApiError(404, f"The model '{name}' does not exist", "model", "model_not_found"))
            else:
                self._error(ApiError(404, f"Unknown path {self.path}", code="not_found"))

        def do_DELETE(self):
            if not self._route("DELETE"):
                self._error(ApiError(404, f"Unknown path {self.path}", code="not_found"))

        def do_POST(self):
            if self._route("POST"):
                return
            try:
                if self.path.rstrip("/") != "/v1/chat/completions":
                    raise ApiError(404, f"Unknown path {self.path}", code="not_found")
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    raise ApiError(413, "request body too large")
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except json.JSONDecodeError as exc:
                    raise ApiError(400, f"We could not parse the JSON body of your request: {exc.msg}") from None
                model, messages, settings, include_usage = parse_request(body)
                system = systems.get(model)
                with systems.counter:
                    if systems.waiting >= MAX_WAITING:
                        raise ApiError(429, "too many requests are queued; retry shortly", code="rate_limit_exceeded", kind="rate_limit_error")
                    systems.waiting += 1
                try:
                    if include_usage is not None:
                        self._stream(system, model, messages, settings, include_usage)
                    else:
                        answer = system.generate([messages], settings)[0]
                        self._json(200, completion(model, answer))
                finally:
                    with systems.counter:
                        systems.waiting -= 1
            except ApiError as error:
                self._error(error)
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as exc:  # keep serving whatever one request did
                self._error(ApiError(500, f"internal error: {exc}", kind="server_error"))

        def _stream(self, system, model: str, messages: list[dict], settings: Settings, include_usage: bool) -> None:
            chunk_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

            def event(delta: dict | None, finish: str | None = None, **extra) -> bytes:
                choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
                payload = {**extra, "id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
                if include_usage and "usage" not in payload:
                    payload["usage"] = None  # as OpenAI: every chunk has the field, the last one the totals
                return f"data: {json.dumps(payload)}\n\n".encode()

            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self.wfile.write(event({"role": "assistant", "content": ""}))
            pieces = system.stream(messages, settings)
            try:
                for piece in pieces:
                    if isinstance(piece, Answer):
                        if settings.calls_tools:  # the text was held back: it may be a call, known only at the end
                            if piece.text:
                                self.wfile.write(event({"content": piece.text}))
                            for index, call in enumerate(piece.tool_calls or []):
                                self.wfile.write(event({"tool_calls": [{"index": index, **call}]}))
                        self.wfile.write(event({}, piece.finish_reason, **sources(piece)))
                        if include_usage:
                            self.wfile.write(event(None, usage=usage(piece)))
                    elif not settings.calls_tools:
                        self.wfile.write(event({"content": piece}))
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            finally:
                pieces.close()

    return Handler


def serve(experiment, run, host: str = "127.0.0.1", port: int = 8000, ready: threading.Event | None = None,
          system_prompt: str | None = None, max_batch: int = 16,
          routes: Callable[[Served], dict[str, Any]] | None = None) -> None:
    """Serve the run's systems until interrupted. routes: given the Served systems, the extra routes by path prefix
    (see Served.routes); `tuneforge serve` passes the fine-tuning API's (finetune_api.fine_tuning_routes)."""
    systems = Served(experiment, run, system_prompt, max_batch)
    if routes is not None:
        systems.routes.update(routes(systems))
    try:
        httpd = ThreadingHTTPServer((host, port), make_handler(systems))
    except OSError as exc:
        raise TuneforgeError(f"cannot listen on {host}:{port}: {describe_os_error(exc)}") from None
    httpd.daemon_threads = True
    print(f"serving {', '.join(systems.names)} at http://{host}:{httpd.server_address[1]}/v1 (OpenAI-compatible)", flush=True)
    default = systems.systems.system_prompt("base")
    if default:
        print(f"requests without a system message get the system prompt {default!r} (--system-prompt '' for none)", flush=True)
    if ready is not None:
        ready.set()
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
