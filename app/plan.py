"""``python -m app plan``: the IPU memory and pipeline plan of a configuration.

The planner (ipu_options/planning.py) estimates what it is given; this command hands it the
network the configuration trains, built as training builds it.
"""
import argparse
from typing import Optional

from app.objective import network_builder
from ipu_options.planning import print_plan


def main(cfg, args: Optional[argparse.Namespace] = None) -> int:
    return print_plan(cfg, network_builder(cfg)())
