"""House rules read from the source: no function (or method) longer than 80 lines, counted as
its AST node's ``end_lineno - lineno + 1`` (decorators excluded, docstring included), so a
function fits on a screen and its parts get names."""

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("app", "model", "ipu_options", "backends", "experiments", "benchmarks", "tests")
MAX_LINES = 80


def python_files() -> Iterator[Path]:
    for folder in FOLDERS:
        yield from sorted((ROOT / folder).rglob("*.py"))


def long_functions(path: Path, root: Path = ROOT) -> List[Tuple[str, int]]:
    """``file:line name`` (file relative to ``root``) and length of each function over the limit."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_LINES:
                found.append((f"{path.relative_to(root)}:{node.lineno} {node.name}", length))
    return found


def test_the_walk_reaches_every_folder():
    assert {path.relative_to(ROOT).parts[0] for path in python_files()} == set(FOLDERS)


def test_the_check_counts_lines_as_the_rule_does(tmp_path):
    body = [f"x{k} = {k}" for k in range(MAX_LINES - 1)]
    # The def line and 79 more: exactly the limit, allowed.
    (tmp_path / "fits.py").write_text("def fits():\n" + "".join(f"    {line}\n" for line in body))
    # A method, one line more: over it.
    over = "class C:\n    def over(self):\n" + "".join(f"        {line}\n" for line in body + ["return 0"])
    (tmp_path / "over.py").write_text(over)
    assert long_functions(tmp_path / "fits.py", tmp_path) == []
    assert long_functions(tmp_path / "over.py", tmp_path) == [("over.py:2 over", MAX_LINES + 1)]


def test_no_function_is_longer_than_80_lines():
    offenders = [
        f"{where} ({length} lines)" for path in python_files() for where, length in long_functions(path)
    ]
    assert not offenders, f"functions over {MAX_LINES} lines, split them into named parts: " + "; ".join(
        offenders
    )
