"""Mixup and CutMix on a uint8 batch, on the host, with float soft targets [B, K], as the paper's
runs mixed (Graphcore's TF1 code at 09b7c67, ``vision/cnns/tensorflow1/training/``).

- Mixup (``Datasets/augmentations.py``, ``assign_mixup_coefficients`` / ``mixup_image``): one
  coefficient per SAMPLE, m_i = max(b, 1 − b) with b ~ Beta(α, α), so the sample's own image always
  dominates; sample i is mixed with its neighbour i − 1 (the batch rolled by one).
- CutMix "v1" (``cutmix`` / ``cutmix_v1_sample_lambda``): one λ per BATCH, drawn from λ₀ (the
  configs' ``cutmix_lambda``): no cut with probability 1.55·λ₀ − 0.96, else λ = 1 + ln(u)/4 with
  u ~ U(e⁻⁴, 1). One box of about (1 − λ)·H·W pixels, the image's aspect ratio, its centre drawn
  uniformly and then moved so the box fits inside the image, is pasted from sample i − 2 (the batch
  rolled by two, by one for batches of two) into every sample; λ is then recomputed as the share
  of pixels left, so the targets match the pixels.
- Both on: mixup first, then CutMix pastes from the mixed batch, so an image can carry four labels
  (``train.py``'s ``integer_labels_to_dense``): with T = m·Y + (1 − m)·roll₁(Y) the mixup targets,
  the final targets are λ·T + (1 − λ)·roll₂(T).
Label smoothing is the loss's job (``app/objective.py``): it is linear, so smoothing each one-hot
before mixing, as the TF code does, equals smoothing the mixed targets.
"""

import math
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

# cutmix_v1_sample_lambda: the denominator of ln(u), and the affine map from λ₀ to P(no cut)
V1_DENOM = 4.0
V1_NO_CUT_SLOPE, V1_NO_CUT_OFFSET = 1.55, 0.96


def one_hot(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    return F.one_hot(targets, num_classes).float()


def roll(batch: torch.Tensor, shift: int) -> torch.Tensor:
    """``out[i] = batch[i - shift]``: tf.roll along the batch, the TF code's pairing."""
    return torch.roll(batch, shifts=shift, dims=0)


def cutmix_shift(batch_size: int) -> int:
    """CutMix's partner offset: 2, so that with mixup on a sample is not cut and mixed with the
    same neighbour (1 for a batch of two)."""
    return 2 if batch_size > 2 else 1


# ----------------------------------------------------------------------------- mixup


def mixup_coefficients(batch_size: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Per-sample mixup weights of the sample's own image: max(b, 1 − b), b ~ Beta(α, α)."""
    b = rng.beta(alpha, alpha, size=batch_size)
    return np.maximum(b, 1.0 - b)


def mixup(
    images: torch.Tensor, soft: torch.Tensor, coefficients: np.ndarray
) -> Tuple[torch.Tensor, torch.Tensor]:
    """m_i·x_i + (1 − m_i)·x_{i−1} (rounded back to uint8) and the same mix of the soft targets."""
    m = torch.as_tensor(coefficients, dtype=torch.float32, device=images.device)
    own = images.float()  # one float copy; the partners are rolled from it (same products, fewer copies)
    mixed = roll(own, 1).mul_((1.0 - m).view(-1, 1, 1, 1)).add_(own.mul_(m.view(-1, 1, 1, 1)))
    targets = soft * m.view(-1, 1) + roll(soft, 1) * (1.0 - m).view(-1, 1)
    return mixed.round_().clamp_(0, 255).to(torch.uint8), targets


# ----------------------------------------------------------------------------- cutmix


def cutmix_v1_lambda(lambda0: float, rng: np.random.Generator) -> float:
    """One draw of CutMix v1's λ for λ₀: 1 (no cut) with probability 1.55·λ₀ − 0.96, else
    1 + ln(u)/4 with u ~ U(e⁻⁴, 1), which lies in (0, 1]."""
    no_cut, u = rng.random(), rng.uniform(math.exp(-V1_DENOM), 1.0)
    if no_cut < lambda0 * V1_NO_CUT_SLOPE - V1_NO_CUT_OFFSET:
        return 1.0
    return 1.0 + math.log(u) / V1_DENOM


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box of side sqrt(1 − λ)·(H, W) whose centre is drawn
    uniformly over the image and then clipped so that the whole box lies inside it."""
    box_h, box_w = height * math.sqrt(1.0 - lam), width * math.sqrt(1.0 - lam)
    cy = min(max(rng.uniform(0, height), box_h / 2), height - box_h / 2)
    cx = min(max(rng.uniform(0, width), box_w / 2), width - box_w / 2)
    # tf.round rounds halves to even, as Python's round does
    return (
        int(round(cy - box_h / 2)),
        int(round(cy + box_h / 2)),
        int(round(cx - box_w / 2)),
        int(round(cx + box_w / 2)),
    )


def cutmix(
    images: torch.Tensor, soft: torch.Tensor, lam: float, rng: np.random.Generator
) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Paste the box from sample i − 2 into every sample i; returns the images, the targets and
    the λ actually applied (the share of each image's own pixels)."""
    height, width = images.shape[-2:]
    top, bottom, left, right = cutmix_box(height, width, lam, rng)
    shift = cutmix_shift(images.shape[0])
    if bottom <= top or right <= left:  # an empty box (no cut): nothing to paste or copy
        return images, soft, 1.0
    out = images.clone()
    # roll only the box's pixels, not the whole batch
    out[..., top:bottom, left:right] = roll(images[..., top:bottom, left:right], shift)
    kept = 1.0 - (bottom - top) * (right - left) / float(height * width)
    return out, soft * kept + roll(soft, shift) * (1.0 - kept), kept


# ----------------------------------------------------------------------------- both


def mixing_enabled(mixup_alpha: float, cutmix_lambda: float) -> bool:
    return mixup_alpha > 0 or cutmix_lambda < 1


def mix_batch(
    images: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    mixup_alpha: float,
    cutmix_lambda: float,
    rng: np.random.Generator,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mixup (``mixup_alpha`` > 0), then CutMix v1 (``cutmix_lambda`` λ₀ < 1). With neither, the
    batch and its integer targets are returned as they are. (A batch of one is its own partner:
    mixing it changes nothing.)"""
    if not mixing_enabled(mixup_alpha, cutmix_lambda):
        return images, targets
    soft = one_hot(targets, num_classes)
    if mixup_alpha > 0:
        images, soft = mixup(images, soft, mixup_coefficients(images.shape[0], mixup_alpha, rng))
    if cutmix_lambda < 1:
        images, soft, _ = cutmix(images, soft, cutmix_v1_lambda(cutmix_lambda, rng), rng)
    return images, soft
