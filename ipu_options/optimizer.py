"""The PopTorch optimiser equivalent to ``app.optim.build_optimizer``'s, on the device copy.

Same parameter groups (weight decay as ``app.optim.param_groups`` decides) and hyper-parameters,
plus PopTorch's own arguments from the ``IpuSpec``: ``loss_scaling`` (static value, or the starting
value of automatic loss scaling), accumulator and optimiser-state types by precision, and for
RMSprop ``use_tf_variant=True`` (the recipe's TensorFlow RMSprop: ε inside the square root,
squared average starting at one, lr in the momentum buffer:
``backends.optimizers.RMSpropTF``).
"""

from types import ModuleType
from typing import Any, List

import torch
from torch import nn

from backends.optimizers import ADAMW_EPS
from backends.specs import OptimSpec
from ipu_options.specs import IpuSpec

# The static scale (and automatic loss scaling's start) with fp16: Graphcore's EfficientNet
# configurations (vision/cnns/pytorch/train/configs.yml:72, graphcore/examples v3.4.1).
HALF_LOSS_SCALING = 128.0


def loss_scaling(ipu: IpuSpec) -> float:
    """ipu.loss_scaling as the optimiser's: a number as given; "auto" or null: 128 with fp16
    (16.16, 16.32), 1 with 32.32 (config validation refuses auto with 32.32)."""
    ls = ipu.loss_scaling
    if ls is None or ls == "auto":
        return HALF_LOSS_SCALING if ipu.precision != "32.32" else 1.0
    return float(ls)


def device_groups(
    host_optimizer: torch.optim.Optimizer, host_model: nn.Module, device_model: nn.Module
) -> List[dict]:
    """The host optimiser's groups with every parameter replaced by the device copy's."""
    index = {id(p): i for i, p in enumerate(host_model.parameters())}
    device_params = list(device_model.parameters())
    groups = []
    for group in host_optimizer.param_groups:
        g = {k: v for k, v in group.items() if k in ("weight_decay",)}
        g["params"] = [device_params[index[id(p)]] for p in group["params"]]
        groups.append(g)
    return groups


def build_ipu_optimizer(
    poptorch: ModuleType, groups: List[dict], ipu: IpuSpec, o: OptimSpec, lr: float
) -> Any:
    half = ipu.precision == "16.16"
    common = dict(loss_scaling=loss_scaling(ipu), accum_type=torch.half if half else torch.float)
    if o.name == "rmsprop":
        return poptorch.optim.RMSprop(
            groups,
            lr=lr,
            alpha=o.alpha,
            eps=o.eps,
            momentum=o.momentum,
            use_tf_variant=True,
            first_order_momentum_accum_type=torch.float,
            second_order_momentum_accum_type=torch.float,
            **common,
        )
    if o.name == "sgd":
        # No velocity_scaling: PopTorch 3.4 ignores it (and warns) for its default SGD variant.
        return poptorch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov, **common)
    if o.name == "adamw":
        return poptorch.optim.AdamW(
            groups,
            lr=lr,
            betas=tuple(o.betas),
            eps=ADAMW_EPS,
            first_order_momentum_accum_type=torch.float,
            second_order_momentum_accum_type=torch.float,
            **common,
        )
    raise ValueError(f"optim.name={o.name!r}: expected sgd, rmsprop or adamw")
