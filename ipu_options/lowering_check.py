"""The lowering check for a configuration, without data or training (``python -m app plan``).

The application hands over what its IPU backend would give PopTorch — the classifier (uint8
images in, normalisation, the network, label-smoothed cross-entropy), built on the meta device so
that no weight is allocated and no arithmetic runs. Here it gets the device's ``ipu.precision``
and its loss marked with ``identity_loss``, and its training forward (one micro-batch with
targets, a trainingModel's rules) and inference forward (images only) are checked with
``ipu_options.emulator.lowering.check_lowering``: the aten ops PopTorch 3.4 would see against its
handlers, and its refusals. Pipeline and recomputation annotations are not applied: they add
PopTorch's own ops, not aten ones.
"""

from typing import Dict, List, Tuple

import torch
from torch import nn

from ipu_options import model_as_traced_graph
from ipu_options.emulator import identity_loss
from ipu_options.emulator.lowering import Lowering, check_lowering, facts
from ipu_options.precision import apply_precision
from ipu_options.specs import IpuSpec


def check_config(
    classifier: nn.Module, ipu: IpuSpec, micro_batch: int, resolution: int
) -> Dict[str, Lowering]:
    """{"training": report, "inference": report} for one micro-batch of ``resolution`` pixels.
    ``classifier``: the application's, ``forward(images, targets=None)``, on the meta device
    (changed here: precision and loss hook)."""

    classifier.to("meta")
    classifier.loss_hook = lambda loss: identity_loss(loss, reduction="none")
    apply_precision(classifier.model, ipu.precision)
    n, res = micro_batch, resolution
    images = torch.zeros(n, 3, res, res, dtype=torch.uint8, device="meta")
    targets = torch.zeros(n, dtype=torch.long, device="meta")
    reports = {}
    with model_as_traced_graph():  # the graph an IPU traces: group norm as torch's one op
        for mode, inputs in (("training", (images, targets)), ("inference", (images,))):
            classifier.train(mode == "training")
            reports[mode], _ = check_lowering(classifier, inputs, training=mode == "training")
    return reports


def describe(reports: Dict[str, Lowering]) -> Tuple[str, bool]:
    """A few lines for the console, and whether PopTorch would lower both graphs."""
    f = facts()
    lines: List[str] = [
        f"PopTorch lowering check (emulated: aten ops and handler rules of "
        f"{f['tag']}, {f['commit'][:10]}; torch {torch.__version__}):"
    ]
    for mode, r in reports.items():
        top = ", ".join(f"{k} {v}" for k, v in r.kinds.most_common(6))
        if r.lowers:
            losses = f"; {r.losses} loss(es), final loss = output {r.loss_leaf}" if r.training else ""
            lines.append(
                f"  {mode}: lowers — {sum(r.kinds.values())} nodes of {len(r.kinds)} kinds ({top}, …){losses}"
            )
        else:
            lines.append(f"  {mode}: PopTorch would stop compiling:")
            lines.extend(f"    {line}" for p in r.problems for line in p.splitlines())
    return "\n".join(lines), all(r.lowers for r in reports.values())
