"""Cheap fine-tuning at the test resolution: ``python -m app finetune --checkpoint RUN``.

The paper's recipe after reduced-resolution training: start from the trained weights (the EMA
copy when the checkpoint has one), freeze every layer before ``finetune.trainable_from`` (by
default the last stage and the head stay trainable), and train ``finetune.epochs`` (2) at the
test resolution ``finetune.resolution`` with validation preprocessing (resize + centre crop: the
same apparent object size and pixel statistics the model will be tested on), plain SGD (no
momentum, no warm-up: Graphcore's PyTorch port) at ``finetune.lr`` per ``finetune.lr_reference_batch``
images scaled with the global batch (2⁻¹¹ per image: 0.25 at the README's global batch of 512),
a cosine schedule and no mixup/cutmix. With batch norm, the running statistics are recalibrated at the new
resolution before fine-tuning (forward passes, no gradients): at a new resolution the activations'
statistics change, and the frozen layers, kept in eval mode, would otherwise normalise with the old
ones; the trainable layers' statistics then follow the fine-tuning itself.

A fine-tuning run is marked as one (``finetune.source`` in its configuration; its checkpoints
record the frozen layer and the accuracies measured before training), so ``finetune --resume RUN``
(or ``train --resume RUN``) freezes the same layers again before the optimiser state is loaded.
Over several processes it is launched like ``train``; only process 0 writes.
"""

import argparse
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from app.checkpoint import CheckpointError, find_checkpoint, latest_run, load_checkpoint, run_dir_of
from app.command_line import given_on_command_line
from app.config import Config, config_from_dict
from app.distributed import all_reduce_mean, current, launch, reduce_results
from app.errors import AppError
from app.evaluate import evaluate
from app.resolution import (
    check_resolutions,
    describe_rule,
    model_stages,
    native_resolution,
    trained_resolution,
)
from app.run_folder import RunFolder, python_command
from app.train import RunHook, TrainResult, TrainSetup, run_training
from backends.batch_norm_stats import (
    BatchNormProbe,
    Statistics,
    batch_norm_layers,
    split_statistics,
    write_statistics,
)
from model import build_model

FREEZE_HELP = (
    "a module name of the network: stem, blocks.<stage> (0-6), blocks.<stage>.<index>, "
    "head or classifier; every layer before it is frozen"
)


# ----------------------------------------------------------------------------- freezing

Named = List[Tuple[str, nn.Module]]


def _modules_before(module: nn.Module, target: str, prefix: str = "") -> Tuple[Named, bool]:
    """The largest sub-modules that come entirely before ``target`` in registration order (the
    forward order of EfficientNet), and whether ``target`` was found."""
    before: Named = []
    for name, child in module.named_children():
        full = prefix + name
        if full == target:
            return before, True
        if target.startswith(full + "."):
            inner, found = _modules_before(child, target, full + ".")
            return before + inner, found
        before.append((full, child))
    return before, False


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze_before(model: nn.Module, layer: str) -> List[str]:
    """Freeze every parameter of the layers before ``layer`` (requires_grad=False) and keep those
    layers in eval mode even when the model is later switched to training: batch norm then uses
    its running statistics and drop-path is off there, so the frozen part computes exactly what it
    will compute at test time. Returns the names of the frozen parameters."""
    before, found = _modules_before(model, layer)
    if not found:
        raise ValueError(
            f"finetune.trainable_from={layer!r} is not a layer of this model: expected {FREEZE_HELP}"
        )
    frozen: List[str] = []
    for name, module in before:
        for pname, param in module.named_parameters():
            param.requires_grad_(False)
            frozen.append(f"{name}.{pname}")
        module.eval()
        # The training loop calls model.train() every step (so do PopTorch's wrappers); an
        # instance-level train() keeps this subtree in eval mode through those calls.
        module.train = types.MethodType(_stay_in_eval, module)
    return frozen


def trainable_parameters(model: nn.Module) -> List[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- batch norm


def _host_statistics(model: nn.Module, device: Optional[torch.device]) -> Callable[[Tensor], Statistics]:
    device = device or next(model.parameters()).device

    def measure(images: Tensor) -> Statistics:
        modes = [(m, m.training) for m in model.modules()]
        nn.Module.train(model, False)  # not model.eval(): the whole tree, frozen parts included
        try:
            return split_statistics(BatchNormProbe(model)(images.to(device)))
        finally:
            for m, mode in modes:
                m.training = mode

    return measure


@torch.no_grad()
def recalibrate_batch_norm(
    model: nn.Module,
    batches: Iterable,
    device: Optional[torch.device] = None,
    max_batches: Optional[int] = None,
    statistics: Optional[Callable[[Tensor], Statistics]] = None,
) -> int:
    """Recompute every batch norm's running mean and variance from ``batches`` (images, or
    (images, targets) pairs), with every other layer in eval mode (no dropout or drop-path) and no
    gradients: only the running statistics change. Each batch counts equally (a cumulative
    average, not an exponential one). ``statistics(images)`` measures one batch (a backend's
    ``batch_norm_statistics``: on an IPU, its inference executable); default: ``model`` here, on
    ``device``. Returns the number of batches used (0: no batch norm)."""
    layers = batch_norm_layers(model)
    if not layers:
        return 0
    measure = statistics or _host_statistics(model, device)
    sums: Optional[List[List[Tensor]]] = None
    rows = used = 0
    for batch in batches:
        if max_batches is not None and used >= max_batches:
            break
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        measured = measure(images)
        pairs = [[mean.sum(0), var.sum(0)] for mean, var in measured]
        sums = pairs if sums is None else [[a + m, b + v] for (a, b), (m, v) in zip(sums, pairs)]
        rows += measured[0][0].shape[0]
        used += 1
    if used == 0:
        raise ValueError("batch-norm recalibration got no batches: the loader is empty")
    write_statistics(model, [m / rows for m, _ in sums], [v / rows for _, v in sums], rows)
    return used


# ----------------------------------------------------------------------------- the command

REPORT = "finetune.md"
RECALIBRATION_IMAGES = 4096  # enough for stable per-channel statistics; all of a small dataset


def checkpoint_source(cfg: Config, args: Optional[argparse.Namespace]) -> Path:
    """--checkpoint, else finetune.checkpoint, else the newest run in log.out_dir (its best)."""
    source = getattr(args, "checkpoint", None) or cfg.finetune.checkpoint or latest_run(cfg.log.out_dir)
    if source is None:
        raise CheckpointError(
            f"nothing to fine-tune: no run with checkpoints in {cfg.log.out_dir}/; pass "
            "--checkpoint RUN_FOLDER_OR_FILE or finetune.checkpoint=... (or train first)"
        )
    return find_checkpoint(source, prefer_best=True)


def finetune_lr(cfg: Config) -> float:
    """The fine-tuning's peak rate: ``finetune.lr`` × global batch / ``finetune.lr_reference_batch``
    (the training loop scales ``optim.lr`` so; ``finetune_config`` hands these two over)."""
    return cfg.finetune.lr * cfg.global_batch / cfg.finetune.lr_reference_batch


def finetune_config(
    cfg: Config,
    payload: Dict[str, Any],
    path: Path,
    resolution: int,
    keep_max_steps: bool = False,
    keep_val_every: bool = False,
) -> Config:
    """The training configuration of a fine-tuning run: the checkpoint's architecture and weights,
    the target resolution with validation preprocessing, no mixing, no weight averaging, SGD
    without momentum at ``finetune_lr(cfg)`` on a cosine schedule without warm-up, over
    ``finetune.epochs``: ``train.max_steps`` only when ``keep_max_steps`` (given on this command
    line; the source run's own would cut the cosine schedule short). It validates once, at the end,
    unless ``keep_val_every`` (``train.val_every`` given on this command line); checkpoints come
    at the interval of ``train.checkpoint_every`` / ``train.checkpoint_minutes`` all the same."""
    data = cfg.to_dict()
    for key, value in (payload.get("arch") or {}).items():
        if key in data["model"] and data["model"][key] != value:
            print(f"fine-tuning uses the checkpoint's model.{key}={value!r} (not {data['model'][key]!r})")
            data["model"][key] = value
    data["resume"] = None
    data["model"].update(init_from=str(path), init_source="ours")
    data["data"].update(
        resolution=resolution, val_resolutions=[resolution], augment=False, mixup=0.0, cutmix_lambda=1.0
    )
    # Plain SGD without momentum or warm-up, cosine to 0 (Graphcore's PyTorch port, v3.4.1
    # train/train.py fine_tune()); the rate scales linearly with the global batch, a rate per image
    # (TF1 cosine.py), whatever rule or limit the training's own optimiser had.
    data["optim"].update(
        name="sgd",
        momentum=0.0,
        nesterov=False,
        lr=cfg.finetune.lr,
        lr_reference_batch=cfg.finetune.lr_reference_batch,
        lr_scaling="linear",
        lr_diverges_at=None,
    )
    data["schedule"].update(name="cosine", warmup_epochs=0.0, min_lr_ratio=0.0)
    data["train"].update(epochs=cfg.finetune.epochs, ema_decay=0.0, weight_avg_exp=0.0)
    if not keep_val_every:
        data["train"]["val_every"] = cfg.finetune.epochs
    if not keep_max_steps:
        data["train"]["max_steps"] = None
    data["finetune"]["source"] = str(path)  # marks the run as a fine-tuning run (resume)
    source_run = run_dir_of(path).name  # cfg may be that run's config.yaml: never reuse its name
    keep = cfg.log.name and cfg.log.name != source_run
    data["log"]["name"] = cfg.log.name if keep else f"{source_run}-finetune-{resolution}"
    return config_from_dict(data)


@dataclass
class FinetuneResult:
    run: TrainResult
    source: Path
    trained_resolution: Optional[int]
    resolution: int
    before: Dict[str, float] = field(default_factory=dict)  # the checkpoint at the new resolution
    recalibrated: Optional[Dict[str, float]] = None  # after batch-norm recalibration (batch norm only)
    frozen: int = 0  # parameters (tensors) frozen
    trainable: int = 0
    trainable_from: str = ""

    @property
    def after(self) -> Dict[str, float]:
        return self.run.results.get(f"raw@{self.resolution}", {})


def check_trainable_from(model_name: str, layer: str) -> None:
    """Fail before any data is read when ``layer`` is not a module of the model (built on the meta
    device: names only, no memory)."""
    with torch.device("meta"):
        model = build_model(model_name, num_classes=1)
    if not _modules_before(model, layer)[1]:
        raise AppError(
            f"finetune.trainable_from={layer!r} is not a layer of {model_name}: expected {FREEZE_HELP}"
        )


@torch.no_grad()
def average_batch_norm_statistics(model: nn.Module) -> None:
    """Every process recalibrated on its own share of the images: give all of them the mean of the
    running statistics (the mean of the shares' variances, close to the pooled variance when the
    shares are alike), so the job's model does not depend on which process it is read from."""
    for layer in batch_norm_layers(model):
        if layer.running_mean is not None:
            layer.running_mean.copy_(all_reduce_mean(layer.running_mean))
            layer.running_var.copy_(all_reduce_mean(layer.running_var))


def measure_and_recalibrate(ctx: TrainSetup, result: FinetuneResult) -> None:
    """Accuracy of the weights as trained at the new resolution, then (batch norm) recalibrate the
    statistics there and measure again. Results are over every process's share of the images."""
    backend, classifier = ctx.backend, ctx.classifier
    target_loader = ctx.val_loaders[result.resolution]

    def measure() -> Dict[str, float]:  # through the backend (IPU: its inference executable)
        return reduce_results({"m": evaluate(backend, target_loader, classifier)})["m"]

    result.before = measure()
    print(f"before fine-tuning, at {result.resolution}: top-1 {result.before['top1']:.2f}%")
    if batch_norm_layers(classifier):
        limit = max(1, RECALIBRATION_IMAGES // (ctx.host_batch * current().world_size))
        used = recalibrate_batch_norm(
            classifier,
            ctx.train_loader,
            max_batches=limit,
            statistics=lambda images: backend.batch_norm_statistics(classifier, images),
        )
        average_batch_norm_statistics(ctx.model)
        result.recalibrated = measure()
        print(
            f"batch-norm statistics recalibrated at {result.resolution} on {used} batches: "
            f"top-1 {result.recalibrated['top1']:.2f}%"
        )


def finetune_setup(ft_cfg: Config, result: FinetuneResult) -> Callable[[TrainSetup], None]:
    """The set-up hook of a fine-tuning run. A new run measures, recalibrates and freezes;
    a resumed one has the checkpoint's weights and statistics already and only freezes again, the
    layers its checkpoint records (the optimiser state holds exactly their parameters)."""

    def setup(ctx: TrainSetup) -> None:
        recorded = (ctx.resumed or {}).get("finetune") or {}
        layer = recorded.get("trainable_from", ft_cfg.finetune.trainable_from)
        if ctx.resumed is None:
            measure_and_recalibrate(ctx, result)
        else:
            result.before = recorded.get("before", {})
            result.recalibrated = recorded.get("recalibrated")
            result.trained_resolution = recorded.get("trained_resolution", result.trained_resolution)
        frozen = freeze_before(ctx.model, layer)
        result.frozen, result.trainable = len(frozen), len(trainable_parameters(ctx.model))
        result.trainable_from = layer
        print(
            f"frozen: everything before {layer} ({result.frozen} tensors); "
            f"training {result.trainable} tensors"
        )
        # every checkpoint records that the run is a fine-tuning run, how it froze and what it measured
        ctx.checkpoint_extra["finetune"] = {
            "source": str(result.source),
            "trainable_from": layer,
            "resolution": result.resolution,
            "trained_resolution": result.trained_resolution,
            "before": result.before,
            "recalibrated": result.recalibrated,
        }

    return setup


def run_finetune(
    cfg: Config, source: Path, keep_max_steps: bool = False, keep_val_every: bool = False
) -> FinetuneResult:
    payload = load_checkpoint(source, expect="training")
    resolution = cfg.finetune.resolution or native_resolution(cfg.model.name)
    ft_cfg = finetune_config(cfg, payload, source, resolution, keep_max_steps, keep_val_every)
    result = FinetuneResult(
        run=None, source=source, trained_resolution=trained_resolution(payload), resolution=resolution
    )
    check_trainable_from(ft_cfg.model.name, ft_cfg.finetune.trainable_from)
    stages = model_stages(ft_cfg.model.name)
    if result.trained_resolution is not None:
        check_resolutions(result.trained_resolution, [resolution], stages, what="fine-tuning")
    print(
        f"fine-tuning {source} (trained at {result.trained_resolution}) at {resolution}: "
        f"{describe_rule(resolution, stages)}"
    )
    result.run = run_training(ft_cfg, RunHook("finetune", finetune_setup(ft_cfg, result)))
    return result


def resume_finetune(cfg: Config) -> FinetuneResult:
    """Continue the fine-tuning run ``cfg.resume`` (``cfg``: its own configuration, with the
    command line's overrides), its layers frozen as they were."""
    if not cfg.finetune.source:
        raise AppError(
            f"{cfg.resume} is not a fine-tuning run (its configuration has no "
            f"finetune.source): continue it with {python_command()} -m app train --resume "
            f"{cfg.resume}, "
            f"or fine-tune it with {python_command()} -m app finetune --checkpoint {cfg.resume}"
        )
    result = FinetuneResult(
        run=None, source=Path(cfg.finetune.source), trained_resolution=None, resolution=cfg.data.resolution
    )
    result.run = run_training(cfg, RunHook("finetune", finetune_setup(cfg, result)))
    return result


def report_lines(result: FinetuneResult) -> List[str]:
    """A Markdown table: accuracy at the target resolution before, (recalibrated,) after."""
    rows = [("checkpoint as trained", result.before)]
    if result.recalibrated is not None:
        rows.append(("+ batch-norm recalibration", result.recalibrated))
    rows.append((f"+ fine-tuning ({result.run.last_step} steps)", result.after))
    return [f"| weights, at {result.resolution} | top-1 % | top-5 % |", "|---|---:|---:|"] + [
        f"| {name} | {m.get('top1', float('nan')):.2f} | {m.get('top5', float('nan')):.2f} |"
        for name, m in rows
    ]


def main(cfg: Config, args: Optional[argparse.Namespace] = None) -> int:
    """``finetune --checkpoint RUN`` (a new fine-tuning run) or ``finetune --resume FT_RUN`` (also
    reached by ``train --resume FT_RUN``); over several processes like ``train``."""
    launched = launch(cfg, args)  # replicas over several processes: torchrun / poprun runs this again
    if launched is not None:
        return launched
    if cfg.resume:
        result = resume_finetune(cfg)
    else:
        result = run_finetune(
            cfg,
            checkpoint_source(cfg, args),
            keep_max_steps=given_on_command_line(args, "train.max_steps"),
            keep_val_every=given_on_command_line(args, "train.val_every"),
        )
    if result.run.exit_code:
        return result.run.exit_code
    if not current().is_main:  # one report, from the process that owns the run folder
        return 0
    folder = RunFolder(result.run.run_dir)
    if result.run.finished_before:  # its report was written when it finished: kept as it is
        print(f"{result.run.run_dir} had finished already; its report: {folder / REPORT}")
        return 0
    table = "\n".join(report_lines(result))
    print(f"fine-tuning of {result.source} at {result.resolution}:\n{table}")
    written = folder.write_report(
        REPORT,
        (
            f"# Fine-tuning at {result.resolution}\n\nFrom `{result.source}` (trained at "
            f"{result.trained_resolution}); trainable from `{result.trainable_from}`.\n\n{table}\n"
        ),
    )
    print(f"report: {written}")
    return 0
