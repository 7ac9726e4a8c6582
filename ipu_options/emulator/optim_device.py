"""PopART's per-weight optimiser scalars on the emulator's torch optimiser.

PopTorch hands PopART one tensor per hyper-parameter and weight (``learningRate___specific___
lin.bias``); ``optimizer.load_state_dict`` with an ``ipu_param`` dict copies each named value into
its tensor (python/poptorch.cpp:1016-1031, sdk/poptorch/3.4.0), and the device uses it from the
next run until a ``setOptimizer`` with changed hyper-parameters uploads them all again
(python/_poplar_executor.py:385-390, 655-668). The emulator steps torch's optimiser, so a loaded
scalar becomes a per-parameter group for that step; SGD's compound scalars are applied with
PopART's own update (popart/sgd.hpp:429-537 at sdk/poplar/3.4.0), g the gradient of the
scaled loss:

  no momentum (SGD0):  w = wdsf0 * w - slr0 * g
  combined (SGD1):     v += dpsf1 * g;  w -= slr1 * v;  v = smm1 * v + swd1 * w
  separate (SGD2):     v = smm2 * v + dpsf2 * g + swd1 * w;  w -= slr2 * v

 PopART keeps a velocity as soon as the momentum is
variable, even at zero (sgd.cpp:152-155 hasMomentum), where torch keeps none: such weights take
PopART's update too. Replication and gradient-accumulation factors are taken as one in the
compound scalars, as in the emulator's ``scaledLearningRate0``; Nesterov's extra scalars are not
modelled (such weights keep torch's step)."""

import contextlib
from typing import Dict, Iterator, List, Optional

import torch

# PopART's names (popart/tensornames.hpp) of the scalars torch keeps in its param groups
_GROUP_KEYS = {"learningRate": "lr", "weightDecay": "weight_decay"}
SPECIFIC = "___specific___"
LOSS_SCALING = "lossScaling_FLOAT"


def has_momentum(opt: torch.optim.Optimizer, group: dict) -> bool:
    """PopART keeps a velocity when the momentum is variable or non-zero (sgd.cpp:152-155);
    PopTorch marks it variable when given or marked (python/_optimizer_attributes.py:411-418)."""
    attrs = getattr(opt, "variable_attrs", None)
    variable = attrs is not None and not attrs.isConstant("momentum")
    return variable or float(group.get("momentum", 0.0)) != 0.0


def sgd_scalars(opt: torch.optim.Optimizer, group: dict, loss_scaling: float) -> Dict[str, float]:
    """SGD's compound scalars for one group (popart/compoundscalarhelper.hpp:56-196). The
    separate variant (SGD2) takes the loss scaling as its velocity scaling
    (popart_compiler/source/CompilerImpl.cpp:823-826, 855-860, sdk/poptorch/3.4.0)."""
    lr, wd = float(group["lr"]), float(group.get("weight_decay", 0.0))
    dm, mm = float(group.get("dampening", 0.0)), float(group.get("momentum", 0.0))
    ls = loss_scaling
    if not has_momentum(opt, group):
        return {"scaledLearningRate0": lr * (1 - dm) / ls, "weightDecayScaleFactor0": 1 - lr * (1 - dm) * wd}
    combined = bool(getattr(opt, "use_combined_accum", False))
    vs = float(group.get("velocity_scaling", 1.0)) if combined else ls
    n = "1" if combined else "2"
    return {
        "scaledWeightDecay1": (1 - dm) * wd * vs,
        f"scaledLearningRate{n}": lr / vs,
        f"scaledMomentum{n}": mm,
        f"dampeningScaleFactor{n}": (1 - dm) * vs / ls,
    }


def by_param(
    named: Dict[str, torch.Tensor], names: Dict[torch.Tensor, str]
) -> Dict[torch.Tensor, Dict[str, float]]:
    """The loaded per-weight scalars, by parameter: {param: {"learningRate": 0.1, ...}}."""
    params = {name: p for p, name in names.items()}
    out: Dict[torch.Tensor, Dict[str, float]] = {}
    for key, value in named.items():
        prefix, _, weight = key.partition(SPECIFIC)
        if weight in params:
            out.setdefault(params[weight], {})[prefix] = float(value)
    return out


@contextlib.contextmanager
def _split_groups(
    opt: torch.optim.Optimizer, scalars: Dict[torch.Tensor, Dict[str, float]], skip: List
) -> Iterator[None]:
    """Each parameter with loaded scalars in a group of its own for the step; ``skip``'s out."""
    kept = opt.param_groups
    groups = []
    for group in kept:
        plain = [p for p in group["params"] if p not in scalars and not _member(p, skip)]
        if plain:
            groups.append({**group, "params": plain})
        for p in group["params"]:
            if p in scalars and not _member(p, skip):
                own = {_GROUP_KEYS[k]: v for k, v in scalars[p].items() if k in _GROUP_KEYS}
                groups.append({**group, **own, "params": [p]})
    opt.param_groups = groups
    try:
        yield
    finally:
        opt.param_groups = kept


def _member(p: torch.Tensor, items: List) -> bool:
    return any(p is q for q in items)


def step(
    opt: torch.optim.Optimizer,
    named: Optional[Dict[str, torch.Tensor]],
    names: Dict[torch.Tensor, str],
    loss_scaling: float,
) -> None:
    """One optimiser step with the device's loaded scalars (none: torch's step as it is)."""
    scalars = by_param(named or {}, names)
    popart_sgd = []
    if isinstance(opt, torch.optim.SGD):
        for group in opt.param_groups:
            if group.get("nesterov"):
                continue
            zero_velocity = has_momentum(opt, group) and not float(group.get("momentum", 0.0))
            popart_sgd += [(p, group) for p in group["params"] if p in scalars or zero_velocity]
    if not scalars and not popart_sgd:
        opt.step()
        return
    with _split_groups(opt, scalars, [p for p, _ in popart_sgd]):
        opt.step()
    for p, group in popart_sgd:
        _sgd_update(opt, p, {**sgd_scalars(opt, group, loss_scaling), **scalars.get(p, {})}, loss_scaling)


def _sgd_update(
    opt: torch.optim.Optimizer, p: torch.Tensor, s: Dict[str, float], loss_scaling: float
) -> None:
    """PopART's SGD0 / SGD1 / SGD2 update of one weight (popart/sgd.hpp:429-537); the velocity is
    PopART's, scaled by the velocity scaling."""
    if p.grad is None:
        return
    with torch.no_grad():
        g = p.grad * loss_scaling  # the gradient of the scaled loss
        if "scaledLearningRate0" in s:
            p.mul_(s["weightDecayScaleFactor0"]).sub_(g * s["scaledLearningRate0"])
            return
        state = opt.state[p]
        v = state.get("momentum_buffer")
        if v is None:
            v = state["momentum_buffer"] = torch.zeros_like(p)
        if "scaledLearningRate1" in s:  # the weight decay and momentum go in after the update
            v.add_(g * s["dampeningScaleFactor1"])
            p.sub_(v * s["scaledLearningRate1"])
            v.mul_(s["scaledMomentum1"]).add_(p * s["scaledWeightDecay1"])
            return
        v.mul_(s["scaledMomentum2"]).add_(g * s["dampeningScaleFactor2"]).add_(p * s["scaledWeightDecay1"])
        p.sub_(v * s["scaledLearningRate2"])
