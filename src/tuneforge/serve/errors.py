"""The OpenAI-shaped error of the HTTP API: a status code and the body clients parse.

Its own module so the server, the fine-tuning routes and their request parsing
(wire) raise the same error without importing one another.
"""

from __future__ import annotations

import re

# an absolute path (POSIX or Windows) of at least one folder and a name; the name is kept
_PATH = re.compile(r"(?<![\w:/.~-])(?:[A-Za-z]:)?[\\/](?:[^\s'\"\\/:,;()\[\]]+[\\/])+([^\s'\"\\/:,;()\[\]]*)")


def without_paths(text: str) -> str:
    """`text` with every absolute path cut to its last part ("…/adapter_config.json"): an error a client reads
    never says where the server keeps its files."""
    return _PATH.sub(lambda m: f"…/{m.group(1)}", text)


def readable(exc: BaseException) -> str:
    """An unexpected exception in words a client may read: its kind and message, without the server's paths."""
    if isinstance(exc, OSError):
        from tuneforge.errors import describe_os_error

        return without_paths(describe_os_error(exc))
    if isinstance(exc, RecursionError):
        return "nested too deeply to read"
    return without_paths(f"{type(exc).__name__}: {exc}")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after = retry_after  # seconds, for a 429: the Retry-After header

    @property
    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
