"""The package's shape, checked: imports run downhill (no circle, typing-only and lazy
imports included; the engine imports nothing from the analyses), the engine, the analyses
and the converter dispatch on no rule's name, and the training loop reads in one screen."""

import ast
import inspect
import re
from pathlib import Path

import ldfa_cli
from ldfa_cli.engine.loop import Trainer

PACKAGE = Path(ldfa_cli.__file__).parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (every import statement, at any depth; a
    module's import runs its packages' __init__ first, so those count too)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                targets.update(f"{base}.{alias.name}" for alias in node.names)
                targets.add(base)
        deps = set()
        for target in targets:
            while target.startswith("ldfa_cli"):
                if target in modules and target != name and not name.startswith(target + "."):
                    deps.add(target)
                target = target.rpartition(".")[0]
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_imports_run_downhill():
    graph = import_graph()
    assert not cycles(graph)
    above = {  # a layer imports nothing from the layers above it
        "ldfa_cli.engine": ("ldfa_cli.analysis", "ldfa_cli.cli"),
        "ldfa_cli.feedback": ("ldfa_cli.engine", "ldfa_cli.analysis", "ldfa_cli.config"),
        "ldfa_cli.models": ("ldfa_cli.engine", "ldfa_cli.analysis", "ldfa_cli.config"),
        "ldfa_cli.measure": ("ldfa_cli.engine", "ldfa_cli.analysis", "ldfa_cli.config"),
    }
    for name, deps in graph.items():
        for layer, forbidden in above.items():
            if name.startswith(layer):
                assert not [d for d in deps if d.startswith(forbidden)], name


def test_the_import_check_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


DISPATCH = re.compile(r"rule\.name\s*(==|!=|in\b)|==\s*\S*rule\.name|getattr\(\s*\w*rule\b")


def test_no_rule_is_dispatched_on_by_name_outside_its_file():
    places = [*(PACKAGE / "engine").glob("*.py"), *(PACKAGE / "analysis").glob("*.py"),
              *(PACKAGE / "measure").glob("*.py"), PACKAGE / "feedback" / "convert.py",
              PACKAGE / "feedback" / "model.py"]  # fmt: skip
    hits = [
        f"{p.name}:{i}: {line.strip()}"
        for p in places
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if DISPATCH.search(line)
    ]
    assert not hits
    assert DISPATCH.search('if layer.rule.name == "ldfa"') and DISPATCH.search(
        'getattr(rule, "broadcast", False)')  # fmt: skip


def test_the_training_loop_reads_in_one_screen():
    assert len(inspect.getsource(Trainer.train).splitlines()) <= 120
