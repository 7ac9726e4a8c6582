"""Half precision as the IPU computes it, on devices that may lack fp16 kernels.

* ``HalfKernels``: a torch-function mode. An op given fp16 tensors runs in fp16 where the device
  has a kernel; where it has none (convolutions on a CPU under torch 2.0) its fp16 inputs are
  widened to fp32 — exactly, every fp16 value is an fp32 value — the op runs in fp32 and its
  outputs are rounded back to fp16. That is an fp16 kernel with fp32 accumulation; the IPU's
  half partials round more often inside a long reduction, which this cannot see (documented).
  Gradients flow through the casts, so they are rounded to fp16 at every op boundary too.
* ``round_half`` / ``stochastic_round_half``: the value grid of fp16, nearest or stochastic (the
  IPU's hardware stochastic rounding: round up with probability equal to the distance from the
  lower neighbour, in units of the local fp16 spacing).
"""

from typing import Any, Dict, Optional, Set

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from . import lowering

FP16_MAX = 65504.0
_NO_HALF_KERNEL: Set[Any] = set()  # ops seen failing on fp16 inputs (per process)
# Convolutions, matrix products and norms: on a CPU their fp16 kernels are missing (torch 2.0) or
# reference loops (later versions), so they always run widened there. They return new tensors
# (no in-place effects besides norm statistics, which are written back).
_WIDEN_ON_CPU = {
    torch.conv2d,
    torch.nn.functional.conv2d,
    torch.nn.functional.linear,
    torch.matmul,
    torch.mm,
    torch.addmm,
    torch.bmm,
    torch.nn.functional.group_norm,
    torch.nn.functional.batch_norm,
    torch.nn.functional.layer_norm,
    torch.group_norm,
    torch.batch_norm,
    torch.layer_norm,
    # losses: their backward kernels lack fp16 on a CPU too (mse_backward, ...)
    torch.nn.functional.mse_loss,
    torch.nn.functional.l1_loss,
    torch.nn.functional.smooth_l1_loss,
    torch.nn.functional.huber_loss,
    torch.nn.functional.cross_entropy,
    torch.nn.functional.nll_loss,
    torch.nn.functional.kl_div,
    torch.nn.functional.binary_cross_entropy,
    torch.nn.functional.binary_cross_entropy_with_logits,
}


def _is_half(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype == torch.half


def _leaves(args, kwargs):
    """Tensors among the arguments (one level of lists/tuples: what torch ops take)."""
    for x in list(args) + list(kwargs.values()):
        if isinstance(x, (list, tuple)):
            yield from x
        else:
            yield x


def _map_args(fn, args):
    return type(args)(type(x)(fn(y) for y in x) if isinstance(x, (list, tuple)) else fn(x) for x in args)


def _run_in_float(func, args, kwargs: Dict[str, Any]):
    pairs = []

    def widen(x: Any) -> Any:
        if _is_half(x):
            wide = x.float()
            pairs.append((x, wide))
            return wide
        return x

    # The casts are the emulator's, not the model's: the lowering check does not see them.
    with lowering.hidden():
        wide_args = _map_args(widen, tuple(args))
        wide_kwargs = {k: widen(v) for k, v in kwargs.items()}
    out = func(*wide_args, **wide_kwargs)
    with lowering.hidden():
        # Norms update running statistics in place: write them back to the fp16 buffers.
        for orig, wide in pairs:
            statistic = not orig.requires_grad and orig.grad_fn is None and orig.dim() == 1
            if statistic and not torch.equal(orig.float(), wide):
                with torch.no_grad():
                    orig.copy_(wide)
        return tree_map(
            lambda t: t.half() if isinstance(t, torch.Tensor) and t.dtype == torch.float else t, out
        )


# Ops whose weight and bias PopTorch casts to the input's type: castWeightAndBias
# (poptorch/source/Utils.cpp:354, called by the norm handlers in
# popart_canonicalization/NormalizationOps.cpp:104 and 166), and the
# dispatcher's type resolution of conv/linear weights (tests/half_float_test.py,
# test_float16_activations_float32_weights: the activation's type wins, sdk/poptorch/3.4.0).
_F = torch.nn.functional
_WEIGHTS_FOLLOW_INPUT = {  # op: (positions of weight and bias, their keyword names)
    _F.linear: ((1, 2), ("weight", "bias")),
    _F.conv1d: ((1, 2), ("weight", "bias")),
    _F.conv2d: ((1, 2), ("weight", "bias")),
    _F.conv3d: ((1, 2), ("weight", "bias")),
    _F.batch_norm: ((3, 4), ("weight", "bias")),
    _F.group_norm: ((2, 3), ("weight", "bias")),
    _F.layer_norm: ((2, 3), ("weight", "bias")),
    _F.instance_norm: ((3, 4), ("weight", "bias")),
}


def _weights_to_input_type(func, args, kwargs):
    positions, names = _WEIGHTS_FOLLOW_INPUT[func]
    x = args[0] if args else kwargs.get("input")
    if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
        return args, kwargs
    follow = lambda t: (
        t.to(x.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != x.dtype else t
    )
    with lowering.hidden():
        args = tuple(follow(a) if i in positions else a for i, a in enumerate(args))
        kwargs = {k: follow(v) if k in names else v for k, v in kwargs.items()}
    return args, kwargs


class HalfKernels(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _WEIGHTS_FOLLOW_INPUT:
            args, kwargs = _weights_to_input_type(func, args, kwargs)
        if func in _WIDEN_ON_CPU and any(
            _is_half(x) and x.device.type == "cpu" for x in _leaves(args, kwargs)
        ):
            return _run_in_float(func, args, kwargs)
        if func in _NO_HALF_KERNEL and any(_is_half(x) for x in _leaves(args, kwargs)):
            return _run_in_float(func, args, kwargs)
        try:
            return func(*args, **kwargs)
        except (RuntimeError, NotImplementedError) as error:
            message = str(error)
            if "Half" not in message and "half" not in message:
                raise
            if not any(_is_half(x) for x in _leaves(args, kwargs)):
                raise
            _NO_HALF_KERNEL.add(func)
            return _run_in_float(func, args, kwargs)


def round_half(x: torch.Tensor) -> torch.Tensor:
    """Nearest fp16 value, kept in x's dtype."""
    return x.to(torch.half).to(x.dtype)


def stochastic_round_half(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """fp16 grid value below or above x, chosen with probability by distance; in x's dtype."""
    xf = x.float().clamp(-FP16_MAX, FP16_MAX)
    _, exponent = torch.frexp(xf)  # |x| = m·2^e, m in [0.5, 1)
    # fp16 spacing: 2^(e−11) for normal numbers, 2^−24 below the smallest normal (2^−14)
    spacing = torch.exp2((exponent - 11).clamp_min(-24).float())
    low = torch.floor(xf / spacing) * spacing  # exact: division by a power of two
    frac = (xf - low) / spacing
    noise = torch.rand(xf.shape, generator=generator, device=xf.device)
    out = torch.where(noise < frac, low + spacing, low)
    return out.clamp(-FP16_MAX, FP16_MAX).to(x.dtype)
