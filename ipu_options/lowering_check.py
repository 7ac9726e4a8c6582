"""The lowering check for a configuration, without data or training (``python -m app plan``).

Builds what the IPU backend gives PopTorch — the classifier (uint8 images in, normalisation, the
network at ``ipu.precision``, label-smoothed cross-entropy marked with ``identity_loss``) — on the
meta device, so no weight is allocated and no arithmetic runs, and checks the training forward
(one micro-batch with its targets, a trainingModel's rules) and the inference forward (images
only) with ``emulator.lowering.check_lowering``: the aten ops PopTorch 3.4 would see against its
handlers, and its refusals. Pipeline and recomputation annotations are not applied: they add
PopTorch's own ops, not aten ones.
"""
from typing import Dict, List, Tuple

import torch

from ipu_options.emulator import identity_loss
from ipu_options.emulator.lowering import Lowering, check_lowering, facts


def _device_classifier(cfg):
    from app.objective import build_classifier, build_network
    from ipu_options.planning import _num_classes
    from ipu_options.precision import apply_precision

    with torch.device("meta"):
        classifier = build_classifier(build_network(cfg, _num_classes(cfg)), cfg)
    classifier.to("meta")
    classifier.loss_hook = lambda loss: identity_loss(loss, reduction="none")
    apply_precision(classifier.model, str(cfg.ipu.precision))
    return classifier


def check_config(cfg) -> Dict[str, Lowering]:
    """{"training": report, "inference": report} for one micro-batch at ``data.resolution``."""
    from model.fast_paths import eager_fast_paths

    classifier = _device_classifier(cfg)
    n, res = cfg.train.micro_batch, cfg.data.resolution
    images = torch.zeros(n, 3, res, res, dtype=torch.uint8, device="meta")
    targets = torch.zeros(n, dtype=torch.long, device="meta")
    reports = {}
    with eager_fast_paths(False):
        for mode, inputs in (("training", (images, targets)), ("inference", (images,))):
            classifier.train(mode == "training")
            reports[mode], _ = check_lowering(classifier, inputs, training=mode == "training")
    return reports


def describe(reports: Dict[str, Lowering]) -> Tuple[str, bool]:
    """A few lines for the console, and whether PopTorch would lower both graphs."""
    f = facts()
    lines: List[str] = [f"PopTorch lowering check (emulated: aten ops and handler rules of "
                        f"{f['tag']}, {f['commit'][:10]}; torch {torch.__version__}):"]
    for mode, r in reports.items():
        top = ", ".join(f"{k} {v}" for k, v in r.kinds.most_common(6))
        if r.lowers:
            losses = f"; {r.losses} loss(es), final loss = output {r.loss_leaf}" if r.training else ""
            lines.append(f"  {mode}: lowers — {sum(r.kinds.values())} nodes of "
                         f"{len(r.kinds)} kinds ({top}, …){losses}")
        else:
            lines.append(f"  {mode}: PopTorch would stop compiling:")
            lines.extend(f"    {line}" for p in r.problems for line in p.splitlines())
    return "\n".join(lines), all(r.lowers for r in reports.values())
