"""The IPU precision of the model that runs on the device (``ipu.precision``).

  "32.32"  fp32 activations and weights.
  "16.32"  fp16 activations, fp32 weights: every conv/linear/norm casts its weights (and input) to
           fp16 in the graph, so the stored weights — and their updates — stay fp32.
  "16.16"  fp16 activations and weights (``model.half()``); the update is rounded back to fp16,
           stochastically when ``ipu.stochastic_rounding`` is on.
Both fp16 modes cast the network's input to fp16; the loss is computed in fp32 by the objective.
Only the backend's device copy of the model is changed: the host model (checkpoints, EMA) stays fp32.
"""

import types

import torch
import torch.nn.functional as F
from torch import nn


def _half(t):
    return None if t is None else t.half()


def _conv_forward(self, x):
    return self._conv_forward(x.half(), self.weight.half(), _half(self.bias))


def _linear_forward(self, x):
    return F.linear(x.half(), self.weight.half(), _half(self.bias))


def _group_norm_forward(self, x):
    if hasattr(self, "normalize"):  # the model's GroupNorm: its channel grouping (model/norms.py)
        return self.normalize(x.half(), _half(self.weight), _half(self.bias))
    return F.group_norm(x.half(), self.num_groups, _half(self.weight), _half(self.bias), self.eps)


def _cast_input(module, inputs):
    return tuple(t.half() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)


def apply_precision(model: nn.Module, precision: str) -> nn.Module:
    """Make ``model`` (the device copy) compute in ``precision``; returns it."""
    if precision == "32.32":
        return model
    if precision == "16.16":
        model.half()
    elif precision == "16.32":
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.forward = types.MethodType(_conv_forward, m)
            elif isinstance(m, nn.Linear):
                m.forward = types.MethodType(_linear_forward, m)
            elif isinstance(m, nn.GroupNorm):
                m.forward = types.MethodType(_group_norm_forward, m)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                # fp32 statistics and affine parameters, fp16 data: cast in, compute, cast out
                m.register_forward_pre_hook(_cast_input)
    else:
        raise ValueError(f"ipu.precision={precision!r}: expected 32.32, 16.32 or 16.16")
    model.register_forward_pre_hook(_cast_input)
    model._ipu_precision = precision  # read by the emulator (fp16 kernels on the CPU)
    return model
