"""Where a ``paper`` or ``study`` run stands, so that ``--resume FOLDER`` continues at the phase it
reached: the phases finished (their results, in ``progress.json``), the one interrupted (its run
folder, resumed from its checkpoint), and what the first start settled (``config.yaml``, the
resolutions, the command) so that a resume repeats it exactly."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from app.checkpoint import CHECKPOINT_DIR, find_checkpoint
from app.config import Config, config_from_dict, read_yaml_file
from app.errors import AppError
from app.finetune import FinetuneResult, resume_finetune, run_finetune
from app.run_folder import RunFolder, python_command
from app.train import TrainResult, run_training

STATE = "progress.json"


def experiment_resume_command(folder: Path, command: str) -> str:
    """The command that continues the paper or study in ``folder``, runnable as printed."""
    return f"{python_command()} -m experiments {command} --resume {folder}"


class Progress:
    """``progress.json`` of a paper or study folder: ``setup`` (what the first start settled),
    ``done`` (phase → its result), ``partial`` (phase → the time and images of its stopped parts)."""

    def __init__(self, folder: Path, setup: Optional[Dict[str, Any]] = None):
        self.folder = Path(folder)
        self.writer = RunFolder(self.folder)
        path = self.folder / STATE
        if setup is None:  # a resume: what the first start recorded
            if not path.is_file():
                raise AppError(
                    f"--resume {folder}: no {STATE} there, so it is not a paper or study "
                    "folder this version started; give the runs/paper-… or runs/study-… "
                    "folder that the stop message named"
                )
            self.data = json.loads(path.read_text())
        else:
            self.data = {"setup": setup, "done": {}, "partial": {}}
            self.save()

    @property
    def setup(self) -> Dict[str, Any]:
        return self.data["setup"]

    def save(self) -> None:
        self.writer.write_document(STATE, json.dumps(self.data, indent=1, sort_keys=True) + "\n")

    def finished(self, phase: str, result: Dict[str, Any]) -> None:
        self.data["done"][phase] = result
        self.data["partial"].pop(phase, None)
        self.save()

    def stopped(self, phase: str, run: TrainResult) -> None:
        """A phase stopped by a signal: its time, steps and images so far count towards its total,
        and its validation (a stop right after the last step comes after the final one)."""
        empty = {"train_seconds": 0.0, "wall_seconds": 0.0, "images": 0, "steps": 0, "results": {}}
        part = self.data["partial"].setdefault(phase, empty)
        for key in ("train_seconds", "wall_seconds", "images", "steps"):
            part[key] += getattr(run, key)
        part["results"] = run.results or part["results"]
        self.save()

    def whole(self, phase: str, run: TrainResult) -> TrainResult:
        """A phase's run as one: the stopped parts of a resumed run added (steps: the run's own)."""
        part = self.data["partial"].get(phase, {})
        counted = run.steps + part.get("steps", 0)  # a kill -9 loses a part's count: images per
        per_step = (run.images + part.get("images", 0)) / counted if counted else 0.0  # step stay
        run.train_seconds += part.get("train_seconds", 0.0)
        run.wall_seconds += part.get("wall_seconds", 0.0)
        run.images = round(per_step * run.last_step)
        run.steps = run.last_step
        run.results = run.results or part.get("results", {})
        return run


def saved_train_result(data: Dict[str, Any]) -> TrainResult:
    return TrainResult(**{**data, "run_dir": Path(data["run_dir"])})


def saved_finetune_result(data: Dict[str, Any]) -> FinetuneResult:
    return FinetuneResult(**{**data, "run": saved_train_result(data["run"]), "source": Path(data["source"])})


def as_record(result: Any) -> Dict[str, Any]:
    return json.loads(json.dumps(asdict(result), default=str))


def resumable(run_dir: Path) -> bool:
    """A phase's run folder that a stop (or kill) left with a checkpoint to continue from."""
    try:
        return run_dir.is_dir() and find_checkpoint(run_dir) is not None
    except AppError:
        return False


def clear_unstarted(run_dir: Path) -> None:
    """A phase's run folder that a kill -9 left before its first checkpoint holds nothing to
    continue from (this command wrote all of it): removed, so the phase starts again under its
    own name rather than beside it as ``<name>-1``."""
    is_run = (run_dir / "config.yaml").is_file()  # a run folder, never the folder holding runs
    if is_run and not any((run_dir / CHECKPOINT_DIR).glob("*.pt")):
        shutil.rmtree(run_dir)
        print(f"{run_dir}: killed before its first checkpoint; starting it again", flush=True)


def own_config(run_dir: Path) -> Config:
    """A run's own configuration, set to resume it (so nothing but the resume differs)."""
    data = read_yaml_file(run_dir / "config.yaml")
    data["resume"] = str(run_dir)
    return config_from_dict(data)


def train_phase(progress: Progress, phase: str, run_cfg: Config) -> TrainResult:
    """Train ``run_cfg`` (log.out_dir/log.name: the phase's run folder) once: its recorded result
    when it finished, a resume when it stopped, else a new run."""
    if phase in progress.data["done"]:
        return saved_train_result(progress.data["done"][phase])
    run_dir = Path(run_cfg.log.out_dir) / run_cfg.log.name
    if resumable(run_dir):
        run = run_training(own_config(run_dir))
    else:
        clear_unstarted(run_dir)
        run = run_training(run_cfg)
    return record(progress, phase, run, run, as_record)


def finetune_phase(
    progress: Progress, phase: str, ft_cfg: Config, source: Path, keep_max_steps: bool
) -> FinetuneResult:
    """Fine-tune as ``train_phase`` trains: recorded, resumed or new."""
    if phase in progress.data["done"]:
        return saved_finetune_result(progress.data["done"][phase])
    run_dir = Path(ft_cfg.log.out_dir) / ft_cfg.log.name
    if resumable(run_dir):
        result = resume_finetune(own_config(run_dir))
    else:
        clear_unstarted(run_dir)
        result = run_finetune(ft_cfg, source, keep_max_steps=keep_max_steps)
    return record(progress, phase, result.run, result, as_record)


def record(
    progress: Progress, phase: str, run: TrainResult, result: Any, to_record: Callable[[Any], Dict[str, Any]]
) -> Any:
    if run.exit_code > 128:
        progress.stopped(phase, run)
    elif run.exit_code == 0:
        progress.whole(phase, run)
        progress.finished(phase, to_record(result))
    return result
