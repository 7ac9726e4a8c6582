"""``python -m app plan``: the IPU memory and pipeline plan of a configuration.

The planner (ipu_options/planning.py) estimates what it is given; this command hands it the
network the configuration trains, built as training builds it, and hands the lowering check
(ipu_options/lowering_check.py) the classifier the IPU backend compiles.
"""

import argparse
from typing import Dict, Optional

import torch

from app.config import Config
from app.data.datasets import IMAGENET_CLASSES, num_classes_of
from app.objective import build_classifier, network_builder
from app.specs import ipu_batch_plan, ipu_spec, model_spec, optim_spec
from ipu_options.emulator.lowering import Lowering
from ipu_options.lowering_check import check_config, describe
from ipu_options.planning import print_plan


def job_line(cfg: Config, preset: str, chosen: bool) -> str:
    """The plan's first line: which job it plans. ``chosen``: the preset was picked from the model
    (no --config), so say how to plan another job."""
    m, t = cfg.model, cfg.train
    classes = num_classes_of(cfg.data.dataset)
    data = "ImageNet" if classes == IMAGENET_CLASSES else f"data.dataset={cfg.data.dataset}"
    norm = f"{m.norm}{'+proxy' if m.proxy_norm else ''} norm"
    line = (
        f"plan: {m.name.upper()} G{m.group_size} {norm} on {data} ({classes} classes) at "
        f"{cfg.data.resolution} px, micro-batch {t.micro_batch} × grad-accum "
        f"{t.grad_accum} × {t.replicas} replica{'s' if t.replicas > 1 else ''} (preset {preset})"
    )
    if chosen:
        line += "; CONFIG=, DATA= or RES= plan another job (CONFIG=digits: the digits toy)"
    return line


def lowering_reports(cfg: Config) -> Dict[str, Lowering]:
    """The lowering check of the classifier the IPU backend compiles, built on the meta device."""
    with torch.device("meta"):
        classifier = build_classifier(network_builder(cfg)(), cfg)
    return check_config(classifier, ipu_spec(cfg), cfg.train.micro_batch, cfg.data.resolution)


def main(cfg: Config, args: Optional[argparse.Namespace] = None) -> int:
    """The plan, then the PopTorch lowering check of the training and inference graphs (no
    weights, no arithmetic). Exit status 1 if the plan does not fit or PopTorch would refuse a
    graph."""
    status = print_plan(
        network_builder(cfg)(), model_spec(cfg), ipu_spec(cfg), ipu_batch_plan(cfg), optim_spec(cfg)
    )
    text, lowers = describe(lowering_reports(cfg))
    print(text)
    return status if lowers else max(status, 1)
