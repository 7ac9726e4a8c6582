"""The training loop: ``python -m app train --config PRESET [overrides]``.

``Trainer`` reads top to bottom: set-up (process group, backend, the checkpoint being resumed,
data, model, run folder, optimiser/EMA/backend, the resumed state), the steps (learning rate per
weight update, EMA, progress), validate-and-save when due, then a stop (signal) or a failure
(non-finite loss), and one teardown that always runs. Its state is one ``LoopState``.
Everything device-specific is behind the backend (backends/contract.py); everything that writes
files runs on the main process only. Other kinds of run (fine-tuning) add a ``RunHook``; the
loop does not know them.
"""

import argparse
import itertools
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch
import yaml
from torch import Tensor

from app.backend import Backend, create_backend
from app.checkpoint import (
    arch_of,
    check_architecture,
    claim_run,
    load_checkpoint,
    load_weights,
    rng_state,
    run_dir_of,
    set_rng_state,
)
from app.checkpointer import Checkpointer, CheckpointSpec
from app.config import Config, check_resume_changes, read_yaml_file
from app.data import build_dataset, build_loader
from app.distributed import (
    DistContext,
    gather_rng_states,
    init_distributed,
    launch,
    own_rng_states,
    reduce_results,
    scale_summary,
    shard_sampler,
)
from app.errors import STOP_SIGNALS, AppError
from app.evaluate import validate_all
from app.objective import Classifier, build_classifier, build_network
from app.optim import build_optimizer, divergence_warning, lr_at, peak_lr
from app.resolution import check_resolutions, downsampling_stages
from app.run_folder import (
    RunFolder,
    RunFolderError,
    check_output_root,
    remove_if_empty,
    resume_command,
    resume_hint,
)
from app.specs import data_spec
from app.tracking import Tracker, format_duration, new_folder
from app.weight_average import build_weight_average
from model import convert_state_dict

# fp16: a non-finite loss means the loss scaler skipped that update (weights untouched; the step
# still counts, as the schedule moves on) and lowered its scale. Only when it keeps happening is
# the run itself diverging.
FP16_SKIPS_BEFORE_STOP = 5
# A run that trained to its end without learning: its validation top-1 is within this factor of
# chance and its training loss grew. It exits with DIVERGED, not 0, so `make train && ...` stops.
CHANCE_FACTOR = 1.5
DIVERGED = 4


class NonFiniteLoss(RuntimeError):
    pass


class StopSignal:
    """A stop signal asks the loop to stop after the current step (and save); a second SIGINT
    interrupts at once."""

    def __init__(self, announce: bool = True):
        self.signum: Optional[int] = None
        self.announce = announce  # one process of a job says it (each one receives the signal)
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            print(
                f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                "(press Ctrl-C again to abort without saving)",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


DIGITS_NOTE = (
    "data: the embedded default, scikit-learn's handwritten digits (8×8 images upscaled to "
    "{resolution} px, 10 classes), not ImageNet; for ImageNet give DATA=/path/to/imagenet "
    "(data.dataset) with the model's grid preset, e.g. CONFIG=b2-g16-lnpn"
)


def steps_per_epoch_text(cfg: Config, loop_steps: int, updates_per_step: int) -> str:
    """'11 steps/epoch of the global batch 128': a step is one weight update of the whole job's
    global batch on every backend (torchrun processes, IPU replicas, one process); an IPU host
    batch of several device iterations makes several."""
    updates = loop_steps * updates_per_step
    text = f"{updates} steps/epoch of the global batch {cfg.global_batch}"
    if updates_per_step > 1:
        text += f" ({loop_steps} host batches of {updates_per_step} device iterations)"
    return text


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def new_run_dir(cfg: Config) -> Path:
    """``runs/<name>``; a folder that exists already is never reused: a suffix is added."""
    m = cfg.model
    variant = f"g{m.group_size}-{m.norm}{'-pn' if m.proxy_norm else ''}"
    dataset = Path(cfg.data.dataset).name or "data"
    name = cfg.log.name or f"{m.name}-{variant}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return new_folder(Path(cfg.log.out_dir), name)


PEER_NORM_EPS = 1e-5  # batch-norm epsilon of timm's efficientnet_* and torchvision's b0-b4


def load_initial_weights(model: torch.nn.Module, cfg: Config) -> None:
    """``model.init_from``: start from a local checkpoint (ours, or a timm/torchvision file).
    Every tensor must fit, except the classifier when the number of classes differs (it keeps
    its fresh initialisation)."""
    path, source = cfg.model.init_from, cfg.model.init_source
    state = load_checkpoint(path, expect="weights")  # a state dict or one of our checkpoints
    if source == "ours":
        if "arch" in state:
            check_architecture(state, cfg.model, state["arch"]["num_classes"], path)
        if "model" in state:  # one of our training checkpoints: prefer its EMA weights
            state = state["ema"]["module"] if state.get("ema") else state["model"]
    else:
        state = convert_state_dict(state.get("state_dict", state), source)
        if cfg.model.norm_eps != PEER_NORM_EPS:  # the epsilon is not in a state dict
            print(
                f"note: model.norm_eps={cfg.model.norm_eps:g}, while timm's efficientnet_* and "
                f"torchvision's efficientnet_b0-b4 use {PEER_NORM_EPS:g} (timm's tf_* and torchvision's "
                f"b5-b7 use 1e-3): set model.norm_eps to the source's to reproduce its outputs",
                file=sys.stderr,
            )
        if cfg.model.padding != "symmetric":  # nor is the padding
            print(
                f"note: model.padding={cfg.model.padding}, while torchvision and timm's efficientnet_* "
                "pad symmetrically (timm's tf_efficientnet_* pad as TensorFlow's SAME): set "
                "model.padding to the source's to reproduce its outputs",
                file=sys.stderr,
            )
    own = model.state_dict()
    new_head = [
        k for k in own if k.startswith("classifier.") and k in state and state[k].shape != own[k].shape
    ]
    load_weights(model, {**state, **{k: own[k] for k in new_head}}, path)
    print(
        f"initialised from {path} ({source})"
        + (f"; new classifier for {own['classifier.weight'].shape[0]} classes" if new_head else "")
    )


def epoch_batches(loader: Iterable, start: int) -> Iterator:
    """This epoch's batches from batch ``start`` on, without loading the skipped ones where the
    loader can. The first batch is fetched here, so whatever a loader draws from the global RNG
    when it starts is drawn now, at a point the checkpoint's RNG states can be restored after
    (ours draw their workers' base seed from a generator of their own: app/data/loader.py)."""
    if hasattr(loader, "iterate"):
        batches = iter(loader.iterate(start_batch=start))
    else:
        batches = iter(loader)
        for _ in range(start):
            next(batches)
    first = next(batches, None)
    return itertools.chain([first], batches) if first is not None else iter(())


@dataclass
class TrainSetup:
    """What a ``RunHook.setup`` gets, after the network is built and its initial
    (or resumed) weights are loaded, before the optimiser sees its parameters (so freezing layers
    there takes them out of the optimiser) and before the backend prepares (compiles) the
    classifier."""

    cfg: Config
    model: torch.nn.Module  # the EfficientNet
    classifier: Classifier  # the model with input normalisation and loss
    backend: Backend
    train_loader: Any
    val_loaders: Dict[int, Any]
    run_dir: Path
    host_batch: int  # images per training batch
    resumed: Optional[Dict[str, Any]] = None  # the checkpoint being resumed, if any
    # entries the hook wants in every checkpoint of the run (plain values and tensors only)
    checkpoint_extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    exit_code: int
    run_dir: Path
    steps: int = 0  # weight updates made by this call (not counting a resumed run's earlier ones)
    images: int = 0  # training images those steps consumed
    train_seconds: float = 0.0  # the training loop without validation and checkpoints
    wall_seconds: float = 0.0  # the whole loop
    results: Dict[str, Dict[str, float]] = field(default_factory=dict)  # the last validation
    last_step: int = 0  # the run's step at the end (a resumed run's earlier steps included)
    finished_before: bool = False  # a resumed run that had nothing left to train

    @property
    def images_per_s(self) -> float:
        return self.images / self.train_seconds if self.train_seconds > 0 else float("nan")


def main(cfg: Config, args: Optional[argparse.Namespace] = None) -> int:
    """``python -m app train`` (the command line sends ``train --resume`` of another kind of run
    to that run's command: app/cli.py)."""
    launched = launch(cfg, args)  # replicas over several processes: torchrun / poprun runs this again
    if launched is not None:
        return launched
    return run_training(cfg).exit_code


# ----------------------------------------------------------------------------- over processes


def job_total(dist: DistContext, count: float) -> float:
    """``count`` summed over every process of the job (each counts its own share), e.g. skipped
    images. Every process must call it at the same point."""
    if dist.world_size == 1:
        return count
    return float(dist.all_reduce_sum(torch.tensor(float(count), dtype=torch.float64)))


def any_process(dist: DistContext, flag: bool) -> bool:
    """Whether ``flag`` is set in any process: decisions that end or change the loop are taken by
    all processes together, or one would wait forever in a collective the others left."""
    return job_total(dist, 1.0 if flag else 0.0) > 0 if dist.world_size > 1 else flag


def agreed_signal(dist: DistContext, own: Optional[int]) -> Optional[int]:
    """The signal the whole job stops on, once any process received one (Ctrl-C may reach some
    processes a step later than others, or only one): one all-reduce of (count, sum of signals)."""
    if dist.world_size == 1:
        return own
    count, total = (
        float(v)
        for v in dist.all_reduce_sum(
            torch.tensor([1.0 if own else 0.0, float(own or 0)], dtype=torch.float64)
        )
    )
    if count == 0:
        return None
    if own is not None:
        return own
    same = total / count  # every process that got one got the same: that signal
    return int(same) if same.is_integer() and int(same) in STOP_SIGNALS else signal.SIGTERM


# ----------------------------------------------------------------------------- messages


def nonfinite_advice(cfg: Config, last_saved: Optional[int], run_dir: Path, resume_command: str) -> str:
    """What to do after a non-finite loss, gradient or weight: only fixes that change something,
    and a resume only where a checkpoint exists."""
    fixes = ["a lower optim.lr"]
    if cfg.device in ("ipu", "ipu-model"):
        if str(cfg.ipu.precision) != "32.32":
            fixes.append("ipu.precision=32.32")
    elif cfg.train.precision != "fp32":
        fixes.append("train.precision=fp32")
    fix = " or ".join(fixes)
    if last_saved is None:
        return (
            f"Training stopped before its first checkpoint, so there is nothing to resume: start "
            f"again with {fix}"
        )
    return (
        f"Training stopped; the checkpoint of step {last_saved} (in {run_dir / 'checkpoints'}) "
        f"holds the last finite weights. Try {fix}: continue from it with the change, e.g. "
        f"{resume_command} optim.lr=..., or start again"
    )


@dataclass
class RunHook:
    """What turns plain training into another kind of run (fine-tuning: app/finetune.py) without
    the loop knowing it: ``setup`` runs once the network has its first weights (see
    ``TrainSetup``); ``kind``, the name of the command that runs it, is recorded in every
    checkpoint, and a checkpoint of another kind is not resumed by this one."""

    kind: str
    setup: Callable[[TrainSetup], None]


PLAIN_RUN = "train"  # the kind of a run without a hook


@dataclass
class LoopState:
    """Everything the loop changes as it runs. A checkpoint holds the step, the best top-1, the EMA
    step and the epoch's RNG states, from which a resumed run starts (its last saved step is the
    checkpoint's); the rest describe this call."""

    step: int = 0  # weight updates of the run so far
    best: float = -1.0  # the best top-1 (best.pt holds that model)
    ema_step: int = 0  # the step of the last EMA update (train.ema_every > 1 resumes exactly)
    epoch_rng: Optional[Dict[str, Any]] = None  # the RNG states when this epoch's iterator was made
    first_step: int = 0  # the step this call started from
    nonfinite: int = 0  # consecutive updates the fp16 loss scaler skipped
    losses: List[float] = field(default_factory=list)  # the run's finite training losses (resumes too)
    trained_images: int = 0  # of the whole job, by this call
    eval_seconds: float = 0.0  # validation and checkpoints, left out of the training time
    results: Dict[str, Dict[str, float]] = field(default_factory=dict)  # the last validation


class Trainer:
    """One training run in this process. ``run()`` is set-up, the steps (each followed, when due,
    by validate-and-save) and the stop or failure, then one teardown that always runs: the
    tracker, the backend and the process group are released whatever happened."""

    def __init__(self, cfg: Config, hook: Optional[RunHook] = None):
        self.cfg, self.hook = cfg, hook
        self.kind = hook.kind if hook is not None else PLAIN_RUN
        self.state = LoopState()
        self.dist: Optional[DistContext] = None
        self.backend: Optional[Backend] = None
        self.tracker: Optional[Tracker] = None
        self.checkpointer = Checkpointer(CheckpointSpec.of(cfg.train), self.kind, is_main=True)
        self.resume: Optional[Dict[str, Any]] = None  # the checkpoint being resumed

    # ------------------------------------------------------------------------- run and teardown
    def run(self) -> TrainResult:
        failed = True
        try:
            outcome = self._run()
            failed = False
        finally:
            self.close(failed)
        if outcome.exit_code == 0 and self.tracker is not None:  # the loop ran to its end
            self.report(outcome)
        return outcome

    def _run(self) -> TrainResult:
        self.set_up()
        early = self.early_exit()
        if early is not None:
            return early
        self.tracker = Tracker(
            self.folder,
            self.cfg,
            enabled=self.dist.is_main,
            total_steps=self.total_steps,
            resumed=self.resume is not None,
        )
        if self.resume is not None:  # records after this one continue from the checkpoint's step
            self.tracker.write(
                {"kind": "resume", "step": self.state.step, "checkpoint": str(self.checkpointer.resumed_path)}
            )
        started = time.perf_counter()
        exit_code = self.loop()
        if exit_code == 0 and self.diverged():
            exit_code = DIVERGED
        skipped = int(job_total(self.dist, skipped_in([self.loader])))  # before the processes part
        elapsed = time.perf_counter() - started
        s, self.skipped = self.state, skipped
        return TrainResult(
            exit_code,
            self.run_dir,
            s.step - s.first_step,
            s.trained_images,
            elapsed - s.eval_seconds,
            elapsed,
            s.results,
            last_step=s.step,
        )

    def close(self, failed: bool = False) -> None:
        """Release the tracker, the backend and the process group, whichever exist. After a
        failure the group is left to the launcher (which ends every process when one fails):
        tearing it down waits for every process, and the others may never get there."""
        if self.tracker is not None:
            self.tracker.close()
        if self.backend is not None:
            self.backend.close()
        if self.dist is not None and (not failed or self.dist.world_size == 1):
            self.dist.close()

    def report(self, outcome: TrainResult) -> None:
        print(
            f"done: {self.total_steps} steps in {format_duration(outcome.wall_seconds)}"
            + (f", {self.skipped} unreadable images skipped" if self.skipped else "")
        )
        print(
            "final validation: "
            + " | ".join(f"{k} top-1 {r['top1']:.2f}%" for k, r in outcome.results.items())
        )
        print(f"run folder: {self.run_dir}")

    # ------------------------------------------------------------------------- set-up
    def set_up(self) -> None:
        cfg = self.cfg
        self.dist = init_distributed(cfg)
        self.checkpointer.is_main = self.dist.is_main  # only the main process writes
        if self.dist.is_main and not cfg.resume:  # a file in its place, read-only, full: say so now
            check_output_root(cfg.log.out_dir)
        self.backend = create_backend(cfg)  # device errors come before any data is read
        seed_everything(cfg.train.seed + self.dist.rank)
        self.open_resume()
        self.build_data()
        self.build_model()
        self.open_run_dir()
        self.prepare()
        self.restore()
        self.describe()

    def open_resume(self) -> None:
        """The checkpoint being resumed (its folder is this run's); checked before anything is read."""
        if not self.cfg.resume:
            return

        def check_config(saved: Dict[str, Any], run_dir: Path, path: Path) -> None:
            if self.hook is None:  # what a resume may change (a hook's run rebuilds its configuration)
                on_disk = run_dir / "config.yaml"
                check_resume_changes(
                    saved, self.cfg, run_dir, path, read_yaml_file(on_disk) if on_disk.is_file() else None
                )

        self.resume = self.checkpointer.open_resume(
            self.cfg.resume, lambda payload: own_rng_states(payload, self.dist), check_config
        )

    def build_data(self) -> None:
        """Before a new run folder exists: a wrong dataset or batch leaves nothing behind. Each
        process loads its own share of every epoch (the same images as one process would)."""
        cfg, dist, backend = self.cfg, self.dist, self.backend
        self.train_set = build_dataset(cfg, "train", cfg.data.resolution)
        self.host_batch = host_batch = backend.host_batch_size()
        data = data_spec(cfg)
        self.loader = build_loader(
            self.train_set,
            backend.batch,
            train=True,
            spec=data,
            device=backend.device,
            seed=cfg.train.seed,
            sampler=shard_sampler(
                dist, self.train_set, train=True, seed=cfg.train.seed, batch_size=host_batch
            ),
        )
        self.val_resolutions = cfg.data.val_resolutions or [cfg.data.resolution]
        self.val_loaders = {}
        for r in self.val_resolutions:
            val_set = build_dataset(cfg, "val", r)
            self.val_loaders[r] = build_loader(
                val_set,
                backend.eval_batch_size(),
                train=False,
                spec=data,
                device=backend.device,
                sampler=shard_sampler(dist, val_set, train=False, seed=cfg.train.seed),
            )
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch < 1:
            raise AppError(
                f"the training set ({len(self.train_set)} images) is smaller than one host "
                f"batch ({host_batch}); lower train.micro_batch or train.grad_accum"
            )
        self.total_steps = math.ceil(cfg.train.epochs * self.steps_per_epoch)
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.val_every = max(1, round(cfg.train.val_every * self.steps_per_epoch))

    def build_model(self) -> None:
        """The network and its first weights: initial, or the resumed checkpoint's (before the
        backend copies them to its device)."""
        cfg, resume = self.cfg, self.resume
        self.num_classes = self.train_set.num_classes
        self.model = build_network(cfg, self.num_classes)
        check_resolutions(
            cfg.data.resolution, self.val_resolutions, downsampling_stages(self.model), what="validation"
        )
        if cfg.model.init_from and resume is None:
            load_initial_weights(self.model, cfg)
        if resume is not None:
            check_architecture(resume, cfg.model, self.num_classes, cfg.resume)
            if resume["steps_per_epoch"] != self.steps_per_epoch:
                raise AppError(
                    f"the checkpoint has {resume['steps_per_epoch']} steps per epoch, this "
                    f"configuration {self.steps_per_epoch}: resume with the same data and "
                    "batch size"
                )
            load_weights(self.model, resume["model"], self.checkpointer.resumed_path)

    def open_run_dir(self) -> None:
        """The folder being resumed, or a new one now that data and weights are in place: its
        config.yaml written atomically, then the folder claimed (locked) by this process."""
        if self.resume is not None:
            self.run_dir = run_dir_of(self.checkpointer.resumed_path)
        elif self.dist.is_main:
            self.run_dir = new_run_dir(self.cfg)
            try:
                RunFolder(self.run_dir).write_document(
                    "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
                )
            except RunFolderError:
                remove_if_empty(self.run_dir)  # no run folder without its configuration
                raise
            claim_run(self.run_dir, new=True)
        else:
            self.run_dir = Path(self.cfg.log.out_dir)
        self.folder = RunFolder(self.run_dir, resume=self.resume_command())
        self.checkpointer.attach(self.folder)
        print(f"run folder: {self.run_dir}")

    def prepare(self) -> None:
        """Objective, the hook, optimiser, backend (compiles, on IPUs), EMA."""
        cfg, model = self.cfg, self.model
        self.dist.broadcast_parameters(model)  # every replica starts from the main process's weights
        self.classifier = build_classifier(model, cfg)
        self.context = TrainSetup(
            cfg,
            model,
            self.classifier,
            self.backend,
            self.loader,
            self.val_loaders,
            self.run_dir,
            self.host_batch,
            self.resume,
        )
        if self.hook is not None:  # before the optimiser: layers it freezes are not optimised
            self.hook.setup(self.context)
        self.base_lr = peak_lr(cfg)  # optim.lr scaled to the global batch by the optimiser's rule
        self.optimizer = build_optimizer(model, cfg, self.base_lr)
        self.backend.prepare(self.classifier, self.optimizer)
        self.ema = build_weight_average(cfg, model, self.steps_per_epoch)  # EMA or per-epoch average

    def restore(self) -> None:
        """A resumed run's state (the Checkpointer's): EMA, optimiser, backend, the loop's
        counters, the RNG states."""
        if self.resume is None:
            return
        counters = self.checkpointer.restore(
            {"ema": self.ema, "optimizer": self.optimizer, "backend": self.backend}
        )
        s = self.state
        s.step = s.first_step = counters["step"]
        s.ema_step, s.best, s.epoch_rng = counters["ema_step"], counters["best_top1"], counters["epoch_rng"]
        s.losses = list(counters["losses"])

    def describe(self) -> None:
        cfg, backend = self.cfg, self.backend
        m = cfg.model
        n_params = sum(p.numel() for p in self.model.parameters())
        steps = steps_per_epoch_text(cfg, self.steps_per_epoch, backend.updates_per_step)
        print(
            f"model {m.name} G{m.group_size} e{m.expand_ratio} {m.norm}{'+proxy' if m.proxy_norm else ''}: "
            f"{n_params / 1e6:.2f}M parameters, {self.num_classes} classes | {len(self.train_set)} "
            f"training images, {steps} | device {backend.name}{' (emulated)' if backend.emulated else ''} "
            f"| {self.total_steps} steps"
        )
        if cfg.data.dataset == "digits":
            print(DIGITS_NOTE.format(resolution=cfg.data.resolution))
        print(scale_summary(cfg, self.dist))
        warning = divergence_warning(cfg)
        if warning and self.dist.is_main:
            print(warning, file=sys.stderr)

    def early_exit(self) -> Optional[TrainResult]:
        """ipu.compile_only (build the executables from one batch), or nothing left to train."""
        if self.backend.compile_only:
            self.loader.set_epoch(0)
            images, targets = next(iter(self.loader))
            print(self.backend.compile(images, targets))
            return TrainResult(0, self.run_dir)
        if self.state.step >= self.total_steps:
            print(
                f"nothing to do: {self.run_dir} is at step {self.state.step} of {self.total_steps} "
                "already (raise train.epochs or train.max_steps to train on)"
            )
            return TrainResult(0, self.run_dir, last_step=self.state.step, finished_before=True)
        return None

    # ------------------------------------------------------------------------- the steps
    def loop(self) -> int:
        """Train to the end, to an agreed stop signal, or to a non-finite loss: the exit status."""
        with StopSignal(announce=self.dist.is_main) as stop:
            try:
                stopping = self.train_until_stop(stop)
                return self.stop(stopping) if stopping is not None else 0
            except NonFiniteLoss as error:
                return self.fail(error)

    def train_until_stop(self, stop: StopSignal) -> Optional[int]:
        """Epoch after epoch; returns the signal every process agreed to stop on, if any."""
        s = self.state
        while s.step < self.total_steps:
            for images, targets in self.epoch_iterator():
                self.one_step(images, targets)
                if s.step % self.val_every == 0 or s.step == self.total_steps:
                    self.validate_and_save()
                elif any_process(self.dist, self.checkpointer.due(s.step)):  # the interval
                    self.save(s.step, {})
                stopping = agreed_signal(self.dist, stop.signum)
                if stopping is not None:
                    return stopping
                if s.step >= self.total_steps:
                    break
        return None

    def epoch_iterator(self) -> Iterator:
        """The current epoch's batches from the current step on. The data of an epoch is fixed by
        (seed, epoch); the model's randomness (dropout, drop path) by the global RNG states.
        Resuming mid-epoch: start this epoch's iterator from the epoch's RNG states (for loaders
        that draw from them; ours have their own generator), skip the batches already trained
        on, then restore the checkpoint's RNG states."""
        s = self.state
        epoch, skip = divmod(s.step, self.steps_per_epoch)
        if skip:
            set_rng_state(s.epoch_rng)
        else:
            s.epoch_rng = rng_state()
        self.loader.set_epoch(epoch)
        batches = epoch_batches(self.loader, skip)
        if skip:
            set_rng_state(self.checkpointer.resumed["rng"])
        self.tracker.start_window()
        return self.tracker.timed(batches)  # counts the time spent waiting for data

    def one_step(self, images: Tensor, targets: Tensor) -> None:
        """One weight update (the rate of update step+1), the EMA when due, the step's records."""
        s, cfg = self.state, self.cfg
        lr = lr_at(s.step + 1.0, cfg, self.steps_per_epoch, self.base_lr)
        self.backend.set_lr(lr)
        out = self.backend.train_step(images, targets)
        loss = float(out["loss"])
        applied = not out.get("nonfinite_grads", False)  # False: the backend did not apply it
        s.step += 1
        if math.isfinite(loss) and applied:
            s.nonfinite = 0
            s.losses.append(loss)
            if self.ema is not None and self.ema.due(s.step, self.total_steps):
                self.backend.sync_to_host()
                self.ema.update(self.model, steps=(s.step - s.ema_step) * self.backend.updates_per_step)
                s.ema_step = s.step
        else:
            self.skipped_update(loss)
        self.tracker.count(images.shape[0] * self.dist.world_size, loss)  # images of the whole job
        s.trained_images += images.shape[0] * self.dist.world_size
        if s.step % cfg.train.log_every == 0 or s.step == self.total_steps:
            self.tracker.log_step(
                s.step,
                s.step / self.steps_per_epoch,
                lr,
                skipped_images=int(job_total(self.dist, skipped_in([self.loader]))),
            )

    def skipped_update(self, loss: float) -> None:
        """A non-finite loss or gradient: fp16 tolerates a few (its scaler skipped the update);
        anything else stops the run."""
        s = self.state
        s.nonfinite += 1
        problem = (
            f"loss is {loss} at step {s.step}"
            if not math.isfinite(loss)
            else f"gradients are not finite at step {s.step} (loss {loss:.4g}; update not applied)"
        )
        if self.cfg.train.precision != "fp16" or s.nonfinite >= FP16_SKIPS_BEFORE_STOP:
            raise NonFiniteLoss(problem)
        print(
            f"warning: loss {loss} at step {s.step}: the fp16 loss scaler skipped this "
            "update and lowered its scale",
            file=sys.stderr,
        )

    # ------------------------------------------------------------------------- validate and save
    def validate_and_save(self) -> None:
        s, started = self.state, time.perf_counter()
        s.results = self.validate(s.step)
        top1 = max(r["top1"] for r in s.results.values())
        is_best = top1 > s.best
        s.best = max(s.best, top1)
        self.save(s.step, {k: r["top1"] for k, r in s.results.items()}, is_best)
        self.tracker.start_window()  # throughput excludes validation time
        s.eval_seconds += time.perf_counter() - started

    def validate(self, at_step: int) -> Dict[str, Dict[str, float]]:
        """Validation leaves the training's random streams as they were (its loaders draw seeds):
        a run's losses then do not depend on when it validated, and a resumed run repeats them."""
        before = rng_state()
        try:  # over every process's share of the images
            results = reduce_results(validate_all(self.backend, self.ema, self.val_loaders, self.cfg))
        finally:
            set_rng_state(before)
        # the images of the raw passes (an EMA pass reads the same ones: counted in its own entry)
        skipped = sum(r.get("skipped_images", 0) for name, r in results.items() if name.startswith("raw@"))
        self.tracker.log_validation(
            at_step, at_step / self.steps_per_epoch, results, skipped_images=int(skipped)
        )
        return results

    def save(self, at_step: int, metrics: Dict[str, float], is_best: bool = False) -> None:
        """Save (process 0), unless a weight is not finite: then every process stops, and the
        previous checkpoint stays the newest."""
        dist, s = self.dist, self.state
        bad: List[str] = []
        if dist.is_main:
            self.backend.sync_to_host()
            bad = self.checkpointer.nonfinite(
                {
                    "": self.model.state_dict(),
                    **({"ema.": self.ema.module.state_dict()} if self.ema is not None else {}),
                }
            )
        if any_process(dist, bool(bad)):
            shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
            raise NonFiniteLoss(
                f"weights are not finite after step {at_step}"
                + (f" ({shown})" if shown else "")
                + "; they were not saved"
            )
        rngs = gather_rng_states(dist, {"rng": rng_state(), "epoch_rng": s.epoch_rng})  # every process's
        if dist.is_main:
            parts = {
                "model": self.model,
                "ema": self.ema,
                "optimizer": self.optimizer,
                "backend": self.backend,
            }
            # ema_step: the step of the last EMA update (train.ema_every > 1 resumes exactly);
            # epoch_rng: the RNG states when this epoch's data iterator was created
            # losses: a resumed run judges whether it learned on the whole run's, as one run would
            counters = {
                "ema_step": s.ema_step,
                "best_top1": s.best,
                "epoch_rng": s.epoch_rng,
                "losses": s.losses,
            }
            record = {
                "metrics": metrics,
                "arch": arch_of(self.cfg.model, self.num_classes),
                "config": self.cfg.to_dict(),
                "rng_by_rank": rngs,
                **self.context.checkpoint_extra,
            }  # what the run's hook records
            self.checkpointer.save(
                self.checkpointer.payload(at_step, self.steps_per_epoch, parts, counters, record), is_best
            )
        self.checkpointer.saved(at_step)

    # ------------------------------------------------------------------------- stop
    def resume_command(self) -> str:
        return resume_command(self.run_dir, self.kind)

    def stop(self, signum: int) -> int:
        """Stopped by a signal: save the step (unless it was just saved) and say how to resume."""
        s = self.state
        if self.checkpointer.last_saved != s.step:
            self.save(s.step, {})
        # the others wait for process 0's checkpoint: a launcher ends every process as soon as
        # one exits with a failure status
        self.dist.barrier()
        if self.dist.is_main:
            print(
                f"stopped by {signal.Signals(signum).name} at step {s.step}/{self.total_steps}; "
                f"checkpoint saved. Resume with:\n{resume_hint(self.run_dir, self.kind)}",
                file=sys.stderr,
            )
        return 128 + signum

    def diverged(self) -> bool:
        """After a run of at least an epoch: validation at chance while the training loss grew
        (the mean of the last quarter of the steps above the first quarter's). Says so, and how to
        fix it, once."""
        s = self.state
        quarter = len(s.losses) // 4
        # a run of at least an epoch, with two losses or more in each quarter (one is noise)
        if not s.results or quarter < 2 or s.step < self.steps_per_epoch:
            return False
        chance = 100.0 / self.num_classes
        top1 = max(r["top1"] for r in s.results.values())
        first, last = (sum(part) / quarter for part in (s.losses[:quarter], s.losses[-quarter:]))
        if top1 > CHANCE_FACTOR * chance or last <= first:
            return False
        if self.dist.is_main:
            fix = divergence_warning(self.cfg) or (
                f"lower the learning rate, e.g. optim.lr={self.cfg.optim.lr / 4:.3g}"
            )
            print(
                f"warning: this run did not learn: validation top-1 {top1:.2f}% is at chance "
                f"({chance:.2f}% for {self.num_classes} classes) while the training loss grew from "
                f"{first:.3f} to {last:.3f} (peak rate {self.base_lr:.4g}). Train again: "
                f"{fix.replace('warning: ', '')}. Exit status {DIVERGED}.",
                file=sys.stderr,
            )
        self.tracker.write({"kind": "error", "step": s.step, "error": "diverged: validation at chance"})
        return True

    def fail(self, error: NonFiniteLoss) -> int:
        if self.dist.is_main:
            advice = nonfinite_advice(
                self.cfg, self.checkpointer.last_saved, self.run_dir, self.resume_command()
            )
            print(f"error: {error}. {advice}", file=sys.stderr)
        self.tracker.write({"kind": "error", "step": self.state.step, "error": str(error)})  # the failed step
        return 3


def run_training(cfg: Config, hook: Optional[RunHook] = None) -> TrainResult:
    """Train as ``cfg`` says in this process (``python -m app train``, or each process of a
    launched job); another kind of run (fine-tuning) passes its ``hook``."""
    return Trainer(cfg, hook).run()


def skipped_in(loaders: Iterable[Any]) -> int:
    """Unreadable images these loaders replaced so far, in this process."""
    return sum(getattr(loader, "skipped", 0) for loader in loaders)
