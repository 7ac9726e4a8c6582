"""The training loop: ``python -m app train --config PRESET [overrides]``.

Read top to bottom: configuration → run folder → data → model → optimiser/EMA → backend → resume
→ steps (learning rate per weight update, progress, validation, checkpoints) → final report.
Everything device-specific is behind ``app.backend``; everything that writes files runs on the
main process only.
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
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import torch
import yaml

from app.backend import Backend, create_backend
from app.checkpoint import (
    arch_of,
    check_architecture,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    rng_state,
    run_dir_of,
    save_checkpoint,
    set_rng_state,
)
from app.config import Config
from app.data import build_dataset, build_loader
from app.distributed import init_distributed, launch, reduce_results, scale_summary
from app.errors import AppError
from app.evaluate import validate_all
from app.objective import Classifier, build_classifier, build_network
from app.optim import EMA, build_optimizer, lr_at
from app.resolution import check_resolutions, downsampling_stages
from app.tracking import Tracker, format_duration, new_folder
from model import convert_state_dict

# fp16: a non-finite loss means the loss scaler skipped that update (weights untouched; the step
# still counts, as the schedule moves on) and lowered its scale. Only when it keeps happening is
# the run itself diverging.
FP16_SKIPS_BEFORE_STOP = 5


class NonFiniteLoss(RuntimeError):
    pass


class StopSignal:
    """SIGINT/SIGTERM ask the loop to stop after the current step (and save); a second SIGINT
    interrupts at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


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


def load_initial_weights(model: torch.nn.Module, cfg: Config) -> None:
    """``model.init_from``: start from a local checkpoint (ours, or a timm/torchvision file).
    Every tensor must fit, except the classifier when the number of classes differs (it keeps
    its fresh initialisation)."""
    path, source = cfg.model.init_from, cfg.model.init_source
    state = load_checkpoint(path)
    if source == "ours":
        if "arch" in state:
            check_architecture(state, cfg.model, state["arch"]["num_classes"], path)
        if "model" in state:  # one of our training checkpoints: prefer its EMA weights
            state = state["ema"]["module"] if state.get("ema") else state["model"]
    else:
        state = convert_state_dict(state.get("state_dict", state), source)
    own = model.state_dict()
    new_head = [k for k in own
                if k.startswith("classifier.") and k in state and state[k].shape != own[k].shape]
    load_weights(model, {**state, **{k: own[k] for k in new_head}}, path)
    print(f"initialised from {path} ({source})"
          + (f"; new classifier for {own['classifier.weight'].shape[0]} classes" if new_head else ""))


def epoch_batches(loader, start: int) -> Iterator:
    """This epoch's batches from batch ``start`` on, without loading the skipped ones where the
    loader can. The first batch is fetched here, so whatever the loader draws from the global RNG
    when it starts (torch's DataLoader draws its workers' base seed) is drawn now, at a point the
    checkpoint's RNG states can be restored after."""
    if hasattr(loader, "iterate"):
        batches = iter(loader.iterate(start_batch=start))
    else:
        batches = iter(loader)
        for _ in range(start):
            next(batches)
    first = next(batches, None)
    return itertools.chain([first], batches) if first is not None else iter(())


def make_payload(step: int, steps_per_epoch: int, model, ema, optimizer, backend: Backend,
                 cfg: Config, num_classes: int, epoch_rng: Dict[str, Any],
                 metrics: Dict[str, float], best: float) -> Dict[str, Any]:
    return {
        "step": step,
        "epoch": step // steps_per_epoch,
        "step_in_epoch": step % steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "backend": backend.state_dict(),
        "rng": rng_state(),
        "epoch_rng": epoch_rng,  # the RNG states when this epoch's data iterator was created
        "metrics": metrics,
        "best_top1": best,
        "arch": arch_of(cfg.model, num_classes),
        "config": cfg.to_dict(),
    }


@dataclass
class TrainSetup:
    """What a ``setup`` hook of ``run_training`` gets, after the network is built and its initial
    weights are loaded, before the optimiser sees its parameters (so freezing layers there takes
    them out of the optimiser) and before the backend prepares (compiles) the classifier."""
    cfg: Config
    model: torch.nn.Module  # the EfficientNet
    classifier: Classifier  # the model with input normalisation and loss
    backend: Backend
    train_loader: Any
    val_loaders: Dict[int, Any]
    run_dir: Path
    host_batch: int  # images per training batch


@dataclass
class TrainResult:
    exit_code: int
    run_dir: Path
    steps: int = 0  # weight updates made by this call (not counting a resumed run's earlier ones)
    images: int = 0  # training images those steps consumed
    train_seconds: float = 0.0  # the training loop without validation and checkpoints
    wall_seconds: float = 0.0  # the whole loop
    results: Dict[str, Dict[str, float]] = field(default_factory=dict)  # the last validation

    @property
    def images_per_s(self) -> float:
        return self.images / self.train_seconds if self.train_seconds > 0 else float("nan")


def main(cfg: Config, args: Optional[argparse.Namespace] = None) -> int:
    launched = launch(cfg, args)  # replicas over several processes: torchrun / poprun runs this again
    if launched is not None:
        return launched
    return run_training(cfg).exit_code


def run_training(cfg: Config, setup: Optional[Callable[[TrainSetup], None]] = None) -> TrainResult:
    """Train as ``cfg`` says in this process (``python -m app train``, or each process of a
    launched job); fine-tuning passes a ``setup`` hook."""
    dist = init_distributed(cfg)
    backend = create_backend(cfg)  # device errors come before any data is read
    seed_everything(cfg.train.seed + dist.rank)

    # -- run folder: a new one, or the one being resumed
    resume: Optional[Dict[str, Any]] = None
    if cfg.resume:
        resume_path = find_checkpoint(cfg.resume)
        resume = load_checkpoint(resume_path)
        run_dir = run_dir_of(resume_path)
        print(f"resuming from {resume_path} (step {resume['step']})")
    else:
        run_dir = new_run_dir(cfg) if dist.is_main else Path(cfg.log.out_dir)
        if dist.is_main:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    print(f"run folder: {run_dir}")

    # -- data
    train_set = build_dataset(cfg, "train", cfg.data.resolution)
    # each process loads its own share of every epoch (the same images as one process would)
    host_batch = backend.host_batch_size(cfg)
    loader = build_loader(train_set, host_batch, train=True, cfg=cfg, device=backend.device,
                          seed=cfg.train.seed, sampler=dist.sampler(train_set, train=True,
                                                                    seed=cfg.train.seed,
                                                                    batch_size=host_batch))
    val_resolutions = cfg.data.val_resolutions or [cfg.data.resolution]
    val_sets = {r: build_dataset(cfg, "val", r) for r in val_resolutions}
    val_loaders = {r: build_loader(val_set, backend.eval_batch_size(cfg), train=False, cfg=cfg,
                                   device=backend.device,
                                   sampler=dist.sampler(val_set, train=False, seed=cfg.train.seed))
                   for r, val_set in val_sets.items()}
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise AppError(f"the training set ({len(train_set)} images) is smaller than one host batch "
                         f"({backend.host_batch_size(cfg)}); lower train.micro_batch or train.grad_accum")
    total_steps = math.ceil(cfg.train.epochs * steps_per_epoch)
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    val_every = max(1, round(cfg.train.val_every * steps_per_epoch))

    # -- model, objective, optimiser, EMA, backend
    num_classes = train_set.num_classes
    m = cfg.model
    model = build_network(cfg, num_classes)
    check_resolutions(cfg.data.resolution, val_resolutions, downsampling_stages(model), what="validation")
    if m.init_from and resume is None:
        load_initial_weights(model, cfg)
    if resume is not None:  # before the backend copies the weights to its device (IPU)
        check_architecture(resume, cfg.model, num_classes, cfg.resume)
        if resume["steps_per_epoch"] != steps_per_epoch:
            raise AppError(f"the checkpoint has {resume['steps_per_epoch']} steps per epoch, this "
                             f"configuration {steps_per_epoch}: resume with the same data and batch size")
        load_weights(model, resume["model"], cfg.resume)
    dist.broadcast_parameters(model)  # every replica starts from the main process's weights
    classifier = build_classifier(model, cfg)
    if setup is not None:
        setup(TrainSetup(cfg, model, classifier, backend, loader, val_loaders, run_dir,
                         backend.host_batch_size(cfg)))
    base_lr = cfg.optim.lr * cfg.global_batch / cfg.optim.lr_reference_batch
    optimizer = build_optimizer(model, cfg, base_lr)
    backend.prepare(classifier, optimizer, cfg)
    ema = EMA(model, cfg.train.ema_decay, warmup=True) if cfg.train.ema_decay > 0 else None

    step, best, epoch_rng = 0, -1.0, None
    if resume is not None:
        if ema is not None and resume["ema"] is not None:
            ema.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        backend.load_state_dict(resume["backend"])
        step, best, epoch_rng = resume["step"], resume["best_top1"], resume["epoch_rng"]
        set_rng_state(resume["rng"])  # after the model's initialisation drew from it
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {m.name} G{m.group_size} e{m.expand_ratio} {m.norm}{'+proxy' if m.proxy_norm else ''}: "
          f"{n_params / 1e6:.2f}M parameters, {num_classes} classes | {len(train_set)} training images, "
          f"{steps_per_epoch} steps/epoch of {backend.host_batch_size(cfg)} | device {backend.name}"
          f"{' (emulated)' if backend.emulated else ''} | {total_steps} steps")
    print(scale_summary(cfg, dist, base_lr))

    if backend.compile_only:  # ipu.compile_only: build the executables from one batch, then stop
        loader.set_epoch(0)
        images, targets = next(iter(loader))
        print(backend.compile(images, targets))
        backend.close()
        dist.close()
        return TrainResult(0, run_dir)
    if step >= total_steps:
        print(f"nothing to do: {run_dir} is at step {step} of {total_steps} already "
              "(raise train.epochs or train.max_steps to train on)")
        backend.close()
        dist.close()
        return TrainResult(0, run_dir)
    tracker = Tracker(run_dir, cfg, enabled=dist.is_main, total_steps=total_steps)
    if resume is not None:  # records after this one continue from the checkpoint's step
        tracker.write({"kind": "resume", "step": step, "checkpoint": str(resume_path)})

    def validate(at_step: int) -> Dict[str, Dict[str, float]]:
        # Validation leaves the training's random streams as they were (its loaders draw seeds):
        # a run's losses then do not depend on when it validated, and a resumed run repeats them.
        before = rng_state()
        try:
            results = reduce_results(validate_all(backend, ema, val_loaders, cfg))  # over all shares
        finally:
            set_rng_state(before)
        tracker.log_validation(at_step, at_step / steps_per_epoch, results)
        return results

    def checkpoint(at_step: int, metrics: Dict[str, float], is_best: bool = False) -> None:
        if dist.is_main:
            backend.sync_to_host()
            payload = make_payload(at_step, steps_per_epoch, model, ema, optimizer, backend, cfg,
                                   num_classes, epoch_rng, metrics, best)
            save_checkpoint(run_dir, payload, cfg.train.keep_checkpoints, is_best)

    def resume_command() -> str:
        return f"python -m app train --resume {run_dir}"

    # -- the loop
    nonfinite, results, started = 0, {}, time.perf_counter()
    ema_step = step  # the step of the last EMA update (train.ema_every)
    exit_code, first_step, trained_images, eval_seconds = 0, step, 0, 0.0
    with StopSignal() as stop:
        try:
            while step < total_steps and stop.signum is None:
                epoch, skip = divmod(step, steps_per_epoch)
                # The data of an epoch is fixed by (seed, epoch); the model's randomness (dropout,
                # drop path) by the global RNG states. Resuming mid-epoch: start this epoch's
                # iterator from the epoch's RNG states (loaders that draw seeds when created),
                # skip the batches already trained on, then restore the checkpoint's RNG states.
                if skip:
                    set_rng_state(epoch_rng)
                else:
                    epoch_rng = rng_state()
                loader.set_epoch(epoch)
                batches = epoch_batches(loader, skip)
                if skip:
                    set_rng_state(resume["rng"])
                tracker.start_window()
                for images, targets in batches:
                    lr = lr_at(step + 1.0, cfg, steps_per_epoch, base_lr)  # the rate of update step+1
                    backend.set_lr(lr)
                    out = backend.train_step(images, targets)
                    loss = float(out["loss"])
                    step += 1
                    if math.isfinite(loss):
                        nonfinite = 0
                        if ema is not None and (step % cfg.train.ema_every == 0 or step == total_steps):
                            backend.sync_to_host()
                            ema.update(model, steps=(step - ema_step) * backend.updates_per_step)
                            ema_step = step
                    else:
                        nonfinite += 1
                        if cfg.train.precision != "fp16" or nonfinite >= FP16_SKIPS_BEFORE_STOP:
                            raise NonFiniteLoss(f"loss is {loss} at step {step}")
                        print(f"warning: loss {loss} at step {step}: the fp16 loss scaler skipped this "
                              "update and lowered its scale", file=sys.stderr)
                    tracker.count(images.shape[0] * dist.world_size, loss)  # images of the whole job
                    trained_images += images.shape[0] * dist.world_size
                    if step % cfg.train.log_every == 0 or step == total_steps:
                        tracker.log_step(step, step / steps_per_epoch, lr,
                                         skipped_images=getattr(loader, "skipped", 0))
                    if step % val_every == 0 or step == total_steps:
                        eval_started = time.perf_counter()
                        results = validate(step)
                        top1 = max(r["top1"] for r in results.values())
                        is_best = top1 > best
                        best = max(best, top1)
                        checkpoint(step, {k: r["top1"] for k, r in results.items()}, is_best)
                        tracker.start_window()  # throughput excludes validation time
                        eval_seconds += time.perf_counter() - eval_started
                    if step >= total_steps or stop.signum is not None:
                        break
        except NonFiniteLoss as error:
            print(f"error: {error}. Training stopped; the weights of the last checkpoint are intact "
                  f"(in {run_dir / 'checkpoints'}). Try a lower optim.lr, train.precision=fp32, or "
                  f"resume from the last checkpoint: {resume_command()}", file=sys.stderr)
            tracker.write({"kind": "error", "step": step, "error": str(error)})  # the failed step
            exit_code = 3
        if stop.signum is not None and exit_code == 0:
            if not (step % val_every == 0 or step == total_steps):  # not saved at this step yet
                checkpoint(step, {})
            print(f"stopped by {signal.Signals(stop.signum).name} at step {step}/{total_steps}; "
                  f"checkpoint saved. Resume with:\n  {resume_command()}", file=sys.stderr)
            exit_code = 128 + stop.signum
    elapsed = time.perf_counter() - started
    tracker.close()
    backend.close()
    dist.close()
    outcome = TrainResult(exit_code, run_dir, step - first_step, trained_images, elapsed - eval_seconds,
                          elapsed, results)
    if exit_code:
        return outcome

    skipped = getattr(loader, "skipped", 0)
    print(f"done: {total_steps} steps in {format_duration(elapsed)}"
          + (f", {skipped} unreadable images skipped" if skipped else ""))
    print("final validation: " + " | ".join(f"{k} top-1 {r['top1']:.2f}%" for k, r in results.items()))
    print(f"run folder: {run_dir}")
    return outcome

