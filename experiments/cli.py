"""``python -m experiments paper|study``: the application's command line (app/cli.py) with these
commands."""

from typing import List, Optional

from app.cli import Command, run_cli
from experiments.study import take_study_name

COMMANDS = {
    "paper": Command("experiments.paper:main", "reproduce the paper's tables and figures"),
    "study": Command(
        "experiments.study:main",
        "norms|groups|resolution: a claim of the paper, over seeds, in a report",
        take_words=take_study_name,
    ),
}


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(argv, COMMANDS, prog="python -m experiments")
