"""Where a run reports: ``metrics.jsonl`` in its folder, a progress line on the console, and
optionally Weights & Biases.

wandb is offline unless the user sets ``log.wandb_mode=online``: an offline run writes to
``<run>/wandb/`` and never touches the network or asks for a login (``wandb sync`` uploads it
later). Without the ``wandb`` package the run goes on with a warning.
"""

import errno
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Union

from app.config import Config
from app.run_folder import RunFolder


def new_folder(root: Path, name: str) -> Path:
    """Create ``root/name``, or ``name-1``, ``name-2`` … when it exists: an existing folder (a
    user's earlier run) is never reused or overwritten."""
    root = Path(root)
    writer = RunFolder(root)
    with writer.guard(root):  # runs/ a file, read-only, a full disk: a message naming the fix
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(root))
        root.mkdir(parents=True, exist_ok=True)
        for attempt in range(1000):
            path = root / (name if attempt == 0 else f"{name}-{attempt}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    raise RuntimeError(f"could not create a new folder for {name} in {root}")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


METRICS = "metrics.jsonl"


class Tracker:
    """Metrics of one run, appended to its ``metrics.jsonl`` through the run-folder writer (a
    resumed run first removes a torn last line). Only the main process writes (``enabled=False``
    elsewhere)."""

    def __init__(
        self,
        folder: Union[RunFolder, Path],
        cfg: Config,
        enabled: bool = True,
        total_steps: int = 0,
        resumed: bool = False,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
        self.path = self.folder / METRICS
        if enabled and resumed:
            self.folder.repair_log(METRICS)
        self.wandb = None
        self._window_start: Optional[float] = None
        self._window_images = 0
        self._window_steps = 0
        self._window_losses: List[float] = []
        self._window_wait = 0.0  # seconds the loop spent blocked on the loader in this window
        self._step_seconds: Optional[float] = None  # smoothed time per step, for the ETA
        if enabled and cfg.log.wandb:
            with self.folder.guard(self.folder / "wandb"):
                self.wandb = _start_wandb(self.folder.path, cfg)

    # -- the window since the last logged step: images, time and losses
    def start_window(self) -> None:
        self._window_start, self._window_images, self._window_steps = time.perf_counter(), 0, 0
        self._window_losses = []
        self._window_wait = 0.0

    def timed(self, batches: Iterable[Any]) -> Iterator[Any]:
        """``batches``, adding the time each one takes to arrive to the window's data wait: the
        time training stood still for the input pipeline (workers not keeping up, decode on the
        main process). Near 0 % the run is device-bound; a large share means input-bound."""
        iterator = iter(batches)
        while True:
            asked = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self._window_wait += time.perf_counter() - asked
            yield batch

    def count(self, images: int, loss: float) -> None:
        self._window_images += images
        self._window_steps += 1
        if math.isfinite(loss):
            self._window_losses.append(loss)

    def _throughput(self) -> Dict[str, float]:
        elapsed = time.perf_counter() - (self._window_start or time.perf_counter())
        if elapsed <= 0 or not self._window_steps:
            return {"images_per_s": float("nan"), "step_s": float("nan"), "data_wait": float("nan")}
        per_step = elapsed / self._window_steps
        s = self._step_seconds
        self._step_seconds = per_step if s is None else 0.7 * s + 0.3 * per_step
        return {
            "images_per_s": self._window_images / elapsed,
            "step_s": per_step,
            "data_wait": min(self._window_wait / elapsed, 1.0),
        }

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        # Strict JSON: a non-finite number is written as null.
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        record = {"time": round(time.time(), 3), **finite}
        self.folder.append_line(METRICS, json.dumps(record))
        if self.wandb is not None:
            with self.folder.guard(self.folder / "wandb"):
                self.wandb.log(
                    {k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step")
                )

    def log_step(self, step: int, epoch: float, lr: float, **extra: Any) -> None:
        """Log the mean loss and the throughput of the steps since the last call."""
        losses = self._window_losses
        loss = sum(losses) / len(losses) if losses else float("nan")
        speed = self._throughput()
        # data_wait_s / data_wait_fraction: time blocked on the loader in the window (see timed)
        self.write(
            {
                "kind": "train",
                "step": step,
                "epoch": round(epoch, 4),
                "loss": loss,
                "lr": lr,
                "images_per_s": round(speed["images_per_s"], 2),
                "data_wait_s": round(self._window_wait, 4),
                "data_wait_fraction": round(speed["data_wait"], 4),
                **extra,
            }
        )
        if self.enabled:
            eta = (self.total_steps - step) * (self._step_seconds or float("nan"))
            print(
                f"step {step:>6}/{self.total_steps} | epoch {epoch:6.2f} | loss {loss:.4f} | "
                f"lr {lr:.3e} | {speed['images_per_s']:7.1f} img/s | "
                f"data wait {100 * speed['data_wait']:4.1f}% | ETA {format_duration(eta)}",
                flush=True,
            )
        self.start_window()

    def log_validation(
        self, step: int, epoch: float, results: Dict[str, Dict[str, float]], skipped_images: int = 0
    ) -> None:
        """``results``: {"raw@32": {"top1":…, "top5":…, "loss":…}, "ema@32": {…}};
        ``skipped_images``: unreadable validation images replaced during this validation."""
        flat = {f"{name}/{k}": round(v, 5) for name, r in results.items() for k, v in r.items()}
        self.write(
            {"kind": "val", "step": step, "epoch": round(epoch, 4), **flat, "skipped_images": skipped_images}
        )
        if self.enabled:
            parts = [f"{name} top-1 {r['top1']:.2f}% top-5 {r['top5']:.2f}%" for name, r in results.items()]
            note = f" ({skipped_images} unreadable images replaced)" if skipped_images else ""
            print(f"validation at step {step} (epoch {epoch:.2f}): " + " | ".join(parts) + note, flush=True)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _start_wandb(run_dir: Path, cfg):
    try:
        wandb = importlib.import_module("wandb")
    except ImportError:
        print(
            "warning: log.wandb=true but the wandb package is not installed; "
            "logging to metrics.jsonl only (pip install wandb)",
            file=sys.stderr,
        )
        return None
    mode = cfg.log.wandb_mode
    if mode == "offline":
        os.environ["WANDB_MODE"] = "offline"  # also covers wandb's background service
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.log.wandb_project,
        name=Path(run_dir).name,
        dir=str(run_dir),
        config=cfg.to_dict(),
        mode=mode,
        resume="allow",
        id=Path(run_dir).name,
    )
