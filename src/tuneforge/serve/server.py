"""`tuneforge serve`: an OpenAI-compatible HTTP API over the run's systems, on FastAPI and uvicorn.

    GET  /v1/models            base, finetuned (when the run has an adapter), +rag variants (with a rag section),
                               and the caller's own fine-tuned `ft:` models
    POST /v1/chat/completions  stream or not (stream_options.include_usage); temperature, top_p, max_tokens, stop,
                               seed, tools and tool_choice (the body and its shapes: serve/chat_wire.py)
    /v1/files, /v1/fine_tuning/jobs...  OpenAI's fine-tuning API, trained locally (serve/finetuning.py; the CLI
                                        hands its router to `serve`)

Bodies are validated by request models into OpenAI-shaped 400s naming the
parameter; unknown paths, wrong methods, oversized bodies (413), a full queue
(429 with Retry-After) and server faults (500, no server paths) are OpenAI-shaped too.
Concurrent requests for one model are batched together (engine/batcher.py), so they
share its forward passes; every request is bounded (serve/bounds.py: the context, the
token cap, the time limit), and an answer whose client goes away stops generating.
Only the Host names the server is bound to are answered, and no state-changing request
from another site's page (origins.py). Binds 127.0.0.1 unless told otherwise, and beyond
loopback only with API keys (serve/keys.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import StreamingResponse

from tuneforge.engine.generation import Answer
from tuneforge.errors import TuneforgeError, describe_os_error
from tuneforge.origins import HostGuard, HostPolicy
from tuneforge.serve.bounds import Limits, answers_within, choices_within, fit
from tuneforge.serve.chat_wire import (
    Chat,
    ChatRequest,
    check_honoured,
    completion,
    logprobs_of,
    parse_request,
    sources,
    usage,
)
from tuneforge.serve.errors import ApiError, readable
from tuneforge.serve.keys import DEFAULT_PROJECT, ApiKeys, check_binding, project_of

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.run import RunDir

MAX_BODY = 4 << 20  # bytes of a JSON request
MAX_WAITING = 32  # chat requests queued beyond this get 429
RETRY_AFTER_S = 1  # a refused request may try again this soon: one batch frees up to --max-batch places
MAX_UPLOAD = 512 << 20  # bytes of a file upload (serve --max-upload-mb)
UPLOAD_PATHS = ("/v1/files",)


class Served:
    """The run's systems as the API sees them: listed names, 404 for others, each `ft:` model only to its project,
    and a bounded queue."""

    def __init__(
        self,
        experiment: Experiment,
        run: RunDir,
        system_prompt: str | None = None,
        max_batch: int = 16,
        limits: Limits | None = None,
    ):
        from tuneforge.systems import Systems

        self.systems = Systems(experiment, run, system_prompt=system_prompt, max_batch=max_batch)
        self.counter = threading.Lock()
        self.waiting = 0
        self.created = int(time.time())
        self.owners: dict[str, str] = {}  # alias -> the project that may use it
        self.limits = limits or Limits()  # what one request may ask: tokens, seconds

    def register(self, name: str, system: str, project: str) -> None:
        """Serve `system` (e.g. adapter:<dir>) under `name` to `project` alone."""
        with self.counter:
            self.systems.aliases[name] = system
            self.owners[name] = project

    def names(self, project: str = DEFAULT_PROJECT) -> list[str]:
        return [n for n in self.systems.available() if self.owners.get(n, project) == project]

    def get(self, name: str, project: str = DEFAULT_PROJECT):
        names = self.names(project)
        if name not in names:
            raise ApiError(
                404, f"The model '{name}' does not exist or you do not have access to it.", "model", "model_not_found"
            )
        return self.systems.get(name)

    def enter(self, places: int = 1) -> None:
        """Take `places` in the queue (a request's choices), or refuse with a 429 that says when to retry."""
        with self.counter:
            if self.waiting + places > MAX_WAITING:
                raise ApiError(
                    429,
                    "too many requests are queued; retry shortly",
                    code="rate_limit_exceeded",
                    kind="rate_limit_error",
                    retry_after=RETRY_AFTER_S,
                )
            self.waiting += places

    def leave(self, places: int = 1) -> None:
        with self.counter:
            self.waiting -= places


# --------------------------------------------------------------------------- the app


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body past its limit (uploads: max_upload, else MAX_BODY) gets a 413, whether the
    client announced its length or streams it; nothing past the limit is read."""

    def __init__(self, app, max_upload: int):
        self.app, self.max_upload = app, max_upload

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_upload if scope["path"].rstrip("/") in UPLOAD_PATHS else MAX_BODY
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        started, received = False, 0
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_json(send, 413, ApiError(413, _too_large(limit), code="request_too_large").body())

        if declared is None and limit == MAX_BODY:  # a small body of unannounced length: read it here, then hand it on
            chunks, more = [], True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                received += len(message.get("body", b""))
                if received > limit:
                    return await _send_json(
                        send, 413, ApiError(413, _too_large(limit), code="request_too_large").body()
                    )
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            body, replayed = b"".join(chunks), False

            async def replay():
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            return await self.app(scope, replay, send)

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _TooLarge
            return message

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, ApiError(413, _too_large(limit), code="request_too_large").body())


def _too_large(limit: int) -> str:
    return f"The request body is larger than this server accepts ({limit / 2**20:.0f} MiB)."


async def _send_json(send, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


def _validation_error(exc) -> ApiError:
    """A request model's complaint as OpenAI words it: the first parameter at fault, by its dotted path, with what
    each accepted form wanted (a union reports one complaint per form)."""
    found: dict[str | None, list[str]] = {}
    kinds: dict[str | None, str] = {}
    for error in exc.errors():
        # a union's branch names (e.g. 'literal['auto']', 'constrained-int') are not parameters
        loc = [str(p) for p in error.get("loc", ()) if p != "body" and not any(c in str(p) for c in "[]()-")]
        param = ".".join(loc) or None
        found.setdefault(param, [])
        if error.get("msg") not in found[param]:
            found[param].append(error.get("msg"))
        kinds.setdefault(param, error.get("type", ""))
    if not found:
        return ApiError(400, "invalid request")
    param = next(iter(found))
    if kinds[param] == "json_invalid":
        return ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly.)",
        )
    if kinds[param] == "missing" and param:
        return ApiError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if kinds[param] == "extra_forbidden" and param:
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    said = "; or ".join(found[param])
    if param is None:
        return ApiError(400, f"The request body must be a JSON object ({said}).")
    return ApiError(400, f"Invalid value for '{param}': {said}.", param, "invalid_value")


def create_app(
    served: Served,
    keys: ApiKeys | None = None,
    routers: list | None = None,
    max_upload: int = MAX_UPLOAD,
    hosts: HostPolicy | None = None,
):
    """The FastAPI app: models and chat completions, plus `routers` (the fine-tuning API's). It answers the Host
    names of `hosts` only (the loopback ones by default) and no state-changing request from another site's page."""
    from fastapi import Depends, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="tuneforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.keys = keys or ApiKeys()
    app.state.served = served
    app.router.redirect_slashes = False  # a redirect would be built from the request's Host
    app.add_middleware(BodyLimit, max_upload=max_upload)
    app.add_middleware(HostGuard, policy=hosts or HostPolicy())  # outermost: before anything reads the body

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        error = _validation_error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        if exc.status_code == 404:
            error = ApiError(404, f"Unknown request URL: {request.method} {request.url.path}.", code="unknown_url")
        elif exc.status_code == 405:
            error = ApiError(
                405, f"Method {request.method} is not allowed on {request.url.path}.", code="method_not_allowed"
            )
        else:
            error = ApiError(exc.status_code, str(exc.detail))
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(Exception)
    async def fault(request, exc: Exception):  # keep serving whatever one request did
        error = ApiError(500, f"internal error: {readable(exc)}", kind="server_error")  # no server paths
        return JSONResponse(error.body(), status_code=500)

    def model_object(name: str) -> dict:
        return {"id": name, "object": "model", "created": served.created, "owned_by": "tuneforge"}

    @app.get("/v1/models")
    def list_models(project: str = Depends(project_of)):
        return {"object": "list", "data": [model_object(n) for n in served.names(project)]}

    @app.get("/v1/models/{name:path}")
    def get_model(name: str, project: str = Depends(project_of)):
        if name not in served.names(project):
            raise ApiError(
                404, f"The model '{name}' does not exist or you do not have access to it.", "model", "model_not_found"
            )
        return model_object(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request, project: str = Depends(project_of)):
        chat = parse_request(body, served.limits)
        system = await run_in_threadpool(served.get, chat.model, project)  # a model's first load takes a while
        await run_in_threadpool(check_honoured, chat.model, chat.settings, system)  # a grammar compiles once
        chat.settings, prompt_tokens = await run_in_threadpool(
            fit, system, chat.messages, chat.settings, chat.asked, served.limits
        )
        served.enter(chat.n)  # a full queue: a 429 with Retry-After now, for a stream too, before any chunk
        if chat.stream:
            events = _events(served, system, chat, request, prompt_tokens)
            release = functools.partial(served.leave, chat.n)
            return _Stream(events, release, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            answers = await answers_within(system, chat.messages, chat.choices(), request, served.limits, prompt_tokens)
        finally:
            served.leave(chat.n)
        if answers is None:  # the client went away; its rows ended at the next token
            return Response(status_code=499)
        return completion(chat.model, answers)

    for router in routers or []:
        app.include_router(router)
    return app


class _Stream(StreamingResponse):
    """A streamed response that gives its place in the queue back when it ends, however it ends (also when the
    client left before the first chunk, and the generator never ran)."""

    def __init__(self, events, release: Callable[[], None], **kwargs):
        super().__init__(events, **kwargs)
        self.release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


async def _events(served: Served, system, chat: Chat, request, prompt_tokens: int = 0):
    """Server-sent chunks of a streamed answer (each choice's, by index); a client that goes away ends its rows in
    the batch."""
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    model, include_usage, calls_tools = chat.model, chat.include_usage, chat.settings.calls_tools

    def event(delta: dict | None, finish: str | None = None, index: int = 0, logprobs=None, **extra) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs_of(logprobs)}
        choices = [] if delta is None else [choice]
        payload = {
            **extra,
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
        }
        if include_usage and "usage" not in payload:
            payload["usage"] = None  # as OpenAI: every chunk has the field, the last one the totals
        return f"data: {json.dumps(payload)}\n\n"

    for index in range(chat.n):
        yield event({"role": "assistant", "content": ""}, index=index)
    answers: dict[int, Answer] = {}
    choices = choices_within(system, chat.messages, chat.choices(), request, served.limits, prompt_tokens)
    async with contextlib.aclosing(choices) as pieces:
        async for index, piece in pieces:
            if not isinstance(piece, Answer):
                if not calls_tools:  # with tools the text is held back: it may be a call, known only at the end
                    yield event({"content": str(piece)}, index=index, logprobs=getattr(piece, "logprobs", None))
                continue
            if calls_tools:
                if piece.text:
                    yield event({"content": piece.text}, index=index)
                for number, call in enumerate(piece.tool_calls or []):
                    yield event({"tool_calls": [{"index": number, **call}]}, index=index)
            yield event({}, piece.finish_reason, index, **sources(piece))
            answers[index] = piece
    if len(answers) == chat.n:
        if include_usage:
            yield event(None, usage=usage([answers[i] for i in range(chat.n)]))
        yield "data: [DONE]\n\n"


def serve(
    experiment: Experiment,
    run: RunDir,
    host: str = "127.0.0.1",
    port: int = 8000,
    ready: threading.Event | None = None,
    system_prompt: str | None = None,
    max_batch: int = 16,
    routers: Callable[[Served], list] | None = None,
    keys: ApiKeys | None = None,
    max_upload: int = MAX_UPLOAD,
    allowed_hosts: tuple[str, ...] = (),
    limits: Limits | None = None,
) -> None:
    """Serve the run's systems until interrupted. routers: given the Served systems, more FastAPI routers
    (`tuneforge serve` passes the fine-tuning API's, finetuning.fine_tuning_router)."""
    import anyio.to_thread
    import uvicorn

    keys = keys or ApiKeys()
    check_binding(host, keys)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise TuneforgeError(f"cannot listen on {host}:{port}: {describe_os_error(exc)}") from None
    sock.set_inheritable(True)
    bound = sock.getsockname()[1]
    # the port first: a busy port is refused before anything is loaded or written (the platform's state folder)
    served = Served(experiment, run, system_prompt, max_batch, limits)
    hosts = HostPolicy.bound_to(host, allowed_hosts)
    app = create_app(served, keys, routers(served) if routers is not None else None, max_upload, hosts)
    print(f"serving {', '.join(served.names())} at http://{host}:{bound}/v1 (OpenAI-compatible)", flush=True)
    if keys.required:
        print(f"API keys required (projects: {', '.join(keys.projects)})", flush=True)
    default = served.systems.system_prompt("base")
    if default:
        print(
            f"requests without a system message get the system prompt {default!r} (--system-prompt '' for none)",
            flush=True,
        )

    config = uvicorn.Config(
        app, log_level="warning", access_log=False, timeout_keep_alive=30, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)

    async def main():
        anyio.to_thread.current_default_thread_limiter().total_tokens = (
            2 * MAX_WAITING + 40
        )  # blocked streams + the rest
        if ready is not None:

            async def announce():
                while not server.started:
                    await asyncio.sleep(0.05)
                ready.set()

            asyncio.get_running_loop().create_task(announce())
        await server.serve(sockets=[sock])

    asyncio.run(main())
