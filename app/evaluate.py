"""Validation: top-1 / top-5 / loss over a loader, and ``python -m app validate``.

Every evaluation goes through the run's ``Backend``: ``evaluate(backend, loader, weights)``
scores ``weights`` (a network of the run's architecture: the EMA copy, a checkpoint's weights)
or, with None, the weights being trained, on the backend's device. On an IPU that is the
backend's inference executable, with the weights copied to it; on CPU/CUDA the backend's device.
The training loop, ``validate``, fine-tuning and the resolution sweeps all measure this way.
"""

import argparse
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from app.backend import Backend, create_backend
from app.checkpoint import (
    CheckpointError,
    check_architecture,
    find_checkpoint,
    latest_run,
    load_checkpoint,
    load_weights,
    run_dir_of,
)
from app.config import Config
from app.data import build_dataset, build_loader
from app.errors import AppError
from app.objective import Classifier, build_classifier, build_network
from app.resolution import (
    check_resolutions,
    downsampling_stages,
    parse_resolutions,
    trained_resolution,
    write_sweep_report,
)
from app.run_folder import RunFolder
from app.specs import data_spec


def as_classifier(weights: Optional[nn.Module], cfg: Optional[Config]) -> Optional[nn.Module]:
    """A network wrapped with the run's input normalisation (what a backend scores); a
    Classifier, or None (the training weights), as it is."""
    if weights is None or isinstance(weights, Classifier):
        return weights
    if cfg is None:
        raise ValueError("evaluate: a bare network needs the run's configuration (cfg)")
    # beside the weights: the Classifier's normalisation buffers are made on the CPU
    param = next(weights.parameters(), None)
    classifier = build_classifier(weights, cfg)
    return classifier.to(param.device) if param is not None else classifier


@torch.no_grad()
def evaluate(
    backend: Backend,
    loader: Iterable,
    weights: Optional[nn.Module] = None,
    cfg: Optional[Config] = None,
    max_batches: Optional[int] = None,
) -> Dict[str, float]:
    """{"top1": %, "top5": %, "loss": mean unsmoothed cross-entropy, "images": n}. ``weights``: a
    network (with ``cfg``) or a Classifier to score; None: the backend's training weights."""
    correct1 = correct5 = 0
    loss_sum, seen = 0.0, 0
    with backend.evaluating(as_classifier(weights, cfg)):
        for i, (images, targets) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            logits = backend.evaluate(images).float().cpu()
            targets = targets.cpu()
            if targets.dtype.is_floating_point:  # soft targets: score against the largest share
                targets = targets.argmax(dim=-1)
            k = min(5, logits.shape[-1])
            top = logits.topk(k, dim=-1).indices
            hits = top == targets[:, None]
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=-1).sum())
            loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            seen += targets.shape[0]
    if seen == 0:
        raise ValueError("the validation loader yielded no images")
    return {
        "top1": 100.0 * correct1 / seen,
        "top5": 100.0 * correct5 / seen,
        "loss": loss_sum / seen,
        "images": seen,
    }


def validate_all(
    backend: Backend, ema: Optional[Any], loaders: Dict[int, Iterable], cfg: Config
) -> Dict[str, Dict[str, float]]:
    """Raw weights and EMA weights at every validation resolution, both through the backend:
    {"raw@224": {...}, "ema@224": {...}, ...}."""
    results = {}
    ema_classifier = as_classifier(ema.module, cfg) if ema is not None else None

    def counted(name: str, *target: Any) -> None:
        # each pass's own count of unreadable images replaced (the raw and EMA passes read the same)
        loader = target[0]
        before = getattr(loader, "skipped", 0)
        results[name] = evaluate(backend, *target)
        results[name]["skipped_images"] = getattr(loader, "skipped", 0) - before

    for resolution, loader in loaders.items():
        counted(f"raw@{resolution}", loader)
        if ema is not None:
            backend.sync_to_host()  # the EMA reads the host copy of the trained weights
            counted(f"ema@{resolution}", loader, ema_classifier)
    return results


def report(results: Dict[str, Dict[str, float]]) -> str:
    return "\n".join(
        f"  {k:>10}: top-1 {r['top1']:6.2f}%  top-5 {r['top5']:6.2f}%  loss {r['loss']:.4f}"
        f"  ({r['images']} images)"
        for k, r in results.items()
    )


def checkpoint_networks(
    payload: Dict, cfg: Config, num_classes: int, source: Union[str, Path]
) -> Dict[str, nn.Module]:
    """{"raw": …, "ema": …}: a checkpoint's weights (EMA only when it has them), each as a network
    on the host; a backend's ``evaluating`` puts them on its device."""
    networks = {}
    weights = {"raw": payload.get("model"), "ema": (payload.get("ema") or {}).get("module")}
    for kind, state in weights.items():
        if state is None:
            continue
        net = build_network(cfg, num_classes)
        load_weights(net, state, source)
        networks[kind] = net
    return networks


def main(cfg: Config, args: Optional[argparse.Namespace] = None) -> int:
    """Validate a checkpoint (a file, or a run folder's best) at cfg.data.val_resolutions, or sweep
    ``--resolutions`` (a table and a plot of accuracy against resolution in the run folder)."""
    sweep_arg = getattr(args, "resolutions", None)
    try:
        swept = parse_resolutions(sweep_arg) if sweep_arg else None
    except ValueError as error:
        raise AppError(str(error)) from None
    source = getattr(args, "checkpoint", None) or cfg.resume or latest_run(cfg.log.out_dir)
    if source is None:
        raise CheckpointError(
            f"nothing to validate: no run with checkpoints in {cfg.log.out_dir}/; "
            "pass --checkpoint RUN_FOLDER_OR_FILE (or train first: make train)"
        )
    path = find_checkpoint(source, prefer_best=True)
    if swept:  # the sweep's table and plot go into the run folder: fail now, not after the sweep
        RunFolder(run_dir_of(path)).check_writable()
    payload = load_checkpoint(path, expect="training")
    backend = create_backend(cfg)
    resolutions = swept or cfg.data.val_resolutions or [cfg.data.resolution]
    datasets = {r: build_dataset(cfg, "val", r) for r in resolutions}
    num_classes = next(iter(datasets.values())).num_classes
    check_architecture(payload, cfg.model, num_classes, path)
    networks = checkpoint_networks(payload, cfg, num_classes, path)
    # The test-resolution rule, relative to the resolution the checkpoint was last trained at.
    stages = downsampling_stages(next(iter(networks.values())))
    trained = trained_resolution(payload) or cfg.data.resolution
    check_resolutions(trained, resolutions, stages, what="validation")
    results = {}
    for kind, network in networks.items():
        for r, dataset in datasets.items():
            loader = build_loader(
                dataset, backend.eval_batch_size(), train=False, spec=data_spec(cfg), device=backend.device
            )
            results[f"{kind}@{r}"] = evaluate(backend, loader, network, cfg)
    print(f"validation of {path} (step {payload.get('step')}):\n{report(results)}")
    if swept:
        table, plot = write_sweep_report(
            results, trained, run_dir_of(path), stages, title=f"Accuracy vs test resolution: {path}"
        )
        print(f"{table.read_text()}resolution sweep: {table} and {plot}")
    backend.close()
    return 0
