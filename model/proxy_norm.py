"""Proxy Norm: the proxy-normalised activation PN-φ (Labatie et al. 2021).

For a channel c with affine (γ_c, β_c) and proxy parameters (β̃_c, γ̃_c):

    proxy points   ỹ_{c,i} = β̃_c + (1 + γ̃_c) · u_i,   u_i = Φ⁻¹((i + ½) / N),  N = 200
    proxy stats    z̃_{c,i} = φ(γ_c ỹ_{c,i} + β_c),   μ̃_c = mean_i z̃,   σ̃²_c = var_i z̃
    output         PN-φ(Y)_c = (φ(γ_c Y_c + β_c) − μ̃_c) / sqrt(σ̃²_c + ε),   ε = 0.03

Y is the output of a batch-independent norm (LayerNorm or GroupNorm). The affine γ·Y + β is the
preceding norm's own affine (one fused kernel, and the only form PopTorch lowers), so this module
holds β̃ and γ̃ and is handed γ and β at call time. The proxy statistics are a C×N computation in
float32, differentiated by autograd, which is the same as the reference's hand-written gradients.
"""
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROXY_POINTS = 200
PROXY_EPS = 0.03


def normal_quantiles(n: int = PROXY_POINTS) -> Tensor:
    """The n fixed standard-normal quantiles Φ⁻¹((i + ½)/n), computed in float64, returned float32."""
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)).float()


def _eager_inference(x: Tensor) -> bool:
    """No gradient recorded and plain eager execution on CPU/GPU: not traced (PopTorch, jit) nor
    compiled, where caching or writing in place could bake host values into a graph."""
    if torch.is_grad_enabled() or x.device.type not in ("cpu", "cuda") or torch.jit.is_tracing():
        return False
    dynamo = getattr(torch, "_dynamo", None)
    return not (dynamo is not None and dynamo.is_compiling())


class ProxyNormAct(nn.Module):
    """PN-φ for inputs that the preceding norm already scaled and shifted by (γ, β)."""

    def __init__(self, channels: int, activation: Callable[[Tensor], Tensor] = F.silu,
                 points: int = PROXY_POINTS, eps: float = PROXY_EPS):
        super().__init__()
        self.activation = activation
        self.eps = eps
        self.proxy_bias = nn.Parameter(torch.zeros(channels))    # β̃
        self.proxy_weight = nn.Parameter(torch.zeros(channels))  # γ̃: the proxy's std is 1 + γ̃
        self.register_buffer("quantiles", normal_quantiles(points), persistent=False)

    def proxy_statistics(self, weight: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(μ̃, 1/sqrt(σ̃² + ε)) per channel, always float32 (explicit casts: no autocast reaches it)."""
        proxy = self.proxy_bias.float()[:, None] + (1.0 + self.proxy_weight.float())[:, None] * self.quantiles
        pre = weight.float()[:, None] * proxy
        if bias is not None:
            pre = pre + bias.float()[:, None]
        z = self.activation(pre)
        # sum / N rather than mean(): torch 2.0's mean() keeps its C×N input for backward.
        n = z.shape[1]
        mean = z.sum(dim=1) / n
        centred = z - mean[:, None]
        var = (centred * centred).sum(dim=1) / n  # population variance
        return mean, torch.rsqrt(var + self.eps)

    def _statistics(self, weight: Tensor, bias: Optional[Tensor],
                    eager_inference: bool) -> Tuple[Tensor, Tensor]:
        """proxy_statistics, remembered during eager inference: they depend only on four
        parameter vectors (and ε, φ, the quantiles), so they are recomputed only when one of
        those changes (another tensor or storage, or an in-place update: its version counter)."""
        if not eager_inference:
            self._cached = None
            return self.proxy_statistics(weight, bias)
        tensors = (self.proxy_bias, self.proxy_weight, weight, bias, self.quantiles)
        key = (self.eps, self.activation) + tuple(
            (id(t), t.data_ptr(), t._version) for t in tensors if t is not None)
        cached = getattr(self, "_cached", None)
        if cached is None or cached[0] != key:
            cached = (key, self.proxy_statistics(weight, bias))
            self._cached = cached
        return cached[1]

    def forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], defer_scale: bool = False):
        """x = γ·Y + β. With ``defer_scale`` returns (φ(x) − μ̃, 1/σ̃) so that a following
        squeeze-excite can fold the division into its gate and save a pass over the tensor."""
        eager_inference = _eager_inference(x)
        mean, inv_std = self._statistics(weight, bias, eager_inference)
        mean = mean.to(x.dtype).view(1, -1, 1, 1)
        inv_std = inv_std.to(x.dtype).view(1, -1, 1, 1)
        z = self.activation(x)
        if eager_inference:
            # Inference: z is a temporary of ours, so write the result into it instead of a fresh
            # tensor (on CPU every large new tensor costs page faults). Same ops, same rounding.
            if defer_scale:
                return z.sub_(mean), inv_std
            return torch.addcmul(-mean * inv_std, z, inv_std, out=z)
        if defer_scale:
            return z - mean, inv_std
        return torch.addcmul(-mean * inv_std, z, inv_std)

    def extra_repr(self) -> str:
        return f"{self.proxy_bias.numel()}, points={self.quantiles.numel()}, eps={self.eps}"
