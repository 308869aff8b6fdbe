"""Layers point down only (../shared/DESIGN.md): parsed from the source, no third-party tool.

Ranks, lowest first:
  0  nn/                       parts: know no tokenizer, no loss, no loop, no I/O of ours
  1  models/                   tokenizers, their registries and loading
  2  losses/, metrics/, data/  objectives, measurements, input pipelines (independent siblings)
  3  training/, evaluation, hub, export, card, config, the package root
Every import counts, also those inside functions (a lazy import still depends on its target;
`if TYPE_CHECKING:` blocks excepted, they never run). A module may import its own rank or below,
never above; the rank-2 siblings do not import each other; and no import circle closes between
modules.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = "tokenizers_vis"
SOURCE = Path(__file__).resolve().parents[1] / PACKAGE

RANKS = {"nn": 0, "models": 1, "losses": 2, "metrics": 2, "data": 2, "training": 3}
TOP_RANK = 3  # top-level modules (evaluation, hub, export, card, config) and the package __init__
SIBLINGS = {"losses", "metrics", "data"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group(module: str) -> str | None:
    """The layer a module belongs to: its subpackage, or None for a top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANKS) else None


def rank(module: str) -> int:
    return RANKS.get(group(module) or "", TOP_RANK)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, root: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports: `from pkg import name` means the submodule pkg.name when
    there is one, else pkg itself."""
    this = module_name(path, root)
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    found.add(_existing(alias.name, modules))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = this.split(".") if is_package else this.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != PACKAGE:
                return
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else _existing(base, modules))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    found.discard(this)
    return found


def _existing(name: str, modules: set[str]) -> str:
    """The longest prefix of a dotted name that is a module of the package."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) or name


def import_graph(root: Path) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    return {module_name(f, root): imports_of(f, root, modules) for f in files}


def violations(root: Path) -> list[str]:
    graph = import_graph(root)
    problems = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if rank(target) > rank(module):
                problems.append(f"{module} (rank {rank(module)}) imports {target} (rank {rank(target)}): upward")
            elif group(module) in SIBLINGS and group(target) in SIBLINGS and group(module) != group(target):
                problems.append(f"{module} imports its sibling layer {target}")
    problems += [f"import circle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strongconnect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                strongconnect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return found


def test_layers_point_down_and_close_no_circle():
    problems = violations(SOURCE)
    assert not problems, "\n".join(problems)


def test_the_graph_sees_the_imports_it_checks():
    graph = import_graph(SOURCE)
    # Guards against a parser that finds nothing and so passes: known downward imports are seen.
    assert "tokenizers_vis.nn.attention" in graph["tokenizers_vis.nn.transformer"]
    assert "tokenizers_vis.models.base" in graph["tokenizers_vis.models.titok"]
    assert "tokenizers_vis.models.base" in graph["tokenizers_vis.training.module"]


@pytest.mark.parametrize("target_file, planted, expected", [
    ("nn/attention.py", "from tokenizers_vis.training.module import TokenizerModule", "upward"),
    ("models/titok.py", "    from tokenizers_vis.hub import push_to_hub", "upward"),  # lazy, inside a function
    ("losses/gan.py", "import tokenizers_vis.metrics.fid", "sibling"),
    ("nn/transformer.py", "import tokenizers_vis", "upward"),  # the package root re-exports the top layer
])
def test_a_planted_upward_import_fails(tmp_path, target_file, planted, expected):
    root = tmp_path / PACKAGE
    shutil.copytree(SOURCE, root, ignore=shutil.ignore_patterns("__pycache__"))
    path = root / target_file
    text = path.read_text()
    if planted.startswith("    "):
        text += f"\n\ndef _planted():\n{planted}\n"
    else:
        text += f"\n{planted}\n"
    path.write_text(text)
    problems = violations(root)
    assert any(expected in p for p in problems), problems


def test_a_planted_circle_fails(tmp_path):
    root = tmp_path / PACKAGE
    shutil.copytree(SOURCE, root, ignore=shutil.ignore_patterns("__pycache__"))
    # transformer imports attention; attention importing transformer back closes a circle.
    path = root / "nn" / "attention.py"
    path.write_text(path.read_text() + "\n\ndef _planted():\n    from tokenizers_vis.nn import transformer\n")
    problems = violations(root)
    assert any("circle" in p and "tokenizers_vis.nn.transformer" in p for p in problems), problems


def test_type_checking_imports_do_not_count(tmp_path):
    root = tmp_path / PACKAGE
    shutil.copytree(SOURCE, root, ignore=shutil.ignore_patterns("__pycache__"))
    path = root / "nn" / "attention.py"
    path.write_text(path.read_text() + "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                    "    from tokenizers_vis.models.base import Tokenizer\n")
    assert not violations(root)
