"""What a command line said, and the command a user types next: shared by the command line
(app/cli.py), the training loop and the experiments, so that none imports another for it."""
import argparse
from pathlib import Path
from typing import Optional, Union

from app.config import Config


def resume_command(cfg: Config, run_dir: Union[str, Path]) -> str:
    """What continues the run in ``run_dir`` that ``cfg`` configures."""
    return f"python -m app {'finetune' if cfg.finetune.source else 'train'} --resume {run_dir}"


def given_on_command_line(args: Optional[argparse.Namespace], name: str) -> bool:
    """Whether the command line set ``name`` (``section.field``) as a dotted override."""
    return any(o.split("=", 1)[0].strip() == name for o in getattr(args, "overrides", None) or [])
