"""The architecture's arrows, read from the source: which folder may import which.

Every import statement counts, also those inside functions (a lazy import is still an arrow).
  * model/ imports nothing of the project: the paper's network stands alone.
  * The backend contract (backends/ but its native backend) imports only itself: it sits below
    the application and the device layer alike.
  * The device layer (ipu_options/ and backends/native.py) imports no module of the application
    (it may use model/ and the contract).
  * The native backend does not reach the IPU layer or the emulator (ipu_options/ chooses it).
  * The PopTorch emulator (poptorch_emulator/) imports neither the application, nor model/, nor
    the IPU layer that uses it.
  * Training (app/) imports nothing of benchmarks/.
  * No import circle joins files of different folders.
"""
import ast
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "backends", "benchmarks", "ipu_options", "model", "poptorch_emulator")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool) -> Set[str]:
    """Absolute names of everything ``source`` imports, ``from X import Y`` giving X and X.Y
    (Y may be a module); relative imports resolved against ``module``."""
    names: Set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def project_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> Dict[str, Set[str]]:
    """file module → the project modules (files) it imports."""
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = imported_names(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def top(module: str) -> str:
    return module.split(".")[0]


def folder(module: str, graph: Dict[str, Set[str]]) -> str:
    """The folder of a module's file (a package's __init__ is in the package's own folder)."""
    is_package = any(other.startswith(module + ".") for other in graph)
    return module if is_package else module.rpartition(".")[0]


NATIVE_BACKEND = "backends.native"
RULES: List[Tuple[str, Callable[[str], bool], Tuple[str, ...]]] = [
    # (what the rule says, which importing files, forbidden targets (top-level packages))
    ("model/ imports nothing of the project", lambda m: top(m) == "model",
     ("app", "backends", "benchmarks", "ipu_options", "poptorch_emulator")),
    ("the backend contract imports only itself",
     lambda m: top(m) == "backends" and m != NATIVE_BACKEND,
     ("app", "benchmarks", "ipu_options", "model", "poptorch_emulator")),
    ("the device layer imports no module of the application",
     lambda m: top(m) == "ipu_options" or m == NATIVE_BACKEND, ("app", "benchmarks")),
    ("the native backend does not reach the IPU layer", lambda m: m == NATIVE_BACKEND,
     ("ipu_options", "poptorch_emulator")),
    ("the emulator imports neither the application, nor model/, nor the IPU layer",
     lambda m: top(m) == "poptorch_emulator", ("app", "benchmarks", "ipu_options", "model")),
    ("training imports nothing of benchmarks/", lambda m: top(m) == "app", ("benchmarks",)),
]


def violations(graph: Dict[str, Set[str]]) -> List[str]:
    found = []
    for rule, applies, forbidden in RULES:
        for module, targets in sorted(graph.items()):
            if applies(module):
                found += [f"{rule}: {module} imports {t}" for t in sorted(targets) if top(t) in forbidden]
    return found


def cross_folder_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components (Tarjan) whose files lie in more than one folder."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [c for c in components if len({folder(m, graph) for m in c}) > 1]


@pytest.fixture(scope="module")
def graph():
    return project_graph()


def test_the_graph_sees_imports_of_every_kind(graph):
    # a module-level import, a lazy one inside a function, a relative one, an import of a package
    assert "app.backend" in graph["app.train"]
    assert "ipu_options.backend" not in graph["app.train"]
    assert "ipu_options.poprun" in graph["app.distributed"]  # inside init_distributed
    assert "model.proxy_norm" in graph["model.blocks"]  # from .proxy_norm import ...
    assert "poptorch_emulator" in graph["ipu_options"]
    assert set(PACKAGES) <= {top(m) for m in graph}


@pytest.mark.parametrize("rule", [r[0] for r in RULES])
def test_import_rule(graph, rule):
    broken = [v for v in violations(graph) if v.startswith(rule + ":")]
    assert not broken, "\n".join(broken)


def test_no_import_circle_between_folders(graph):
    assert cross_folder_cycles(graph) == []


def test_the_checks_catch_what_they_forbid(tmp_path):
    """The same checks on a made-up project: an upward import and a circle across folders."""
    files = {
        "model/__init__.py": "", "model/net.py": "from app.cfg import X\n",
        "app/__init__.py": "", "app/cfg.py": "def f():\n    from ipu_options import dev\n",
        "ipu_options/__init__.py": "", "ipu_options/dev.py": "from ..app import cfg\n",
        "backends/__init__.py": "", "benchmarks/__init__.py": "", "poptorch_emulator/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    fake = project_graph(tmp_path)
    found = violations(fake)
    assert "model/ imports nothing of the project: model.net imports app.cfg" in found
    assert "the device layer imports no module of the application: ipu_options.dev imports app.cfg" \
        in found
    assert cross_folder_cycles(fake) == [["app.cfg", "ipu_options.dev"]]
