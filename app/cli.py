"""The command line: ``python -m app <command> [--config PRESET] [--device D] [section.field=value ...]``.

Configuration comes from one place: ``app.config.build_config(preset, overrides)``. Flags are
shorthands for overrides (``--device cuda`` is ``device=cuda``); every other setting is a dotted
override whose value is read as YAML. The resolved configuration is printed before anything else
runs, and an invalid one exits with status 2 before any data is read or any model is built.
Commands are imported only when chosen, so one command's dependencies never slow another.
``run_cli(argv, commands, prog)`` serves any table of commands: ``python -m experiments`` (paper,
study) runs its own through it.
"""

import argparse
import dataclasses
import importlib
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

from app.checkpoint import current_run, discard_unstarted_run, find_checkpoint, latest_run
from app.config import (
    Config,
    ConfigError,
    UsageError,
    build_config,
    changes_from_preset,
    check_dataset,
    check_resume_changes,
    parse_overrides,
    preset_names,
    read_yaml_file,
)
from app.distributed import settle_job_status, under_poprun, under_torchrun
from app.errors import STOP_SIGNALS, AppError, Interrupted, user_message
from app.plan import job_line
from app.presets import grid_preset
from app.resolution import ResolutionWarning
from app.run_folder import CAUSES, RunFolderError, resume_command, resume_hint
from model.efficientnet import variant_key

DEFAULT_PRESET = "digits"
# ``plan``'s own ImageNet job: a dataset folder that is not on this machine counts as ImageNet's
# 1000 classes (app/data/datasets.py num_classes_of); plan reads no data.
IMAGENET_PLACEHOLDER = "imagenet"


class Command(NamedTuple):
    """One command: ``target`` is "module:function", a ``main(cfg, args) -> exit status`` imported
    only when the command is chosen."""

    target: str
    help: str
    reads_data: bool = True  # data.dataset is checked before any work
    # takes the command's own leading words out of the overrides into ``args`` (``study NAME``)
    take_words: Optional[Callable[[argparse.Namespace, List[str]], None]] = None


COMMANDS: Dict[str, Command] = {
    "train": Command("app.train:main", "train a model (or continue one with --resume RUN)"),
    "validate": Command("app.evaluate:main", "top-1/top-5 of a checkpoint's raw and EMA weights"),
    "finetune": Command("app.finetune:main", "fine-tune the last layers at a higher resolution"),
    "plan": Command("app.plan:main", "IPU memory / pipeline plan for the configuration", reads_data=False),
}
MOVED = {"paper": "experiments", "study": "experiments"}  # commands another entry point runs


# A fine-tuning run's configuration names its source checkpoint (finetune.source): that is what
# makes ``train --resume`` of it a fine-tuning run again, its layers frozen as before.
def route(command: str, cfg: Config) -> Tuple[str, Config]:
    """The command that runs ``cfg``: ``train --resume`` of a fine-tuning run is ``finetune
    --resume``; a new ``train`` from a fine-tuning run's config.yaml is a plain run."""
    if command != "train" or not cfg.finetune.source:
        return command, cfg
    if cfg.resume:
        return "finetune", cfg
    return command, dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, source=None))


def own_job(overrides: List[str]) -> Tuple[str, List[str]]:
    """``plan`` without --config: the ImageNet job of the model the overrides name (model.name,
    model.group_size, model.norm; default B0 G16 LN+PN, the digits model): its grid preset, on
    ImageNet (1000 classes) unless data.dataset is given. Other overrides (data.resolution, ...)
    still apply on top."""
    model = parse_overrides(overrides).get("model", {})
    try:
        name = variant_key(str(model.get("name", "b0")))
    except ValueError:
        return DEFAULT_PRESET, overrides  # the configuration check names the problem
    group = 1 if model.get("group_size") == 1 else 16
    norm = "gn" if model.get("norm") == "group" else "lnpn"
    preset = f"{name}-g{group}-{norm}"
    if grid_preset(preset) is None:  # B6/B7 are outside the paper's grid: the B5 recipe, that model
        preset = f"b5-g{group}-{norm}"
    given = any(o.split("=", 1)[0].strip() == "data.dataset" for o in overrides)
    return preset, overrides + ([] if given else [f"data.dataset={IMAGENET_PLACEHOLDER}"])


EXAMPLES = """examples:
  python -m app train                                  # the digits default (make train)
  python -m app train --config b0-g16-lnpn-half data.dataset=/data/imagenet
  python -m app train --config digits model.group_size=1 optim.lr=0.001 train.epochs=2
  python -m app train --resume runs/<run>              # continue an interrupted run
  python -m app train --device cuda train.replicas=8 --dry-run   # the torchrun command (docs/scaling-out.md)
  python -m app validate --checkpoint runs/<run> data.val_resolutions=[32,64]
  python -m app validate --checkpoint runs/<run> --resolutions 64:128:8   # accuracy vs resolution
  python -m app finetune --checkpoint runs/<run> finetune.resolution=96
  python -m experiments paper                          # the paper's tables (make paper)

presets: {presets}
overrides: section.field=value with YAML values; sections: device, resume, model, data, optim,
  schedule, train, finetune, ipu, dist, log (see app/config.py for every field and its range)."""


def build_parser(
    commands: Dict[str, Command] = COMMANDS, prog: str = "python -m app"
) -> argparse.ArgumentParser:
    presets = preset_names()
    shown = ", ".join(p for p in presets if "-" not in p or p.endswith("-g16-lnpn"))
    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="EfficientNet with group convolutions, LayerNorm + Proxy Norm and reduced-resolution "
        "training, on IPU, GPU or CPU.",
        epilog=EXAMPLES.format(presets=f"{shown}, and the grid b<0-5>-g<1|16>-<gn|lnpn>[-half]"),
    )
    parser.add_argument(
        "command",
        choices=list(commands),
        help="; ".join(f"{name}: {command.help}" for name, command in commands.items()),
    )
    parser.add_argument(
        "--config",
        metavar="PRESET",
        help=f"a preset name or a YAML file (default: {DEFAULT_PRESET}; with --resume or "
        "--checkpoint, the run folder's config.yaml)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "ipu", "ipu-model"],
        help="shorthand for device=... (default: the preset's, auto)",
    )
    parser.add_argument("--resume", metavar="RUN", help="a run folder or checkpoint to continue training")
    parser.add_argument(
        "--checkpoint", metavar="PATH", help="validate/finetune: a run folder or a checkpoint file"
    )
    parser.add_argument(
        "--resolutions",
        metavar="LIST",
        help="validate: sweep test resolutions, '224,256,288' or 'low:high[:step]'; "
        "writes an accuracy-vs-resolution table and plot to the run folder",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the command that launches the job's processes (torchrun / poprun, "
        "see docs/scaling-out.md) and exit; shorthand for dist.dry_run=true",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="dotted configuration overrides, e.g. model.group_size=16 optim.lr=0.1",
    )
    return parser


def base_preset(args: argparse.Namespace) -> str:
    """--config, else the config.yaml of the run being resumed, validated or fine-tuned (``validate``
    or ``finetune`` without --checkpoint: the newest run), else the default preset."""
    for flag in ("resume", "checkpoint"):
        given = getattr(args, flag)
        if given and not Path(given).exists():
            raise UsageError(
                f"--{flag}",
                f"--{flag} {given}: no such path; give a run folder (e.g. "
                "runs/<run>) or a checkpoint file in one",
            )
    if args.command == "train" and args.checkpoint:
        weights = args.checkpoint if Path(args.checkpoint).is_file() else "RUN/checkpoints/best.pt"
        raise UsageError(
            "--checkpoint",
            (
                f"train does not read --checkpoint (it would train from scratch): continue that run with "
                f"{resume_command(args.checkpoint)}, or start a new run from its weights with "
                f"model.init_from={weights}"
            ),
        )
    if args.config:
        return args.config
    source = args.resume or args.checkpoint
    if source is None and args.command in ("validate", "finetune"):
        out_dir = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("log.out_dir=")), "runs")
        source = latest_run(out_dir)
        args.checkpoint = str(source) if source else None
    if source:
        found = run_config_file(source)
        if found is None:
            raise UsageError(
                "--config",
                f"{source} has no config.yaml next to it, so name the "
                "configuration it was trained with: --config PRESET_OR_FILE",
            )
        return str(found)
    return DEFAULT_PRESET


def run_config_file(source: Union[str, Path]) -> Optional[Path]:
    """The config.yaml of the run that ``source`` (a run folder or a checkpoint in one) belongs to."""
    path = Path(source)
    for folder in (path, path.parent, path.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def check_resume(cfg: Config, args: argparse.Namespace) -> None:
    """``train --resume RUN overrides``: only what a resume may change (app/config.py
    RESUME_MAY_CHANGE), checked against the run's config.yaml before any work."""
    if args.command != "train" or not cfg.resume or cfg.finetune.source:
        return  # a fine-tuning run's resume rebuilds its configuration itself (app/finetune.py)
    found = run_config_file(cfg.resume)
    if found is None:
        return  # the training loop checks against the checkpoint's own configuration
    checkpoint = find_checkpoint(cfg.resume)
    check_resume_changes(read_yaml_file(found), cfg, found.parent, checkpoint)


def on_stop_signal(signum: int, frame: object) -> None:
    """Until the training loop takes over (it stops after a step and saves), SIGTERM, SIGHUP and
    SIGQUIT end the command like Ctrl-C: through the same clean-up, not with Python's default
    instant death (or SIGQUIT's core dump)."""
    raise Interrupted(signum)


HANDLED_SIGNALS = tuple(s for s in STOP_SIGNALS if s != signal.SIGINT)  # SIGINT: KeyboardInterrupt


def load_command(command: Command) -> Optional[Callable[[Config, argparse.Namespace], int]]:
    module_name, function = command.target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        return None
    return getattr(module, function)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m app``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in MOVED:
        print(
            f"error: '{argv[0]}' is a command of python -m {MOVED[argv[0]]}: run "
            f"python -m {MOVED[argv[0]]} {' '.join(argv)}",
            file=sys.stderr,
        )
        return 2
    return run_cli(argv, COMMANDS, prog="python -m app")


def run_cli(argv: Optional[List[str]], commands: Dict[str, Command], prog: str) -> int:
    """Parse ``argv`` against ``commands``, build and print the configuration, run the command."""
    args = build_parser(commands, prog).parse_intermixed_args(argv)
    # check_resolutions prints its own console line; the Python warning is for library callers.
    warnings.filterwarnings("ignore", category=ResolutionWarning)
    previous = {s: signal.signal(s, on_stop_signal) for s in HANDLED_SIGNALS} if _main_thread() else {}
    try:
        code, orderly = run_command(args, commands[args.command])
    except KeyboardInterrupt as interrupt:
        code, orderly = interrupted(interrupt, args.command), False
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if args.command in ("train", "finetune"):
        return settle_job_status(code, orderly)
    return code


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def run_command(args: argparse.Namespace, command: Command) -> Tuple[int, bool]:
    """(exit status, whether the command ended on its own terms: a finished or orderly stopped
    run, as opposed to an error or an abort)."""
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    if args.resume:
        overrides.append(f"resume={args.resume}")
    if args.dry_run:
        overrides.append("dist.dry_run=true")
    try:
        if command.take_words is not None:
            command.take_words(args, overrides)
        preset = base_preset(args)
        if args.command == "plan" and preset == DEFAULT_PRESET and not args.config:
            preset, overrides = own_job(overrides)
        cfg = build_config(preset, overrides)
        if command.reads_data:
            check_dataset(cfg)
        check_resume(cfg, args)
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 2, False
    except AppError as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return 2, False
    if args.command == "plan":
        print(job_line(cfg, preset, chosen=not args.config))
    if not (under_torchrun() or under_poprun()):  # the launching command printed it already
        print(
            f"# resolved configuration ({args.command}): {preset} with {changes_from_preset(cfg, preset)}"
            + ("" if args.command == "plan" else " (the whole one: config.yaml in the run folder)"),
            flush=True,
        )
    name, cfg = route(args.command, cfg)
    run = load_command(COMMANDS[name] if name != args.command else command)
    if run is None:
        print(
            f"error: the '{args.command}' command is not in this checkout yet ({command.target} is missing)",
            file=sys.stderr,
        )
        return 2, False
    try:
        return run(cfg, args), True
    except ConfigError as error:  # raised inside the command (a run's edited config.yaml)
        print(f"configuration error: {error}", file=sys.stderr)
        return 2, False
    except AppError as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return 2, False
    except OSError as error:
        if error.errno not in CAUSES:
            raise
        path = error.filename or current_run()["dir"] or cfg.log.out_dir
        print(f"error: {RunFolderError(Path(str(path)), error)}", file=sys.stderr)
        return 2, False


def interrupted(interrupt: KeyboardInterrupt, command: str = "train") -> int:
    """Ctrl-C (a second one, while the loop was already stopping), or a signal before the loop
    started: no traceback, what is on disk, and how to go on. 128 + the signal's number."""
    signum = getattr(interrupt, "signum", signal.SIGINT)
    name = signal.Signals(signum).name
    discarded = discard_unstarted_run()
    run_dir = current_run()["dir"]
    if discarded is not None:
        print(
            f"\n{name}: stopped during start-up, before any step; removed the new run folder "
            f"{discarded} (it held only its config.yaml)",
            file=sys.stderr,
        )
    elif run_dir is not None:
        kind = "finetune" if command == "finetune" else "train"
        print(
            f"\n{name}: aborted without saving; the newest complete checkpoint in {run_dir} is whole. "
            f"Resume with:\n{resume_hint(run_dir, kind)}",
            file=sys.stderr,
        )
    else:
        print(f"\n{name}: stopped before any run folder was made; nothing was written", file=sys.stderr)
    return 128 + int(signum)
