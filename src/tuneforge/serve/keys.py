"""API keys for `tuneforge serve`: where they come from, and which project a request's key belongs to.

Keys come from the environment (`TUNEFORGE_API_KEYS`, entries separated by commas
or whitespace) or from a keys file (`--api-keys FILE` or `TUNEFORGE_API_KEYS_FILE`,
one entry a line; `#` starts a comment at the start of a line or after a space). An
entry is `KEY` (project `default`) or `PROJECT:KEY`; a key holds no `:` and, in a file, no
`#`, and an entry that breaks either rule is refused naming its line rather than read as
something else (a truncated key, or a key's first part taken for a project). Keys never
come from the experiment file, and this module never prints one: errors name the entry's
place (variable, or file and line), not its text.

A request's bearer token is hashed and compared with every configured key's hash
in constant time, without stopping at the first match, so the time a check takes
says nothing about how close a guess was.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

from tuneforge.errors import TuneforgeError
from tuneforge.serve.errors import ApiError

ENV_KEYS = "TUNEFORGE_API_KEYS"
ENV_FILE = "TUNEFORGE_API_KEYS_FILE"
MIN_KEY_LENGTH = 16
PROJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_PROJECT = "default"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class ApiKeys:
    """The configured keys, as (sha256 of the key, project) pairs; empty means no authentication (loopback only)."""

    entries: tuple[tuple[bytes, str], ...] = ()

    @property
    def required(self) -> bool:
        return bool(self.entries)

    @property
    def projects(self) -> list[str]:
        return sorted({project for _, project in self.entries})

    def project_of(self, token: str | None) -> str | None:
        """The project whose key `token` is, or None; every entry is compared, so the time taken is the same."""
        if token is None:
            return None
        given = digest(token)
        found = None
        for hashed, project in self.entries:
            if hmac.compare_digest(given, hashed) and found is None:
                found = project
        return found


def _entry(text: str, where: str) -> tuple[bytes, str]:
    project, sep, key = text.partition(":")
    if not sep:
        project, key = DEFAULT_PROJECT, text
    if ":" in key or (sep and (project.startswith("sk-") or len(project) >= MIN_KEY_LENGTH)):
        raise TuneforgeError(
            f"{where}: an entry is KEY or PROJECT:KEY and a key holds no ':'; this one has a ':' inside its key "
            "(or the part before ':' is a key, not a project name)"
        )
    if not PROJECT.match(project):
        raise TuneforgeError(
            f"{where}: the project name before ':' must be letters, digits, '_', '.' or '-' (at most 64)"
        )
    if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
        raise TuneforgeError(
            f"{where}: an API key must be at least {MIN_KEY_LENGTH} characters without spaces "
            "(for example: python -c \"import secrets; print('sk-' + secrets.token_urlsafe(32))\")"
        )
    return digest(key), project


def load_keys(path: str | Path | None = None, environ: dict[str, str] | None = None) -> ApiKeys:
    """The keys of the environment variable and of the keys file (the argument, else the file variable), together."""
    env = os.environ if environ is None else environ
    entries: list[tuple[bytes, str]] = []
    for n, text in enumerate(re.split(r"[,\s]+", env.get(ENV_KEYS, "").strip()), start=1):
        if text:
            entries.append(_entry(text, f"{ENV_KEYS} entry {n}"))
    path = path or env.get(ENV_FILE) or None
    if path is not None:
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise TuneforgeError(f"API keys file {path}: {exc.strerror or exc}") from None
        if os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            print(f"warning: {path} can be read by other users of this machine; chmod 600 {path}", flush=True)
        for n, line in enumerate(lines, start=1):
            line = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip()
            if "#" in line:
                raise TuneforgeError(
                    f"{path} line {n}: a '#' inside a key (a comment starts at the line's start or after a space); "
                    "keys hold no '#'"
                )
            if line:
                entries.append(_entry(line, f"{path} line {n}"))
    seen: dict[bytes, str] = {}
    for hashed, project in entries:
        if seen.setdefault(hashed, project) != project:
            raise TuneforgeError("the same API key is configured for two projects; give each project its own key")
    return ApiKeys(tuple(dict.fromkeys(entries)))


def check_binding(host: str, keys: ApiKeys) -> None:
    """Beyond loopback, a server must ask for keys: anyone who reaches the port could otherwise train and read files."""
    if host not in LOOPBACK and not keys.required:
        raise TuneforgeError(
            f"refusing to serve on {host} without API keys: set {ENV_KEYS} (entries KEY or PROJECT:KEY) "
            f"or pass --api-keys FILE, or bind 127.0.0.1"
        )


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def project_of(request: Request) -> str:
    """The project of the request's API key (a FastAPI dependency); 401 in OpenAI's shape without a valid one.
    A server without keys (loopback only) has one project, `default`."""
    keys: ApiKeys = request.app.state.keys
    if not keys.required:
        return DEFAULT_PROJECT
    token = bearer(request.headers.get("authorization"))
    if token is None:
        raise ApiError(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )
    project = keys.project_of(token)
    if project is None:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    return project
