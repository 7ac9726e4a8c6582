"""Proxy Norm: the proxy-normalised activation PN-φ (Labatie et al. 2021).

For a channel c with affine (γ_c, β_c) and proxy parameters (β̃_c, γ̃_c):

    proxy points   ỹ_{c,i} = β̃_c + (1 + γ̃_c) · u_i,   u_i = Φ⁻¹((i + ½) / N),  N = 200
    proxy stats    z̃_{c,i} = φ(γ_c ỹ_{c,i} + β_c),   μ̃_c = mean_i z̃,   σ̃²_c = var_i z̃
    output         PN-φ(Y)_c = (φ(γ_c Y_c + β_c) − μ̃_c) / sqrt(σ̃²_c + ε),   ε = 0.03

Y is the output of a batch-independent norm (LayerNorm or GroupNorm). The affine γ·Y + β is the
preceding norm's own affine (one fused kernel, and the only form PopTorch lowers), so this module
holds β̃ and γ̃ and is handed γ and β at call time. The proxy statistics are a C×N computation in
float32. In eager CPU/GPU training the statistics and the standardisation (φ(x) − μ̃)/σ̃ have
hand-written backwards (as the reference code has for the statistics); wherever a graph is traced
or compiled (PopTorch, torch.compile) autograd differentiates the same arithmetic, so both paths
give the same loss and the same gradients up to float32 rounding (see ``fast_paths.py``).
"""

import math
from typing import Any, Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fast_paths import plain_eager

PROXY_POINTS = 200
PROXY_EPS = 0.03


def normal_quantiles(n: int = PROXY_POINTS) -> Tensor:
    """The n fixed standard-normal quantiles Φ⁻¹((i + ½)/n), computed in float64, returned float32."""
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)).float()


def _proxy_statistics(
    proxy_bias: Tensor,
    proxy_weight: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    quantiles: Tensor,
    eps: float,
    activation: Callable[[Tensor], Tensor],
):
    """μ̃, 1/sqrt(σ̃² + ε) and the intermediates a backward pass needs, all float32. The
    pre-activations γ·(β̃ + (1 + γ̃)·u) + β are slope·u + offset with per-channel
    slope = γ(1 + γ̃) and offset = γβ̃ + β: two passes over the C×N points instead of four."""
    w = weight.float()
    slope = w * (1.0 + proxy_weight.float())
    offset = w * proxy_bias.float()
    if bias is not None:
        offset = offset + bias.float()
    pre = slope[:, None] * quantiles + offset[:, None]
    z = activation(pre)
    mean = z.mean(dim=1)
    centred = z - mean[:, None]
    var = centred.square().mean(dim=1)  # population variance
    return mean, torch.rsqrt(var + eps), pre, centred


def _differentiable_backward(fn: Callable, inputs: Tuple, grads: Tuple) -> Tuple:
    """The gradients of ``fn(*inputs)`` — the plain arithmetic a hand-written backward replaces —
    recorded by autograd, for ``create_graph=True`` (second derivatives, gradient penalties): a
    hand-written backward would be a constant to the next differentiation."""
    wanted = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    result = [None] * len(inputs)
    with torch.enable_grad():
        outputs = fn(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None]
        found = torch.autograd.grad(
            [o for o, _ in pairs],
            [inputs[i] for i in wanted],
            [g for _, g in pairs],
            create_graph=True,
            allow_unused=True,
        )
    for i, g in zip(wanted, found):
        result[i] = g
    return tuple(result)


def _standardised_silu(x: Tensor, mean: Tensor, inv_std: Optional[Tensor]) -> Tensor:
    z = F.silu(x) - mean
    return z if inv_std is None else z * inv_std


class _SiluProxyStatistics(torch.autograd.Function):
    """The proxy statistics with φ = SiLU and a hand-written backward (as the paper's reference
    code has): the forward is the same float32 arithmetic as autograd's path; the backward
    makes 4 passes over the C×N proxy points and keeps only the pre-activations and centred
    values. On small batches these batch-independent points weigh as much as activations."""

    @staticmethod
    def forward(
        ctx: Any,
        proxy_bias: Tensor,
        proxy_weight: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        quantiles: Tensor,
        eps: float,
    ) -> Tuple[Tensor, Tensor]:
        mean, inv_std, pre, centred = _proxy_statistics(
            proxy_bias, proxy_weight, weight, bias, quantiles, eps, F.silu
        )
        ctx.save_for_backward(proxy_bias, proxy_weight, weight, bias, quantiles, pre, centred, inv_std)
        ctx.has_bias, ctx.eps = bias is not None, eps
        return mean, inv_std

    @staticmethod
    def backward(
        ctx: Any, grad_mean: Optional[Tensor], grad_inv_std: Optional[Tensor]
    ) -> Tuple[Optional[Tensor], ...]:
        pb, pw, weight, bias, quantiles, pre, centred, inv_std = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            statistics = lambda *a: _proxy_statistics(*a, ctx.eps, F.silu)[:2]  # noqa: E731
            inputs = (pb, pw, weight, bias if ctx.has_bias else None, quantiles)
            return _differentiable_backward(statistics, inputs, (grad_mean, grad_inv_std)) + (None,)
        n = quantiles.numel()
        if grad_mean is None:
            grad_mean = torch.zeros_like(inv_std)
        if grad_inv_std is None:
            grad_inv_std = torch.zeros_like(inv_std)
        # mean = Σz/n, var = Σ(z − mean)²/n, inv_std = (var + ε)^-½; Σ(z − mean) = 0, so
        # ∂L/∂z_i = g_mean/n + g_var · 2(z_i − mean)/n with g_var = −½ g_inv_std inv_std³.
        grad_var = -0.5 * grad_inv_std.float() * inv_std.pow(3)
        grad_z = torch.addcmul((grad_mean.float() / n)[:, None], centred, (2.0 * grad_var / n)[:, None])
        grad_pre = torch.ops.aten.silu_backward(grad_z, pre)
        grad_offset = grad_pre.sum(dim=1)  # pre = slope·u + offset
        grad_slope = torch.mv(grad_pre, quantiles.float())
        w = weight.float()
        # slope = γ(1 + γ̃), offset = γβ̃ + β
        grad_weight = grad_slope * (1.0 + pw.float()) + grad_offset * pb.float()
        return (
            grad_offset.mul(w).to(pb.dtype),
            grad_slope.mul(w).to(pw.dtype),
            grad_weight.to(weight.dtype),
            grad_offset.to(bias.dtype) if ctx.has_bias else None,
            None,
            None,
        )


class _StandardisedSilu(torch.autograd.Function):
    """(SiLU(x) − μ̃)·s, or SiLU(x) − μ̃ when s is None (the scale deferred to squeeze-excite), for
    eager training. Autograd would keep SiLU(x) besides x and allocate three activation-sized
    tensors in the backward; this keeps x and the output (which the next layer saves anyway) and
    allocates one tensor each way. On CPUs every fresh activation-sized tensor costs page faults
    on top of its pass, which makes them the larger part of proxy norm's cost on a CPU."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, mean: Tensor, inv_std: Optional[Tensor]) -> Tensor:
        out = F.silu(x)
        if inv_std is None:
            out.sub_(mean)
        else:
            out.mul_(inv_std).add_(-mean * inv_std)
        ctx.save_for_backward(x, out, mean, inv_std)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, out, mean, inv_std = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return _differentiable_backward(_standardised_silu, (x, mean, inv_std), (grad,))
        dims = [d for d in range(grad.dim()) if d != 1]
        grad_sum = grad.sum(dims, keepdim=True, dtype=torch.float32)
        if inv_std is None:
            grad_x = torch.ops.aten.silu_backward(grad, x)
            return grad_x, (-grad_sum).to(x.dtype), None
        # With z = SiLU(x): out = (z − μ̃)·s, so ∂L/∂s = Σ g·(z − μ̃) = Σ g·out / s,
        # ∂L/∂μ̃ = −s·Σ g and ∂L/∂z = g·s. One buffer serves the product, then ∂L/∂z, then ∂L/∂x.
        buffer = grad * out
        grad_inv_std = buffer.sum(dims, keepdim=True, dtype=torch.float32) / inv_std.float()
        grad_mean = -inv_std.float() * grad_sum
        torch.mul(grad, inv_std, out=buffer)
        grad_x = torch.ops.aten.silu_backward.grad_input(buffer, x, grad_input=buffer)
        return grad_x, grad_mean.to(x.dtype), grad_inv_std.to(x.dtype)


class ProxyNormAct(nn.Module):
    """PN-φ for inputs that the preceding norm already scaled and shifted by (γ, β)."""

    def __init__(
        self,
        channels: int,
        activation: Callable[[Tensor], Tensor] = F.silu,
        points: int = PROXY_POINTS,
        eps: float = PROXY_EPS,
    ):
        super().__init__()
        self.activation = activation
        self.eps = eps
        self.proxy_bias = nn.Parameter(torch.zeros(channels))  # β̃
        self.proxy_weight = nn.Parameter(torch.zeros(channels))  # γ̃: the proxy's std is 1 + γ̃
        self.register_buffer("quantiles", normal_quantiles(points), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # .half() / .to(bfloat16) cast every floating buffer; the fixed quantiles stay float32,
        # as the statistics computed from them are.
        super()._apply(fn, *args, **kwargs)
        q = self.quantiles
        if q.dtype != torch.float32:  # recomputed: casting back would keep the rounding
            self.quantiles = normal_quantiles(q.numel()).to(q.device)
        return self

    def proxy_statistics(self, weight: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """(μ̃, 1/sqrt(σ̃² + ε)) per channel, always float32 (explicit casts: no autocast reaches it)."""
        if self.activation is F.silu and plain_eager(self.quantiles, weight, self.proxy_weight):
            return _SiluProxyStatistics.apply(
                self.proxy_bias, self.proxy_weight, weight, bias, self.quantiles, self.eps
            )
        return _proxy_statistics(
            self.proxy_bias, self.proxy_weight, weight, bias, self.quantiles, self.eps, self.activation
        )[:2]

    def forward(
        self, x: Tensor, weight: Tensor, bias: Optional[Tensor], defer_scale: bool = False
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """x = γ·Y + β. With ``defer_scale`` returns (φ(x) − μ̃, 1/σ̃) so that a following
        squeeze-excite can fold the division into its gate and save a pass over the tensor.
        (Eager inference computes the statistics once: ``model.inference.fuse_for_inference``.)"""
        mean, inv_std = self.proxy_statistics(weight, bias)
        mean = mean.to(x.dtype).view(1, -1, 1, 1)
        inv_std = inv_std.to(x.dtype).view(1, -1, 1, 1)
        if self.activation is F.silu and torch.is_grad_enabled() and plain_eager(x):
            if defer_scale:
                return _StandardisedSilu.apply(x, mean, None), inv_std
            return _StandardisedSilu.apply(x, mean, inv_std)
        z = self.activation(x)
        if defer_scale:
            return z - mean, inv_std
        # φ(x)·s − μ̃·s: a multiply and an add with one per-channel operand each, which CPU
        # kernels vectorise (addcmul with two broadcast operands runs a scalar loop, ~2× slower).
        return z * inv_std + (-mean * inv_std)

    def extra_repr(self) -> str:
        return f"{self.proxy_bias.numel()}, points={self.quantiles.numel()}, eps={self.eps}"
