"""``make paper``: the paper's reduced-resolution recipe end to end, in one report.

1. native: train at the native resolution N (the model's own, or ``data.native_resolution``, or
   ``finetune.resolution``: ``app.resolution.recipe_native``).
2. half: train the same number of epochs at ``half_resolution(N)`` — about half the pixels, same
   residue modulo 2^n — validating at the half size and at N.
3. fine-tune BOTH models at N (``app.finetune``: last layers, validation preprocessing,
   ``finetune.epochs``), as the paper does for every model it reports.
4. sweep both fine-tuned models over test resolutions around N, marking those that keep the residue.

The report (``report.md`` + ``sweep.png`` in ``runs/paper-…/``) puts native (+ fine-tune) and half
(+ fine-tune) side by side: top-1 at N, training images/s and training time.

Sizes for the embedded digits data: the digits preset sets ``data.native_resolution: 96`` as the
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import yaml

from app.backend import create_backend
from app.checkpoint import find_checkpoint, load_checkpoint
from app.command_line import given_on_command_line
from app.config import Config, config_from_dict, read_yaml_file
from app.data import build_dataset, build_loader
from app.errors import AppError
from app.evaluate import checkpoint_networks, evaluate
from app.finetune import FinetuneResult, finetune_lr, report_lines
from app.provenance import git_commit
from app.resolution import (
    half_resolution,
    model_stages,
    plot_sweep,
    recipe_native,
    sweep,
    sweep_table,
)
from app.run_folder import RunFolder
from app.specs import data_spec
from app.tracking import format_duration, new_folder
from app.train import TrainResult
from experiments.progress import (
    Progress,
    experiment_resume_command,
    finetune_phase,
    train_phase,
)

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


def final_weights(run_dir: Path, cfg: Config, num_classes: int) -> Tuple[torch.nn.Module, str]:
    """A run's best checkpoint as a network: its EMA weights when it has them."""
    path = find_checkpoint(run_dir, prefer_best=True)
    networks = checkpoint_networks(load_checkpoint(path), cfg, num_classes, path)
    kind = "ema" if "ema" in networks else "raw"
    return networks[kind], ("EMA" if kind == "ema" else "raw")


def sweep_resolutions(native: int, stages: int) -> List[int]:
    step = max(1, 2**stages // 4)
    half_span = step * (SWEEP_POINTS // 2)
    return [r for r in range(native - half_span, native + half_span + 1, step) if r >= 32]


def _top1(results: Dict[str, Dict[str, float]], resolution: int) -> Dict[str, float]:
    """The EMA result at ``resolution`` when there is one, else the raw one."""
    return results.get(f"ema@{resolution}") or results.get(f"raw@{resolution}") or {}


@dataclass
class RecipeRuns:
    """The four runs of the recipe: both models trained, both fine-tuned at the native size."""

    native: TrainResult
    half: TrainResult
    native_ft: FinetuneResult
    half_ft: FinetuneResult


def run_recipe(
    cfg: Config,
    folder: Path,
    native: int,
    half: int,
    keep_max_steps: bool,
    progress: Progress,
    prefix: str = "",
) -> Union[RecipeRuns, int]:
    """Train at ``native`` and at ``half`` (validated once, at the end), then fine-tune BOTH at
    ``native``: "for all results (apart from the baseline) we finetune the final model on the
    validation image sizes for 2 epochs" (graphcore-research Making_EfficientNet_More_Efficient/
    README.md), so the comparison applies the same protocol to both. Each of the four phases runs
    once: a resume (``progress``, phases named ``prefix`` + label) takes the finished ones' results
    and continues the interrupted one from its checkpoint. Returns the runs, or the exit status of
    the first that failed."""
    base_log = {"out_dir": str(folder)}
    trained: Dict[str, TrainResult] = {}
    for label, resolution, val in (("native", native, [native]), ("half", half, [half, native])):
        print(f"\n=== {label}: training at {resolution} ===", flush=True)
        run_cfg = derived(
            cfg,
            log={**base_log, "name": label},
            finetune={"resolution": native},
            data={"resolution": resolution, "val_resolutions": val},
            train={"val_every": cfg.train.epochs},
        )
        trained[label] = train_phase(progress, prefix + label, run_cfg)
        if trained[label].exit_code:
            return trained[label].exit_code
    tuned: Dict[str, FinetuneResult] = {}
    for label in ("native", "half"):
        print(f"\n=== {label} + fine-tuning at {native} ===", flush=True)
        ft_cfg = derived(cfg, log={**base_log, "name": f"{label}-finetune"}, finetune={"resolution": native})
        tuned[label] = finetune_phase(
            progress,
            f"{prefix}{label}-finetune",
            ft_cfg,
            find_checkpoint(trained[label].run_dir, prefer_best=True),
            keep_max_steps,
        )
        if tuned[label].run.exit_code:
            return tuned[label].run.exit_code
    return RecipeRuns(trained["native"], trained["half"], tuned["native"], tuned["half"])


def write_report(
    folder: Path,
    cfg: Config,
    native: int,
    half: int,
    stages: int,
    runs: RecipeRuns,
    sweep_md: str,
    command: str,
    device: str,
) -> str:
    n_acc, h_acc = _top1(runs.native.results, native), _top1(runs.half.results, native)
    nf, hf = runs.native_ft, runs.half_ft
    native_total = runs.native.train_seconds + nf.run.train_seconds
    half_total = runs.half.train_seconds + hf.run.train_seconds
    step = 2**stages
    m = cfg.model

    def pct(r: Dict[str, float]) -> str:
        return f"{r['top1']:.2f}" if r else "–"

    def seconds(train: TrainResult, ft: FinetuneResult) -> str:
        total = train.train_seconds + ft.run.train_seconds
        return f"{format_duration(total)} ({train.train_seconds:.1f} + {ft.run.train_seconds:.1f} s)"

    lines = [
        f"# Reduced-resolution training and fine-tuning: {m.name.upper()} G{m.group_size} "
        f"{m.norm}{'+PN' if m.proxy_norm else ''} on {cfg.data.dataset}",
        "",
        f"Measured {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} on {device} "
        f"({torch.get_num_threads()} threads, torch {torch.__version__}, commit {git_commit()}) with "
        f"`{command}`.",
        f"Native resolution {native}, half {half} ({(half / native) ** 2:.0%} of the pixels; both "
        f"≡ {native % step} mod {step}, the total stride of {stages} stride-2 stages). "
        f"{cfg.train.epochs:g} epochs each; BOTH models are then fine-tuned at {native} for "
        f"{cfg.finetune.epochs:g} epochs from `{cfg.finetune.trainable_from}` on (validation "
        f"preprocessing, SGD without momentum, cosine, {finetune_lr(cfg):.4g} = {cfg.finetune.lr:g} × "
        f"global batch {cfg.global_batch} / {cfg.finetune.lr_reference_batch}), as the paper does for "
        "every reported model.",
        "",
        f"| | native ({native}) | native + fine-tune | half ({half}), no fine-tune | "
        f"half + fine-tune at {native} |",
        "|---|---:|---:|---:|---:|",
        f"| top-1 at {native} (%) | {pct(n_acc)} | {pct(nf.after)} | {pct(h_acc)} | {pct(hf.after)} |",
        f"| training images/s | {runs.native.images_per_s:.1f} | {nf.run.images_per_s:.1f} (fine-tune) | "
        f"{runs.half.images_per_s:.1f} | {hf.run.images_per_s:.1f} (fine-tune) |",
        f"| training time | {format_duration(runs.native.train_seconds)} "
        f"({runs.native.train_seconds:.1f} s) | {seconds(runs.native, nf)} | "
        f"{format_duration(runs.half.train_seconds)} ({runs.half.train_seconds:.1f} s) | "
        f"{seconds(runs.half, hf)} |",
        f"| training time vs native + fine-tune | {runs.native.train_seconds / native_total:.2f}× | 1.00× | "
        f"{runs.half.train_seconds / native_total:.2f}× | {half_total / native_total:.2f}× |",
        "",
        "Training time: the training loop of each run (data loading and weight updates), without "
        "validation and checkpoints. Top-1: the averaged weights where the run keeps them (native, "
        "half), raw weights after fine-tuning (no average there). Accuracy before fine-tuning and "
        "batch-norm recalibration (batch norm only) are measured before the fine-tuning clock starts.",
        "",
        "## Fine-tuning the native model",
        "",
        *report_lines(nf),
        "",
        "## Fine-tuning the half-resolution model",
        "",
        *report_lines(hf),
        "",
        "## Accuracy against test resolution",
        "",
        sweep_md,
        "![accuracy vs resolution](sweep.png)",
        "",
        "Runs: "
        + ", ".join(
            f"`{r}`" for r in (runs.native.run_dir, runs.half.run_dir, nf.run.run_dir, hf.run.run_dir)
        )
        + ".",
    ]
    text = "\n".join(lines) + "\n"
    RunFolder(folder).write_report("report.md", text)
    return text


def start_or_resume(
    cfg: Config,
    args: Optional[argparse.Namespace],
    command: str,
    new_folder_of: Callable[[Config], Path],
    setup_of: Callable[[Config], Dict[str, Any]],
) -> Tuple[Config, Path, Progress]:
    """A new paper/study folder (its ``config.yaml``, what ``setup_of`` settles), or the folder
    ``--resume`` names, continued with what its first start settled: its configuration as it was
    (overrides would make its phases disagree, so a resume refuses them)."""
    if not cfg.resume:
        folder = new_folder_of(cfg)
        RunFolder(folder).write_document("config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return cfg, folder, Progress(folder, setup_of(cfg))
    folder = Path(cfg.resume)
    given = [o for o in getattr(args, "overrides", None) or [] if "=" in o]
    given += [f"--{flag} {getattr(args, flag)}" for flag in ("config", "device") if getattr(args, flag, None)]
    if given:
        raise AppError(
            f"--resume {folder}: continue it as it started, without overrides "
            f"({' '.join(given)}): "
            f"{experiment_resume_command(folder, command)}"
        )
    progress = Progress(folder)
    return config_from_dict(read_yaml_file(folder / "config.yaml")), folder, progress


def main(cfg: Config, args: Optional[argparse.Namespace] = None) -> int:
    stages = model_stages(cfg.model.name)

    def setup(c: Config) -> Dict[str, Any]:
        native = recipe_native(c, given_on_command_line(args, "finetune.resolution"))
        return {
            "native": native,
            "half": half_resolution(native, stages),  # errors before any work
            "keep_max_steps": given_on_command_line(args, "train.max_steps"),
            "command": " ".join(["python -m experiments"] + sys.argv[1:]),
        }

    resumed = bool(cfg.resume)
    if not resumed:
        setup(cfg)  # a native size too small: refused before a folder exists
    cfg, folder, progress = start_or_resume(cfg, args, "paper", paper_folder, setup)
    native, half, command = progress.setup["native"], progress.setup["half"], progress.setup["command"]
    print(
        f"paper recipe in {folder}: native {native}, half {half} (mod {2**stages}: "
        f"{native % 2**stages} and {half % 2**stages})"
        + (f"; resuming, done: {', '.join(progress.data['done']) or 'nothing yet'}" if resumed else "")
    )
    try:
        return finish_recipe(cfg, folder, native, half, stages, progress, command)
    except KeyboardInterrupt:  # a signal outside a training loop (during the sweep, at a start)
        print(
            f"\npaper stopped; continue the recipe with:\n  {experiment_resume_command(folder, 'paper')}",
            file=sys.stderr,
        )
        raise


def finish_recipe(
    cfg: Config, folder: Path, native: int, half: int, stages: int, progress: Progress, command: str
) -> int:
    """The recipe's phases not finished yet, then the sweep and the report."""
    runs = run_recipe(cfg, folder, native, half, progress.setup["keep_max_steps"], progress)
    if isinstance(runs, int):
        if runs > 128:
            print(
                f"\npaper stopped (exit {runs}); its finished phases are kept. Continue the recipe "
                f"with:\n  {experiment_resume_command(folder, 'paper')}",
                file=sys.stderr,
            )
        return runs

    print(f"\n=== sweep of test resolutions around {native} ===", flush=True)
    backend = create_backend(cfg)
    resolutions = sweep_resolutions(native, stages)
    num_classes = build_dataset(cfg, "val", native).num_classes
    models = {
        "native + fine-tune": final_weights(runs.native_ft.run.run_dir, cfg, num_classes)[0],
        "half + fine-tune": final_weights(runs.half_ft.run.run_dir, cfg, num_classes)[0],
    }

    def evaluate_at(resolution: int) -> Dict[str, Dict[str, float]]:
        loader = build_loader(
            build_dataset(cfg, "val", resolution),
            backend.eval_batch_size(),
            train=False,
            spec=data_spec(cfg),
            device=backend.device,
        )
        return {name: evaluate(backend, loader, model, cfg) for name, model in models.items()}

    rows = sweep(evaluate_at, resolutions, native, stages)
    backend.close()
    plot_sweep(
        rows,
        native,
        folder / "sweep.png",
        stages,
        title=f"{cfg.model.name.upper()} on {cfg.data.dataset}: trained/fine-tuned at {native}",
    )
    report = write_report(
        folder,
        cfg,
        native,
        half,
        stages,
        runs,
        sweep_table(rows, native, stages),
        command,
        f"{backend.name}" + (" (emulated)" if backend.emulated else ""),
    )
    print("\n" + report)
    print(f"report: {folder / 'report.md'}")
    return 0
