"""The exceptions the CLI turns into a one-line cause and a non-zero exit code."""

from __future__ import annotations


class TuneforgeError(Exception):
    """A problem the user can fix (bad input, missing package, unsupported device)."""

    exit_code = 1


class UsageError(TuneforgeError):
    """The command line names something that is not there (an experiment file): exit 2, as for a bad file."""

    exit_code = 2


class ConfigError(TuneforgeError):
    """The experiment file (or an override) is invalid; every problem is listed at once."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun}\n" + "\n".join(f"  - {p}" for p in problems))


def describe_os_error(exc: OSError) -> str:
    """`[Errno 2] No such file or directory: 'x'` in a user's words (set TUNEFORGE_DEBUG=1 for the traceback)."""
    import errno

    where = f" {exc.filename}" if exc.filename else ""
    words = {
        errno.ENOENT: f"no such file or folder:{where}",
        errno.EACCES: f"permission denied:{where}",
        errno.EISDIR: f"{where.strip()} is a folder, not a file",
        errno.ENOSPC: f"no space left on the device{' for' + where if where else ''}",
        errno.EADDRINUSE: "the address is already in use (another server on that port?); pick another --port",
    }
    return words.get(exc.errno, f"{exc.strerror or exc}{':' + where if where else ''}")
