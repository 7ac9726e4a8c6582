"""Batch-norm statistics as an inference computation, so that every backend can measure them.

Recalibrating batch norm at a new resolution needs each layer's batch mean and variance with the
layers before it normalising by their own batch statistics (what torch's train mode does). Torch's
way of accumulating them (``momentum=None``: a cumulative average through ``num_batches_tracked``,
updated in place and read back on the host) does not lower to an IPU graph, so the statistics are
outputs here: ``BatchNormProbe`` runs a ``Classifier`` with every layer in eval mode (no dropout,
no drop-path, no running-statistic updates), replaces each batch norm's output by the input
normalised with its batch statistics, and returns those statistics, a [1, C] pair per layer. A
backend runs the probe like any inference model (on an IPU: its own inference executable, where
a micro-batch is one batch); the host averages the pairs and writes them into the running buffers.
"""

from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

Statistics = List[Tuple[Tensor, Tensor]]  # per batch-norm layer: (means [k, C], variances [k, C])


def batch_norm_layers(model: nn.Module) -> List[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class BatchNormProbe(nn.Module):
    """``forward(images)`` → (mean₀, var₀, mean₁, var₁, …): each batch norm's batch mean and
    unbiased variance over its input, [1, C] each (the leading 1 lets micro-batches stack)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.layers = batch_norm_layers(classifier)

    def forward(self, images: Tensor) -> Tuple[Tensor, ...]:
        records: List[Tensor] = []

        def normalise_by_batch(module: nn.BatchNorm2d, inputs: Tuple[Tensor, ...], output: Tensor) -> Tensor:
            x = inputs[0]
            dims = [d for d in range(x.dim()) if d != 1]
            xf = x.float()
            mean = xf.mean(dim=dims, keepdim=True)
            var = ((xf - mean) ** 2).mean(dim=dims, keepdim=True)
            y = (xf - mean) * torch.rsqrt(var + module.eps)
            shape = [1, -1] + [1] * (x.dim() - 2)
            if module.weight is not None:
                y = y * module.weight.float().view(shape) + module.bias.float().view(shape)
            n = xf.numel() // xf.shape[1]
            records.append(mean.reshape(1, -1))
            records.append((var * (n / max(n - 1, 1))).reshape(1, -1))  # unbiased, as torch keeps
            return y.to(x.dtype)

        hooks = [m.register_forward_hook(normalise_by_batch) for m in self.layers]
        try:
            self.classifier(images)
        finally:
            for hook in hooks:
                hook.remove()
        return tuple(records)


def split_statistics(outputs: Sequence[Tensor]) -> Statistics:
    """The probe's flat outputs (micro-batches stacked) as [(means, variances), ...]."""
    return [(outputs[i].float(), outputs[i + 1].float()) for i in range(0, len(outputs), 2)]


@torch.no_grad()
def write_statistics(
    model: nn.Module, means: Sequence[Tensor], variances: Sequence[Tensor], batches: int
) -> None:
    for layer, mean, var in zip(batch_norm_layers(model), means, variances):
        layer.running_mean.copy_(mean.to(layer.running_mean))
        layer.running_var.copy_(var.to(layer.running_var))
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked.fill_(batches)
