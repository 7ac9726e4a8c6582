"""House rules read from the source: no function (or method) longer than 80 lines, counted as
its AST node's ``end_lineno - lineno + 1`` (decorators excluded, docstring included), so a
function fits on a screen and its parts get names; and type hints on every public function of
the shipped code (name not starting with ``_``, nested ones too): every parameter but a method's
self/cls annotated, *args/**kwargs included, and a return annotation."""

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("app", "model", "ipu_options", "backends", "experiments", "benchmarks", "tests")
MAX_LINES = 80
HINTED_FOLDERS = ("app", "model", "ipu_options", "backends", "experiments")


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


def missing_hints(path: Path, root: Path = ROOT) -> List[str]:
    """``file:line name (what)`` for each public function of ``path`` missing a hint."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        args = node.args
        named = args.posonlyargs + args.args
        # self/cls only as a first parameter (methods); anywhere else they need a hint too
        skip = named[:1] if named and named[0].arg in ("self", "cls") else []
        params = [a for a in named + args.kwonlyargs if a not in skip]
        params += [a for a in (args.vararg, args.kwarg) if a is not None]
        missing = [a.arg for a in params if a.annotation is None]
        if node.returns is None:
            missing.append("return")
        if missing:
            found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({', '.join(missing)})")
    return found


def test_the_hint_check_flags_what_the_rule_names(tmp_path):
    source = (
        "def bare(x, *rest, **options):\n    return x\n"
        "def hinted(x: int, *rest: int, **options: str) -> int:\n    return x\n"
        "def _private(x):\n    return x\n"
        "class C:\n"
        "    def __init__(self, x: int):\n        self.x = x\n"
        "    def method(self, y: int):\n"
        "        def inner(z) -> int:\n            return z\n"
        "        return inner(y)\n"
    )
    (tmp_path / "m.py").write_text(source)
    assert missing_hints(tmp_path / "m.py", tmp_path) == [
        "m.py:1 bare (x, rest, options, return)",
        "m.py:10 method (return)",
        "m.py:11 inner (z)",
    ]


def test_every_public_function_has_type_hints():
    offenders = [
        where
        for folder in HINTED_FOLDERS
        for path in sorted((ROOT / folder).rglob("*.py"))
        for where in missing_hints(path)
    ]
    assert not offenders, "public functions missing type hints, annotate them: " + "; ".join(offenders)
