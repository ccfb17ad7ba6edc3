"""Functions a reader can hold in one screen: none in the package runs past 80 lines, except the HTTP route
tables, which are flat lists of small handlers."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "tuneforge"
LONGEST = 80
ROUTE_TABLES = {("serve/server.py", "create_app"), ("serve/finetuning.py", "router")}


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def _too_long() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        found += [
            f"{where}:{line} {name} ({length} lines)"
            for name, line, length in _functions(path)
            if length > LONGEST and (where, name) not in ROUTE_TABLES
        ]
    return found


def test_no_function_runs_past_80_lines():
    assert _too_long() == []


def test_the_length_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LONGEST))
    path = tmp_path / "long.py"
    path.write_text(f"def long():\n{body}\n", encoding="utf-8")
    assert [(name, length) for name, _, length in _functions(path)] == [("long", LONGEST + 1)]
