"""The package reads downward: no import cycle between tuneforge modules, no layer importing one above it,
and the modules a config or data step needs come without torch.

Every `import tuneforge...` and `from tuneforge... import` counts, at module level or inside a function
(a lazy import is still a dependency; it only moves the failure to the first call).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "tuneforge"

# bottom to top, one directory (or top-level module) per layer; a module may import its own layer or lower ones,
# never a higher one. A directory is never split across layers: every tuneforge.<dir>.* module has its directory's rank.
VERBS = (
    "tuneforge.chat",
    "tuneforge.merge",
    "tuneforge.generate",
    "tuneforge.compare",
    "tuneforge.serve",
    "tuneforge.demo",
)
LAYERS: list[tuple[str, ...]] = [
    (
        "tuneforge",
        "tuneforge.errors",
        "tuneforge.atomic",
        "tuneforge.home",
        "tuneforge.config_errors",
        "tuneforge.config",
        "tuneforge.explain",
        "tuneforge.run",
        "tuneforge.hosted",
        "tuneforge.origins",  # the Host and Origin guard serve and demo both use
    ),
    ("tuneforge.data",),
    ("tuneforge.feedback",),
    ("tuneforge.models",),
    ("tuneforge.rag",),
    ("tuneforge.engine",),
    ("tuneforge.systems",),
    ("tuneforge.graders",),  # OpenAI-format graders: rewards for train, metrics for eval, a model asked through systems
    ("tuneforge.scoring",),
    ("tuneforge.train",),
    ("tuneforge.eval",),
    ("tuneforge.gguf_export",),  # merge's GGUF export: converter, metadata, Modelfile, probe from the file
    VERBS,
    ("tuneforge.sweep",),
    ("tuneforge.cli", "tuneforge.__main__"),
]
# modules that run one verb or recipe end to end; they never import one another (the CLI and the sweep, above
# them, compose them)
RECIPES = (
    "tuneforge.data.prepare",
    "tuneforge.train.local",
    "tuneforge.train.dpo",
    "tuneforge.train.kto",
    "tuneforge.train.grpo",
    "tuneforge.train.openai_backend",
    "tuneforge.eval.harness",
)
RANK = {prefix: rank for rank, names in enumerate(LAYERS) for prefix in names}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The tuneforge module an imported name lives in (a package's submodule, else the package)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> dict[str, int]:
    """tuneforge modules this module imports, module-level or lazily, each with the first line that does."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        owner = _owner(name)
        if owner is not None and owner != module:
            targets.setdefault(owner, line)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tuneforge":
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "tuneforge":
                continue
            for alias in node.names:  # `from tuneforge.data import report` imports the submodule
                add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source, node.lineno)
    return targets


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _rank(module: str) -> int | None:
    name = module
    while name:
        if name in RANK and (name != "tuneforge" or module == "tuneforge"):  # the bare package ranks only itself
            return RANK[name]
        name = name.rpartition(".")[0]
    return None


def _where(a: str, b: str) -> str:
    return f"{a} -> {b} ({MODULES[a].relative_to(SRC)}:{GRAPH[a][b]})"


def _cycles() -> list[list[str]]:
    """One import cycle (its modules, the first repeated at the end) in each group of modules that import
    one another, found as strongly connected components (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(group)

    for module in sorted(GRAPH):
        if module not in index:
            connect(module)

    def around(group: set[str]) -> list[str]:
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:  # breadth first: the shortest way back to start
            path = paths.pop(0)
            for target in sorted(GRAPH[path[-1]]):
                if target == start:
                    return path + [start]
                if target in group and target not in seen:
                    seen.add(target)
                    paths.append(path + [target])
        raise AssertionError(group)

    return [around(group) for group in groups]


def test_the_layer_check_fails_on_an_upward_import(monkeypatch):
    """The check itself: an import of a higher layer is reported (data importing train, sideways verbs)."""
    monkeypatch.setitem(
        GRAPH, "tuneforge.data.records", {**GRAPH["tuneforge.data.records"], "tuneforge.train.local": 1}
    )
    with pytest.raises(AssertionError, match="tuneforge.data.records -> tuneforge.train.local"):
        test_no_module_imports_a_higher_layer()
    monkeypatch.setitem(GRAPH, "tuneforge.chat", {**GRAPH["tuneforge.chat"], "tuneforge.merge": 1})
    with pytest.raises(AssertionError, match="tuneforge.chat -> tuneforge.merge"):
        test_verbs_never_import_one_another()


def test_the_scan_sees_lazy_imports():
    """A function-level import is an edge too (cli imports every verb inside its command functions)."""
    assert "tuneforge.train.openai_backend" in GRAPH["tuneforge.cli"]
    assert "tuneforge.train.local" in GRAPH["tuneforge.train"]  # train.recipe picks the recipe inside a function
    assert "tuneforge.data.report" in GRAPH["tuneforge.data.prepare"]  # `from tuneforge.data import report as ...`


def test_no_import_cycle():
    cycles = ["; ".join(_where(a, b) for a, b in zip(cycle, cycle[1:])) for cycle in _cycles()]
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _rank(m) is None] == [], "add the new modules to LAYERS"


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{_where(a, b)}: layer {_rank(a)} imports layer {_rank(b)}"
        for a in sorted(GRAPH)
        for b in sorted(GRAPH[a])
        if _rank(b) > _rank(a)
    ]
    assert upward == [], "\n".join(upward)


def _unit(module: str) -> str:
    """The verb a module belongs to: its directory under tuneforge, else the module itself."""
    return ".".join(module.split(".")[:2])


def test_each_directory_is_one_layer():
    """No LAYERS entry names a module inside a directory (that would split the directory across layers)."""
    nested = [name for names in LAYERS for name in names if name.count(".") > 1]
    assert nested == []


def test_verbs_never_import_one_another():
    sideways = [
        _where(a, b)
        for a in sorted(GRAPH)
        for b in sorted(GRAPH[a])
        if _rank(a) == _rank(b) == RANK[VERBS[0]] and _unit(a) != _unit(b)
    ]
    sideways += [_where(a, b) for a in sorted(GRAPH) for b in sorted(GRAPH[a]) if a in RECIPES and b in RECIPES]
    assert sideways == [], "\n".join(sideways)


def test_data_never_reaches_into_train():
    assert [
        _where(a, b)
        for a in sorted(GRAPH)
        if a.startswith("tuneforge.data")
        for b in sorted(GRAPH[a])
        if b.startswith("tuneforge.train")
    ] == []


@pytest.mark.parametrize("modules", ["tuneforge.systems, tuneforge.data.prepare, tuneforge.config"])
def test_config_data_and_systems_import_without_torch(modules):
    """Checking a config, preparing data and naming systems must not pay for torch (the engine loads it when a
    model is loaded)."""
    code = (
        f"import sys\nimport {modules}\n"
        "print(sorted(m for m in ('torch', 'transformers.modeling_utils') if m in sys.modules))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
    }  # this tree
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=SRC.parent, env=env
    )
    assert out.stdout.strip() == "[]", f"import {modules} loaded {out.stdout.strip()}"
