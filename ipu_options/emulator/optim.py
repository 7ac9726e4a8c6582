"""``poptorch.optim``: torch optimisers that also accept PopTorch's extra arguments.

The extra arguments are kept as attributes the executor reads: ``loss_scaling`` (the loss is
multiplied by it before the backward pass and the gradients divided by it before the update),
``max_grad_norm`` (global gradient-norm clipping before the update), ``accum_type`` and the
momentum ``*_accum_type`` (fp16 rounds the gradient accumulator / optimiser state to fp16 after
every update), ``velocity_scaling`` (SGD; a storage scale of the velocity, numerically neutral
in fp32, so only recorded). RMSprop(use_tf_variant=True) is the TensorFlow variant —
``backends.optimizers.RMSpropTF`` (ε inside the square root, squared average starting at one, lr
accumulated in the momentum buffer), as PopTorch documents it."""

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from backends.optimizers import RMSpropTF

from . import optim_device


class VariableAttributes:
    """Which hyper-parameters the executable keeps variable (python/optim.py:10-47, 3.4.0): those
    the user passed to the constructor, and any marked so since. The emulator keeps every one
    changeable; the marks are recorded for code that reads them."""

    def __init__(self, variable_attributes: List[str], allowed_attributes: List[str]) -> None:
        self._variable_attributes = variable_attributes
        self._allowed_attributes = allowed_attributes

    def isConstant(self, attr: str) -> bool:
        return attr not in self._variable_attributes

    def markAsConstant(self, attr: str) -> None:
        self._check(attr)
        self._variable_attributes = [a for a in self._variable_attributes if a != attr]

    def markAsVariable(self, attr: str) -> None:
        self._check(attr)
        self._variable_attributes.append(attr)

    def _check(self, attr: str) -> None:
        assert attr in self._allowed_attributes, (
            f"Unknown attribute {attr}, allowed values: {self._allowed_attributes}"
        )


def _variables(constructor_locals: Dict[str, Any]) -> List[str]:
    """The constructor's arguments the user gave: variable (python/optim.py:50-64, 3.4.0)."""
    given = dict(constructor_locals, **constructor_locals.get("torch_kwargs", {}))
    return [k for k, v in given.items() if v is not None and k not in ("self", "torch_kwargs")]


class _PopTorchExtras:
    def _track_variables(self, variables: List[str]) -> None:
        # the torch defaults plus the global loss scaling may be marked (python/optim.py:184, 286-288)
        self.variable_attrs = VariableAttributes(variables, list(self.defaults) + ["loss_scaling"])

    def _set_extras(
        self,
        loss_scaling: Optional[float],
        accum_type: Optional[torch.dtype],
        max_grad_norm: Optional[float] = None,
        **state_types: Optional[torch.dtype],
    ) -> None:
        allowed = (torch.float16, torch.float32)
        for name, dtype in dict(accum_type=accum_type, **state_types).items():
            if dtype is not None and dtype not in allowed:
                raise ValueError(f"{name}: Accumulation types must be either torch.float32 or torch.float16")
        self.loss_scaling = 1.0 if loss_scaling is None else float(loss_scaling)
        self.accum_type = accum_type or torch.float32
        self.state_types = {k: (v or torch.float32) for k, v in state_types.items()}
        self.max_grad_norm = max_grad_norm

    # PopTorch keeps the optimiser's state on the device (python/optim.py:68-105, 3.4.0): its
    # state_dict() is torch's entries plus "ipu_state" / "ipu_param", both None until an
    # executable on a device holds the optimiser, then PopART's tensors by name
    # ("Accl1___lin.weight", "learningRate___specific___lin.bias"; tests/optimizers_test.py:
    # 1229-1240). A loaded state is given back as loaded until the device next runs (line 99).
    _device_names: Optional[Dict[torch.Tensor, str]] = None  # set by the executor (device_names)
    _loaded_ipu: Optional[Dict[str, Any]] = None  # ipu_state/ipu_param as loaded, not yet run
    _device_extra: Dict[str, torch.Tensor] = {}  # state the executor keeps (lossScaleUpdateFactor)

    def state_dict(self) -> Dict[str, Any]:
        torch_state = torch.optim.Optimizer.state_dict(self)
        if self._loaded_ipu is not None:
            return {**self._loaded_ipu, **torch_state}
        if self._device_names is None:
            return {"ipu_state": None, "ipu_param": None, **torch_state}
        return {"ipu_state": self._named_state(), "ipu_param": self._named_params(), **torch_state}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not state_dict:  # python/optim.py:92-98 (3.4.0)
            raise RuntimeError("Cannot load optimizer state dictionary because it is empty.")
        if not ("ipu_state" in state_dict and "ipu_param" in state_dict):
            raise RuntimeError("Only IPU optimizer states can be loaded onto the IPU.")
        # torch's entries too, so LR schedulers work (python/optim.py:82-84). The emulator's
        # device state *is* torch's state, so they restore it; PopART's named entries, when
        # given, are written over it on the next run (device_names). Older checkpoints of this
        # project hold torch's per-index state under "ipu_state": that is the device's then.
        named = state_dict["ipu_state"]
        by_name = isinstance(named, dict) and isinstance(state_dict["ipu_param"], dict)
        by_index = isinstance(named, dict) and not by_name
        saved = named if by_index else state_dict.get("state", {})
        torch.optim.Optimizer.load_state_dict(
            self, {"state": saved, "param_groups": state_dict["param_groups"]}
        )
        # torch casts loaded state to each parameter's dtype (fp16 in 16.16); the device keeps the
        # accumulator types it was built with, so restore the saved ones.
        params = [p for g in self.param_groups for p in g["params"]]
        for index, values in saved.items():
            loaded = self.state[params[int(index)]]
            for key, value in values.items():
                if isinstance(value, torch.Tensor) and isinstance(loaded.get(key), torch.Tensor):
                    loaded[key] = loaded[key].to(value.dtype)
        if by_name:
            self._loaded_ipu = {"ipu_state": named, "ipu_param": state_dict["ipu_param"]}

    def device_names(
        self, names: Dict[torch.Tensor, str], extra: Optional[Dict[str, torch.Tensor]] = None
    ) -> None:
        """An executable on a device now holds this optimiser (``names``: each parameter's name
        in the model): a loaded named state is written to it and the state is read by name.
        ``extra``: the device's other optimiser state tensors (lossScaleUpdateFactor). Each loaded
        tensor is written on its own; a name the device lacks is skipped and a device tensor the
        dict lacks keeps its value (python/poptorch.cpp:1004-1031, 3.4.0)."""
        self._device_names = names
        self._device_extra = dict(extra or {})
        if self._loaded_ipu is None:
            return
        loaded, self._loaded_ipu = self._loaded_ipu, None
        params = self._named_params()
        written = {k: v.detach().clone() for k, v in (loaded["ipu_param"] or {}).items() if k in params}
        self._device_params = {**(self._device_params or {}), **written}
        self._write_named_state(loaded["ipu_state"] or {})

    def _write_named_state(self, named: Dict[str, Any]) -> None:
        """PopART's accumulators as loaded; a weight torch holds no state for yet starts from
        PopART's initial one, as on the device (torch would create its own at the first step)."""
        with torch.no_grad():
            for p, name in self._device_names.items():
                fresh = self._initial_state(p)
                if "exp_avg" in fresh or (isinstance(self, torch.optim.RMSprop) and not self.use_tf_variant):
                    fresh["step"] = torch.tensor(0.0)  # torch's step count beside its moments
                state = self.state[p] if self.state.get(p) else fresh
                for key in list(state):
                    entry = f"{self._prefix(key)}___{name}"
                    if isinstance(named.get(entry), torch.Tensor) and isinstance(state[key], torch.Tensor):
                        state[key] = named[entry].detach().clone().to(state[key].dtype)
                if state is fresh and any(f"{self._prefix(k)}___{name}" in named for k in fresh):
                    self.state[p] = fresh

    _device_params: Optional[Dict[str, torch.Tensor]] = None  # loaded ipu_param on the device

    def forget_device_params(self) -> None:
        """setOptimizer uploaded changed hyper-parameters: they replace every loaded scalar
        (python/_poplar_executor.py:385-390 and 660-668, 3.4.0)."""
        self._device_params = None

    def device_params(self) -> Optional[Dict[str, torch.Tensor]]:
        """The scalars loaded through ipu_param that the device holds (None: none loaded)."""
        return self._device_params

    # torch's state entries under PopART's accumulator names (popart/names.hpp: Accl1___ first
    # moment, Accl2___ second moment, Accl3___ RMSprop's momentum, Accl___ SGD's velocity).
    _STATE_PREFIX: Dict[str, str] = {
        "exp_avg": "Accl1",
        "exp_avg_sq": "Accl2",
        "step": "Step",
        "square_avg": "Accl1",
        "grad_avg": "Accl2",
        "momentum_buffer": "Accl",
    }

    def _prefix(self, key: str) -> Optional[str]:
        prefix = self._STATE_PREFIX.get(key)
        if prefix == "Accl" and isinstance(self, RMSprop):
            return "Accl3"
        # SGD's separate variant (the default) keeps its velocity in Accl1, the combined one in
        # Accl (popart/patterns/sgd2decompose.cpp:58-62, sdk/poplar/3.4.0)
        if prefix == "Accl" and not getattr(self, "use_combined_accum", False):
            return "Accl1"
        return prefix

    def _named_state(self) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        for p, name in self._device_names.items():
            for key, value in (self.state.get(p) or self._initial_state(p)).items():
                prefix = self._prefix(key)
                if prefix and isinstance(value, torch.Tensor):
                    out[f"{prefix}___{name}"] = value.detach().clone()
        out.update({key: value.clone() for key, value in self._device_extra.items()})
        return out

    def _initial_state(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The accumulators PopART creates at compilation, before the first update (torch
        creates its own lazily at the first step): zero moments, RMSpropTF's squares at one."""
        defaults = self.defaults
        if isinstance(self, (torch.optim.Adam, torch.optim.AdamW, LAMB)):
            return {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        group = next((g for g in self.param_groups if any(p is q for q in g["params"])), defaults)
        if isinstance(self, RMSprop):  # torch's layout (RMSpropTF: backends/optimizers.py:62-64)
            start = torch.ones_like(p) if self.use_tf_variant else torch.zeros_like(p)
            state = {"square_avg": start}
            if self.use_tf_variant or group.get("momentum", 0) > 0:
                state["momentum_buffer"] = torch.zeros_like(p)
            if group.get("centered"):
                state["grad_avg"] = torch.zeros_like(p)
            return state
        return {"momentum_buffer": torch.zeros_like(p)} if optim_device.has_momentum(self, group) else {}

    def _named_params(self) -> Dict[str, torch.Tensor]:
        """The hyper-parameters as PopART names them, per parameter, with any loaded through
        ipu_param in place. SGD's are PopART's compound scalars (optim_device.sgd_scalars;
        tests/optimizers_test.py:1245-1258 checks scaledLearningRate0 and
        weightDecayScaleFactor0)."""
        out: Dict[str, torch.Tensor] = {}
        for group in self.param_groups:
            if isinstance(self, torch.optim.SGD):
                values = optim_device.sgd_scalars(self, group, self.loss_scaling)
            else:
                values = {"learningRate": group["lr"], "weightDecay": group.get("weight_decay", 0.0)}
            for p in group["params"]:
                name = self._device_names.get(p)
                for key, value in values.items() if name is not None else ():
                    out[f"{key}{optim_device.SPECIFIC}{name}"] = torch.tensor(float(value))
        out[optim_device.LOSS_SCALING] = torch.tensor(self.loss_scaling)
        return {**out, **(self._device_params or {})}


def _given(**kwargs):
    return {k: v for k, v in kwargs.items() if v is not None}


class SGD(_PopTorchExtras, torch.optim.SGD):
    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: Optional[float] = None,
        dampening: Optional[float] = None,
        weight_decay: Optional[float] = None,
        nesterov: Optional[bool] = None,
        maximize: Optional[bool] = None,
        foreach: Optional[bool] = None,
        differentiable: Optional[bool] = None,
        loss_scaling: Optional[float] = None,
        velocity_scaling: Optional[float] = None,
        use_combined_accum: Optional[bool] = None,
        accum_type: Optional[torch.dtype] = None,
        velocity_accum_type: Optional[torch.dtype] = None,
        max_grad_norm: Optional[float] = None,
    ) -> None:
        variables = _variables(locals())
        torch.optim.SGD.__init__(
            self,
            params,
            lr=lr,
            **_given(
                momentum=momentum,
                dampening=dampening,
                weight_decay=weight_decay,
                nesterov=nesterov,
                maximize=maximize,
                foreach=foreach,
                differentiable=differentiable,
            ),
        )
        self._set_extras(loss_scaling, accum_type, max_grad_norm, velocity_accum_type=velocity_accum_type)
        self.velocity_scaling = 1.0 if velocity_scaling is None else float(velocity_scaling)
        self.use_combined_accum = use_combined_accum
        self._track_variables(variables)


class AdamW(_PopTorchExtras, torch.optim.AdamW):
    def __init__(
        self,
        params: Iterable,
        lr: Optional[float] = None,
        betas: Optional[Tuple[float, float]] = None,
        eps: Optional[float] = None,
        weight_decay: Optional[float] = None,
        amsgrad: Optional[bool] = None,
        maximize: Optional[bool] = None,
        foreach: Optional[bool] = None,
        capturable: Optional[bool] = None,
        differentiable: Optional[bool] = None,
        fused: Optional[bool] = None,
        loss_scaling: Optional[float] = None,
        bias_correction: Optional[bool] = None,
        accum_type: Optional[torch.dtype] = None,
        first_order_momentum_accum_type: Optional[torch.dtype] = None,
        second_order_momentum_accum_type: Optional[torch.dtype] = None,
        max_grad_norm: Optional[float] = None,
    ) -> None:
        variables = _variables(locals())
        # Recorded only: PopTorch 3.4 maps AdamW(bias_correction=False) to ADAMW_NO_BIAS but then
        # builds PopART's AdamMode::Adam for it all the same, bias-corrected (popart_compiler/
        # source/CompilerImpl.cpp:869-882: only LAMB / LAMB_NO_BIAS change the mode).
        self.bias_correction = True if bias_correction is None else bool(bias_correction)
        torch.optim.AdamW.__init__(
            self,
            params,
            **_given(
                lr=lr,
                betas=betas,
                eps=eps,
                weight_decay=weight_decay,
                amsgrad=amsgrad,
                maximize=maximize,
                foreach=foreach,
                capturable=capturable,
                differentiable=differentiable,
                fused=fused,
            ),
        )
        self._set_extras(
            loss_scaling,
            accum_type,
            max_grad_norm,
            first_order_momentum_accum_type=first_order_momentum_accum_type,
            second_order_momentum_accum_type=second_order_momentum_accum_type,
        )
        self._track_variables(variables)


class Adam(_PopTorchExtras, torch.optim.Adam):
    def __init__(
        self,
        params: Iterable,
        lr: Optional[float] = None,
        betas: Optional[Tuple[float, float]] = None,
        eps: Optional[float] = None,
        weight_decay: Optional[float] = None,
        amsgrad: Optional[bool] = None,
        loss_scaling: Optional[float] = None,
        accum_type: Optional[torch.dtype] = None,
        first_order_momentum_accum_type: Optional[torch.dtype] = None,
        second_order_momentum_accum_type: Optional[torch.dtype] = None,
        max_grad_norm: Optional[float] = None,
        **torch_kwargs,
    ) -> None:
        variables = _variables(locals())
        torch.optim.Adam.__init__(
            self,
            params,
            **_given(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad),
            **torch_kwargs,
        )
        self._set_extras(
            loss_scaling,
            accum_type,
            max_grad_norm,
            first_order_momentum_accum_type=first_order_momentum_accum_type,
            second_order_momentum_accum_type=second_order_momentum_accum_type,
        )
        self._track_variables(variables)


class RMSprop(_PopTorchExtras, torch.optim.Optimizer):
    """torch's RMSprop, or with ``use_tf_variant=True`` the TensorFlow variant (RMSpropTF)."""

    _base: type = torch.optim.RMSprop  # the update rule: set by the two concrete classes below

    def __new__(cls, *args, use_tf_variant: Optional[bool] = None, **kwargs):
        return super().__new__(_RMSpropTF if use_tf_variant else _RMSpropTorch)

    def __init__(
        self,
        params: Iterable,
        lr: Optional[float] = None,
        alpha: Optional[float] = None,
        eps: Optional[float] = None,
        weight_decay: Optional[float] = None,
        momentum: Optional[float] = None,
        centered: Optional[bool] = None,
        loss_scaling: Optional[float] = None,
        accum_type: Optional[torch.dtype] = None,
        first_order_momentum_accum_type: Optional[torch.dtype] = None,
        second_order_momentum_accum_type: Optional[torch.dtype] = None,
        use_tf_variant: Optional[bool] = None,
        **torch_kwargs,
    ) -> None:
        variables = _variables(locals())
        args = _given(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum)
        self.use_tf_variant = self._base is RMSpropTF
        if self.use_tf_variant:
            if centered:
                raise NotImplementedError("RMSprop(use_tf_variant=True, centered=True) is not emulated")
            self._base.__init__(self, params, **args)
        else:
            self._base.__init__(self, params, **args, **_given(centered=centered), **torch_kwargs)
        self._set_extras(
            loss_scaling,
            accum_type,
            None,
            first_order_momentum_accum_type=first_order_momentum_accum_type,
            second_order_momentum_accum_type=second_order_momentum_accum_type,
        )
        self._track_variables(variables)


class _RMSpropTorch(RMSprop, torch.optim.RMSprop):
    _base = torch.optim.RMSprop
    step = torch.optim.RMSprop.step


class _RMSpropTF(RMSprop, RMSpropTF):
    _base = RMSpropTF
    step = RMSpropTF.step


class LAMB(_PopTorchExtras, torch.optim.Optimizer):
    """LAMB as PopTorch 3.4 defines it (python/optim.py:666-818): Adam's moments, the update
    m̂ / (sqrt(v̂) + eps) + weight_decay * w (m̂, v̂ bias-corrected unless bias_correction=False)
    scaled by the trust ratio min(|w|, max_weight_norm) / |update| (1 when either norm is zero).
    PopART takes max_weight_norm per group (python/_optimizer_attributes.py:189-190); so does
    the emulator, its default 65500 (fp16's largest) as PopTorch's."""

    def __init__(
        self,
        params: Iterable,
        lr: Optional[float] = None,
        betas: Optional[Tuple[float, float]] = None,
        eps: Optional[float] = None,
        weight_decay: Optional[float] = None,
        bias_correction: Optional[bool] = None,
        loss_scaling: Optional[float] = None,
        max_weight_norm: Optional[float] = None,
        accum_type: Optional[torch.dtype] = None,
        first_order_momentum_accum_type: Optional[torch.dtype] = None,
        second_order_momentum_accum_type: Optional[torch.dtype] = None,
    ) -> None:
        variables = _variables(locals())
        # python/optim.py:719-743: PopTorch's defaults
        defaults = dict(
            lr=1e-3 if lr is None else lr,
            betas=(0.9, 0.999) if betas is None else betas,
            eps=1e-8 if eps is None else eps,
            weight_decay=1e-2 if weight_decay is None else weight_decay,
            max_weight_norm=65500.0 if max_weight_norm is None else max_weight_norm,
        )
        torch.optim.Optimizer.__init__(self, params, defaults)
        self.bias_correction = True if bias_correction is None else bool(bias_correction)
        self.max_weight_norm = defaults["max_weight_norm"]
        self._set_extras(
            loss_scaling,
            accum_type,
            None,
            first_order_momentum_accum_type=first_order_momentum_accum_type,
            second_order_momentum_accum_type=second_order_momentum_accum_type,
        )
        self._track_variables(variables)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: Dict[str, Any]) -> None:
        state = self.state[p]
        if not state:
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        t = float(state["step"])
        beta1, beta2 = group["betas"]
        g, m, v = p.grad, state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        c1, c2 = (1 - beta1**t, 1 - beta2**t) if self.bias_correction else (1.0, 1.0)
        update = (m / c1) / (v.sqrt() / c2**0.5 + group["eps"]) + group["weight_decay"] * p
        weight_norm = p.norm().clamp(max=group["max_weight_norm"])
        update_norm = update.norm()
        zero = weight_norm == 0 or update_norm == 0
        trust = 1.0 if zero else float(weight_norm / update_norm)
        p.add_(update, alpha=-group["lr"] * trust)
