"""The layout is the architecture: gradsync/ reads downhill with no import circles (imports
inside functions and under TYPE_CHECKING count too), and only comm/ imports torch.distributed
or mpi4py."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import PACKAGE
from tests.helpers import module_imports as _imports
from tests.helpers import module_name as _module_name


def _graph(root: Path, package_dir: Path = PACKAGE) -> dict[str, set[str]]:
    modules = {_module_name(p, package_dir): p for p in root.rglob("*.py")}
    return {name: {m for m in _imports(path, package_dir) if m in modules and m != name}
            for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # A package's __init__ importing its own submodules is not a circle; a submodule
            # importing its parent package's __init__ would be, and is caught below.
            if state.get(nxt) == 1 and not node.startswith(nxt + "."):
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circles_anywhere():
    graph = _graph(PACKAGE)
    assert "gradsync.comm.engine" in graph and "gradsync.train.trainer" in graph
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_a_planted_circle_is_found(tmp_path):
    """A circle closed by a late import or a TYPE_CHECKING import fails the layout test."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import B\n")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from .sub.b import B\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import C\n")
    (pkg / "c.py").write_text("from . import a\n")
    assert _cycle(_graph(pkg, pkg)) is not None
    (pkg / "c.py").write_text("")
    assert _cycle(_graph(pkg, pkg)) is None


def test_only_comm_imports_the_engines():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if (PACKAGE / "comm") in path.parents:
            continue
        for name in _imports(path):
            if name.startswith(("torch.distributed", "mpi4py")):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not offenders, offenders


def test_the_readme_layout_table_matches_the_tree():
    """Every path the README's layout table names exists, and every package and top-level
    module of gradsync/ has a row."""
    import re

    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## Layout"):]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    named = {p for row in rows for p in re.findall(r"`(gradsync/[\w/.]*)`", row.split("|")[1])}
    missing = [p for p in named if not (PACKAGE.parent / p).exists()]
    assert not missing, missing
    tops = {f"gradsync/{p.name}" + ("/" if p.is_dir() else "") for p in PACKAGE.iterdir()
            if (p.is_dir() and (p / "__init__.py").exists())
            or (p.suffix == ".py" and p.stem not in ("__init__", "__main__"))}
    assert not tops - named, sorted(tops - named)
