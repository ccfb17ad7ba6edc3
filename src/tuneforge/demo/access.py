"""Who may reach the demo page and what it may serve, decided before Gradio starts.

Defaults are the safe ones: loopback only, no share link, no files beyond Gradio's own
(kept inside the run directory), a bounded queue. A page beyond loopback, or behind a
share link, answers whoever reaches it, so it is refused unless a user and password
are set. The page answers only the Host names it is bound to (origins.py), and there
a visitor picks among the systems the run and the experiment list, never a typed
adapter: folder or openai: model (which would load any folder, or spend the operator's key).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tuneforge.errors import TuneforgeError
from tuneforge.origins import HostGuard, HostPolicy

if TYPE_CHECKING:
    from tuneforge.config import DemoSection
    from tuneforge.run import RunDir

# Gradio reads these when it is imported or launched; none of them may reach the network.
QUIET_GRADIO = {
    "GRADIO_ANALYTICS_ENABLED": "False",  # no usage reports, no version check at start
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_MCP_SERVER": "False",
}


@dataclass
class Access:
    host: str
    port: int
    share: bool
    auth: tuple[str, str] | None
    cache: Path  # Gradio's upload and example caches: the only files the page serves
    blocked: list[str] = field(default_factory=list)
    allowed_hosts: tuple[str, ...] = ()  # Host names besides the loopback ones and `host` (demo --allowed-host)

    @property
    def hosts(self) -> HostPolicy:
        """A share link's Host is the tunnel's name, and its login guards it."""
        return HostPolicy.bound_to(self.host, ("*",) if self.share else self.allowed_hosts)

    @property
    def typed_systems(self) -> bool:
        """Whether a visitor may type any system name (adapter:<folder>, openai:<model>): on loopback only."""
        return is_loopback(self.host) and not self.share

    def launch_kwargs(self) -> dict:
        from starlette.middleware import Middleware

        return dict(
            app_kwargs={"middleware": [Middleware(HostGuard, policy=self.hosts)]},
            server_name=self.host,
            server_port=self.port,
            share=self.share,
            auth=self.auth,
            allowed_paths=[],
            blocked_paths=self.blocked,
            ssr_mode=False,  # server-side rendering would start a Node process
            mcp_server=False,
            enable_monitoring=False,
            run_history=False,  # nothing about past chats is kept in the browser
            footer_links=[],
            show_error=True,  # a TuneforgeError (no adapter yet, unknown system) shows on the page
            quiet=True,
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_auth(value: str, variable: str) -> tuple[str, str]:
    user, colon, password = value.partition(":")
    if not colon or not user.strip() or not password:
        raise TuneforgeError(f"{variable} must be user:password (both non-empty)")
    return user.strip(), password


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def decide(
    demo: DemoSection,
    run: RunDir,
    host: str | None = None,
    port: int | None = None,
    share: bool = False,
    environ: Mapping[str, str] | None = None,
    allowed_hosts: tuple[str, ...] = (),
) -> Access:
    """The launch settings for the experiment's demo section; refuses a share link or a host beyond loopback
    without auth."""
    environ = os.environ if environ is None else environ
    raw = environ.get(demo.auth_env, "")
    auth = parse_auth(raw, demo.auth_env) if raw else None
    share = bool(share or demo.share)
    if share and auth is None:
        raise TuneforgeError(
            f"a share link puts the page on the internet; set {demo.auth_env}=user:password first "
            "(demo.auth_env names the variable)"
        )
    host = host or demo.host
    if not is_loopback(host) and auth is None:
        raise TuneforgeError(
            f"refusing to serve the page on {host} without a login: anyone who reaches it could chat, vote and add "
            f"training data; set {demo.auth_env}=user:password (demo.auth_env names the variable), or bind 127.0.0.1"
        )
    cache = run.sub("demo").resolve()
    blocked = [str(p.resolve()) for p in sorted(run.path.iterdir()) if p.name != "demo"] if run.path.is_dir() else []
    return Access(host, port or demo.port, share, auth, cache, blocked, tuple(allowed_hosts))


def quiet_gradio(access: Access) -> None:
    """Point Gradio's caches into the run directory and switch off everything that phones home."""
    os.environ.update(QUIET_GRADIO)
    os.environ["GRADIO_TEMP_DIR"] = str(access.cache / "uploads")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(access.cache / "examples")
