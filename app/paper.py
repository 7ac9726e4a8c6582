"""``make paper``: the paper's reduced-resolution recipe end to end, in one report.

1. native: train at the native resolution N (the model's own, or ``finetune.resolution``).
2. half: train the same number of epochs at ``half_resolution(N)`` — about half the pixels, same
   residue modulo 2^n — validating at the half size and at N.
3. fine-tune the half-resolution model at N (``app.finetune``: last layers, validation
   preprocessing, ``finetune.epochs``).
4. sweep both final models over test resolutions around N, marking those that keep the residue.

The report (``report.md`` + ``sweep.png`` in ``runs/paper-…/``) puts native and half + fine-tune
side by side: top-1 at N, training images/s and training time.

Sizes for the embedded digits data: the digits preset sets ``finetune.resolution: 96`` as the
"native" size (the 8×8 digits are upscaled; 224 would cost ~5× more for nothing), so half is
``half_resolution(96) = 64``: 44 % of the pixels (B4's 380→252 has the same share), and 96 ≡ 64
≡ 0 (mod 32), so every one of B0's five stride-2 stages sees even maps at both sizes
(96→48→24→12→6→3, 64→32→16→8→4→2). 32 vs 24 or 64 vs 48 would be nearer half the pixels but
differ modulo 32: at 24 the fourth stride-2 stage, at 48 the fifth, downsamples an odd 3×3 map
where 32 and 64 give even ones — the misalignment the rule is about.
"""
import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from app.backend import create_backend
from app.checkpoint import find_checkpoint, load_checkpoint
from app.config import Config, config_from_dict
from app.data import build_dataset, build_loader
from app.evaluate import checkpoint_networks, evaluate
from app.finetune import FinetuneResult, given_on_command_line, report_lines, run_finetune
from app.resolution import (
    half_resolution,
    model_stages,
    native_resolution,
    plot_sweep,
    sweep,
    sweep_table,
)
from app.tracking import format_duration, new_folder
from app.train import TrainResult, run_training

SWEEP_POINTS = 9  # test resolutions N - 2^n … N + 2^n in steps of 2^n / 4


def derived(cfg: Config, **sections: Dict[str, Any]) -> Config:
    """A copy of ``cfg`` with some fields of some sections replaced."""
    data = cfg.to_dict()
    for section, values in sections.items():
        data[section].update(values)
    return config_from_dict(data)


def paper_folder(cfg: Config) -> Path:
    """A new ``runs/paper-<model>-<dataset>-<time>`` (or ``log.name``) holding the three runs."""
    dataset = Path(cfg.data.dataset).name or "data"
    name = cfg.log.name or f"paper-{cfg.model.name}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return new_folder(Path(cfg.log.out_dir), name)  # never reuses (overwrites) an existing folder


def final_weights(run_dir: Path, cfg: Config, num_classes: int):
    """A run's best checkpoint as a network: its EMA weights when it has them."""
    path = find_checkpoint(run_dir, prefer_best=True)
    networks = checkpoint_networks(load_checkpoint(path), cfg, num_classes, path)
    kind = "ema" if "ema" in networks else "raw"
    return networks[kind], ("EMA" if kind == "ema" else "raw")


def sweep_resolutions(native: int, stages: int) -> List[int]:
    step = max(1, 2 ** stages // 4)
    half_span = step * (SWEEP_POINTS // 2)
    return [r for r in range(native - half_span, native + half_span + 1, step) if r >= 32]


def _top1(results: Dict[str, Dict[str, float]], resolution: int) -> Dict[str, float]:
    """The EMA result at ``resolution`` when there is one, else the raw one."""
    return results.get(f"ema@{resolution}") or results.get(f"raw@{resolution}") or {}


def write_report(folder: Path, cfg: Config, native: int, half: int, stages: int, native_run: TrainResult,
                 half_run: TrainResult, ft: FinetuneResult, sweep_md: str, command: str, device: str) -> str:
    n_acc = _top1(native_run.results, native)
    h_acc = _top1(half_run.results, native)
    f_acc = ft.after
    half_total = half_run.train_seconds + ft.run.train_seconds
    step = 2 ** stages
    m = cfg.model

    def pct(r: Dict[str, float]) -> str:
        return f"{r['top1']:.2f}" if r else "–"

    lines = [
        f"# Reduced-resolution training and fine-tuning: {m.name.upper()} G{m.group_size} "
        f"{m.norm}{'+PN' if m.proxy_norm else ''} on {cfg.data.dataset}",
        "",
        f"Measured {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {device} "
        f"({torch.get_num_threads()} threads) with `{command}`.",
        f"Native resolution {native}, half {half} ({(half / native) ** 2:.0%} of the pixels; both "
        f"≡ {native % step} mod {step}, the total stride of {stages} stride-2 stages). "
        f"{cfg.train.epochs:g} epochs each, fine-tuning {cfg.finetune.epochs:g} epochs from "
        f"`{cfg.finetune.trainable_from}` on.",
        "",
        f"| | native ({native}) | half ({half}), no fine-tuning | half ({half}) + fine-tune at {native} |",
        "|---|---:|---:|---:|",
        f"| top-1 at {native} (%) | {pct(n_acc)} | {pct(h_acc)} | {pct(f_acc)} |",
        f"| training images/s | {native_run.images_per_s:.1f} | {half_run.images_per_s:.1f} | "
        f"{half_run.images_per_s:.1f} (half), {ft.run.images_per_s:.1f} (fine-tune) |",
        f"| training time | {format_duration(native_run.train_seconds)} ({native_run.train_seconds:.1f} s) | "
        f"{format_duration(half_run.train_seconds)} ({half_run.train_seconds:.1f} s) | "
        f"{format_duration(half_total)} ({half_run.train_seconds:.1f} + {ft.run.train_seconds:.1f} s) |",
        f"| training time vs native | 1.00× | {half_run.train_seconds / native_run.train_seconds:.2f}× | "
        f"{half_total / native_run.train_seconds:.2f}× |",
        "",
        "Training time: the training loop of each run (data loading and weight updates), without "
        "validation and checkpoints. Top-1: EMA weights where the run keeps them (native, half), raw "
        "weights after fine-tuning (no EMA there). Accuracy before fine-tuning and batch-norm "
        "recalibration (batch norm only) are measured before the fine-tuning clock starts.",
        "",
        "## Fine-tuning",
        "",
        *report_lines(ft),
        "",
        "## Accuracy against test resolution",
        "",
        sweep_md,
        "![accuracy vs resolution](sweep.png)",
        "",
        f"Runs: `{native_run.run_dir}`, `{half_run.run_dir}`, `{ft.run.run_dir}`.",
    ]
    text = "\n".join(lines) + "\n"
    (folder / "report.md").write_text(text)
    return text


def main(cfg: Config, args: Optional[argparse.Namespace] = None) -> int:
    stages = model_stages(cfg.model.name)
    native = cfg.finetune.resolution or native_resolution(cfg.model.name)
    half = half_resolution(native, stages)  # errors (too small a native size) before any work
    folder = paper_folder(cfg)
    command = " ".join(["python -m app"] + sys.argv[1:])
    print(f"paper recipe in {folder}: native {native}, half {half} (mod {2 ** stages}: "
          f"{native % 2 ** stages} and {half % 2 ** stages})")
    base = dict(log={"out_dir": str(folder), "name": None}, finetune={"resolution": native})

    runs: Dict[str, TrainResult] = {}
    for label, resolution, val in (("native", native, [native]), ("half", half, [half, native])):
        print(f"\n=== {label}: training at {resolution} ===", flush=True)
        # validated once, at the end: the comparison is about the final models
        run_cfg = derived(cfg, log={**base["log"], "name": label}, finetune=base["finetune"],
                          data={"resolution": resolution, "val_resolutions": val},
                          train={"val_every": cfg.train.epochs})
        runs[label] = run_training(run_cfg)
        if runs[label].exit_code:
            return runs[label].exit_code

    print(f"\n=== half + fine-tuning at {native} ===", flush=True)
    ft_cfg = derived(cfg, log={**base["log"], "name": "half-finetune"}, finetune=base["finetune"])
    ft = run_finetune(ft_cfg, find_checkpoint(runs["half"].run_dir, prefer_best=True),
                      keep_max_steps=given_on_command_line(args, "train.max_steps"))
    if ft.run.exit_code:
        return ft.run.exit_code

    print(f"\n=== sweep of test resolutions around {native} ===", flush=True)
    backend = create_backend(cfg)
    resolutions = sweep_resolutions(native, stages)
    num_classes = build_dataset(cfg, "val", native).num_classes
    native_model, native_kind = final_weights(runs["native"].run_dir, cfg, num_classes)
    ft_model, _ = final_weights(ft.run.run_dir, cfg, num_classes)
    models = {f"native ({native_kind})": native_model, "half + fine-tune": ft_model}

    def evaluate_at(resolution: int) -> Dict[str, Dict[str, float]]:
        loader = build_loader(build_dataset(cfg, "val", resolution), backend.eval_batch_size(cfg),
                              train=False, cfg=cfg, device=backend.device)
        return {name: evaluate(backend, loader, model, cfg) for name, model in models.items()}

    rows = sweep(evaluate_at, resolutions, native, stages)
    backend.close()
    plot_sweep(rows, native, folder / "sweep.png", stages,
               title=f"{cfg.model.name.upper()} on {cfg.data.dataset}: trained/fine-tuned at {native}")
    report = write_report(folder, cfg, native, half, stages, runs["native"], runs["half"], ft,
                          sweep_table(rows, native, stages), command, f"{backend.name}"
                          + (" (emulated)" if backend.emulated else ""))
    print("\n" + report)
    print(f"report: {folder / 'report.md'}")
    return 0

