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
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from app.errors import AppError

CHECKPOINT_DIR = "checkpoints"
BEST = "best.pt"
STEP_FILE = re.compile(r"step-(\d+)\.pt")
# The fields of cfg.model that decide the shapes and meaning of the weights.
ARCH_FIELDS = ("name", "group_size", "expand_ratio", "norm", "proxy_norm", "norm_groups")


class CheckpointError(AppError):
    pass


# ----------------------------------------------------------------------------- writing

def atomic_save(payload: Dict[str, Any], path: Union[str, Path]) -> Path:
    """Write to a temporary file in the same folder, flush it to disk, then rename over ``path``:
    a crash at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is still atomic
    return path


def step_checkpoints(folder: Union[str, Path]) -> List[Path]:
    """``step-*.pt`` files in ``folder``, oldest step first."""
    folder = Path(folder)
    found = [(int(m.group(1)), p) for p in folder.glob("step-*.pt") if (m := STEP_FILE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def nonfinite_tensors(state: Dict[str, Any], prefix: str = "") -> List[str]:
    """Names of the floating-point tensors of ``state`` holding NaN or inf (a state dict)."""
    return [prefix + name for name, value in state.items()
            if isinstance(value, torch.Tensor) and value.is_floating_point()
            and not bool(torch.isfinite(value).all())]


def save_checkpoint(run_dir: Union[str, Path], payload: Dict[str, Any], keep: int,
                    is_best: bool = False) -> Path:
    folder = Path(run_dir) / CHECKPOINT_DIR
    path = atomic_save(payload, folder / f"step-{payload['step']:07d}.pt")
    if is_best:
        atomic_save(payload, folder / BEST)
    for old in step_checkpoints(folder)[:-keep]:
        old.unlink()
    return path


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
        f"would overwrite. Continue the run from its newest checkpoint: python -m app train --resume "
        f"{run}; or start a new run from these weights: python -m app train --config "
        f"{run / 'config.yaml'} model.init_from={path}; or move the newer checkpoints out of "
        f"{path.parent} first to continue from this one in place")


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


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error


def arch_of(model_cfg, num_classes: int) -> Dict[str, Any]:
    arch = {name: getattr(model_cfg, name) for name in ARCH_FIELDS}
    arch["num_classes"] = num_classes
    return arch


def check_architecture(payload: Dict[str, Any], model_cfg, num_classes: int, source: Any) -> None:
    """Raise naming every architectural field where the checkpoint and this run differ."""
    saved = payload.get("arch")
    if saved is None:
        return  # not one of ours: load_weights reports mismatches by parameter name
    current = arch_of(model_cfg, num_classes)
    diffs = [f"{'model.' if k != 'num_classes' else ''}{k}: checkpoint {saved.get(k)!r}, this run {v!r}"
             for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {source} is for a different architecture ("
                              + "; ".join(diffs) + "). Use the checkpoint's own settings "
                              "(validate/resume from its run folder without --config), or another checkpoint")


def load_weights(module: torch.nn.Module, state: Dict[str, Any], source: Any) -> None:
    """``load_state_dict`` with the parameter-level mismatches spelled out."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and hasattr(state[k], "shape") and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        def head(items: List[str]) -> str:
            return ", ".join(items[:4]) + (f" (+{len(items) - 4} more)" if len(items) > 4 else "")
        parts = [f"missing {head(missing)}" if missing else "",
                 f"unexpected {head(unexpected)}" if unexpected else "",
                 f"shape (checkpoint vs model) {head(shapes)}" if shapes else ""]
        raise CheckpointError(f"weights in {source} do not fit this model: "
                              + "; ".join(p for p in parts if p))
    module.load_state_dict(state)


def latest_run(out_dir: Union[str, Path]) -> Optional[Path]:
    """The most recently modified run folder that has a checkpoint."""
    runs = [p for p in Path(out_dir).glob("*") if (p / CHECKPOINT_DIR).is_dir()]
    return max(runs, key=lambda p: p.stat().st_mtime) if runs else None
