"""What is optimised: the network wrapped with its input normalisation and its loss.

Images arrive as uint8 (4× less to move from host to device than float32) and are normalised here,
on the device. ``forward(images, targets)`` returns ``(logits, loss)`` so that one call holds the
whole training objective, which is the form PopTorch's ``trainingModel`` needs. PopTorch also
wants the final loss marked with ``poptorch.identity_loss``: a backend sets ``loss_hook`` to that
instead of this file importing anything device-specific.
"""

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.config import Config
from app.data import IMAGENET_MEAN, IMAGENET_STD, num_classes_of
from model import build_model


def identity(loss: Tensor) -> Tensor:
    return loss


def smoothed_cross_entropy(logits: Tensor, targets: Tensor, smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy against label-smoothed targets (the paper's runs' form: 1 − s on the
    labelled class, s/(K − 1) on each other).

    ``targets`` are class indices (int64 [B]) or probabilities (float [B, K], e.g. from mixup).
    Written out (one-hot, log-softmax, sum) rather than with ``F.cross_entropy(label_smoothing=)``
    so that soft targets and every backend (PopTorch included) take the same path.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    classes = logits.shape[-1]
    if targets.dtype in (torch.int64, torch.int32):
        targets = F.one_hot(targets.long(), classes).to(log_probs.dtype)
    else:
        targets = targets.to(log_probs.dtype)
    if smoothing > 0:
        # TF1 train.py (integer_labels_to_dense): on-value 1 − s, off-value s/(K − 1), so the
        # true class gets exactly 1 − s (not 1 − s + s/K); linear, so soft targets mix the same
        off = smoothing / (classes - 1) if classes > 1 else 0.0
        targets = targets * (1.0 - smoothing - off) + off
    return -(targets * log_probs).sum(dim=-1).mean()


class Classifier(nn.Module):
    """EfficientNet + on-device normalisation of uint8 images + label-smoothed cross-entropy."""

    def __init__(
        self,
        model: nn.Module,
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        loss_hook: Callable[[Tensor], Tensor] = identity,
    ):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.channels_last = channels_last
        self.loss_hook = loss_hook
        # mean/std of 0..1 images, rescaled to 0..255 so uint8 input needs no extra division.
        # Not persistent: checkpoints hold only the network's own state.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0, persistent=False)

    def normalise(self, images: Tensor) -> Tensor:
        x = (images.float() - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, images: Tensor, targets: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        logits = self.model(self.normalise(images))
        if targets is None:
            return logits
        loss = smoothed_cross_entropy(logits, targets, self.label_smoothing)
        return logits, self.loss_hook(loss)


def build_classifier(model: nn.Module, cfg: Config) -> Classifier:
    return Classifier(model, cfg.train.label_smoothing, cfg.train.channels_last)


def build_network(cfg: Config, num_classes: int) -> nn.Module:
    """The EfficientNet that ``cfg.model`` describes, with ``num_classes`` outputs."""
    m = cfg.model
    return build_model(
        m.name,
        group_size=m.group_size,
        expand_ratio=m.expand_ratio,
        norm=m.norm,
        proxy_norm=m.proxy_norm,
        norm_groups=m.norm_groups,
        norm_eps=m.norm_eps,
        num_classes=num_classes,
        dropout=m.dropout,
        drop_path=m.drop_path,
        padding=m.padding,
        graph=m.graph,
        norm_grouping=m.norm_grouping,
    )


def network_builder(cfg: Config) -> Callable[[], nn.Module]:
    """What the application hands a backend and the planner: a call that builds this run's
    network (``cfg.model`` with the dataset's number of classes), so neither has to know how."""
    num_classes = num_classes_of(cfg.data.dataset)
    return lambda: build_network(cfg, num_classes)
