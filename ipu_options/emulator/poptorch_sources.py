"""Regenerate ``poptorch_ops.json``, the lowering check's facts, from PopTorch's own sources.

    python -m ipu_options.emulator.poptorch_sources \\
        --git-dir PATH/TO/poptorch/.git --tag sdk/poptorch/3.4.0

reads a clone of https://github.com/graphcore/poptorch (a bare git directory is enough: files are
read with ``git show TAG:path``) and writes, with the tag, its commit and the file:line of each fact:

- ``handlers``: every ``registerHandler(c10::aten::NAME, fn)`` of
  ``poptorch/source/popart_canonicalization/*.cpp``: the aten node kinds PopTorch canonicalises to
  PopART (any aten node left over stops compilation, ``ErrorOnUnsupportedAten.cpp``);
- ``loss_handlers``: those whose handler (or a handler it calls) creates ``popart::identityloss``;
- ``affine_pair_handlers``: those whose handler calls ``maybeInitializeAffineParamConstants``
  (NormalizationOps.cpp), which stops on a weight without bias or a bias without weight;
- ``ipu_key_ops``: the ``m.impl("schema", …)`` registrations of the IPU / AutogradIPU dispatch keys
  (``dispatch_tracer/RegisterOptionalAtenOps.cpp.inc``, ``RegisterAtenOverloads.cpp``): ops PopTorch
  intercepts as themselves before PyTorch decomposes them, and the function each goes to;
- ``only_inplace``: ``onlyInplaceOps()`` of ``InplaceOps.cpp`` (kept in place; every other in-place
  kind is lowered as its out-of-place twin, ``outplaceKind``: the ``inPlaceToOutOfPlace`` table of
  ``InplaceOpsPyTorch.hpp_nolint`` (``outplace``), else the name without its trailing ``_``).

Only facts (names, file and line) are taken from the sources, no code.
"""

import argparse
import json
import re
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

HERE = Path(__file__).resolve().parent
DATA = HERE / "poptorch_ops.json"
DEFAULT_TAG = "sdk/poptorch/3.4.0"

CANONICALISATION = "poptorch/source/popart_canonicalization/"
IPU_KEY_FILES = (
    "poptorch/source/dispatch_tracer/RegisterOptionalAtenOps.cpp.inc",
    "poptorch/source/dispatch_tracer/RegisterAtenOverloads.cpp",
)
INPLACE_FILE = "poptorch/source/InplaceOps.cpp"
OUTPLACE_FILE = "poptorch/source/include/poptorch/InplaceOpsPyTorch.hpp_nolint"

_HANDLER_DEF = re.compile(
    r"torch::jit::Node\s*\*\s*(\w+)\s*\(\s*torch::jit::Graph\s*\*\s*\w*\s*,"
    r"\s*torch::jit::Node\s*\*\s*\w*\s*\)\s*\{"
)
_REGISTER = re.compile(r"registerHandler\(\s*c10::aten::(\w+)\s*,\s*(\w+)\s*\)")
_LIBRARY = re.compile(r"TORCH_LIBRARY_IMPL\(\s*aten\s*,\s*(\w+)\s*,\s*m\s*\)\s*\{")
_IMPL = re.compile(r'm\.impl\(\s*"([\w.]+)"\s*,\s*([^;]*?)\)\s*;', re.S)
_TARGET = re.compile(r"(?:PTC_BOXED|PTC|makeFromBoxedFunction<&)\(?\s*(?:poptorch::)?([\w:]+)")


def _git(git_dir: str, *args: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", git_dir, *args], check=True, capture_output=True, text=True
    ).stdout


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _bodies(text: str) -> Dict[str, str]:
    """Handler name → its source text, up to the next handler definition (handlers are
    file-level functions with one signature, so this is their body and nothing else's)."""
    starts = [(m.start(), m.group(1)) for m in _HANDLER_DEF.finditer(text)]
    end = text.find("__attribute__((constructor")  # the registrations name every handler
    end = len(text) if end < 0 else end
    return {
        name: text[start : starts[i + 1][0] if i + 1 < len(starts) else end]
        for i, (start, name) in enumerate(starts)
    }


def _handlers(git_dir: str, tag: str):
    files = [
        p
        for p in _git(git_dir, "ls-tree", "-r", "--name-only", tag, "--", CANONICALISATION).split()
        if p.endswith(".cpp")
    ]
    registered: Dict[str, Tuple[str, str]] = {}  # op → (handler, "file:line")
    bodies: Dict[str, str] = {}
    for path in files:
        text = _git(git_dir, "show", f"{tag}:{path}")
        bodies.update(_bodies(text))
        for m in _REGISTER.finditer(text):
            registered[m.group(1)] = (m.group(2), f"{path}:{_line(text, m.start())}")
    return registered, bodies


def _closure(bodies: Dict[str, str], marker: str) -> Set[str]:
    """Handlers whose body contains ``marker`` or names a handler that does."""
    found = {name for name, body in bodies.items() if marker in body}
    while True:
        more = {
            name
            for name, body in bodies.items()
            if name not in found and any(re.search(rf"\b{h}\b", body) for h in found)
        }
        if not more:
            return found
        found |= more


def _ipu_key_ops(git_dir: str, tag: str) -> Dict[str, Dict[str, str]]:
    ops: Dict[str, Dict[str, str]] = {}
    for path in IPU_KEY_FILES:
        text = _git(git_dir, "show", f"{tag}:{path}")
        for lib in _LIBRARY.finditer(text):
            end = text.find("\n}", lib.end())
            for m in _IMPL.finditer(text, lib.end(), end):
                target = _TARGET.search(m.group(2))
                ops[m.group(1)] = {
                    "key": lib.group(1),
                    "function": target.group(1) if target else m.group(2).strip(),
                    "source": f"{path}:{_line(text, m.start())}",
                }
    return ops


def _only_inplace(git_dir: str, tag: str) -> Tuple[List[str], str]:
    text = _git(git_dir, "show", f"{tag}:{INPLACE_FILE}")
    m = re.search(r"onlyInplaceOps\(\)\s*\{.*?=\s*\{(.*?)\};", text, re.S)
    names = re.findall(r"aten::(\w+)", m.group(1))
    return names, f"{INPLACE_FILE}:{_line(text, m.start())}"


def _outplace(git_dir: str, tag: str) -> Tuple[Dict[str, str], str]:
    text = _git(git_dir, "show", f"{tag}:{OUTPLACE_FILE}")
    m = re.search(r"inPlaceToOutOfPlace\s*=\s*\{(.*?)\};", text, re.S)
    pairs = dict(re.findall(r"\{\s*aten::(\w+)\s*,\s*aten::(\w+)\s*\}", m.group(1)))
    return pairs, f"{OUTPLACE_FILE}:{_line(text, m.start())}"


def extract(git_dir: str, tag: str = DEFAULT_TAG) -> dict:
    registered, bodies = _handlers(git_dir, tag)
    losses = _closure(bodies, "createIdentityloss")
    affine = _closure(bodies, "maybeInitializeAffineParamConstants(")
    only_inplace, inplace_source = _only_inplace(git_dir, tag)
    outplace, outplace_source = _outplace(git_dir, tag)
    return {
        "repository": "https://github.com/graphcore/poptorch",
        "tag": tag,
        "commit": _git(git_dir, "rev-parse", f"{tag}^{{commit}}").strip(),
        "regenerate": "python -m ipu_options.emulator.poptorch_sources --git-dir DIR --tag TAG",
        "handlers": {op: src for op, (_, src) in sorted(registered.items())},
        "loss_handlers": sorted(op for op, (h, _) in registered.items() if h in losses),
        "affine_pair_handlers": sorted(op for op, (h, _) in registered.items() if h in affine),
        "ipu_key_ops": dict(sorted(_ipu_key_ops(git_dir, tag).items())),
        "only_inplace": {"ops": only_inplace, "source": inplace_source},
        "outplace": {"ops": outplace, "source": outplace_source},
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--git-dir", required=True, help="a clone of graphcore/poptorch (bare is fine)")
    parser.add_argument("--tag", default=DEFAULT_TAG)
    parser.add_argument("--out", default=str(DATA))
    args = parser.parse_args(argv)
    data = extract(args.git_dir, args.tag)
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(
        f"{args.out}: {len(data['handlers'])} aten handlers, {len(data['loss_handlers'])} losses, "
        f"{len(data['ipu_key_ops'])} IPU-key registrations from {args.tag} ({data['commit'][:10]})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
