"""Which average of the weights a run keeps, and when it folds the current weights in.

Two forms, both kept where the EMA always was (validated as ``ema@<res>``, saved as the
checkpoint's ``ema``, the weights fine-tuning and ``make paper`` start from):

- ``train.ema_decay`` d: the per-update EMA of ``app.optim.EMA`` (θ_ema ← d·θ_ema + (1 − d)·θ
  after every ``train.ema_every`` updates).
- ``train.weight_avg_exp`` d: the paper's runs' average of END-OF-EPOCH weights (TF1
  ``weight_avg.py``, ``average_ckpts(mode='exponential')``, called by ``train.py`` on every
  epoch's checkpoint with ``weight_avg_exp: [0.97]`` from graphcore-research ``configs.yml``):
  V₁ = θ₁, then V_e = d·V_{e−1} + (1 − d)·θ_e, and the run's last weights count as its last
  epoch's. As in the TF code, every floating-point tensor of the state is averaged (batch norm's
  running statistics included; Graphcore's PyTorch port averages parameters only); integer
  buffers (batch norm's update counter) are the newest.
"""

import copy
from typing import Any, Dict, Optional

import torch
from torch import nn

from app.config import Config
from app.optim import EMA


class EpochAverage:
    """V ← d·V + (1 − d)·θ once per epoch (the first fold copies θ). ``module`` holds V."""

    def __init__(self, model: nn.Module, decay: float, steps_per_epoch: int):
        if not 0 <= decay < 1:
            raise ValueError(f"weight_avg_exp={decay} is invalid: expected a number in [0, 1)")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch={steps_per_epoch} is invalid: expected an integer >= 1")
        self.decay, self.steps_per_epoch, self.updates = decay, steps_per_epoch, 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def due(self, step: int, total_steps: int) -> bool:
        """At the end of every epoch and at the last step of the run."""
        return step % self.steps_per_epoch == 0 or step == total_steps

    @torch.no_grad()
    def update(self, model: nn.Module, steps: int = 1) -> None:
        """Fold in ``model``'s current state (``steps`` is the EMA's argument; unused here)."""
        weight = 1.0 if self.updates == 0 else 1.0 - self.decay
        current = model.state_dict()
        for name, avg in self.module.state_dict().items():
            new = current[name].detach()
            if avg.is_floating_point():
                avg.lerp_(new.to(avg.dtype), weight)
            else:
                avg.copy_(new)
        self.updates += 1

    def state_dict(self) -> Dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "decay": self.decay,
            "updates": self.updates,
            "kind": "epoch",
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.decay, self.updates = float(state["decay"]), int(state["updates"])


class StepEMA(EMA):
    """``app.optim.EMA`` with the schedule of its updates: every ``train.ema_every`` updates and at
    the last one."""

    def __init__(self, model: nn.Module, decay: float, every: int):
        super().__init__(model, decay, warmup=True)
        self.every = every

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every == 0 or step == total_steps


def build_weight_average(cfg: Config, model: nn.Module, steps_per_epoch: int) -> Optional[Any]:
    """The run's weight average (``train.weight_avg_exp`` or ``train.ema_decay``), or None."""
    t = cfg.train
    if t.weight_avg_exp > 0:
        return EpochAverage(model, t.weight_avg_exp, steps_per_epoch)
    if t.ema_decay > 0:
        return StepEMA(model, t.ema_decay, t.ema_every)
    return None
