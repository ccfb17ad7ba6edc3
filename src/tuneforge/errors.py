"""The exceptions the CLI turns into a one-line cause and a non-zero exit code."""

from __future__ import annotations


class TuneforgeError(Exception):
    """A problem the user can fix (bad input, missing package, unsupported device)."""

    exit_code = 1


class ConfigError(TuneforgeError):
    """The experiment file (or an override) is invalid; every problem is listed at once."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun}\n" + "\n".join(f"  - {p}" for p in problems))
