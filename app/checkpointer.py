"""The Checkpointer: what a training run saves, when, and how a resumed run gets it back.

It owns the checkpoint's contents (the state of every part the trainer hands it, the loop's
counters, the random states, the configuration and architecture), the resume policy (which
checkpoint, that it is the run's newest and of this kind of run, the run folder's lock and the
repairs of a killed run), and the save interval: a checkpoint every ``train.checkpoint_every``
steps and at least every ``train.checkpoint_minutes`` minutes, so after a kill -9 the newest
checkpoint is a bounded amount of work behind. Files are written through the run-folder writer
(app/run_folder.py). It knows nothing of data loaders or validation.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from app.checkpoint import (
    CHECKPOINT_DIR,
    begin_resume,
    check_resume_is_newest,
    claim_run,
    find_checkpoint,
    load_checkpoint,
    newest_whole,
    nonfinite_tensors,
    rng_state,
    run_dir_of,
    save_checkpoint,
    saved_best_top1,
    set_rng_state,
)
from app.errors import AppError
from app.run_folder import RunFolder, resume_command


@dataclass(frozen=True)
class CheckpointSpec:
    """When checkpoints are written and how many are kept (from ``cfg.train``)."""

    keep: int = 3  # step checkpoints kept (best.pt besides)
    every_steps: Optional[int] = None  # a checkpoint every N steps (None: by time only)
    every_minutes: Optional[float] = None  # at least every M minutes of training (None: off)

    @classmethod
    def of(cls, train_cfg: Any) -> "CheckpointSpec":
        return cls(
            keep=train_cfg.keep_checkpoints,
            every_steps=train_cfg.checkpoint_every,
            every_minutes=train_cfg.checkpoint_minutes,
        )


# The parts whose state a checkpoint holds, by payload key; each has state_dict/load_state_dict.
# The model is loaded by the trainer before its backend copies it (its errors name parameters).
RESTORED_PARTS = ("ema", "optimizer", "backend")


class Checkpointer:
    """Saves one run's state into its folder and gives a resumed run its state back."""

    def __init__(self, spec: CheckpointSpec, kind: str, is_main: bool):
        self.spec, self.kind, self.is_main = spec, kind, is_main
        self.folder: Optional[RunFolder] = None
        self.resumed: Optional[Dict[str, Any]] = None  # the checkpoint being resumed
        self.resumed_path: Optional[Path] = None
        self.last_saved: Optional[int] = None  # the step of the newest good checkpoint
        self._saved_at = time.monotonic()

    # ------------------------------------------------------------------------- resume policy
    def open_resume(
        self,
        source: str,
        own_states: Callable[[Dict[str, Any]], Dict[str, Any]],
        check_config: Callable[[Dict[str, Any], Path, Path], None],
    ) -> Dict[str, Any]:
        """The checkpoint of ``source`` (a run folder or file) this process resumes, with its own
        random states (``own_states``). Refused when a newer checkpoint of the run exists, when
        ``check_config(saved config, run folder, checkpoint)`` refuses, or when it belongs to
        another kind of run. The main process takes the folder's lock first (another process may
        be training it) and repairs what a killed run left."""
        path = find_checkpoint(source)
        run_dir = run_dir_of(path)
        if self.is_main:
            claim_run(run_dir, new=False)
        payload = own_states(load_checkpoint(path, expect="training"))
        check_resume_is_newest(path, payload["step"])
        check_config(payload["config"], run_dir, path)
        if self.is_main:
            begin_resume(path, payload)
        recorded = payload.get("run_kind", self.kind)  # older checkpoints: any kind
        if recorded != self.kind:  # a kind is named after the command that runs it
            raise AppError(
                f"{path} is a checkpoint of a {recorded} run, not of a {self.kind} run: "
                f"resume it with {resume_command(run_dir, recorded)}"
            )
        print(f"resuming from {path} (step {payload['step']})")
        self.resumed, self.resumed_path = payload, path
        self.last_saved = payload["step"]
        return payload

    def attach(self, folder: RunFolder) -> None:
        """The run folder checkpoints go to (its resume command goes into every failure message)."""
        folder.whole = lambda: newest_whole(folder / CHECKPOINT_DIR)
        self.folder = folder

    def restore(self, parts: Dict[str, Any]) -> Dict[str, Any]:
        """A resumed run's state into ``parts`` (by payload key: ema, optimizer, backend; None for
        a part the run lacks), then the random states, last (the model's initialisation drew from
        them). Returns the loop's counters: step, ema_step, best_top1, epoch_rng, losses."""
        resumed = self.resumed
        for name in RESTORED_PARTS:
            if parts.get(name) is not None and resumed.get(name) is not None:
                parts[name].load_state_dict(resumed[name])
        best = max(resumed["best_top1"], saved_best_top1(self.folder.path))  # best.pt: only a better one
        set_rng_state(resumed["rng"])
        return {
            "step": resumed["step"],
            "ema_step": resumed.get("ema_step", resumed["step"]),
            "best_top1": best,
            "epoch_rng": resumed["epoch_rng"],
            "losses": resumed.get("losses", []),  # older checkpoints: the resumed part's only
        }

    # ------------------------------------------------------------------------- saving
    def due(self, step: int) -> bool:
        """Whether the interval asks for a checkpoint after ``step`` (besides validation's)."""
        spec = self.spec
        if spec.every_steps and step % spec.every_steps == 0:
            return True
        return bool(spec.every_minutes) and time.monotonic() - self._saved_at >= 60 * spec.every_minutes

    @staticmethod
    def nonfinite(states: Dict[str, Dict[str, Any]]) -> List[str]:
        """Names of the non-finite tensors of ``states`` (prefix → state dict): a checkpoint holds
        finite weights only."""
        return [name for prefix, state in states.items() for name in nonfinite_tensors(state, prefix)]

    def payload(
        self,
        step: int,
        steps_per_epoch: int,
        parts: Dict[str, Any],
        counters: Dict[str, Any],
        record: Dict[str, Any],
    ) -> Dict[str, Any]:
        """A checkpoint's contents: every part's state by key (None for one the run lacks), the
        loop's ``counters`` (ema_step, best_top1, epoch_rng, losses), this process's random states and the
        ``record`` (metrics, arch, config, what the run's hook adds)."""
        return {
            "step": step,
            "epoch": step // steps_per_epoch,
            "step_in_epoch": step % steps_per_epoch,
            "steps_per_epoch": steps_per_epoch,
            **{name: part.state_dict() if part is not None else None for name, part in parts.items()},
            **counters,
            "rng": rng_state(),
            "run_kind": self.kind,
            **record,
        }

    def save(self, payload: Dict[str, Any], is_best: bool = False) -> Path:
        """Write ``payload`` as the step's checkpoint (and best.pt), keeping the newest
        ``spec.keep``; the main process only."""
        path = save_checkpoint(self.folder, payload, self.spec.keep, is_best)
        self.saved(payload["step"])
        return path

    def saved(self, step: int) -> None:
        """Every process: ``step`` is the newest checkpoint now; the interval starts again."""
        self.last_saved = step
        self._saved_at = time.monotonic()
