"""Cheap fine-tuning at the test resolution: ``python -m app finetune --checkpoint RUN``.

The paper's recipe after reduced-resolution training: start from the trained weights (the EMA
copy when the checkpoint has one), freeze every layer before ``finetune.trainable_from`` (by
default the last stage and the head stay trainable), and train ``finetune.epochs`` (2) at the
test resolution ``finetune.resolution`` with validation preprocessing (resize + centre crop: the
same pixels statistics the model will be tested on), a small-LR cosine schedule and no
mixup/cutmix. With batch norm, the running statistics are recalibrated at the new resolution
(forward passes, no gradients) before and after: at a new resolution the activations' statistics
change, and the frozen layers would otherwise normalise with the old ones.
"""
import types
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

FREEZE_HELP = ("a module name of the network: stem, blocks.<stage> (0-6), blocks.<stage>.<index>, "
               "head or classifier; every layer before it is frozen")


# ----------------------------------------------------------------------------- freezing

Named = List[Tuple[str, nn.Module]]


def _modules_before(module: nn.Module, target: str, prefix: str = "") -> Tuple[Named, bool]:
    """The largest sub-modules that come entirely before ``target`` in registration order (the
    forward order of EfficientNet), and whether ``target`` was found."""
    before: Named = []
    for name, child in module.named_children():
        full = prefix + name
        if full == target:
            return before, True
        if target.startswith(full + "."):
            inner, found = _modules_before(child, target, full + ".")
            return before + inner, found
        before.append((full, child))
    return before, False


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze_before(model: nn.Module, layer: str) -> List[str]:
    """Freeze every parameter of the layers before ``layer`` (requires_grad=False) and keep those
    layers in eval mode even when the model is later switched to training: batch norm then uses
    its running statistics and drop-path is off there, so the frozen part computes exactly what it
    will compute at test time. Returns the names of the frozen parameters."""
    before, found = _modules_before(model, layer)
    if not found:
        raise ValueError(f"finetune.trainable_from={layer!r} is not a layer of this model: expected "
                         f"{FREEZE_HELP}")
    frozen: List[str] = []
    for name, module in before:
        for pname, param in module.named_parameters():
            param.requires_grad_(False)
            frozen.append(f"{name}.{pname}")
        module.eval()
        # The training loop calls model.train() every step (so do PopTorch's wrappers); an
        # instance-level train() keeps this subtree in eval mode through those calls.
        module.train = types.MethodType(_stay_in_eval, module)
    return frozen


def trainable_parameters(model: nn.Module) -> List[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- batch norm

def batch_norm_layers(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, batches: Iterable, device: Optional[torch.device] = None,
                           max_batches: Optional[int] = None) -> int:
    """Recompute every batch norm's running mean and variance from ``batches`` (images, or
    (images, targets) pairs), with every other layer in eval mode (no dropout or drop-path) and no
    gradients: only the running statistics change. Each batch counts equally (a cumulative
    average, not an exponential one). Returns the number of batches used (0: no batch norm)."""
    layers = batch_norm_layers(model)
    if not layers:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in layers]
    device = device or next(model.parameters()).device
    used = 0
    try:
        nn.Module.train(model, False)  # not model.eval(): the whole tree, frozen parts included
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the batches below
            nn.Module.train(m, True)
        for batch in batches:
            if max_batches is not None and used >= max_batches:
                break
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(images.to(device))
            used += 1
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        for m, mode in modes:
            m.training = mode
    if used == 0:
        raise ValueError("batch-norm recalibration got no batches: the loader is empty")
    return used
