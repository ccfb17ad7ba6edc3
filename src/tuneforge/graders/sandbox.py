"""The python grader: `grade(sample, item)` from the grader's source, in a separate process with OpenAI's limits.

Each grade runs in a fresh `python -I` (no PYTHON* variables, no user site, no script folder on the path) in an
empty temporary folder, with these limits, OpenAI's for its python graders:
  - no network: in a network namespace of its own (`unshare --user --map-root-user --net`, where the kernel
    allows it), and in any case with socket creation refused inside the process before the grader's code runs;
  - time: RLIMIT_CPU for CPU seconds, and a wall clock after which the process group is killed;
  - memory: RLIMIT_AS (an allocation past it raises MemoryError);
  - disk: RLIMIT_FSIZE caps each file it writes (a write past it fails with EFBIG).
A grader that breaks a limit, raises, or returns no finite number scores 0 with the error counted; the caller is
never held past the wall clock. This bounds runaway graders; it is not a jail for hostile code (files outside
the folder stay readable, and the disk cap is per file).
"""

from __future__ import annotations

import ast
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache

from tuneforge.graders.errors import GraderError


@dataclass(frozen=True)
class Limits:
    """One grade's limits; the defaults are OpenAI's (its guide: 2 minutes, 2 GB memory, 1 GB disk, 256 kB)."""

    seconds: float = 120.0
    """Wall-clock seconds for one grade, start-up included; CPU seconds are capped at the same figure."""
    cpu_seconds: float | None = None
    """CPU seconds, when they should differ from `seconds` (None: the same)."""
    memory_bytes: int = 2 * 1024**3
    """Address space of the grading process."""
    disk_bytes: int = 1024**3
    """Largest file the grader may write."""
    source_bytes: int = 256 * 1024
    """Longest source accepted."""


# Runs in the child, before the grader's code: the limits set (RLIMIT_CPU's hard limit a second past the soft one,
# so SIGXCPU comes first), sockets refused, stdout kept for the result and the grader's own
# prints sent to stderr (dropped), then one JSON line back: {"score": x} or {"error": kind, "message": text}.
RUNNER = r"""
import json, math, os, resource, socket, sys, traceback, _socket
request = json.loads(sys.stdin.read())
for name, value in request["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value + (name == "RLIMIT_CPU")))
class _NoNetwork(_socket.socket):
    def __init__(self, *args, **kwargs):
        raise PermissionError("network access is disabled in python graders")
def _refuse(*args, **kwargs):
    raise PermissionError("network access is disabled in python graders")
_socket.socket = socket.socket = socket.SocketType = _NoNetwork
socket.create_connection = socket.socketpair = socket.fromfd = socket.getaddrinfo = _refuse
out = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
try:
    space = {"__name__": "grader"}
    exec(compile(request["source"], "<grader>", "exec"), space)
    score = float(space["grade"](request["sample"], request["item"]))
    reply = {"score": score} if math.isfinite(score) else {"message": f"grade returned {score}"}
except BaseException as exc:
    lines = traceback.format_exception_only(type(exc), exc)
    reply = {"message": "".join(lines).strip()[-2000:]}
out.write(json.dumps(reply))
out.flush()
"""


@cache
def network_namespace() -> tuple[str, ...]:
    """The command prefix that gives the grader a network namespace of its own, or () where the kernel refuses."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    command = (unshare, "--user", "--map-root-user", "--net")
    try:
        ok = subprocess.run([*command, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return command if ok else ()


def _rlimits(limits: Limits) -> dict[str, int]:
    return {
        "RLIMIT_CPU": math.ceil(limits.seconds if limits.cpu_seconds is None else limits.cpu_seconds),
        "RLIMIT_AS": limits.memory_bytes,
        "RLIMIT_FSIZE": limits.disk_bytes,
        "RLIMIT_CORE": 0,
    }


def check_source(source: str, limits: Limits = Limits()) -> list[str]:
    """Problems with a grader's source found without running it: too long, not Python, no grade function."""
    if len(source.encode()) > limits.source_bytes:
        return [f"source: {len(source.encode())} bytes, over the {limits.source_bytes} a python grader may have"]
    try:
        tree = ast.parse(source, "<grader>")
    except (SyntaxError, ValueError, RecursionError) as exc:
        return [f"source: not Python ({exc})"]
    if not any(getattr(node, "name", None) == "grade" for node in tree.body):
        return ["source: defines no grade(sample, item) function"]
    return []


def run_python(source: str, sample: dict, item, limits: Limits = Limits()) -> float:
    """The score `grade(sample, item)` returns, run under `limits`; GraderError when it gives none."""
    problems = check_source(source, limits)
    if problems:
        raise GraderError("python_grader_runtime_error", problems[0])
    request = json.dumps({"source": source, "sample": sample, "item": item, "limits": _rlimits(limits)})
    env = {"PATH": os.defpath, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="tuneforge-grader-") as folder:
        process = subprocess.Popen(
            [*network_namespace(), sys.executable, "-I", "-c", RUNNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=folder,
            env=env,
            start_new_session=True,  # its own process group, so a kill takes anything it started too
        )
        try:
            out, _ = process.communicate(request.encode(), timeout=limits.seconds)
        except subprocess.TimeoutExpired:
            _kill(process)
            raise GraderError(
                "unresponsive_reward_error", f"the python grader ran past {limits.seconds:g} s and was stopped"
            ) from None
        finally:
            _kill(process)
    return _score(out, process.returncode)


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _score(out: bytes, returncode: int) -> float:
    try:
        reply = json.loads(out)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        if returncode == -signal.SIGXCPU:  # the CPU limit was reached before the wall clock
            raise GraderError("unresponsive_reward_error", "the python grader used up its CPU time and was stopped")
        cause = f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
        raise GraderError("python_grader_server_error", f"the python grader stopped without a score: {cause}")
    if "score" not in reply:
        raise GraderError("python_grader_runtime_error", str(reply.get("message")))
    return float(reply["score"])
