"""Update rules that every backend runs the same way, whatever device computes them.

``RMSpropTF`` is the recipe's RMSprop: the native backend trains with it (``app.optim``), and
PopTorch's ``RMSprop(use_tf_variant=True)`` — emulated in ``ipu_options.emulator.optim`` — is this
rule. ``ADAMW_EPS`` is AdamW's ε on every device (``optim.eps`` is RMSprop's, inside the square
root). Pure torch: nothing of the application or the model.
"""

from typing import Callable, Iterable, Optional

import torch

ADAMW_EPS = 1e-8  # optim.eps is RMSprop's (inside the square root, 1e-3); AdamW keeps its usual one


class RMSpropTF(torch.optim.Optimizer):
    """RMSprop as TensorFlow implements it (the EfficientNet reference recipe). Per parameter θ
    with gradient g, squared average v (initialised to ONES, as TF does) and momentum m (zeros):

        g ← g + wd·θ                       (L2 weight decay, the group's ``weight_decay``)
        v ← α·v + (1 − α)·g²
        m ← μ·m + lr·g / sqrt(v + ε)       (ε inside the square root; lr inside the buffer)
        θ ← θ − m

    Differences from ``torch.optim.RMSprop``: ε inside the sqrt (torch: sqrt(v) + ε), v starts at
    1 (torch: 0, which makes the first steps huge), and lr multiplies the momentum buffer's input,
    so a change of lr only affects new contributions (torch scales the whole buffer)."""

    def __init__(
        self,
        params: Iterable,
        lr: float,
        alpha: float = 0.9,
        eps: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ):
        if lr < 0 or not 0 < alpha < 1 or eps <= 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(
                f"RMSpropTF: invalid lr={lr}, alpha={alpha}, eps={eps}, "
                f"momentum={momentum} or weight_decay={weight_decay}"
            )
        super().__init__(
            params, dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay)
        )

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, alpha, eps = group["lr"], group["alpha"], group["eps"]
            momentum, wd = group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RMSpropTF does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["square_avg"] = torch.ones_like(p, memory_format=torch.preserve_format)
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                grad = p.grad.add(p, alpha=wd) if wd != 0 else p.grad
                square_avg = state["square_avg"]
                square_avg.mul_(alpha).addcmul_(grad, grad, value=1.0 - alpha)
                step = grad.div(square_avg.add(eps).sqrt_()).mul_(lr)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(step)
                p.sub_(buf)
        return loss
