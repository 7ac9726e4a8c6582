"""Checkpoints: written atomically, the last N and the best kept, loaded without unpickling code.

A checkpoint is a dict of tensors and plain containers only (``torch.load(weights_only=True)``
refuses anything else): model, EMA, optimiser, backend (loss scaler), the step and data
position, RNG states, the resolved configuration and the architecture it was trained with.
Files live in ``<run>/checkpoints/``: ``step-0000123.pt`` for the last N, ``best.pt`` for the
best validation accuracy so far.
"""

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional, Union

import numpy as np
import torch

from app.config import ModelConfig
from app.errors import AppError
from app.run_folder import TMP_MARK, RunFolder, python_command, replace_atomically, resume_command
from backends.process import proc_stat

CHECKPOINT_DIR = "checkpoints"
BEST = "best.pt"
STEP_FILE = re.compile(r"step-(\d+)\.pt")
# The fields of cfg.model that decide the shapes and meaning of the weights.
ARCH_FIELDS = (
    "name",
    "group_size",
    "expand_ratio",
    "norm",
    "proxy_norm",
    "norm_groups",
    "padding",
    "graph",
    "norm_grouping",
)
# What a checkpoint without a recorded graph variant computed (written before padding and graph
# were fields): the override that builds that function again.
UNRECORDED_GRAPH = {"padding": "symmetric", "graph": "v1"}
# What a group-norm checkpoint without a recorded channel grouping computed (torch's groups).
UNRECORDED_GROUPING = {"norm_grouping": "contiguous"}


class CheckpointError(AppError):
    pass


# ----------------------------------------------------------------------------- writing


def atomic_save(payload: Dict[str, Any], path: Union[str, Path]) -> Path:
    """``torch.save`` through the run-folder writer's atomic replacement: a crash at any moment
    leaves either the old file or the new one, never half of one."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return replace_atomically(Path(path), lambda f: torch.save(payload, f))


def atomic_copy(source: Union[str, Path], path: Union[str, Path]) -> Path:
    """``source``'s bytes as ``path``, with the same guarantee as ``atomic_save``."""

    def copy(f: BinaryIO) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, f)

    return replace_atomically(Path(path), copy)


def newest_whole(folder: Union[str, Path]) -> str:
    """What a failed write leaves whole in a run's checkpoint folder, for its message."""
    folder = Path(folder)
    if not folder.parent.is_dir():
        return (
            f"nothing was lost on disk: {folder.parent} is no longer there, and its files "
            "(checkpoints included) are wherever it was moved"
        )
    steps = step_checkpoints(folder)
    if steps:
        return f"the newest complete checkpoint, {steps[-1]}, and every earlier file of the run"
    return "every earlier file of the run (it has no checkpoint yet)"


def step_checkpoints(folder: Union[str, Path]) -> List[Path]:
    """``step-*.pt`` files in ``folder``, oldest step first."""
    folder = Path(folder)
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := STEP_FILE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def nonfinite_tensors(state: Dict[str, Any], prefix: str = "") -> List[str]:
    """Names of the floating-point tensors of ``state`` holding NaN or inf (a state dict)."""
    return [
        prefix + name
        for name, value in state.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]


def save_checkpoint(
    run_dir: Union[str, Path, RunFolder], payload: Dict[str, Any], keep: int, is_best: bool = False
) -> Path:
    """The step checkpoint (and best.pt), then the oldest beyond ``keep`` removed. A failed write
    (a full disk, a folder gone) raises RunFolderError naming what is whole and how to go on."""
    run = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
    if run.whole is None:
        run.whole = lambda: newest_whole(run / CHECKPOINT_DIR)
    names = [f"{CHECKPOINT_DIR}/step-{payload['step']:07d}.pt"]
    names += [f"{CHECKPOINT_DIR}/{BEST}"] if is_best else []
    for name in names:
        run.write_document(name, lambda f: torch.save(payload, f))
    folder = run / CHECKPOINT_DIR
    with run.guard(folder):
        for old in step_checkpoints(folder)[:-keep]:
            old.unlink()
    return run / names[0]


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> Dict[str, Any]:
    """Every random generator the loop draws from, as tensors and plain lists."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- reading


def find_checkpoint(source: Union[str, Path], prefer_best: bool = False) -> Path:
    """A checkpoint file from a file path or a run folder (its newest step, or best.pt)."""
    source = Path(source)
    if source.is_file():
        return source
    folder = source / CHECKPOINT_DIR if (source / CHECKPOINT_DIR).is_dir() else source
    if not folder.is_dir():
        raise CheckpointError(f"{source} is neither a checkpoint file nor a run folder")
    steps = step_checkpoints(folder)
    best = folder / BEST
    if prefer_best and best.is_file():
        return best
    if steps:
        return steps[-1]
    if best.is_file():
        return best
    raise CheckpointError(f"no checkpoint in {folder} (expected step-*.pt or {BEST})")


def step_of(path: Path) -> Optional[int]:
    """The step in a ``step-NNNNNNN.pt`` file name (None for other names, e.g. best.pt)."""
    match = STEP_FILE.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def check_resume_is_newest(path: Union[str, Path], step: int) -> None:
    """Resuming writes new step checkpoints and best.pt into the checkpoint's folder: from an older
    checkpoint of a run that went further, that would replace the newer checkpoints (and the run's
    later history) with another continuation. Refuse, naming them and the ways out."""
    path = Path(path)
    newer = [p for p in step_checkpoints(path.parent) if (step_of(p) or 0) > step]
    if not newer:
        return
    run = run_dir_of(path)
    names = ", ".join(p.name for p in newer)
    raise CheckpointError(
        f"{path} is at step {step}, but its run has newer checkpoints ({names}) that resuming from it "
        f"would overwrite. Continue the run from its newest checkpoint: {resume_command(run)}; or "
        f"start a new run from these weights: {python_command()} -m app train --config "
        f"{run / 'config.yaml'} model.init_from={path}; or move the newer checkpoints out of "
        f"{path.parent} first to continue from this one in place"
    )


def saved_best_top1(run_dir: Union[str, Path]) -> float:
    """The validation top-1 of the run's best.pt (-1 without one): a resumed run replaces best.pt
    only with a better model than the one there."""
    best = Path(run_dir) / CHECKPOINT_DIR / BEST
    if not best.is_file():
        return -1.0
    return float(load_checkpoint(best).get("best_top1", -1.0))


def run_dir_of(checkpoint: Union[str, Path]) -> Path:
    checkpoint = Path(checkpoint)
    parent = checkpoint.parent
    return parent.parent if parent.name == CHECKPOINT_DIR else parent


TRAINING_KEYS = ("step", "model", "steps_per_epoch")  # what every training checkpoint holds


def load_checkpoint(
    path: Union[str, Path], map_location: Union[str, torch.device] = "cpu", expect: Optional[str] = None
) -> Dict[str, Any]:
    """A checkpoint's contents, without running any code it holds. ``expect="training"``: it must
    be one of this application's training checkpoints (resume, validate, fine-tune);
    ``expect="weights"``: a state dict (tensors by name, possibly under ``state_dict``) or one of
    ours (``model.init_from``); None: whatever the file holds."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: {first}. It is truncated, damaged, or not a weights-only "
            "torch file (files that need code to load are refused); use another checkpoint, e.g. an "
            "older step-*.pt of the same run"
        ) from None
    if expect is None:
        return payload
    if expect == "training":
        if not (
            isinstance(payload, dict)
            and all(k in payload for k in TRAINING_KEYS)
            and isinstance(payload["model"], dict)
        ):
            raise CheckpointError(
                f"{path} is a torch file ({_describe(payload)}) but not a training checkpoint of this "
                f"application (those hold {', '.join(TRAINING_KEYS)}): give a run folder or its "
                "checkpoints/step-*.pt; to start from other weights use model.init_from=FILE"
            )
        return payload
    weights = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
    if isinstance(weights, dict) and "model" in weights and isinstance(weights["model"], dict):
        weights = weights["model"]  # one of our training checkpoints
    if not (
        isinstance(weights, dict) and weights and all(isinstance(v, torch.Tensor) for v in weights.values())
    ):
        raise CheckpointError(
            f"{path} holds {_describe(payload)}, not weights (a state dict of tensors by name, or one "
            "of our checkpoints): give a weights file for model.init_from"
        )
    return payload


def _describe(payload: Any) -> str:
    if isinstance(payload, dict):
        keys = ", ".join(map(str, list(payload)[:5])) + (" …" if len(payload) > 5 else "")
        return f"a dict of {len(payload)} entries: {keys}"
    if isinstance(payload, torch.Tensor):
        return f"a tensor of shape {tuple(payload.shape)}"
    return f"a {type(payload).__name__}"


def arch_of(model_cfg: ModelConfig, num_classes: int) -> Dict[str, Any]:
    arch = {name: getattr(model_cfg, name) for name in ARCH_FIELDS}
    arch["num_classes"] = num_classes
    return arch


def grouping_matters(arch: Dict[str, Any]) -> bool:
    """Whether an architecture's norm changes with the channel grouping: a group norm of more than
    one group (layer and batch norm are the same function either way)."""
    return arch.get("norm") == "group" and arch.get("norm_groups", 1) > 1


def _unrecorded(saved_arch: Dict[str, Any], model_cfg: ModelConfig) -> Dict[str, Any]:
    """What a checkpoint computed for the graph-variant fields it does not record."""
    missing: Dict[str, Any] = {}
    if not all(k in saved_arch for k in UNRECORDED_GRAPH):
        missing.update(UNRECORDED_GRAPH)
    if "norm_grouping" not in saved_arch:
        # a layer/batch-norm checkpoint computes the same function under either grouping
        missing.update(
            UNRECORDED_GROUPING
            if grouping_matters(saved_arch)
            else {"norm_grouping": model_cfg.norm_grouping}
        )
    return missing


def check_graph_variant(saved_arch: Dict[str, Any], model_cfg: ModelConfig, source: Any) -> Dict[str, Any]:
    """The checkpoint's architecture with its graph variant (padding, graph, a group norm's channel
    grouping). A checkpoint that records none computed ``UNRECORDED_GRAPH`` (and, with group norm,
    ``UNRECORDED_GROUPING``): loading it into another graph would silently compute another
    function, so that is refused with the override that restores its graph."""
    missing = _unrecorded(saved_arch, model_cfg)
    if any(getattr(model_cfg, k) != v for k, v in missing.items()):
        override = " ".join(f"model.{k}={v}" for k, v in missing.items() if getattr(model_cfg, k) != v)
        what = []
        if "graph" in missing:
            what.append(
                "this project's first graph (symmetric padding, squeeze-excite and head of graph v1), "
                f"not this run's (model.padding={model_cfg.padding}, model.graph={model_cfg.graph})"
            )
        if missing.get("norm_grouping") == "contiguous":
            what.append(
                "group norm with torch's contiguous channel groups, not this run's "
                f"model.norm_grouping={model_cfg.norm_grouping}"
            )
        raise CheckpointError(
            f"checkpoint {source} was written before its graph variant was recorded: it computes "
            f"{'; and '.join(what)}. Add {override} to the command line to use it "
            "(docs/official-code.md)"
        )
    return {**missing, **saved_arch}


def check_architecture(
    payload: Dict[str, Any], model_cfg: ModelConfig, num_classes: int, source: Any
) -> None:
    """Raise naming every architectural field where the checkpoint and this run differ."""
    saved = payload.get("arch")
    if saved is None:
        return  # not one of ours: load_weights reports mismatches by parameter name
    saved = check_graph_variant(saved, model_cfg, source)
    current = arch_of(model_cfg, num_classes)
    if not grouping_matters(saved):  # the same function under either grouping
        current["norm_grouping"] = saved["norm_grouping"]
    diffs = [
        f"{'model.' if k != 'num_classes' else ''}{k}: checkpoint {saved.get(k)!r}, this run {v!r}"
        for k, v in current.items()
        if saved.get(k) != v
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {source} is for a different architecture ("
            + "; ".join(diffs)
            + "). Use the checkpoint's own settings "
            "(validate/resume from its run folder without --config), or another checkpoint"
        )


def load_weights(module: torch.nn.Module, state: Dict[str, Any], source: Any) -> None:
    """``load_state_dict`` with the parameter-level mismatches spelled out."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and hasattr(state[k], "shape") and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:

        def head(items: List[str]) -> str:
            return ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")

        parts = [
            f"missing {head(missing)}" if missing else "",
            f"unexpected {head(unexpected)}" if unexpected else "",
            f"shape (checkpoint vs model) {head(shapes)}" if shapes else "",
        ]
        raise CheckpointError(
            f"weights in {source} do not fit this model: " + "; ".join(p for p in parts if p)
        )
    module.load_state_dict(state)


def latest_run(out_dir: Union[str, Path]) -> Optional[Path]:
    """The most recently modified run folder that has a checkpoint."""
    runs = [p for p in Path(out_dir).glob("*") if (p / CHECKPOINT_DIR).is_dir()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None


# ----------------------------------------------------------------------------- run folders

LOCK_FILE = ".lock"
_HELD: Dict[str, Any] = {}  # run folder → its open lock file (held until this process exits)
_CURRENT_RUN: Dict[str, Any] = {"dir": None, "new": False}


def claim_run(run_dir: Union[str, Path], new: bool) -> None:
    """This process trains ``run_dir`` from now on: take the folder's lock (a second process
    resuming the same run at the same time would write the same checkpoints and duplicate its
    metrics), and note the folder for the messages of an interrupted start-up. Resuming, also
    remove what killed runs left behind and repair best.pt (``tidy_resumed_run``)."""
    run_dir = Path(run_dir)
    lock_run_folder(run_dir)
    _CURRENT_RUN.update(dir=run_dir, new=new)


def current_run() -> Dict[str, Any]:
    """{"dir": the run folder this process trains (None before it has one), "new": made by it}."""
    return dict(_CURRENT_RUN)


def lock_run_folder(run_dir: Path) -> None:
    """An exclusive advisory lock (flock) on ``run_dir/.lock`` for this process's lifetime; the
    kernel releases it when the process ends, however it ends (kill -9 included)."""
    key = str(run_dir.resolve())
    if key in _HELD:
        return
    try:
        import fcntl  # (POSIX only)
    except ImportError:
        return  # no flock on this system: runs are not protected against a concurrent resume
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise CheckpointError(
            f"{run_dir} is being trained by {holder} right now: two processes resuming one run would "
            "write the same checkpoints. Wait for it to finish or stop it (Ctrl-C saves), then resume "
            f"again: {resume_command(run_dir)}"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()}\n")
    handle.flush()
    _HELD[key] = handle


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (an ended one its parent has not reaped yet does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process
    fields = proc_stat(pid)
    if not fields:
        return True  # no /proc (not Linux): it exists
    return fields[0] not in ("Z", "X")


def remove_stale_partials(folder: Union[str, Path]) -> List[Path]:
    """Partial checkpoint files (``.<name>.tmp-<pid>``) whose writer is dead: a process killed
    while writing. Those of a living process are left (it may be writing them now)."""
    removed = []
    for tmp in Path(folder).glob(f".*{TMP_MARK}*"):
        pid = tmp.name.rsplit(TMP_MARK, 1)[1]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def own_top1(payload: Dict[str, Any]) -> Optional[float]:
    """The best validation top-1 of the model of this checkpoint itself (None: not validated)."""
    metrics = payload.get("metrics") or {}
    values = [float(v) for v in metrics.values() if isinstance(v, (int, float))]
    return max(values) if values else None


def repair_best(checkpoint: Path, payload: Dict[str, Any]) -> bool:
    """best.pt is written right after the step checkpoint that beat it; killed between the two
    renames, a run keeps an older best.pt than its best model for good. The newest checkpoint
    knows whether it was the best (its own top-1 is the run's best): then best.pt must be it."""
    top1 = own_top1(payload)
    if top1 is None or top1 < float(payload.get("best_top1", -1.0)):
        return False
    best = Path(checkpoint).parent / BEST
    if best.is_file():
        try:
            held = load_checkpoint(best)
        except CheckpointError:
            held = {}
        if held.get("step") == payload["step"] or float(held.get("best_top1", -1.0)) >= top1:
            return False
    atomic_copy(checkpoint, best)
    return True


def tidy_resumed_run(checkpoint: Union[str, Path], payload: Dict[str, Any]) -> List[str]:
    """What a resume repairs in its run folder before training on; returns a note per repair."""
    checkpoint = Path(checkpoint)
    notes = []
    removed = remove_stale_partials(checkpoint.parent)
    if removed:
        notes.append(
            f"removed {len(removed)} partial checkpoint file(s) left by a killed run: "
            + ", ".join(p.name for p in removed)
        )
    if repair_best(checkpoint, payload):
        notes.append(
            f"{BEST} was older than the best checkpoint ({checkpoint.name}, top-1 "
            f"{own_top1(payload):.2f}%): replaced by it"
        )
    return notes


def discard_unstarted_run() -> Optional[Path]:
    """After an interrupted start-up: the new run folder of this process, if it holds nothing but
    its config.yaml (no step trained, nothing the user wrote), is removed; returns it."""
    run_dir, new = _CURRENT_RUN["dir"], _CURRENT_RUN["new"]
    if run_dir is None or not new or not Path(run_dir).is_dir():
        return None

    def untouched(entry: Path) -> bool:
        if entry.name in ("config.yaml", LOCK_FILE):
            return True
        if entry.name == CHECKPOINT_DIR:
            return entry.is_dir() and not any(entry.iterdir())
        if entry.name == "metrics.jsonl":  # the tracker's header only: no step was recorded
            return '"kind": "train"' not in entry.read_text(errors="replace")
        return False

    if not all(untouched(entry) for entry in Path(run_dir).iterdir()):
        return None
    shutil.rmtree(run_dir, ignore_errors=True)
    _CURRENT_RUN.update(dir=None, new=False)
    return Path(run_dir)


def begin_resume(checkpoint: Union[str, Path], payload: Dict[str, Any]) -> None:
    """The main process of a resumed run, before any work: take its folder (``claim_run``),
    clear what a killed run left behind and repair best.pt, saying what it did."""
    claim_run(run_dir_of(checkpoint), new=False)
    for note in tidy_resumed_run(checkpoint, payload):
        print(f"note: {note}")
