"""Mixup and CutMix on a uint8 batch, on the host, with float soft targets [B, K].

Each sample is mixed with its mirror in the batch (sample i with B-1-i), with one λ ~ Beta(α, α)
per batch; the soft target is λ·onehot(y_i) + (1-λ)·onehot(y_{B-1-i}). Label smoothing is the
loss's job, not done here. With both on, each batch picks one of the two with probability 0.5.
"""
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def one_hot(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(targets, num_classes).float()


def mixup(images: torch.Tensor, targets: torch.Tensor, num_classes: int,
          lam: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """λ·x_i + (1-λ)·x_{B-1-i}, rounded back to uint8."""
    partner = images.flip(0)
    mixed = images.float().mul_(lam).add_(partner.float(), alpha=1.0 - lam)
    soft = one_hot(targets, num_classes)
    return mixed.round_().clamp_(0, 255).to(torch.uint8), soft * lam + soft.flip(0) * (1.0 - lam)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """A box of about (1-λ)·H·W pixels at a uniformly random centre, clipped to the image:
    (top, bottom, left, right)."""
    cut = np.sqrt(1.0 - lam)
    ch, cw = int(round(height * cut)), int(round(width * cut))
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - ch // 2, 0), min(cy + ch - ch // 2, height)
    left, right = max(cx - cw // 2, 0), min(cx + cw - cw // 2, width)
    return top, bottom, left, right


def cutmix(images: torch.Tensor, targets: torch.Tensor, num_classes: int, lam: float,
           rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Paste a box of the partner image; λ is recomputed from the box actually pasted (after
    clipping), so the soft target equals the fraction of pixels each image contributes."""
    height, width = images.shape[-2:]
    top, bottom, left, right = cutmix_box(height, width, lam, rng)
    out = images.clone()
    out[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
    soft = one_hot(targets, num_classes)
    return out, soft * lam + soft.flip(0) * (1.0 - lam)


def mix_batch(images: torch.Tensor, targets: torch.Tensor, num_classes: int, mixup_alpha: float,
              cutmix_alpha: float, rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply mixup or cutmix (or neither when both alphas are 0, returning int targets)."""
    use_cutmix: Optional[bool] = None
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = bool(rng.random() < 0.5)
    elif mixup_alpha > 0 or cutmix_alpha > 0:
        use_cutmix = cutmix_alpha > 0
    if use_cutmix is None:
        return images, targets
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    if use_cutmix:
        return cutmix(images, targets, num_classes, lam, rng)
    return mixup(images, targets, num_classes, lam)
