"""Optimisation: weight-decay parameter groups, optimisers, the learning-rate schedule, EMA.

Weight decay is an L2 term on the gradient (g ← g + wd·θ) for SGD and RMSprop, as the TensorFlow
reference adds it (ipu_optimizer.py:48-53); AdamW decays decoupled (θ ← θ − lr·wd·θ). The
official rule: every variable decays except those named beta, gamma, proxy or moving_
(efficientnet.py:557, train.py:234-244), and of the proxy variable, β̃ and γ̃ (rows 4-5) decay
with the same rate while β, γ, μ̃, 1/σ̃ (rows 0-3) do not (proxy_norm.py:148-152, the
optimiser's own decay for the variables it takes out of the general rule, train.py:221-227). Here:
conv and linear weights *and biases* (squeeze-excite, classifier) and proxy norm's β̃, γ̃
(``proxy_bias``, ``proxy_weight``) decay; norm weights and biases (TF's gamma, beta; proxy norm's
γ, β live there) do not.
"""

import copy
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from app.config import Config
from backends.optimizers import ADAMW_EPS, RMSpropTF
from model.proxy_norm import ProxyNormAct

# ----------------------------------------------------------------------------- parameter groups


def decay_split(model: nn.Module) -> Tuple[List[Tuple[str, nn.Parameter]], List[Tuple[str, nn.Parameter]]]:
    """(decayed, not decayed) trainable parameters as (name, parameter), by the module owning each:
    ProxyNormAct (β̃, γ̃) and conv/linear weights and biases → decayed; norm affine → not decayed
    (the official rule, see the module's docstring). A parameter of another module type decays
    when it is a matrix or larger (a weight), not when it is a vector (a bias or scale)."""
    decay, no_decay = [], []
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue  # frozen (fine-tuning): not the optimiser's business
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(module, ProxyNormAct):
                decayed = True
            elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                decayed = True  # TF's conv2d/kernel, conv2d/bias, dense/kernel, dense/bias
            elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                decayed = False
            else:
                decayed = param.dim() > 1
            (decay if decayed else no_decay).append((full, param))
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Optimiser parameter groups: decayed parameters with ``weight_decay``, the rest with 0.
    Empty groups are left out; a model with nothing trainable is an error."""
    decay, no_decay = decay_split(model)
    groups = [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    return groups


# ----------------------------------------------------------------------------- optimisers


def build_optimizer(model: nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """cfg.optim.name: ``rmsprop`` (RMSpropTF), ``sgd`` (momentum, optional Nesterov) or ``adamw``;
    weight decay cfg.optim.weight_decay on the groups of ``param_groups``."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if o.name == "rmsprop":
        return RMSpropTF(groups, lr=lr, alpha=o.alpha, eps=o.eps, momentum=o.momentum)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), eps=ADAMW_EPS)
    raise ValueError(f"optim.name={o.name!r} is invalid: expected sgd, rmsprop or adamw")


# ----------------------------------------------------------------------------- peak rate

# How the peak rate follows the global batch B, from optim.lr at optim.lr_reference_batch B0:
#   linear  lr·B/B0     the paper's RMSprop and SGD recipes give a rate per image ([TF]
#                       LR_Schedules/exponential.py: 2^exponent × global batch), so it is linear
#   sqrt    lr·√(B/B0)  Adam-type optimisers: their step is normalised by the gradient's own size,
#                       so a linear rule grows the step with the batch far past stability (Malladi
#                       et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms")
#   none    lr          the rate as given, whatever the batch
LR_SCALING = ("auto", "linear", "sqrt", "none")
AUTO_SCALING = {"sgd": "linear", "rmsprop": "linear", "adamw": "sqrt"}


def lr_scaling_rule(cfg: Config) -> str:
    """``optim.lr_scaling``, with ``auto`` resolved for ``optim.name``."""
    rule = cfg.optim.lr_scaling
    return AUTO_SCALING[cfg.optim.name] if rule == "auto" else rule


def peak_lr(cfg: Config) -> float:
    """The schedule's peak rate for ``cfg.global_batch``: ``optim.lr`` scaled by ``lr_scaling_rule``."""
    ratio = cfg.global_batch / cfg.optim.lr_reference_batch
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[lr_scaling_rule(cfg)]
    return cfg.optim.lr * factor


def describe_peak_lr(cfg: Config) -> str:
    """'lr 0.002 × √(128/32) = 0.004 (adamw: square-root scaling)': the rule, as the scale line shows it."""
    o, rule = cfg.optim, lr_scaling_rule(cfg)
    ratio = f"{cfg.global_batch}/{o.lr_reference_batch}"
    factor = {"linear": f" × {ratio}", "sqrt": f" × √({ratio})", "none": ""}[rule]
    why = {
        "linear": "linear in the global batch: a rate per image",
        "sqrt": "square-root scaling",
        "none": "not scaled",
    }[rule]
    source = "optim.lr_scaling=auto" if o.lr_scaling == "auto" else f"optim.lr_scaling={rule}"
    return f"lr {o.lr:g}{factor} = {peak_lr(cfg):.4g} ({o.name}: {why}; {source})"


def divergence_warning(cfg: Config) -> Optional[str]:
    """A warning when the peak rate reaches ``optim.lr_diverges_at`` (a preset's measured limit),
    naming the fix; None otherwise."""
    limit = cfg.optim.lr_diverges_at
    lr = peak_lr(cfg)
    if limit is None or lr < limit:
        return None
    safe = cfg.optim.lr * limit / lr / 2
    return (
        f"warning: the peak learning rate {lr:.4g} is at or above {limit:g}, where this preset's "
        f"training was measured to diverge (the loss grows and validation stays at chance): lower "
        f"it, e.g. optim.lr={safe:.3g}"
        + ("" if lr_scaling_rule(cfg) != "linear" else " or optim.lr_scaling=sqrt")
    )


# ----------------------------------------------------------------------------- schedule


def lr_at(step: float, cfg: Config, steps_per_epoch: int, base_lr: float) -> float:
    """Learning rate after ``step`` weight updates (0 before the first; fractions allowed).

    Warm-up: linear from 0 to base_lr over cfg.schedule.warmup_epochs. Then, by
    cfg.schedule.name (e = step / steps_per_epoch, s = cfg.schedule):
      exponential  base_lr · s.decay_rate ^ floor(e / s.decay_epochs)  — staircase, counted from
                   step 0 as the TF reference does (warm-up then continues at the decayed value)
      step         base_lr · s.decay_rate ^ floor((e − warmup) / s.decay_epochs) — counted from
                   the end of warm-up (base_lr is held for decay_epochs first)
      cosine       min + (base_lr − min)·(1 + cos(π·p))/2, p = (e − warmup)/(train.epochs − warmup),
                   min = s.min_lr_ratio · base_lr, reached at the end of cfg.train.epochs
    """
    s = cfg.schedule
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch} is invalid: expected an integer >= 1")
    epoch = step / steps_per_epoch
    if s.warmup_epochs > 0 and epoch < s.warmup_epochs:
        return base_lr * epoch / s.warmup_epochs
    if s.name == "exponential":
        return base_lr * s.decay_rate ** math.floor(epoch / s.decay_epochs)
    if s.name == "step":
        return base_lr * s.decay_rate ** math.floor((epoch - s.warmup_epochs) / s.decay_epochs)
    if s.name == "cosine":
        span = cfg.train.epochs - s.warmup_epochs
        progress = min(max((epoch - s.warmup_epochs) / span, 0.0), 1.0) if span > 0 else 1.0
        low = s.min_lr_ratio * base_lr
        return low + (base_lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule.name={s.name!r} is invalid: expected exponential, cosine or step")


# ----------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a model's weights: after each weight update,
    θ_ema ← d·θ_ema + (1 − d)·θ for parameters; buffers (BatchNorm statistics) are copied.
    With ``warmup`` the decay is min(d, (1 + n)/(10 + n)) at update n, so the average is not
    dominated by the initial weights in short runs. ``module`` is the averaged copy (eval mode,
    no gradients)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay={decay} is invalid: expected a number in [0, 1)")
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, steps: int = 1) -> None:
        """Fold in the current weights as ``steps`` updates' worth of averaging (decay**steps), for
        callers that average every few weight updates (a host copy of IPU weights is not free)."""
        decay = self.current_decay() ** steps
        self.updates += 1
        averages = list(self.module.parameters())
        news = [new.detach().to(avg.dtype) for avg, new in zip(averages, model.parameters())]
        torch._foreach_lerp_(averages, news, 1.0 - decay)  # one call, not one per parameter
        for avg, new in zip(self.module.buffers(), model.buffers()):
            avg.copy_(new)

    def state_dict(self) -> Dict[str, Any]:
        return {"module": self.module.state_dict(), "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
