"""The package layout is a contract: stages import one way, and no module imports itself back through others.

Function-level imports count too (a cycle that only closes at run time is still a cycle). Imports under
`if TYPE_CHECKING:` are ignored: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "captioner"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """module -> the captioner modules it imports (a `from pkg import mod` counts as importing pkg.mod)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        targets: set[str] = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("captioner"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("captioner"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    # The package root re-exports the public API, so every module "imports" it only through the root: leave it out.
    graph = {k: v - {"captioner"} for k, v in import_graph().items() if k != "captioner"}
    assert find_cycle(graph) is None


@pytest.mark.parametrize("stage, forbidden", [
    ("captioner.models", ("captioner.runtime", "captioner.training", "captioner.api", "captioner.cli",
                          "captioner.data", "captioner.evaluation")),
    ("captioner.runtime", ("captioner.training", "captioner.api", "captioner.cli", "captioner.data")),
    ("captioner.data", ("captioner.training", "captioner.api", "captioner.cli")),
    ("captioner.evaluation", ("captioner.training", "captioner.api", "captioner.cli")),
    ("captioner.training", ("captioner.api", "captioner.cli")),
    ("captioner.integrations", ("captioner.cli", "captioner.training", "captioner.data", "captioner.evaluation")),
])
def test_stages_import_one_way(stage, forbidden):
    offenders = [f"{module} imports {target}" for module, targets in import_graph().items()
                 if module.startswith(stage) for target in targets if target.startswith(forbidden)]
    assert offenders == []
