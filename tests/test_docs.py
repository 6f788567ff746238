"""The Python in README.md and docs/*.md still runs: a renamed module or a changed call fails here.

Every ```python block compiles, and its import lines (``import x``, ``from x import y``,
wherever they stand) are executed, so a snippet naming a module that moved fails. A block
runs whole unless the line just before its fence says why it cannot:

    <!-- docs-test: imports only (build_model, dataset and loss_fn are yours) -->

for snippets that start processes, need root or a network, take long, or use names the
reader supplies. Whole blocks run in a temporary directory and must be fast (no processes).
Names in backticks (`gradsync.x.y`, `gradsync/x/y.py`) must exist too.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PARTIAL = "<!-- docs-test: imports only"
FENCE = re.compile(r"^```python\s*$\n(.*?)^```\s*$", re.M | re.S)


def _blocks() -> list[tuple[str, str, bool]]:
    """``(where, source, whole)`` of every ```python block; ``where`` is file:line."""
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
            found.append((f"{path.relative_to(REPO)}:{line}", match.group(1),
                          not before.startswith(PARTIAL)))
    return found


BLOCKS = _blocks()


def test_the_docs_have_python_blocks():
    # A change to the fence syntax that finds nothing would pass every test below.
    assert len(BLOCKS) >= 5 and any(whole for _, _, whole in BLOCKS)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where,source,whole", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_snippet_imports_and_runs(where, source, whole, tmp_path, monkeypatch):
    path, fence = where.rsplit(":", 1)
    tree = ast.parse(source, filename=path)
    ast.increment_lineno(tree, int(fence))  # tracebacks give the line in the .md file
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    monkeypatch.syspath_prepend(str(REPO))  # snippets run "from the repository root"
    exec(compile(ast.Module(imports, type_ignores=[]), path, "exec"), {})
    if whole:
        monkeypatch.chdir(tmp_path)
        exec(compile(tree, path, "exec"), {"__name__": "__docs__"})


def _named(pattern: str) -> set[str]:
    return {m for path in DOCS for m in re.findall(pattern, path.read_text(encoding="utf-8"))}


@pytest.mark.parametrize("name", sorted(_named(r"`(gradsync(?:\.\w+)+)")))
def test_dotted_names_resolve(name):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError:
            continue
    for attr in parts[i:]:
        assert hasattr(obj, attr), f"the docs name {name}, which does not exist"
        obj = getattr(obj, attr)


@pytest.mark.parametrize("path", sorted(_named(r"`(gradsync/[\w/]*\w\.py)")))
def test_source_paths_exist(path):
    assert (REPO / path).is_file(), f"the docs name {path}, which does not exist"
