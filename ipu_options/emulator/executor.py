"""``trainingModel`` / ``inferenceModel``: the emulated PoplarExecutor.

One call of a training executor consumes a host batch of
micro_batch × deviceIterations × gradientAccumulation × replicationFactor samples, laid out as
PopART streams it: [deviceIterations, gradientAccumulation, replicas, micro_batch, ...]. For each
device iteration every replica runs its gradientAccumulation micro-batches one at a time — so
batch-norm statistics are those of one micro-batch, as on an IPU — and each replica keeps its own
norm running statistics (the host copy is replica 0's, as copyWeightsToHost returns). Gradients
are summed over micro-batches and replicas, divided by their number under ReductionType.Mean,
then one optimiser step is taken: deviceIterations weight updates per call.

Compiling (the first call, or ``compile``) traces one micro-batch through ``lowering.check_lowering``
and refuses, in PopTorch's words, what PopTorch 3.4 would refuse to lower; in training the loss
back-propagated is the one final loss that check finds (PopTorch's rule, not a marked output).
"""

import contextlib
from typing import Any, Callable, ContextManager, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from . import anchors, blocks, lowering, norms, optim_device, optim_snapshot, recompute, wrapping
from .custom_args import flatten_tensors, rebuild
from .enums import ConnectionType, MeanReductionStrategy, OutputMode, ReductionType
from .errors import RuntimeRefusal, ValueRefusal
from .inputs import ArgsParser, CompiledInputs
from .options import Options, ShardedExecution
from .precision import FP16_MAX, HalfKernels, round_half, stochastic_round_half

# PopTorch traces the model through PyTorch's dispatcher (poptorch/source/dispatch_tracer), so an
# IPU runs the traced graph's plain arithmetic and
# never a model's eager shortcuts (hand-written backwards, cached statistics). The emulator runs
# eagerly: whoever owns such a model registers the context that turns its shortcuts off
# (ipu_options does, for model/fast_paths.py), and every run of an executor enters them. This
# keeps the emulator free of any model.
_GRAPH_CONTEXTS: List[Callable[[], ContextManager]] = []


def register_graph_context(factory: Callable[[], ContextManager]) -> None:
    """Enter ``factory()`` around every run of every executor (once per factory)."""
    if factory not in _GRAPH_CONTEXTS:
        _GRAPH_CONTEXTS.append(factory)


_ON_IPU = [0]  # executors running (compiling or executing) now


@contextlib.contextmanager
def _running_on_ipu():
    _ON_IPU[0] += 1
    try:
        yield
    finally:
        _ON_IPU[0] -= 1


def isRunningOnIpu() -> bool:
    """True inside a model an executor runs, False outside (python/_impl.py:76-91, 3.4.0: true
    while PopTorch traces the model for the IPU)."""
    return _ON_IPU[0] > 0


def _as_traced_graph() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(_running_on_ipu())
    for factory in _GRAPH_CONTEXTS:
        stack.enter_context(factory())
    return stack


# PopTorch's words (SDK 3.4 user guide, "Pipelined execution"), quoted in our errors.
TRAINING_PIPELINE_RULE = (
    "You must set gradientAccumulation to be greater than or equal to the "
    "number of pipeline stages (forward and backward)."
)
INFERENCE_PIPELINE_RULE = (
    "you must set deviceIterations to be greater than or equal to the "
    "number of pipeline stages used by the model."
)

# Automatic loss scaling, after PopART's defaults (automaticLossScalingSettings): halve the scale
# when more than this proportion of fp16 gradients lie above this fraction of the fp16 maximum,
# double it otherwise, once per weight update.
ALS_BIN_EDGE = 0.125
ALS_UPPER_PROPORTION = 1e-7
ALS_MAX_SCALE = 2.0**24

_FIRST, _SECOND = "first_order_momentum_accum_type", "second_order_momentum_accum_type"
_STATE_TYPES = {"exp_avg": _FIRST, "momentum_buffer": _FIRST, "exp_avg_sq": _SECOND, "square_avg": _SECOND}


class BatchSizeError(ValueRefusal):
    pass


class PipelineError(ValueRefusal):
    pass


# Not PopTorch's rule but the emulator's: PopART trains on the final loss wherever it is in the
# graph; the emulator back-propagates from a tensor the forward returns.
LOSS_NOT_RETURNED = (
    "trainingModel (emulated): the model's final loss is not among its outputs; "
    "the emulator back-propagates from a returned tensor: return the loss "
    "(e.g. `return logits, loss`)"
)


def _add(a: Any, b: Any) -> Any:
    return rebuild(a, [x + y for x, y in zip(flatten_tensors(a), flatten_tensors(b))])


def _combine(pieces: List[Any]) -> Any:
    """Concatenate per-micro-batch outputs along the batch dimension (scalars are stacked), in
    the first one's structure, as PopTorch rebuilds its outputs (python/_poplar_executor.py:
    1298-1301 with python/_utils.py:120-137: containers keep their type, registered types go
    through their parser)."""
    columns = zip(*[flatten_tensors(p) for p in pieces])
    joined = [
        (col[0] if len(col) == 1 else torch.stack(col)) if col[0].dim() == 0 else torch.cat(col)
        for col in columns
    ]
    return rebuild(pieces[0], joined)


def _detached(out: Any, copy: bool) -> Any:
    """The run's outputs as the device returns them: new tensors in the model's structure."""
    return rebuild(out, [t.clone() if copy else t.detach() for t in flatten_tensors(out)])


class PoplarExecutor:
    def __init__(
        self,
        model: nn.Module,
        options: Optional[Options],
        training: bool,
        optimizer: Optional[torch.optim.Optimizer] = None,
    ):
        if training and wrapping.is_wrapped(model):  # python/__init__.py:703-708 (3.4.0)
            raise RuntimeError(
                "Model has already been wrapped in 'poptorch.trainingModel'. Call "
                "model.destroy() on the model to unwrap before wrapping again."
            )
        self.__dict__["_user_model"] = model  # before anything that could reach __getattr__
        if options is not None and not isinstance(options, Options):  # _poplar_executor.py:147-151
            raise ValueRefusal(
                f"Invalid type: 'options' is of type {type(options)} (Expected poptorch.Options)"
            )
        if options is not None:  # python/_poplar_executor.py:152-154: the user's are frozen,
            options._freeze()  # the executor works on its own copy (frozen too, line 244)
        self._options = options.clone() if options is not None else Options()
        if self._options.defaultOutputMode():  # python/_poplar_executor.py:163-176
            self._options.output_mode = OutputMode.Final if training else OutputMode.All
        for anchor in self._options.anchored_tensors.values():  # _poplar_executor.py:213-220
            if anchor[1]:  # no mode of its own: the outputs' (the one used anyway: anchors.py)
                anchor[2] = self._options.output_mode
                if anchor[2] == OutputMode.EveryN:
                    anchor[3] = self._options.output_return_period
        self._anchor_memory: Dict[str, Any] = {}  # each anchor's value after the last run
        self._loss_dtype = torch.float32  # the final loss's, as traced: finalLossScale's type
        self._options._freeze()
        self._training = training
        if training:
            if optimizer is None:
                optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        self._optimizer = optimizer
        self._compiled = False
        # What the device was given: the optimiser's hyper-parameters as they were at the last
        # setOptimizer (trainingModel calls it). Edits to param_groups after that do nothing.
        self._dict_optimizer: Optional[optim_snapshot.Snapshot] = None
        self.applied_lr: List[Tuple[float, ...]] = []  # each group's lr at every weight update
        self.runs = 0  # calls that executed (inference: the number of batches evaluated here)
        self._attached = False
        self._dirty_host_weights = False  # the device trained since the last copy to the host
        self._host_weights_version = 0
        self._device_weights: Optional[List[torch.Tensor]] = None  # inference: what the device holds
        # Training runs on the host model's tensors (the emulator's device copy), but PopTorch's
        # host copy only changes on copyWeightsToHost: the weights as the host last had them, and
        # each weight's (storage, version) after the last run to tell whether the user has
        # written to the host model since.
        self._stale_host: Optional[List[torch.Tensor]] = None
        self._after_run: List[Tuple[int, int]] = []
        self._running = False  # inside a run: the host model's hooks must not copy back
        self._inputs: Optional[CompiledInputs] = None  # what the executable was compiled for
        self._args_parser = ArgsParser(model.forward)  # before instrument() hooks forward
        self._replica_buffers: Optional[List[List[torch.Tensor]]] = None
        self._recomputation: Optional[recompute.Recomputation] = None
        self._loss_scale: Optional[float] = None
        self._loss_leaf: Optional[int] = None  # the final loss among the output's leaves
        self.stages: List[int] = []  # IPU of each forward pipeline stage, set by compile
        self.lowering: Optional[lowering.Lowering] = None  # what the compile-time check saw
        # each parameter's name in the model: PopART names the optimiser's tensors by it
        self._param_names = {p: n for n, p in model.named_parameters()}
        self._named_optimizer: Optional[torch.optim.Optimizer] = None  # the last setOptimizer's
        if training:
            # python/_poplar_executor.py:241-242 (3.4.0): the constructor calls setOptimizer.
            self.setOptimizer(optimizer)
            wrapping.instrument(model, self)

    def __getattr__(self, attr: str):
        """The wrapped model's attributes (python/_poplar_executor.py:480-510, 3.4.0), after
        copying trained weights back as the instrumented model does."""
        model = self.__dict__.get("_user_model")
        if model is None or attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(model, attr)

    # ------------------------------------------------------------------ PopTorch's surface
    @property
    def model(self) -> nn.Module:
        return self._user_model

    @property
    def options(self) -> Options:
        return self._options

    def isCompiled(self) -> bool:
        return self._compiled

    def isAttachedToDevice(self) -> bool:
        return self._attached

    def compile(self, *args: Any, **kwargs: Any) -> None:
        with _running_on_ipu(), self._channel_grouping():
            self._prepare(args, kwargs)
        self._optimizers_on_device()

    def _optimizers_on_device(self) -> None:
        """Compiled for a device that is online: the optimiser's state is read from it by name
        (python/optim.py:103-105 has_state, 3.4.0; an offline target never fills it)."""
        if not (self._training and self._compiled) or self._options.offline_ipu_version is not None:
            return
        # automatic loss scaling keeps its factor with the optimiser's state: PopART's
        # lossScaleUpdateFactor, ones of the loss scale's type at first (popart willow/src/
        # tensor.cpp:1071-1073; transforms/automaticlossscaling.cpp:923-924)
        factor = None
        if self._automatic_loss_scaling() and self._loss_scale is not None:
            ratio = self._loss_scale / self._dict_optimizer.loss_scaling
            factor = {"lossScaleUpdateFactor": torch.tensor(ratio, dtype=self._loss_dtype)}
        for opt in {id(o): o for o in (self._optimizer, self._named_optimizer)}.values():
            if hasattr(opt, "device_names"):
                opt.device_names(self._param_names, factor)

    def _channel_grouping(self):
        """Group norm's channel grouping as the PopART options select it (norms.py)."""
        return norms.channel_grouping(self._options._Popart.options)

    def setOptimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Hand the optimiser's hyper-parameters (lr, momentum, …, loss_scaling) to the device, as
        a snapshot: python/_poplar_executor.py:631-668 (3.4.0) converts the optimiser to its
        attribute dict here (convertOptimizerToDict) and compilation and every later update use
        that dict, so editing ``param_groups`` without calling setOptimizer again changes nothing.
        The optimiser state already on the device stays (a new optimiser without state does not
        overwrite it)."""
        if not self._training:
            raise RuntimeError("setOptimizer is only valid for a trainingModel")
        if len(optimizer.param_groups) != len(self._optimizer.param_groups):
            raise ValueError("setOptimizer: the new optimizer must have the same parameter groups")
        snapshot = optim_snapshot.take(optimizer, self._options, self._compiled)
        if snapshot != self._dict_optimizer:  # new values overwrite every loaded scalar
            for opt in (self._named_optimizer, optimizer):
                getattr(opt, "forget_device_params", lambda: None)()
        self._dict_optimizer = snapshot
        self._named_optimizer = optimizer
        if self._compiled:
            self._optimizers_on_device()
        if self._loss_scale is not None and not self._options.Training.automatic_loss_scaling:
            self._loss_scale = self._dict_optimizer.loss_scaling

    def copyWeightsToHostIfNeeded(self) -> bool:
        """Copy back only when the device changed the weights since the last copy (PopTorch)."""
        if not self._dirty_host_weights or self._running:
            return False
        self.copyWeightsToHost()
        return True

    def copyWeightsToHost(self) -> None:
        """Device → host: the trained parameters and replica 0's buffers
        (python/_poplar_executor.py:555-573, 3.4.0)."""
        self._dirty_host_weights = False
        self._host_weights_version += 1  # python/_poplar_executor.py:573 (3.4.0)
        self._stale_host = None
        if self._replica_buffers is not None:
            with torch.no_grad():
                for buf, value in zip(self._user_model.buffers(), self._replica_buffers[0]):
                    buf.copy_(value)

    def copyWeightsToDevice(self) -> None:
        """Host → device. An inference executable keeps its own copy of the weights (what it
        runs with): written on attach, by this call, and — when its model is also a
        trainingModel's — after that model's weights were copied to the host
        (python/_poplar_executor.py:414-417 and 1245-1262, sdk/poptorch/3.4.0). A host model
        changed in place after that (e.g. other weights loaded into it) runs with the old weights
        until copyWeightsToDevice, as on an IPU. A training executable whose trained weights
        were never copied back (nothing touched the host model since) gets the host's older
        weights back over the trained ones, as PopTorch writes them
        (python/_poplar_executor.py:577-598)."""
        if not self._training:
            self._device_weights = [t.detach().clone() for t in self._weight_tensors()]
            self._reset_replica_buffers()
            return
        if (
            self._dirty_host_weights
            and self._stale_host is not None
            and self._fingerprint() == self._after_run
        ):
            with torch.no_grad():
                for t, old in zip(self._weight_tensors(), self._stale_host):
                    t.copy_(old)
        self._dirty_host_weights = False  # python/_poplar_executor.py:584-585
        self._stale_host = None
        self._reset_replica_buffers()

    def copyNamedBuffersToDevice(self) -> None:
        """Host → device for the buffers ``Options.updatableNamedBuffers`` names, on every
        replica; the device's other weights stay (python/_poplar_executor.py:600-629,
        popart_compiler/source/Compiler.cpp:1088-1101). Like PopTorch it reads the host's buffers
        without copying trained weights back first (line 612-613), but leaves that copy pending
        where PopTorch drops it."""
        quiet, self._running = self._running, True  # the host model's hooks stay silent
        try:
            model = self._user_model
            chosen = anchors.named_buffers_to_write(self._options, model, self._compiled)
            names = [name for name, _ in model.named_buffers()]
            offset = len(list(model.parameters()))
        finally:
            self._running = quiet
        with torch.no_grad():
            for name, value in chosen.items():
                index = names.index(name)
                for replica in self._replica_buffers or []:
                    replica[index].copy_(value)
                if self._device_weights is not None:  # inference: the executable's own copy
                    self._device_weights[offset + index].copy_(value)

    def getAnchoredTensor(self, short_name: str) -> torch.Tensor:
        """An anchored tensor's value in the last run (python/_poplar_executor.py:538-541)."""
        assert short_name in self._anchor_memory, "No tensor with name " + short_name + " found."
        return self._anchor_memory[short_name]

    def _reset_replica_buffers(self) -> None:
        """Every replica starts again from the host's buffers."""
        if self._replica_buffers is not None:
            self._replica_buffers = [
                [b.detach().clone() for b in self._user_model.buffers()] for _ in self._replica_buffers
            ]

    def _fingerprint(self) -> List[Tuple[int, int]]:
        return [(t.data_ptr(), t._version) for t in self._weight_tensors()]

    def detachFromDevice(self) -> None:
        if not self._attached:
            raise RuntimeRefusal("Device is not attached")  # _poplar_executor.py:1560 (3.4.0)
        self.copyWeightsToHostIfNeeded()
        self._attached = False

    def attachToDevice(self) -> None:
        if not self._compiled:
            raise RuntimeError("Cannot attach a model that has not been compiled")
        self._check_online("Trying to attach to an offline device (ConnectionType.Never)")
        self._attached = True
        if not self._training:  # _on_device_attach uploads the weights (_poplar_executor.py:414-417)
            self.copyWeightsToDevice()

    def _check_online(self, message: str) -> None:
        # ConnectionType.Never (useOfflineIpuTarget sets it): PopTorch compiles for an IPU it
        # never connects to (python/_poplar_executor.py:1232-1235 and 1576-1578 assert)
        if self._options.connection_type == ConnectionType.Never:
            raise AssertionError(message)

    def destroy(self) -> None:
        if self._attached:
            self.detachFromDevice()
        if self._recomputation is not None:
            self._recomputation.remove()
            self._recomputation = None
        if self._training:
            self.copyWeightsToHostIfNeeded()  # python/_poplar_executor.py:1482-1500 (3.4.0)
            wrapping.unwrap(self._user_model)
        self._compiled = False

    def __call__(self, *args, **kwargs):
        # An IPU runs the traced graph's plain arithmetic, never the model's eager fast paths
        # (hand-written backwards, batch norm folded into convs, cached proxy statistics).
        self._check_online(
            "Trying to run a model on an offline device (ConnectionType.Never): "
            "use model.compile(inputs) instead of model(inputs)"
        )
        # python/_poplar_executor.py:1238 parses every call, before compiling; line 1264
        # validates a compiled executable's inputs
        parsed = self._args_parser(args, kwargs)
        with _as_traced_graph(), self._channel_grouping():
            if not self._compiled:
                self._prepare(args, kwargs)
            else:
                self._inputs.validate(parsed)
            if not self._attached:
                self.attachToDevice()
            self.runs += 1
            if not self._training:
                self._follow_training_weights()
                return self._infer(args, kwargs)
            self._optimizers_on_device()  # a loaded state goes to the device before the run
            self._running = True
            try:
                if not self._dirty_host_weights:  # what the host keeps while the device trains
                    self._stale_host = [t.detach().clone() for t in self._weight_tensors()]
                out = self._train(args, kwargs)
                self._after_run = self._fingerprint()
            finally:
                self._running = False
            self._dirty_host_weights = True
            self._optimizers_on_device()
            return out

    def _weight_tensors(self) -> List[torch.Tensor]:
        """Parameters then buffers, read without the host model's copy-back hook."""
        quiet, self._running = self._running, True
        try:
            return list(self._user_model.parameters()) + list(self._user_model.buffers())
        finally:
            self._running = quiet

    def _follow_training_weights(self) -> None:
        """An inference executable of a trainingModel's module picks up the trained weights
        (python/_poplar_executor.py:1245-1262): copy them to the host if the device changed
        them, and to this executable when the host's version moved on."""
        trainer = wrapping.executor_of(self._user_model)
        if trainer is None:
            return
        trainer.copyWeightsToHostIfNeeded()
        if self._host_weights_version != trainer._host_weights_version:
            self.copyWeightsToDevice()
            self._host_weights_version = trainer._host_weights_version

    # ------------------------------------------------------------------ batching
    def _factors(self) -> Tuple[int, int, int]:
        o = self._options
        ga = o.Training.gradient_accumulation if self._training else 1
        if not self._training and o.Training.gradient_accumulation != 1:
            raise ValueError("When running an inferenceModel, you must set gradientAccumulation to 1")
        return o.device_iterations, ga, o.replication_factor

    def _micro(self, args, kwargs):
        """(get(d, g, r) → (args, kwargs) of one micro-batch, micro-batch size)."""
        di, ga, reps = self._factors()
        n = di * ga * reps
        # a registered type's tensors too (python/_utils.py:94-111)
        tensors = flatten_tensors((args, kwargs))
        sizes = {t.shape[0] for t in tensors if t.dim() > 0}
        if n == 1:
            # Nothing to split: one run of the graph on the inputs as given, whatever their first
            # dimensions (no inputs, scalars, an LSTM's sequence beside its state), as PopTorch
            # compiles and runs them (tests/inputs_test.py, test_no_inputs_no_output; norms_test.py,
            # test_norm_in_loop; half_test.py, test_lstm, sdk/poptorch/3.4.0)
            return (lambda d, g, r: rebuild((args, kwargs), tensors)), max(sizes, default=0)
        if not sizes:
            raise BatchSizeError(
                f"the model's inputs have no batch dimension to split into the "
                f"{n} micro-batches of deviceIterations × gradientAccumulation × "
                f"replicationFactor"
            )
        if len(sizes) > 1:
            raise BatchSizeError(f"the inputs' batch dimensions differ: {sorted(sizes)}")
        size = sizes.pop()
        if size % n:
            raise BatchSizeError(
                f"host batch of {size} samples is not micro_batch × deviceIterations ({di}) × "
                f"gradientAccumulation ({ga}) × replicationFactor ({reps}) = micro_batch × {n}: "
                f"feed a multiple of {n} samples (poptorch.DataLoader does this for you)"
            )
        micro = size // n

        def get(d: int, g: int, r: int) -> Tuple[Any, Any]:
            # the graph's inputs are new structures (python/_poplar_executor.py:1007-1024 traces
            # a rebuilt view): what the model does to them is not seen by the caller's objects
            start = ((d * ga + g) * reps + r) * micro
            return rebuild((args, kwargs), [t[start : start + micro] if t.dim() > 0 else t for t in tensors])

        return get, micro

    # ------------------------------------------------------------------ compile: stages, checks
    def _precision_mode(self, inputs: Any = ()):
        """fp16 kernels (precision.HalfKernels) when the model or an input is fp16; PopTorch
        also resolves a conv/linear/norm's weights to its input's type there."""
        model = self._user_model
        # The precision mark sits on the network, which the user's model may wrap (e.g. with its loss).
        half = (
            any(getattr(m, "_ipu_precision", "32.32") != "32.32" for m in model.modules())
            or any(p.dtype == torch.half for p in model.parameters())
            or any(t.dtype == torch.half for t in flatten_tensors(inputs))
        )
        return HalfKernels() if half else contextlib.nullcontext()

    def _prepare(self, args, kwargs) -> None:
        """Compile: trace one micro-batch as PopTorch does (its graph, in the caller's grad mode,
        without the eager fast paths), refuse what PopTorch would refuse, then set up replicas."""
        if self._options._Popart.options.get("instrumentWithHardwareCycleCounter"):
            # the emulator is an IPU model: popart_compiler/source/CompilerImpl.cpp:640-645,
            # 1290-1293 (3.4.0) refuse cycle counting on anything but IPU hardware
            raise RuntimeRefusal("Cycle count logging is only supported on actual IPU hardware.")
        get, _ = self._micro(args, kwargs)
        self._inputs = CompiledInputs(self._args_parser(args, kwargs))
        anchors.check_named_buffers(self._options, self._user_model)
        a, k = get(0, 0, 0)
        model = self._user_model
        # Each module's train/eval mode is the user's: PopTorch traces the model as it is and
        # never calls train() or eval() (python/__init__.py:672-676 and 729-732, 3.4.0).
        buffers = [b.detach().clone() for b in model.buffers()]
        rng = torch.get_rng_state()
        blocks.start_trace()
        try:
            with _as_traced_graph(), self._precision_mode((a, k)):
                report, traced = lowering.check_lowering(model, a, k, training=self._training)
        finally:
            trace = blocks.stop_trace()
            torch.set_rng_state(rng)
            changed = [name for (name, b), v in zip(model.named_buffers(), buffers) if not torch.equal(b, v)]
            with torch.no_grad():
                for b, v in zip(model.buffers(), buffers):
                    b.copy_(v)
        report.raise_if_refused()
        if self._training and report.loss_leaf is None:
            raise RuntimeError(LOSS_NOT_RETURNED)
        self.lowering, self._loss_leaf = report, report.loss_leaf
        if self._training:
            self._loss_dtype = tree_flatten(traced)[0][report.loss_leaf].dtype
        trainable = self._trainable() if self._training else []
        scaling = self._training and self._automatic_loss_scaling()
        anchors.check_anchors(self._options, model, trainable, self._training, scaling)
        self.stages = self._check_stages(trace)
        self._check_buffer_updates(changed)
        if self._training and self._recomputation is None:
            self._recomputation = recompute.install(model, pipelined=len(self.stages) > 1)
        reps = self._options.replication_factor
        self._replica_buffers = [[b.detach().clone() for b in model.buffers()] for _ in range(reps)]
        if self._training and self._loss_scale is None:
            self._loss_scale = self._dict_optimizer.loss_scaling
        self._compiled = True

    def _check_buffer_updates(self, changed: List[str]) -> None:
        """PopTorch cannot broadcast buffers that the model updates in place (batch norm's running
        statistics in training) to several replicas: it stops the compilation, training and
        inference alike (poptorch/source/InplaceOps.cpp:228-233, with replicas_needing_broadcast
        = hasInputReplication() && broadcastBuffers(), LowerToPopartFactories.cpp:41-43)."""
        if not (self._options.replication_factor > 1 and self._options.broadcast_buffers):
            return
        if changed:
            raise RuntimeRefusal(
                "PopTorch does not support broadcasting buffers. If your model is able to tolerate "
                "buffers becoming out of sync between replicas, you can disable buffer broadcasting "
                f"using poptorch.Options.broadcastBuffers(False). (buffers updated in place: "
                f"{', '.join(changed[:3])})"
            )

    def _check_stages(self, trace) -> List[int]:
        stages = [0]
        for _, ipu in trace:
            if ipu != stages[-1]:
                stages.append(ipu)
        if any(b < a for a, b in zip(stages, stages[1:])):
            raise PipelineError(
                f"pipeline stages run on IPUs {stages} in model order; the emulator (like a "
                f"sensible PopTorch pipeline) needs contiguous stages with non-decreasing IPU "
                f"indices: give later modules equal or higher ipu_id"
            )
        count = len(stages)
        di, ga, _ = (self._options.device_iterations, self._options.Training.gradient_accumulation, 1)
        # Only pipelining needs a batch per stage: popart_compiler/source/Compiler.cpp:675-702
        # checks under ExecutionMode::Pipelined alone, which ShardedExecution is not (it sends
        # execution_mode 1, python/options.py:945-946; CompilerOptions.hpp:19)
        if isinstance(self._options.execution_strategy, ShardedExecution):
            return stages
        if count > 1 and self._training and ga < 2 * count - 1:
            raise PipelineError(
                f"{count} forward pipeline stages make {2 * count - 1} stages in training, but "
                f'gradientAccumulation is {ga}. PopTorch: "{TRAINING_PIPELINE_RULE}" Set '
                f"gradient accumulation (train.grad_accum) to at least {2 * count - 1}."
            )
        if count > 1 and not self._training and di < count:
            raise PipelineError(
                f'{count} pipeline stages but deviceIterations is {di}. PopTorch: "When running an '
                f'inference model with PipelinedExecution, {INFERENCE_PIPELINE_RULE}" Set '
                f"ipu.device_iterations to at least {count}."
            )
        return stages

    # ------------------------------------------------------------------ execution
    def _load_replica(self, r: int) -> None:
        with torch.no_grad():
            for buf, value in zip(self._user_model.buffers(), self._replica_buffers[r]):
                buf.copy_(value)

    def _save_replica(self, r: int) -> None:
        with torch.no_grad():
            for value, buf in zip(self._replica_buffers[r], self._user_model.buffers()):
                value.copy_(buf)

    def _train(self, args, kwargs):
        di, ga, reps = self._factors()
        get, _ = self._micro(args, kwargs)
        model, opt = self._user_model, self._optimizer
        params = self._trainable()
        accum_half = getattr(opt, "accum_type", torch.float32) == torch.float16
        running = self._running_mean()
        outputs: List[List[List[Any]]] = [[[None] * reps for _ in range(ga)] for _ in range(di)]
        # Gradients the host model holds (from a CPU backward) are not the device's: set them
        # aside for the run and give them back after.
        host_grads = {p: p.grad for p in model.parameters()}
        for p in host_grads:
            p.grad = None
        values = anchors.AnchorValues(self._options, self._param_names, di, ga, reps)
        try:
            self._run_steps(get, params, outputs, accum_half, running, values)
        finally:
            for p, grad in host_grads.items():
                p.grad = grad
        self._load_replica(0)
        # the anchors come back after the outputs, gathered as they are (anchors.py)
        self._anchor_memory = values.gathered(lambda per_micro: self._gather(per_micro, di, ga, reps))
        return self._gather(outputs, di, ga, reps)

    def _trainable(self) -> List[nn.Parameter]:
        return [p for g in self._optimizer.param_groups for p in g["params"] if p.requires_grad]

    def _run_steps(self, get, params, outputs, accum_half: bool, running: bool, values) -> None:
        di, ga, reps = self._factors()
        model = self._user_model
        for d in range(di):
            acc: Dict[nn.Parameter, torch.Tensor] = {}
            scale = self._backward_scale()
            for r in range(reps):
                self._load_replica(r)
                replica: Dict[nn.Parameter, torch.Tensor] = {}
                counts: Dict[nn.Parameter, int] = {}
                for g in range(ga):
                    a, k = get(d, g, r)
                    with self._precision_mode((a, k)):
                        out = model(*a, **k)
                        loss = tree_flatten(out)[0][self._loss_leaf]
                        # a loss no trainable weight reaches has no gradient: PopTorch trains
                        # such a model anyway (tests/misc_nn_layers_test.py:174-204, 3.4.0)
                        if loss.requires_grad:
                            (loss * scale if scale != 1.0 else loss).backward()
                    values.gradients(d, g, r, params)
                    for p in params:
                        if p.grad is None:
                            continue
                        grad = p.grad.float()
                        seen = counts.get(p, 0)
                        if p not in replica:
                            replica[p] = grad
                        elif running:
                            # PopART's Mean accumulation (popx/op/accumulatex.cpp:137-146,
                            # sdk/poplar/3.4.0): b = 1/(counter+1), accum = (1-b)·accum + b·grad
                            b = 1.0 / (seen + 1)
                            replica[p] = replica[p] * (1.0 - b) + grad * b
                        else:
                            replica[p] = replica[p] + grad
                        counts[p] = seen + 1
                        if accum_half:
                            replica[p] = round_half(replica[p])
                        p.grad = None
                    outputs[d][g][r] = _detached(out, copy=False)
                self._save_replica(r)
                for p, grad in replica.items():  # the replicas' reduction
                    acc[p] = grad if p not in acc else acc[p] + grad
                    if accum_half:
                        acc[p] = round_half(acc[p])
            # Running: each replica's accumulator is already its micro-batches' mean
            self._update(params, acc, reps if running else ga * reps)
            values.step(d, reps, params, scale, self._loss_dtype)

    def _device_params(self) -> Optional[Dict[str, torch.Tensor]]:
        """The scalars loaded through the device's optimiser's ipu_param (optim_device)."""
        return getattr(self._named_optimizer, "device_params", lambda: None)()

    def _backward_scale(self) -> float:
        """A loaded lossScaling_FLOAT scales the loss (the loss's gradient starts at that tensor:
        popart transforms/autodiff/gradgrowerloss.cpp:50-55, sdk/poplar/3.4.0); the optimiser's
        own scalars still unscale by the value they were built with (compoundscalarhelper.cpp:
        146-155), so the emulator's update divides by the snapshot's."""
        loaded = (self._device_params() or {}).get(optim_device.LOSS_SCALING)
        return self._loss_scale if loaded is None else float(loaded)

    def _running_mean(self) -> bool:
        training = self._options.Training
        return (
            training.accumulation_and_replication_reduction_type == ReductionType.Mean
            and training.mean_reduction_strategy == MeanReductionStrategy.Running
        )

    def _update(self, params: List[nn.Parameter], acc: Dict[nn.Parameter, torch.Tensor], count: int) -> None:
        opt = self._optimizer
        divisor = self._loss_scale
        if self._options.Training.accumulation_and_replication_reduction_type == ReductionType.Mean:
            divisor *= count
        if self._automatic_loss_scaling():
            # the statistic is taken on the mean scaled fp16 gradient of a micro-batch
            scaled = list(acc.values())
            finite = all(bool(torch.isfinite(g).all()) for g in scaled)
            edge = ALS_BIN_EDGE * FP16_MAX * count
            total = sum(g.numel() for g in scaled)
            upper = sum(int((g.abs() > edge).sum()) for g in scaled)
            grow = finite and upper <= ALS_UPPER_PROPORTION * total
            if grow:
                self._loss_scale = min(self._loss_scale * 2.0, ALS_MAX_SCALE)
            else:
                self._loss_scale = max(self._loss_scale / 2.0, 1.0)
            if not finite:
                return  # the scaled gradients overflowed: no update with this scale
        half_params = [p for p in params if p.dtype == torch.half]
        for p in half_params:  # update in fp32, store in fp16 (rounded, stochastically if enabled)
            p.data = p.data.float()
        for p in params:
            if p in acc:
                p.grad = acc[p] / divisor
        snapshot = self._dict_optimizer  # what setOptimizer gave the device, not param_groups now
        max_norm = snapshot.max_grad_norm
        if max_norm and max_norm != float("inf"):
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
        with snapshot.applied(opt):
            optim_device.step(opt, self._device_params(), self._param_names, snapshot.loss_scaling)
        self.applied_lr.append(snapshot.lrs())
        stochastic = self._options.Precision.stochastic_rounding
        with torch.no_grad():
            for p in half_params:
                p.grad = None
                p.data = (stochastic_round_half(p.data) if stochastic else p.data).half()
            for p in params:
                for key, value in opt.state.get(p, {}).items():
                    kind = _STATE_TYPES.get(key)
                    if (
                        kind
                        and getattr(opt, "state_types", {}).get(kind) == torch.float16
                        and isinstance(value, torch.Tensor)
                    ):
                        value.copy_(round_half(value))
        for p in params:
            p.grad = None

    def _automatic_loss_scaling(self) -> bool:
        return self._options.Training.automatic_loss_scaling and not isinstance(
            self._precision_mode(), contextlib.nullcontext
        )

    @property
    def loss_scale(self) -> float:
        """The loss scale in use (changes under automatic loss scaling)."""
        return self._loss_scale if self._loss_scale is not None else 1.0

    def _infer(self, args, kwargs):
        di, _, reps = self._factors()
        get, _ = self._micro(args, kwargs)
        outputs = [[[None] * reps] for _ in range(di)]
        host = self._weight_tensors()
        kept = [t.data for t in host]
        try:
            for t, on_device in zip(host, self._device_weights):  # run with the device's copy
                t.data = on_device
            with torch.no_grad(), self._precision_mode((args, kwargs)):
                for d in range(di):
                    for r in range(reps):
                        # each replica its own buffers (broadcastBuffers(False); with broadcast
                        # buffers PopTorch refuses in-place updates: _check_buffer_updates)
                        self._load_replica(r)
                        a, k = get(d, 0, r)
                        # copies, as the device's outputs are: a returned buffer is not the buffer
                        outputs[d][0][r] = _detached(self._user_model(*a, **k), copy=True)
                        self._save_replica(r)
            self._load_replica(0)
        finally:
            for t, data in zip(host, kept):
                t.data = data
        return self._gather(outputs, di, 1, reps)

    def _gather(self, outputs, di: int, ga: int, reps: int):
        mode = self._options.output_mode
        if mode == OutputMode.Default:
            mode = OutputMode.Final if self._training else OutputMode.All
        if mode == OutputMode.All:
            pieces = [outputs[d][g][r] for d in range(di) for g in range(ga) for r in range(reps)]
        elif mode == OutputMode.Final:
            pieces = [outputs[di - 1][ga - 1][r] for r in range(reps)]
        elif mode == OutputMode.Sum:
            pieces = []
            for r in range(reps):
                seq = [outputs[d][g][r] for d in range(di) for g in range(ga)]
                total = seq[0]
                for other in seq[1:]:
                    total = _add(total, other)
                pieces.append(total)
        else:  # EveryN: the last micro-batch of every N-th device iteration
            n = self._options.output_return_period
            pieces = [outputs[d][ga - 1][r] for d in range(di) if (d + 1) % n == 0 for r in range(reps)]
            if not pieces:
                raise ValueError(
                    f"EveryN with output_return_period={n} > deviceIterations={di} returns nothing"
                )
        return _combine(pieces)


def trainingModel(
    model: nn.Module, options: Optional[Options] = None, optimizer: Optional[torch.optim.Optimizer] = None
) -> PoplarExecutor:
    if isinstance(model, PoplarExecutor):
        model = model.model
    return PoplarExecutor(model, options, training=True, optimizer=optimizer)


def inferenceModel(model: nn.Module, options: Optional[Options] = None) -> PoplarExecutor:
    if isinstance(model, PoplarExecutor):
        model = model.model
    return PoplarExecutor(model, options, training=False)


def ipuHardwareIsAvailable(num_ipus: int = 1) -> bool:
    return False
