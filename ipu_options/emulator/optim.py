"""``poptorch.optim``: torch optimisers that also accept PopTorch's extra arguments.

The extra arguments are kept as attributes the executor reads: ``loss_scaling`` (the loss is
multiplied by it before the backward pass and the gradients divided by it before the update),
``max_grad_norm`` (global gradient-norm clipping before the update), ``accum_type`` and the
momentum ``*_accum_type`` (fp16 rounds the gradient accumulator / optimiser state to fp16 after
every update), ``velocity_scaling`` (SGD; a storage scale of the velocity, numerically neutral
in fp32, so only recorded). RMSprop(use_tf_variant=True) is the TensorFlow variant —
``backends.optimizers.RMSpropTF`` (ε inside the square root, squared average starting at one, lr
accumulated in the momentum buffer), as PopTorch documents it."""
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

from backends.optimizers import RMSpropTF


class _PopTorchExtras:
    def _set_extras(self, loss_scaling: Optional[float], accum_type: Optional[torch.dtype],
                    max_grad_norm: Optional[float] = None, **state_types: Optional[torch.dtype]) -> None:
        allowed = (torch.float16, torch.float32)
        for name, dtype in dict(accum_type=accum_type, **state_types).items():
            if dtype is not None and dtype not in allowed:
                raise ValueError(f"{name}: Accumulation types must be either torch.float32 or torch.float16")
        self.loss_scaling = 1.0 if loss_scaling is None else float(loss_scaling)
        self.accum_type = accum_type or torch.float32
        self.state_types = {k: (v or torch.float32) for k, v in state_types.items()}
        self.max_grad_norm = max_grad_norm


    # PopTorch keeps the optimiser's state on the device. Its state_dict() reads it back as
    # "ipu_state" / "ipu_param" beside torch's own entries (kept for LR schedulers), and its
    # load_state_dict() accepts only such a dict: a plain torch optimiser's state cannot be loaded.
    def state_dict(self) -> Dict[str, Any]:
        torch_state = torch.optim.Optimizer.state_dict(self)
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in torch_state["param_groups"]]
        return {**torch_state, "ipu_state": torch_state["state"], "ipu_param": hyper}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not state_dict:
            raise RuntimeError("Cannot load optimizer state dictionary because it is empty.")
        if not ("ipu_state" in state_dict and "ipu_param" in state_dict):
            raise RuntimeError("Only IPU optimizer states can be loaded onto the IPU.")
        saved = state_dict["ipu_state"]
        torch.optim.Optimizer.load_state_dict(
            self, {"state": saved, "param_groups": state_dict["param_groups"]})
        # torch casts loaded state to each parameter's dtype (fp16 in 16.16); the device keeps the
        # accumulator types it was built with, so restore the saved ones.
        params = [p for g in self.param_groups for p in g["params"]]
        for index, values in saved.items():
            loaded = self.state[params[int(index)]]
            for key, value in values.items():
                if isinstance(value, torch.Tensor) and isinstance(loaded.get(key), torch.Tensor):
                    loaded[key] = loaded[key].to(value.dtype)


def _given(**kwargs):
    return {k: v for k, v in kwargs.items() if v is not None}


class SGD(_PopTorchExtras, torch.optim.SGD):
    def __init__(self, params: Iterable, lr: float, momentum: Optional[float] = None,
                 dampening: Optional[float] = None, weight_decay: Optional[float] = None,
                 nesterov: Optional[bool] = None, maximize: Optional[bool] = None,
                 foreach: Optional[bool] = None, differentiable: Optional[bool] = None,
                 loss_scaling: Optional[float] = None, velocity_scaling: Optional[float] = None,
                 use_combined_accum: Optional[bool] = None, accum_type: Optional[torch.dtype] = None,
                 velocity_accum_type: Optional[torch.dtype] = None,
                 max_grad_norm: Optional[float] = None) -> None:
        torch.optim.SGD.__init__(self, params, lr=lr, **_given(
            momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, foreach=foreach, differentiable=differentiable))
        self._set_extras(loss_scaling, accum_type, max_grad_norm, velocity_accum_type=velocity_accum_type)
        self.velocity_scaling = 1.0 if velocity_scaling is None else float(velocity_scaling)
        self.use_combined_accum = use_combined_accum


class AdamW(_PopTorchExtras, torch.optim.AdamW):
    def __init__(self, params: Iterable, lr: Optional[float] = None,
                 betas: Optional[Tuple[float, float]] = None, eps: Optional[float] = None,
                 weight_decay: Optional[float] = None, amsgrad: Optional[bool] = None,
                 maximize: Optional[bool] = None, foreach: Optional[bool] = None,
                 capturable: Optional[bool] = None, differentiable: Optional[bool] = None,
                 fused: Optional[bool] = None, loss_scaling: Optional[float] = None,
                 bias_correction: Optional[bool] = None, accum_type: Optional[torch.dtype] = None,
                 first_order_momentum_accum_type: Optional[torch.dtype] = None,
                 second_order_momentum_accum_type: Optional[torch.dtype] = None,
                 max_grad_norm: Optional[float] = None) -> None:
        if bias_correction is False:
            raise NotImplementedError("the emulator's AdamW always applies bias correction")
        torch.optim.AdamW.__init__(self, params, **_given(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused))
        self._set_extras(loss_scaling, accum_type, max_grad_norm,
                         first_order_momentum_accum_type=first_order_momentum_accum_type,
                         second_order_momentum_accum_type=second_order_momentum_accum_type)


class Adam(_PopTorchExtras, torch.optim.Adam):
    def __init__(self, params: Iterable, lr: Optional[float] = None,
                 betas: Optional[Tuple[float, float]] = None, eps: Optional[float] = None,
                 weight_decay: Optional[float] = None, amsgrad: Optional[bool] = None,
                 loss_scaling: Optional[float] = None, accum_type: Optional[torch.dtype] = None,
                 first_order_momentum_accum_type: Optional[torch.dtype] = None,
                 second_order_momentum_accum_type: Optional[torch.dtype] = None,
                 max_grad_norm: Optional[float] = None, **torch_kwargs) -> None:
        torch.optim.Adam.__init__(self, params, **_given(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad), **torch_kwargs)
        self._set_extras(loss_scaling, accum_type, max_grad_norm,
                         first_order_momentum_accum_type=first_order_momentum_accum_type,
                         second_order_momentum_accum_type=second_order_momentum_accum_type)


class RMSprop(_PopTorchExtras, torch.optim.Optimizer):
    """torch's RMSprop, or with ``use_tf_variant=True`` the TensorFlow variant (RMSpropTF)."""

    _base: type = torch.optim.RMSprop  # the update rule: set by the two concrete classes below

    def __new__(cls, *args, use_tf_variant: Optional[bool] = None, **kwargs):
        return super().__new__(_RMSpropTF if use_tf_variant else _RMSpropTorch)

    def __init__(self, params: Iterable, lr: Optional[float] = None, alpha: Optional[float] = None,
                 eps: Optional[float] = None, weight_decay: Optional[float] = None,
                 momentum: Optional[float] = None, centered: Optional[bool] = None,
                 loss_scaling: Optional[float] = None, accum_type: Optional[torch.dtype] = None,
                 first_order_momentum_accum_type: Optional[torch.dtype] = None,
                 second_order_momentum_accum_type: Optional[torch.dtype] = None,
                 use_tf_variant: Optional[bool] = None, **torch_kwargs) -> None:
        args = _given(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum)
        self.use_tf_variant = self._base is RMSpropTF
        if self.use_tf_variant:
            if centered:
                raise NotImplementedError("RMSprop(use_tf_variant=True, centered=True) is not emulated")
            self._base.__init__(self, params, **args)
        else:
            self._base.__init__(self, params, **args, **_given(centered=centered), **torch_kwargs)
        self._set_extras(loss_scaling, accum_type, None,
                         first_order_momentum_accum_type=first_order_momentum_accum_type,
                         second_order_momentum_accum_type=second_order_momentum_accum_type)


class _RMSpropTorch(RMSprop, torch.optim.RMSprop):
    _base = torch.optim.RMSprop
    step = torch.optim.RMSprop.step


class _RMSpropTF(RMSprop, RMSpropTF):
    _base = RMSpropTF
    step = RMSpropTF.step
