"""The architecture's arrows, read from the source: which folder may import which.

Every import statement counts, also those inside functions (a lazy import is still an arrow).
  * model/ imports nothing of the project: the paper's network stands alone.
  * The backend contract (backends/ but its native backend) imports only itself: it sits below
    the application and the device layer alike.
  * The device layer (ipu_options/ and backends/native.py) imports no module of the application
    (it may use model/ and the contract).
  * The native backend does not reach the IPU layer or its emulator (app/backend.py chooses).
  * The PopTorch emulator (ipu_options/emulator/) imports neither the application, nor model/,
    nor the rest of the IPU layer that uses it.
  * The application (app/) imports nothing of experiments/ or benchmarks/; experiments/ import
    the application, never benchmarks/.
  * No import circle between files anywhere, and the project's own packages import one another
    at module level only (a function-level import would hide an arrow).
And no component reads another's part of the run configuration: the device layer (backends/,
ipu_options/) takes specs (backends/specs.py, ipu_options/specs.py, built in app/specs.py), never
the configuration or a section of it; the data layer never reads its ``ipu`` section.
"""

import ast
import dataclasses
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "backends", "benchmarks", "experiments", "ipu_options", "model")
EMULATOR = "ipu_options.emulator"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_names(
    source: str, module: str, is_package: bool, is_module: Callable[[str], bool] = lambda name: False
) -> Set[str]:
    """Absolute names of everything ``source`` imports; relative imports resolved against
    ``module``. ``from X import Y`` gives X.Y (Y may be a module) and X, unless every name it
    imports is a module (``is_module``): then what it runs of X's ``__init__`` is X's own business,
    as for ``import X.Y``."""
    names: Set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            named = {f"{base}.{alias.name}" for alias in node.names}
            names.update(named)
            if not all(is_module(name) for name in named):
                names.add(base)
    return names


def project_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> Dict[str, Set[str]]:
    """file module → the project modules (files) it imports."""
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = imported_names(
            path.read_text(encoding="utf-8"), name, path.name == "__init__.py", is_module=files.__contains__
        )
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def top(module: str) -> str:
    return module.split(".")[0]


def layer(module: str) -> str:
    """The top-level package, but the emulator is a layer of its own inside ipu_options/."""
    return EMULATOR if module == EMULATOR or module.startswith(EMULATOR + ".") else top(module)


NATIVE_BACKEND = "backends.native"
RULES: List[Tuple[str, Callable[[str], bool], Tuple[str, ...]]] = [
    # (what the rule says, which importing files, forbidden targets (layers))
    (
        "model/ imports nothing of the project",
        lambda m: top(m) == "model",
        ("app", "backends", "benchmarks", "experiments", "ipu_options", EMULATOR),
    ),
    (
        "the backend contract imports only itself",
        lambda m: top(m) == "backends" and m != NATIVE_BACKEND,
        ("app", "benchmarks", "experiments", "ipu_options", EMULATOR, "model"),
    ),
    (
        "the device layer imports no module of the application",
        lambda m: top(m) == "ipu_options" or m == NATIVE_BACKEND,
        ("app", "benchmarks", "experiments"),
    ),
    (
        "the native backend does not reach the IPU layer",
        lambda m: m == NATIVE_BACKEND,
        ("ipu_options", EMULATOR),
    ),
    (
        "the emulator imports neither the application, nor model/, nor the IPU layer",
        lambda m: layer(m) == EMULATOR,
        ("app", "benchmarks", "experiments", "ipu_options", "model"),
    ),
    (
        "the application imports nothing of experiments/ or benchmarks/",
        lambda m: top(m) == "app",
        ("benchmarks", "experiments"),
    ),
    ("experiments/ import nothing of benchmarks/", lambda m: top(m) == "experiments", ("benchmarks",)),
]


def violations(graph: Dict[str, Set[str]]) -> List[str]:
    found = []
    for rule, applies, forbidden in RULES:
        for module, targets in sorted(graph.items()):
            if applies(module):
                found += [f"{rule}: {module} imports {t}" for t in sorted(targets) if layer(t) in forbidden]
    return found


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components (Tarjan) of more than one file: the import circles."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
    return [c for c in components if len(c) > 1]


@pytest.fixture(scope="module")
def graph():
    return project_graph()


def test_the_graph_sees_imports_of_every_kind(graph):
    # a module-level import, a relative one, an import of a package, one of a package's module
    assert "app.backend" in graph["app.train"]
    assert "ipu_options.backend" not in graph["app.train"]
    assert "model.proxy_norm" in graph["model.blocks"]  # from .proxy_norm import ...
    assert EMULATOR in graph["ipu_options.lowering_check"]  # from ipu_options.emulator import identity_loss
    assert "ipu_options.emulator.lowering" in graph["ipu_options.emulator.blocks"]  # from . import lowering
    assert EMULATOR not in graph["ipu_options.emulator.blocks"]
    assert set(PACKAGES) <= {top(m) for m in graph}


@pytest.mark.parametrize("rule", [r[0] for r in RULES])
def test_import_rule(graph, rule):
    broken = [v for v in violations(graph) if v.startswith(rule + ":")]
    assert not broken, "\n".join(broken)


def test_no_import_circle(graph):
    assert cycles(graph) == []


def lazy_project_imports(source: str, project: Iterable[str] = PACKAGES) -> List[int]:
    """Lines of imports of the project inside functions: a lazy import that hides an arrow (or
    dodges a circle) rather than one that puts off a heavy optional library."""
    lines = []
    for function in ast.walk(ast.parse(source)):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or "."]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                if any(n == "." or top(n) in project for n in names) or getattr(node, "level", 0):
                    lines.append(node.lineno)
    return sorted(set(lines))


def test_the_project_imports_itself_at_module_level():
    assert lazy_project_imports("def f():\n    from app import x\n    import numpy\n") == [2]
    found = {
        str(p.relative_to(ROOT)): lazy_project_imports(p.read_text(encoding="utf-8"))
        for pkg in ("app", "backends", "experiments", "ipu_options", "model")
        for p in (ROOT / pkg).rglob("*.py")
    }
    assert {path: lines for path, lines in found.items() if lines} == {}


def configuration_sections() -> Dict[str, Set[str]]:
    """Each section of the run configuration (``Config``'s dataclass fields) and its field names."""
    from app.config import Config

    return {
        f.name: {g.name for g in dataclasses.fields(f.type)}
        for f in dataclasses.fields(Config)
        if dataclasses.is_dataclass(f.type)
    }


def annotation_name(node: Optional[ast.expr]) -> str:
    """The last name of an annotation: ``Config``, ``app.config.Config`` and ``"Config"`` alike."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.rpartition(".")[2]
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def configuration_reads(source: str, sections: Dict[str, Set[str]]) -> Set[str]:
    """Where ``source`` touches the run configuration: ``X.<section>.<one of its fields>`` whatever
    X is called (``cfg.train.micro_batch``, ``self.run.ipu.precision``), a parameter called
    ``cfg`` or ``config``, or one annotated with a ``...Config`` type (``IPUConfig`` is the
    ``ipu`` section's own declaration, which only validates itself)."""
    found: Set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.attr in sections.get(node.value.attr, ())
        ):
            found.add(f"{node.value.attr}.{node.attr}")
        elif isinstance(node, ast.arg):
            annotation = annotation_name(node.annotation)
            if node.arg in ("cfg", "config") or annotation.endswith("Config"):
                found.add(f"parameter {node.arg}: {annotation or '?'}")
    return found


def test_components_read_only_their_own_configuration():
    """The device layer (backends/, ipu_options/ with its emulator) takes specs, never the run
    configuration or a section of it; the data layer never reads the ``ipu`` section."""
    sections = configuration_sections()
    assert {"train", "optim", "model", "data", "ipu", "log", "dist"} <= set(sections)
    reads = {
        module_name(p, ROOT): configuration_reads(p.read_text(encoding="utf-8"), sections)
        for folder in ("backends", "ipu_options", "app/data")
        for p in (ROOT / folder).rglob("*.py")
    }
    assert {m: r for m, r in reads.items() if top(m) in ("backends", "ipu_options") and r} == {}
    assert {
        m: r for m, r in reads.items() if m.startswith("app.data") and any(x.startswith("ipu.") for x in r)
    } == {}


def test_the_configuration_check_sees_every_spelling():
    sections = configuration_sections()
    caught = configuration_reads(
        "def f(run, config, spec: 'RunConfig'):\n"
        "    return run.train.micro_batch, self.cfg.ipu.precision, getattr(run.optim, 'name')\n",
        sections,
    )
    assert caught == {
        "train.micro_batch",
        "ipu.precision",
        "parameter config: ?",
        "parameter spec: RunConfig",
    }
    # what the device layer legitimately writes is not mistaken for a section read
    assert (
        configuration_reads(
            "def f(ipu: IpuSpec, batch):\n    return torch.optim.Optimizer, "
            "classifier.model.state_dict(), p.data.float(), ipu.precision\n",
            sections,
        )
        == set()
    )


def test_the_checks_catch_what_they_forbid(tmp_path):
    """The same checks on a made-up project: an upward import, lazy and relative imports, a circle
    across folders and one inside a folder."""
    files = {
        "model/__init__.py": "",
        "model/net.py": "from app.cfg import X\n",
        "app/__init__.py": "",
        "app/cfg.py": "def f():\n    from ipu_options import dev\n",
        "app/a.py": "from app import b\n",
        "app/b.py": "def g():\n    from . import a\n",
        "ipu_options/__init__.py": "",
        "ipu_options/dev.py": "from ..app import cfg\n",
        "ipu_options/emulator/__init__.py": "from . import core\n",
        "ipu_options/emulator/core.py": "from ipu_options import dev\n",
        "backends/__init__.py": "",
        "benchmarks/__init__.py": "",
        "experiments/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    fake = project_graph(tmp_path)
    found = violations(fake)
    assert "model/ imports nothing of the project: model.net imports app.cfg" in found
    assert "the device layer imports no module of the application: ipu_options.dev imports app.cfg" in found
    assert (
        "the emulator imports neither the application, nor model/, nor the IPU layer: "
        "ipu_options.emulator.core imports ipu_options.dev"
    ) in found
    assert fake["ipu_options.emulator"] == {"ipu_options.emulator.core"}
    assert cycles(fake) == [["app.a", "app.b"], ["app.cfg", "ipu_options.dev"]]
