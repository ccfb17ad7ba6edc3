"""Which Host names and browser origins a local server answers: the guard `serve` and `demo` both put in front.

A web page its user visits can make the browser talk to a server on 127.0.0.1 in two ways: through a name of its
own that it re-points at 127.0.0.1 (DNS rebinding; the request then carries the page's name as its Host), or by
submitting a form across sites (the request carries the page's Origin, or Sec-Fetch-Site: cross-site). So a
request whose Host is not a name the server is reached by gets 400, and a request that changes state (anything but
GET, HEAD, OPTIONS; and every WebSocket) sent by a browser from another origin gets 403.

The names: the loopback ones, the bound host, and the operator's (`--allowed-host`; `*` for any, behind a proxy
that checks them itself). A server bound to every interface (0.0.0.0, ::) is also reached by any IP address of the
machine, so there a literal IP is allowed: rebinding needs a name, never an address.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
EVERY_INTERFACE = frozenset({"0.0.0.0", "::", ""})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def host_name(value: str) -> str | None:
    """The name of a Host header or an origin's host part ("example.com:80", "[::1]:8000"), lower case; None when
    it is not one."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return None
        return name
    name, colon, port = value.partition(":")
    if (colon and not port.isdigit()) or not name or any(c in name for c in "/@\\ \t[]"):
        return None
    return name.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostPolicy:
    """The Host names a server answers to."""

    names: frozenset[str] = LOOPBACK_NAMES
    any_ip: bool = False  # bound to every interface: any of the machine's addresses reaches it
    any_host: bool = False  # `--allowed-host '*'`: a proxy in front checks the names
    extra: frozenset[str] = frozenset()  # the operator's names: also the origins a browser may post from

    @classmethod
    def bound_to(cls, host: str, allowed: Iterable[str] = ()) -> HostPolicy:
        bound = host.strip("[]").lower()
        extra = frozenset(n.strip("[]").lower().rstrip(".") for n in allowed if n.strip() and n.strip() != "*")
        names = LOOPBACK_NAMES | extra | ({bound} - EVERY_INTERFACE)
        return cls(names, bound in EVERY_INTERFACE, any(n.strip() == "*" for n in allowed), extra)

    def allows(self, name: str | None) -> bool:
        if name is None:
            return False
        return self.any_host or name in self.names or (self.any_ip and _is_ip(name))

    def cross_site(self, headers: dict[bytes, bytes], host: str) -> bool:
        """Whether a browser sent this request from a page of another origin than the one it is addressed to."""
        origin = headers.get(b"origin")
        if origin is None:
            return headers.get(b"sec-fetch-site", b"").lower() == b"cross-site"
        netloc = urlsplit(origin.decode("latin-1").strip()).netloc.lower()
        if not netloc:
            return True  # "null": a sandboxed frame, a file, a redirect across sites
        return netloc != host.strip().lower() and host_name(netloc) not in self.extra


class HostGuard:
    """ASGI middleware: a Host this server is not reached by gets 400; a state-changing request from another
    origin gets 403; both with an OpenAI-shaped JSON error."""

    def __init__(self, app, policy: HostPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.policy.allows(host_name(host)):
            return await _refuse(scope, send, 400, "invalid_host", "The Host header names no host this server answers.")
        changes = scope["type"] == "websocket" or scope["method"] not in SAFE_METHODS
        if changes and self.policy.cross_site(headers, host):
            return await _refuse(
                scope, send, 403, "cross_origin", "Requests from another site's page may not change this server."
            )
        return await self.app(scope, receive, send)


async def _refuse(scope, send, status: int, code: str, message: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
