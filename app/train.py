"""The training loop: ``python -m app train --config PRESET [overrides]``.

Read top to bottom: configuration → run folder → data → model → optimiser/EMA → backend → resume
→ steps (learning rate per weight update, progress, validation, checkpoints) → final report.
Everything device-specific is behind ``app.backend``; everything that writes files runs on the
main process only.
"""
import argparse
import dataclasses
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

from app.backend import Backend, create_backend
from app.checkpoint import (
    arch_of,
    check_architecture,
    check_resume_is_newest,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    nonfinite_tensors,
    rng_state,
    run_dir_of,
    save_checkpoint,
    saved_best_top1,
    set_rng_state,
)
from app.config import Config
from app.data import build_dataset, build_loader
from app.distributed import (
    DistContext,
    init_distributed,
    launch,
    reduce_results,
    scale_summary,
    shard_sampler,
)
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


PEER_NORM_EPS = 1e-5  # batch-norm epsilon of timm's efficientnet_* and torchvision's b0-b4


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
        if cfg.model.norm_eps != PEER_NORM_EPS:  # the epsilon is not in a state dict
            print(f"note: model.norm_eps={cfg.model.norm_eps:g}, while timm's efficientnet_* and "
                  f"torchvision's efficientnet_b0-b4 use {PEER_NORM_EPS:g} (timm's tf_* and torchvision's "
                  f"b5-b7 use 1e-3): set model.norm_eps to the source's to reproduce its outputs",
                  file=sys.stderr)
    own = model.state_dict()
    new_head = [k for k in own
                if k.startswith("classifier.") and k in state and state[k].shape != own[k].shape]
    load_weights(model, {**state, **{k: own[k] for k in new_head}}, path)
    print(f"initialised from {path} ({source})"
          + (f"; new classifier for {own['classifier.weight'].shape[0]} classes" if new_head else ""))


def epoch_batches(loader, start: int) -> Iterator:
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


def make_payload(step: int, steps_per_epoch: int, model, ema, optimizer, backend: Backend,
                 cfg: Config, num_classes: int, epoch_rng: Dict[str, Any],
                 metrics: Dict[str, float], best: float, ema_step: int,
                 extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    return {
        "step": step,
        "epoch": step // steps_per_epoch,
        "step_in_epoch": step % steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "ema_step": ema_step,  # the step of the last EMA update (train.ema_every > 1 resumes exactly)
        "optimizer": optimizer.state_dict(),
        "backend": backend.state_dict(),
        "rng": rng_state(),
        "epoch_rng": epoch_rng,  # the RNG states when this epoch's data iterator was created
        "metrics": metrics,
        "best_top1": best,
        "arch": arch_of(cfg.model, num_classes),
        "config": cfg.to_dict(),
        **(extra or {}),  # what a setup hook records (fine-tuning: its settings and results)
    }


@dataclass
class TrainSetup:
    """What a ``setup`` hook of ``run_training`` gets, after the network is built and its initial
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

    @property
    def images_per_s(self) -> float:
        return self.images / self.train_seconds if self.train_seconds > 0 else float("nan")


def main(cfg: Config, args: Optional[argparse.Namespace] = None) -> int:
    if cfg.resume and cfg.finetune.source:  # a fine-tuning run: resumed as one, its layers frozen again
        from app.finetune import main as finetune_main  # noqa: PLC0415  (app.finetune imports this module)

        return finetune_main(cfg, args)
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
    count, total = (float(v) for v in dist.all_reduce_sum(
        torch.tensor([1.0 if own else 0.0, float(own or 0)], dtype=torch.float64)))
    if count == 0:
        return None
    if own is not None:
        return own
    return signal.SIGINT if total == count * signal.SIGINT else signal.SIGTERM


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
        return (f"Training stopped before its first checkpoint, so there is nothing to resume: start "
                f"again with {fix}")
    return (f"Training stopped; the checkpoint of step {last_saved} (in {run_dir / 'checkpoints'}) "
            f"holds the last finite weights. Try {fix}: continue from it with the change, e.g. "
            f"{resume_command} optim.lr=..., or start again")


def run_training(cfg: Config, setup: Optional[Callable[[TrainSetup], None]] = None,
                 command: str = "train") -> TrainResult:
    """Train as ``cfg`` says in this process (``python -m app train``, or each process of a
    launched job); fine-tuning passes a ``setup`` hook and ``command="finetune"`` (the command that
    resumes the run)."""
    if setup is None and not cfg.resume and cfg.finetune.source:
        # trained from a fine-tuning run's config.yaml, this is a plain run: not resumed as one
        cfg = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, source=None))
    dist = init_distributed(cfg)
    backend = create_backend(cfg)  # device errors come before any data is read
    seed_everything(cfg.train.seed + dist.rank)

    # -- the checkpoint being resumed (its folder is this run's); checked before anything is read
    resume: Optional[Dict[str, Any]] = None
    resume_path: Optional[Path] = None
    if cfg.resume:
        resume_path = find_checkpoint(cfg.resume)
        resume = load_checkpoint(resume_path)
        check_resume_is_newest(resume_path, resume["step"])
        if resume.get("finetune") and setup is None:
            raise AppError(f"{resume_path} is a fine-tuning checkpoint: resume it with python -m app "
                           f"finetune --resume {run_dir_of(resume_path)} (its layers are frozen again)")
        print(f"resuming from {resume_path} (step {resume['step']})")

    # -- data (before a new run folder exists: a wrong dataset or batch leaves nothing behind)
    train_set = build_dataset(cfg, "train", cfg.data.resolution)
    # each process loads its own share of every epoch (the same images as one process would)
    host_batch = backend.host_batch_size(cfg)
    loader = build_loader(train_set, host_batch, train=True, cfg=cfg, device=backend.device,
                          seed=cfg.train.seed, sampler=shard_sampler(dist, train_set, train=True,
                                                                 seed=cfg.train.seed,
                                                                 batch_size=host_batch))
    val_resolutions = cfg.data.val_resolutions or [cfg.data.resolution]
    val_sets = {r: build_dataset(cfg, "val", r) for r in val_resolutions}
    val_loaders = {r: build_loader(val_set, backend.eval_batch_size(cfg), train=False, cfg=cfg,
                                   device=backend.device,
                                   sampler=shard_sampler(dist, val_set, train=False,
                                                         seed=cfg.train.seed))
                   for r, val_set in val_sets.items()}
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise AppError(f"the training set ({len(train_set)} images) is smaller than one host batch "
                         f"({backend.host_batch_size(cfg)}); lower train.micro_batch or train.grad_accum")
    total_steps = math.ceil(cfg.train.epochs * steps_per_epoch)
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    val_every = max(1, round(cfg.train.val_every * steps_per_epoch))

    # -- model and its first weights
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

    # -- run folder: the one being resumed, or a new one now that data and weights are in place
    if resume_path is not None:
        run_dir = run_dir_of(resume_path)
    else:
        run_dir = new_run_dir(cfg) if dist.is_main else Path(cfg.log.out_dir)
        if dist.is_main:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    print(f"run folder: {run_dir}")

    # -- objective, optimiser, EMA, backend
    dist.broadcast_parameters(model)  # every replica starts from the main process's weights
    classifier = build_classifier(model, cfg)
    context = TrainSetup(cfg, model, classifier, backend, loader, val_loaders, run_dir, host_batch, resume)
    if setup is not None:
        setup(context)
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
        step, epoch_rng = resume["step"], resume["epoch_rng"]
        # best.pt is replaced only by a better model than the one it holds
        best = max(resume["best_top1"], saved_best_top1(run_dir))
        set_rng_state(resume["rng"])  # after the model's initialisation drew from it
    ema_step = resume.get("ema_step", step) if resume is not None else step  # train.ema_every
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {m.name} G{m.group_size} e{m.expand_ratio} {m.norm}{'+proxy' if m.proxy_norm else ''}: "
          f"{n_params / 1e6:.2f}M parameters, {num_classes} classes | {len(train_set)} training images, "
          f"{steps_per_epoch} steps/epoch of {host_batch} | device {backend.name}"
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
        before, skipped_before = rng_state(), skipped_in(val_loaders.values())
        try:
            results = reduce_results(validate_all(backend, ema, val_loaders, cfg))  # over all shares
        finally:
            set_rng_state(before)
        skipped = job_total(dist, skipped_in(val_loaders.values()) - skipped_before)
        tracker.log_validation(at_step, at_step / steps_per_epoch, results, skipped_images=int(skipped))
        return results

    last_saved = step if resume is not None else None  # the step of the newest good checkpoint

    def checkpoint(at_step: int, metrics: Dict[str, float], is_best: bool = False) -> None:
        """Save (process 0), unless a weight is not finite: then every process stops, and the
        previous checkpoint stays the newest."""
        nonlocal last_saved
        bad: List[str] = []
        if dist.is_main:
            backend.sync_to_host()
            bad = nonfinite_tensors(model.state_dict())
            if ema is not None:
                bad += nonfinite_tensors(ema.module.state_dict(), prefix="ema.")
        if any_process(dist, bool(bad)):
            shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
            raise NonFiniteLoss(f"weights are not finite after step {at_step}"
                                + (f" ({shown})" if shown else "") + "; they were not saved")
        if dist.is_main:
            payload = make_payload(at_step, steps_per_epoch, model, ema, optimizer, backend, cfg,
                                   num_classes, epoch_rng, metrics, best, ema_step,
                                   context.checkpoint_extra)
            save_checkpoint(run_dir, payload, cfg.train.keep_checkpoints, is_best)
        last_saved = at_step

    def resume_command() -> str:
        return f"python -m app {command} --resume {run_dir}"

    # -- the loop
    nonfinite, results, started = 0, {}, time.perf_counter()
    exit_code, first_step, trained_images, eval_seconds = 0, step, 0, 0.0
    stopping: Optional[int] = None  # the signal every process has agreed to stop on
    with StopSignal() as stop:
        try:
            while step < total_steps and stopping is None:
                epoch, skip = divmod(step, steps_per_epoch)
                # The data of an epoch is fixed by (seed, epoch); the model's randomness (dropout,
                # drop path) by the global RNG states. Resuming mid-epoch: start this epoch's
                # iterator from the epoch's RNG states (for loaders that draw from them; ours
                # have their own generator), skip the batches already trained on, then restore
                # the checkpoint's RNG states.
                if skip:
                    set_rng_state(epoch_rng)
                else:
                    epoch_rng = rng_state()
                loader.set_epoch(epoch)
                batches = epoch_batches(loader, skip)
                if skip:
                    set_rng_state(resume["rng"])
                tracker.start_window()
                for images, targets in tracker.timed(batches):  # counts time waiting for data
                    lr = lr_at(step + 1.0, cfg, steps_per_epoch, base_lr)  # the rate of update step+1
                    backend.set_lr(lr)
                    out = backend.train_step(images, targets)
                    loss = float(out["loss"])
                    bad_grads = bool(out.get("nonfinite_grads", False))  # the update was not applied
                    step += 1
                    if math.isfinite(loss) and not bad_grads:
                        nonfinite = 0
                        if ema is not None and (step % cfg.train.ema_every == 0 or step == total_steps):
                            backend.sync_to_host()
                            ema.update(model, steps=(step - ema_step) * backend.updates_per_step)
                            ema_step = step
                    else:
                        nonfinite += 1
                        problem = f"loss is {loss} at step {step}" if not math.isfinite(loss) else \
                            f"gradients are not finite at step {step} (loss {loss:.4g}; update not applied)"
                        if cfg.train.precision != "fp16" or nonfinite >= FP16_SKIPS_BEFORE_STOP:
                            raise NonFiniteLoss(problem)
                        print(f"warning: loss {loss} at step {step}: the fp16 loss scaler skipped this "
                              "update and lowered its scale", file=sys.stderr)
                    tracker.count(images.shape[0] * dist.world_size, loss)  # images of the whole job
                    trained_images += images.shape[0] * dist.world_size
                    if step % cfg.train.log_every == 0 or step == total_steps:
                        tracker.log_step(step, step / steps_per_epoch, lr,
                                         skipped_images=int(job_total(dist, skipped_in([loader]))))
                    if step % val_every == 0 or step == total_steps:
                        eval_started = time.perf_counter()
                        results = validate(step)
                        top1 = max(r["top1"] for r in results.values())
                        is_best = top1 > best
                        best = max(best, top1)
                        checkpoint(step, {k: r["top1"] for k, r in results.items()}, is_best)
                        tracker.start_window()  # throughput excludes validation time
                        eval_seconds += time.perf_counter() - eval_started
                    stopping = agreed_signal(dist, stop.signum)
                    if step >= total_steps or stopping is not None:
                        break
            if stopping is not None:
                if not (step % val_every == 0 or step == total_steps):  # not saved at this step yet
                    checkpoint(step, {})
                # the others wait for process 0's checkpoint: a launcher ends every process as
                # soon as one exits with a failure status
                dist.barrier()
                if dist.is_main:
                    print(f"stopped by {signal.Signals(stopping).name} at step {step}/{total_steps}; "
                          f"checkpoint saved. Resume with:\n  {resume_command()}", file=sys.stderr)
                exit_code = 128 + stopping
        except NonFiniteLoss as error:
            if dist.is_main:
                print(f"error: {error}. {nonfinite_advice(cfg, last_saved, run_dir, resume_command())}",
                      file=sys.stderr)
            tracker.write({"kind": "error", "step": step, "error": str(error)})  # the failed step
            exit_code = 3
    skipped = int(job_total(dist, skipped_in([loader])))  # before the job's processes part
    elapsed = time.perf_counter() - started
    tracker.close()
    backend.close()
    dist.close()
    outcome = TrainResult(exit_code, run_dir, step - first_step, trained_images, elapsed - eval_seconds,
                          elapsed, results, last_step=step)
    if exit_code:
        return outcome

    print(f"done: {total_steps} steps in {format_duration(elapsed)}"
          + (f", {skipped} unreadable images skipped" if skipped else ""))
    print("final validation: " + " | ".join(f"{k} top-1 {r['top1']:.2f}%" for k, r in results.items()))
    print(f"run folder: {run_dir}")
    return outcome


def skipped_in(loaders: Iterable[Any]) -> int:
    """Unreadable images these loaders replaced so far, in this process."""
    return sum(getattr(loader, "skipped", 0) for loader in loaders)
