"""``python -m experiments study norms|groups|resolution``: the paper's three claims, measured in miniature.

Each study trains a few variants of the configuration (``--config``, digits by default) once per
seed in ``study.seeds``, writes one row per run to ``<study.out_dir>/study-<name>-<dataset>-<device>
.jsonl`` (and ``.csv``), then the Markdown report and plot from those rows (``experiments/study_report.py``;
``study.report_only=true`` regenerates them from the rows without training). Rows are written as
runs finish to ``….jsonl.partial``, which replaces the previous rows only once the study is
complete, so an interrupted study leaves the last complete one in place.

- ``norms``: BN, GN, LN and LN+PN at micro-batches 2, 4, 8 and 32; the same global batch (the
  configuration's) by gradient accumulation, the same number of updates. The paper: BN degrades at
  small micro-batches, GN/LN alone lose accuracy, LN+PN matches large-batch BN at any micro-batch.
- ``groups``: group sizes 1, 4, 16, 64 with expansion ratios 6, 5, 4, 2 (``GROUP_EXPANSION``),
  top-1 beside measured training throughput (the paper chose G16 for the trade-off; G4 was the
  most accurate).
- ``resolution``: native vs half resolution, each then fine-tuned at the native one (``make
  paper``'s ``run_recipe``: the paper's protocol for every model it reports).

Every run validates once, at its end, with its raw weights (no weight averaging: the comparison is
about the variants, not the averaging). Unless this command line sets ``train.epochs``, each study
trains for its ``STUDY_EPOCHS`` — short, so that a study fits ~20 minutes of a 2-core CPU.
"""

import argparse
import csv
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from app.command_line import given_on_command_line
from app.config import Config, ConfigError
from app.errors import AppError
from app.provenance import cpu_name, git_commit, load_average
from app.resolution import half_resolution, model_stages, recipe_native
from app.run_folder import RunFolder
from app.tracking import new_folder
from app.train import TrainResult
from experiments.paper import derived, run_recipe, start_or_resume
from experiments.progress import Progress, experiment_resume_command, train_phase
from experiments.study_report import load_rows, write_report
from model import build_model, count_macs, count_parameters

STUDY_NAMES = ("norms", "groups", "resolution")
STUDY_EPOCHS = {"norms": 1.5, "groups": 2.0, "resolution": 3.0}
NORM_VARIANTS = (
    ("BN", "batch", False),
    ("GN", "group", False),
    ("LN", "layer", False),
    ("LN+PN", "layer", True),
)
MICRO_BATCHES = (2, 4, 8, 32)
RESOLUTION_VARIANTS = ("native", "native + fine-tune", "half", "half + fine-tune")  # its rows per seed
# Group size → expansion ratio. The paper's configs pair G1 with e6 and G16 with e4 (configs.yml
# G1/G16 anchors). For G4 and G64, whose ratios neither the configs nor the paper
# give, the integer ratio nearest the paper's aim of "approximately equal FLOPs" (README): G4 e5
# (B0: 5.15M parameters / 0.42G multiply-adds vs G1 e6's 5.29M / 0.39G) and G64 e2, the smallest
# ratio that still expands (7.65M / 1.02G; no integer ratio brings G64 down to G1's FLOPs).
GROUP_EXPANSION = ((1, 6), (4, 5), (16, 4), (64, 2))


def take_study_name(args: argparse.Namespace, overrides: List[str]) -> None:
    """``python -m experiments study NAME [overrides]``: move NAME (the first word without '=')
    from the overrides to ``args.study``; ConfigError (exit 2) when it is missing or unknown."""
    for i, word in enumerate(overrides):
        if "=" not in word:
            if word not in STUDY_NAMES:
                raise ConfigError(
                    "study",
                    word,
                    f"one of {', '.join(STUDY_NAMES)} "
                    "(python -m experiments study norms|groups|resolution [overrides])",
                )
            del overrides[i]
            args.study = word
            return
    raise ConfigError("study", None, f"a study name: python -m experiments study {'|'.join(STUDY_NAMES)}")


@dataclass
class Variant:
    label: str
    sections: Dict[str, Dict[str, Any]]  # config fields this variant sets
    fields: Dict[str, Any] = field(default_factory=dict)  # what its rows record about it


def norm_variants(cfg: Config) -> List[Variant]:
    total = cfg.global_batch // cfg.train.replicas
    out = []
    for label, norm, proxy in NORM_VARIANTS:
        for micro in MICRO_BATCHES:
            if total % micro:
                raise AppError(
                    f"the norms study keeps the global batch ({cfg.global_batch}) by "
                    f"accumulation: micro-batch {micro} does not divide it; set "
                    f"train.micro_batch × train.grad_accum to a multiple of 32"
                )
            out.append(
                Variant(
                    f"{label} mb{micro}",
                    {
                        "model": {"norm": norm, "proxy_norm": proxy},
                        "train": {"micro_batch": micro, "grad_accum": total // micro},
                    },
                    {"norm": label, "micro_batch": micro, "grad_accum": total // micro},
                )
            )
    return out


def group_variants(cfg: Config) -> List[Variant]:
    return [
        Variant(
            f"G{g} e{e}",
            {"model": {"group_size": g, "expand_ratio": e}},
            {"group_size": g, "expand_ratio": e},
        )
        for g, e in GROUP_EXPANSION
    ]


def study_config(cfg: Config, args: Optional[argparse.Namespace], name: str) -> Config:
    """The base of every run: validated once at its end, raw weights, the study's length."""

    train: Dict[str, Any] = {"ema_decay": 0.0, "weight_avg_exp": 0.0}
    if not given_on_command_line(args, "train.epochs"):
        train["epochs"] = STUDY_EPOCHS[name]
    schedule: Dict[str, Any] = {}
    if not given_on_command_line(args, "schedule.warmup_epochs"):  # a quarter of the run at most
        schedule["warmup_epochs"] = min(cfg.schedule.warmup_epochs, train.get("epochs", cfg.train.epochs) / 4)
    base = derived(cfg, train=train, schedule=schedule)
    return derived(base, train={"val_every": base.train.epochs})


# ----------------------------------------------------------------------------- rows


def device_kind(cfg: Config) -> str:
    """``device=auto`` as the native backend resolves it (app/backend.py)."""
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def study_stem(cfg: Config, name: str) -> Path:
    dataset = Path(cfg.data.dataset).name or "data"
    return Path(cfg.study.out_dir) / f"study-{name}-{dataset}-{device_kind(cfg)}"


def environment(cfg: Config, command: str) -> Dict[str, Any]:
    """What every row of the study records about its setting and machine."""
    m = cfg.model
    model = f"{m.name.upper()} G{m.group_size} e{m.expand_ratio} {m.norm}{'+PN' if m.proxy_norm else ''}"
    return {
        "dataset": Path(cfg.data.dataset).name or "data",
        "model": model,
        "epochs": cfg.train.epochs,
        "global_batch": cfg.global_batch,
        "device": device_kind(cfg),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        # the threads each run sets (train.cpu_threads), not this process's
        "threads": cfg.train.cpu_threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "command": command,
    }


class RowWriter:
    """Appends rows to ``<stem>.jsonl.partial`` as runs finish; ``finish`` moves them in place.

    A run of part of the grid (``study.variants``) completes the rows already there: ``finish``
    keeps every earlier row whose (variant, seed) it did not run again. A whole grid replaces
    them. Either way it says so (earlier versions of committed rows are in git)."""

    def __init__(self, stem: Path, resume: bool = False):
        self.stem = stem
        self.partial = stem.with_name(stem.name + ".jsonl.partial")
        self.folder = RunFolder(stem.parent)
        self.folder.check_writable()  # the rows' folder, made if need be: before the first run
        self.rows: List[Dict[str, Any]] = []
        if resume and self.partial.is_file():  # the rows of the cells finished before the stop
            self.folder.repair_log(self.partial.name)
            self.rows = load_rows(self.partial)
        else:
            self.folder.write_document(self.partial.name, "")

    def has(self, variant: str, seed: int) -> bool:
        return any(r["variant"] == variant and r["seed"] == seed for r in self.rows)

    def drop_seed(self, seed: int) -> None:
        """Rows of a seed whose cell a kill cut between its rows: written again with the cell."""
        if any(r["seed"] == seed for r in self.rows):
            self.rows = [r for r in self.rows if r["seed"] != seed]
            self.folder.write_document(self.partial.name, "".join(json.dumps(r) + "\n" for r in self.rows))

    def add(self, row: Dict[str, Any]) -> None:
        self.rows.append(row)
        self.folder.append_line(self.partial.name, json.dumps(row))

    def finish(self, merge: bool = False) -> Path:

        final = self.stem.with_name(self.stem.name + ".jsonl")
        earlier = load_rows(final) if final.is_file() else []
        rows = self.rows
        if merge:
            ran = {(r["variant"], r["seed"]) for r in self.rows}
            kept = [r for r in earlier if (r["variant"], r["seed"]) not in ran]
            rows = kept + self.rows
            self.folder.write_document(self.partial.name, "".join(json.dumps(r) + "\n" for r in rows))
            print(
                f"{final}: {len(self.rows)} new rows beside {len(kept)} of the {len(earlier)} already there"
            )
        elif earlier:
            print(
                f"replacing the {len(earlier)} rows of {final} "
                "(earlier versions of committed rows are in git)"
            )
        with self.folder.guard(final):
            os.replace(self.partial, final)
        write_csv(rows, self.stem.with_name(self.stem.name + ".csv"))
        return final


def write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    keys: List[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    RunFolder(path.parent).write_document(path.name, text.getvalue())


def run_row(
    study: str,
    variant: Variant,
    seed: int,
    result: TrainResult,
    resolution: int,
    env: Dict[str, Any],
    load_before: float,
    extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    metrics = result.results.get(f"raw@{resolution}", {})
    return {
        "study": study,
        "variant": variant.label,
        "seed": seed,
        **variant.fields,
        "resolution": resolution,
        "top1": metrics.get("top1"),
        "top5": metrics.get("top5"),
        "steps": result.steps,
        "images": result.images,
        "train_seconds": round(result.train_seconds, 2),
        "images_per_s": round(result.images_per_s, 2),
        **(extra or {}),
        "load_before": load_before,
        "load_after": load_average(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **env,
    }


# ----------------------------------------------------------------------------- running


def run_variants(
    name: str,
    cfg: Config,
    variants: List[Variant],
    folder: Path,
    writer: RowWriter,
    env: Dict[str, Any],
    progress: Progress,
    extra: Callable[[Config], Dict[str, Any]] = lambda c: {},
) -> int:
    """Each cell (variant × seed) once: a resume skips those with a row and continues the
    interrupted one from its checkpoint."""
    for seed in cfg.study.seeds:
        for variant in variants:
            if writer.has(variant.label, seed):
                continue
            log = {"out_dir": str(folder), "name": f"{slug(variant.label)}-s{seed}"}
            run_cfg = derived(
                cfg,
                **{
                    **variant.sections,
                    "log": log,
                    "train": {**variant.sections.get("train", {}), "seed": seed},
                },
            )
            print(f"\n=== {name}: {variant.label}, seed {seed} ===", flush=True)
            load_before = load_average()
            result = train_phase(progress, log["name"], run_cfg)
            if result.exit_code:
                return result.exit_code
            writer.add(
                run_row(
                    name, variant, seed, result, run_cfg.data.resolution, env, load_before, extra(run_cfg)
                )
            )
    return 0


def variants_of(name: str, cfg: Config) -> List[Variant]:
    return {"norms": norm_variants, "groups": group_variants}.get(name, lambda c: [])(cfg)


def model_size(cfg: Config) -> Dict[str, Any]:
    """Parameters and multiply-adds of the variant at the paper's scale (B0 at 224, 1000 classes)."""

    m = cfg.model
    net = build_model(m.name, group_size=m.group_size, expand_ratio=m.expand_ratio, num_classes=1000)
    return {"parameters_1000": count_parameters(net), "macs_224": count_macs(net, 224)}


def run_resolution(
    cfg: Config,
    folder: Path,
    writer: RowWriter,
    env: Dict[str, Any],
    keep_max_steps: bool,
    native: int,
    progress: Progress,
) -> int:
    half = half_resolution(native, model_stages(cfg.model.name))
    for seed in cfg.study.seeds:
        if all(writer.has(label, seed) for label in RESOLUTION_VARIANTS):
            continue
        writer.drop_seed(seed)
        print(f"\n=== resolution: native {native} vs half {half}, seed {seed} ===", flush=True)
        load_before = load_average()
        seed_folder = folder / f"s{seed}"
        RunFolder(seed_folder).check_writable()
        runs = run_recipe(
            derived(cfg, train={"seed": seed}),
            seed_folder,
            native,
            half,
            keep_max_steps,
            progress,
            prefix=f"s{seed}/",
        )
        if isinstance(runs, int):
            return runs
        for label, train, ft, res in (
            ("native", runs.native, None, native),
            ("native + fine-tune", runs.native, runs.native_ft, native),
            ("half", runs.half, None, half),
            ("half + fine-tune", runs.half, runs.half_ft, half),
        ):
            metrics = ft.after if ft is not None else train.results.get(f"raw@{native}", {})
            seconds = train.train_seconds + (ft.run.train_seconds if ft is not None else 0.0)
            writer.add(
                {
                    "study": "resolution",
                    "variant": label,
                    "seed": seed,
                    "train_resolution": res,
                    "test_resolution": native,
                    "top1": metrics.get("top1"),
                    "top5": metrics.get("top5"),
                    "train_seconds": round(train.train_seconds, 2),
                    "finetune_seconds": round(ft.run.train_seconds, 2) if ft is not None else 0.0,
                    "total_seconds": round(seconds, 2),
                    "images_per_s": round(train.images_per_s, 2),
                    "load_before": load_before,
                    "load_after": load_average(),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    **env,
                }
            )
    return 0


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-").replace("--", "-")


def report_only(cfg: Config, name: str) -> int:
    """``study.report_only=true``: the CSV and the report again from the rows of the last study."""
    stem = study_stem(cfg, name)
    rows_path = stem.with_name(stem.name + ".jsonl")
    if not rows_path.is_file():
        raise AppError(
            f"study.report_only: no rows at {rows_path}; run python -m experiments study {name} first"
        )
    write_csv(load_rows(rows_path), stem.with_name(stem.name + ".csv"))  # rows joined by hand too
    print(f"report: {write_report(name, rows_path)}")
    return 0


def chosen_variants(cfg: Config, name: str, base: Config) -> List[Variant]:
    """The study's variants, or the part of its grid ``study.variants`` names (e.g. the runs an
    interrupted study still lacks)."""
    variants = variants_of(name, base)
    if not cfg.study.variants:
        return variants
    unknown = sorted(set(cfg.study.variants) - {v.label for v in variants})
    if unknown:
        raise AppError(
            f"study.variants: {unknown} are not variants of the {name} study; it has "
            f"{[v.label for v in variants]}"
        )
    return [v for v in variants if v.label in cfg.study.variants]


def start_study(
    cfg: Config, args: Optional[argparse.Namespace], name: str
) -> Tuple[Config, Path, Progress, List[Variant]]:
    """A new study folder, or the one ``--resume`` names (refused when it holds another study):
    the configuration, folder, progress and variants to run."""
    command = " ".join(["python -m experiments"] + sys.argv[1:]) if args is not None else f"study {name}"
    base = study_config(cfg, args, name)
    variants = chosen_variants(cfg, name, base)

    def new_study_folder(c: Config) -> Path:
        return new_folder(Path(c.log.out_dir), f"study-{name}-{time.strftime('%Y%m%d-%H%M%S')}")

    def setup(c: Config) -> Dict[str, Any]:
        return {
            "study": name,
            "command": command,
            "variants": [v.label for v in variants],
            "keep_max_steps": given_on_command_line(args, "train.max_steps"),
            "native": recipe_native(c, given_on_command_line(args, "finetune.resolution"))
            if name == "resolution"
            else None,
        }

    base, folder, progress = start_or_resume(
        base if not cfg.resume else cfg, args, f"study {name}", new_study_folder, setup
    )
    if progress.setup["study"] != name:
        raise AppError(
            f"--resume {folder}: that folder holds the {progress.setup['study']} study; "
            f"{experiment_resume_command(folder, 'study ' + progress.setup['study'])}"
        )
    variants = [v for v in variants_of(name, base) if v.label in progress.setup["variants"]]
    return base, folder, progress, variants


def run_study(
    name: str,
    cfg: Config,
    variants: List[Variant],
    folder: Path,
    writer: RowWriter,
    env: Dict[str, Any],
    progress: Progress,
) -> int:
    """Every run of the study; Ctrl-C says how to continue it before it stops the command."""
    try:
        if name == "resolution":
            return run_resolution(
                cfg, folder, writer, env, progress.setup["keep_max_steps"], progress.setup["native"], progress
            )
        extra = model_size if name == "groups" else (lambda c: {})
        return run_variants(name, cfg, variants, folder, writer, env, progress, extra=extra)
    except KeyboardInterrupt:
        print(
            f"\nstudy {name} stopped; continue it with:\n  "
            f"{experiment_resume_command(folder, 'study ' + name)}",
            file=sys.stderr,
        )
        raise


def main(cfg: Config, args: Optional[argparse.Namespace] = None) -> int:
    """``python -m experiments study NAME``: run (or continue) the study, then write its rows and report."""
    name = getattr(args, "study", None) or "norms"
    if cfg.study.report_only:
        return report_only(cfg, name)
    resumed = bool(cfg.resume)
    base, folder, progress, variants = start_study(cfg, args, name)
    env = environment(base, progress.setup["command"])
    writer = RowWriter(study_stem(base, name), resume=resumed)
    print(
        f"study {name}: {len(variants) or 4} variants × seeds {base.study.seeds} in {folder}; rows: "
        f"{writer.partial}" + (f" ({len(writer.rows)} of them there already)" if resumed else "")
    )
    code = run_study(name, base, variants, folder, writer, env, progress)
    if code:
        print(
            f"study {name} stopped (exit {code}); its rows so far: {writer.partial}. Continue it "
            f"with:\n  {experiment_resume_command(folder, 'study ' + name)}",
            file=sys.stderr,
        )
        return code
    rows_path = writer.finish(merge=bool(cfg.study.variants))
    print(f"rows: {rows_path}\nreport: {write_report(name, rows_path)}")
    return 0
