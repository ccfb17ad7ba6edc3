"""Start a tuneforge process (serve, demo) on a free loopback port for an e2e test, and stop it after."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(
    args: list[str], workdir: Path, ready: Callable[[], bool], timeout: float = 300, env: dict | None = None
) -> Iterator[subprocess.Popen]:
    """`python -m tuneforge *args` in workdir until `ready()` is true; its output goes to workdir/process.log.

    A log file rather than a pipe: nobody reads a pipe while the test runs, and once
    it is full (an access log is enough) the process blocks on its next write.
    """
    log_path = workdir / "process.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuneforge", *args],
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=env if env is not None else os.environ.copy(),
        )
        try:
            deadline = time.time() + timeout
            while not ready():
                assert proc.poll() is None, f"tuneforge {args[0]} exited:\n{log_path.read_text()[-3000:]}"
                assert time.time() < deadline, (
                    f"tuneforge {args[0]} did not come up in {timeout} s:\n{log_path.read_text()[-3000:]}"
                )
                time.sleep(0.5)
            yield proc
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def answers_models(client) -> Callable[[], bool]:
    """Ready once an OpenAI-compatible server lists its models to the official client."""
    import openai

    def ready() -> bool:
        try:
            client.models.list()
            return True
        except openai.APIConnectionError:
            return False

    return ready
