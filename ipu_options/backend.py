"""``PopTorchBackend``: the training loop's backend for ``--device ipu`` and ``--device ipu-model``.

  --device ipu        real PopTorch on IPU hardware; refuses (with the reason and the fix) when
                      PopTorch does not import or no IPUs are visible.
  --device ipu-model  the SDK's IPU Model when PopTorch is installed (no replication there),
                      otherwise the project's PopTorch emulator (CPU, or CUDA when present).
Both ipu-model flavours are emulations: the backend says which runs and its results are labelled
emulated. Every configuration check (batch factors, split names, pipeline accumulation rule,
estimated memory) runs in the constructor, before data, model or compilation.

The loop's model stays the host copy (fp32, for checkpoints and EMA); the backend runs a device
copy with the IPU precision, the pipeline/recomputation annotations and a PopTorch optimiser,
and copies weights back in ``sync_to_host``. The optimiser's state lives on the device: a
checkpoint holds it in PopTorch's own format (``state_dict``), the only one PopTorch loads back.

Training returns the loss only (one scalar per replica under the default ``ipu.output_mode=sum``),
never per-sample tensors. The learning rate reaches the device through ``setOptimizer`` whenever
it changes, compiled or not: PopTorch reads the optimiser only there and in ``trainingModel``
(python/_poplar_executor.py:241-242, 631-668, sdk/poptorch/3.4.0), so the first step, and the first
after a resume, run at the schedule's rate.

Every evaluation runs on the device through one inference model (``evaluating``/``evaluate``):
a device-precision copy of the network whose weights are loaded from the training weights (after
``sync_to_host``), the EMA copy or a checkpoint, then copied to the device with
``copyWeightsToDevice`` — PopTorch uploads an inference model's weights on attach and afterwards
only on that call (python/_poplar_executor.py:414-417, 577-598, 1245-1262). One inference
executable per input shape (a compiled PopTorch executable has fixed input shapes); batch-norm
recalibration statistics run as a second inference graph (backends/batch_norm_stats.py).
"""

import contextlib
import copy
import sys
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from backends.batch_norm_stats import BatchNormProbe, Statistics, split_statistics
from backends.contract import Backend, BackendError
from backends.process import all_reduce_mean
from backends.specs import BatchPlan, DeviceSpec, ModelSpec, OptimSpec
from ipu_options import EMULATED, IMPORT_ERROR, poptorch
from ipu_options.optimizer import build_ipu_optimizer, device_groups
from ipu_options.options import build_options, check_norm_grouping
from ipu_options.pipeline import SplitError, annotate, num_ipus
from ipu_options.planning import PlanError, resolve_pipeline
from ipu_options.precision import apply_precision
from ipu_options.specs import IpuSpec


class _LossOnly(nn.Module):
    """What the training executable runs: the classifier's loss, without the logits (no per-sample
    tensor is streamed to the host)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: Tensor, targets: Tensor) -> Tensor:
        return self.classifier(images, targets)[1]


def _describe(poptorch_emulated: bool, device: str, compute: torch.device) -> str:
    if device == "ipu":
        return "IPU hardware (PopTorch)"
    if poptorch_emulated:
        return f"PopTorch emulator on {compute.type.upper()} (ipu_options.emulator; emulated, not an IPU)"
    return "Poplar SDK IPU Model (emulated IPU, not hardware)"


class PopTorchBackend(Backend):
    """``device_spec``: the kind (ipu | ipu-model) and the emulator's host threads; ``ipu``: the
    PopTorch options, pipeline and memory settings; ``batch``: the run's sizes (its
    ``local_replicas`` are this process's replicas); ``optim`` and ``model``: what the device
    optimiser and the memory plan need. ``network`` builds the network the run trains (the
    application's ``network_builder``): called once on the meta device, for split names and the
    memory plan."""

    def __init__(
        self,
        device_spec: DeviceSpec,
        ipu: IpuSpec,
        batch: BatchPlan,
        optim: OptimSpec,
        model: ModelSpec,
        network: Callable[[], nn.Module],
    ):
        self.spec, self.optim_spec, self.poptorch, self.batch = ipu, optim, poptorch, batch
        kind = device_spec.kind
        self.use_ipu_model = kind == "ipu-model" and not EMULATED
        self.emulated = kind == "ipu-model"
        replicas = batch.local_replicas
        if kind == "ipu":
            if EMULATED:
                raise BackendError(
                    f"device=ipu needs PopTorch from the Poplar SDK 3.4 (Python 3.8, torch 2.0.1), which "
                    f"does not import here ({IMPORT_ERROR}). Enable the SDK (source "
                    f"poplar_sdk/enable) and install its poptorch wheel (requirements-ipu.txt), or run "
                    f"--device ipu-model (the emulator) or --device cpu/cuda"
                )
        elif self.use_ipu_model and replicas > 1:
            raise BackendError(
                "the SDK's IPU Model does not support replicated graphs: use "
                "train.replicas=1 with --device ipu-model, or IPU_OPTIONS_EMULATE=1 to run "
                "the project's emulator, which does"
            )
        try:
            self.network = self._meta_network(network)
            self.splits, self.recompute, self.plan = resolve_pipeline(self.network, model, ipu, batch, optim)
        except (PlanError, SplitError) as error:
            raise BackendError(f"invalid IPU configuration: {error}") from None
        try:
            check_norm_grouping(self.network, ipu)  # PopART's option is set from the spec
        except ValueError as error:
            raise BackendError(f"invalid IPU configuration: {error}") from None
        self.ipus = num_ipus(ipu, self.splits)
        if kind == "ipu" and not ipu.compile_only:
            needed = self.ipus * replicas
            if not poptorch.ipuHardwareIsAvailable(needed):
                raise BackendError(
                    f"device=ipu: no {needed} IPUs available ({self.ipus} per replica × "
                    f"{replicas} replicas); check gc-info / the V-IPU partition, use "
                    f"ipu.compile_only=true to compile offline, or --device ipu-model"
                )
        self.compute = torch.device("cuda" if EMULATED and torch.cuda.is_available() else "cpu")
        if EMULATED and device_spec.cpu_threads is not None:
            torch.set_num_threads(device_spec.cpu_threads)  # the emulator computes on the host
        self.device = torch.device("cpu")  # PopTorch takes host tensors; the emulator moves them
        self.name = "ipu" if kind == "ipu" else "ipu-model"
        self.description = _describe(EMULATED, kind, self.compute)
        stage_text = f", pipeline {self.splits}" if self.splits else ""
        print(
            f"IPU backend: {self.description}; {replicas} replica(s) × {self.ipus} IPU(s){stage_text}, "
            f"precision {ipu.precision}"
        )
        self.eval_iterations = max(batch.device_iterations, self.ipus)  # inference: DI >= stages
        self.compile_only = bool(ipu.compile_only)
        self.train_model = None
        self._lr: Optional[float] = None
        self._state_checked = self._device_state_loaded = False
        self.host_classifier = None
        self.eval_opts = build_options(
            ipu, poptorch, batch, training=False, splits=self.splits, use_ipu_model=self.use_ipu_model
        )
        self.eval_opts.deviceIterations(self.eval_iterations)
        # Evaluation: one device copy of the network (built from the first weights evaluated),
        # its inference executables by (graph, input shape), and the weights each one holds.
        self._inference_classifier: Optional[nn.Module] = None
        self.inference_models: Dict[Tuple, Any] = {}
        self._weights_version = 0
        self._uploaded: Dict[Tuple, int] = {}

    @staticmethod
    def _meta_network(network: Callable[[], nn.Module]) -> nn.Module:
        """The network's structure for name checks and planning, without allocating weights."""
        try:
            with torch.device("meta"):
                return network()
        except (AttributeError, TypeError, RuntimeError):  # no device context manager
            return network()

    def eval_batch_size(self) -> int:
        return self.batch.eval_batch(self.eval_iterations)

    # ------------------------------------------------------------------ setup
    def prepare(self, classifier: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        poptorch = self.poptorch
        self.host_classifier, self.host_optimizer = classifier, optimizer
        device = self._device_copy(classifier, self.recompute)
        device.loss_hook = lambda loss: poptorch.identity_loss(loss, reduction="none")
        self.device_classifier = device
        lr = optimizer.param_groups[0]["lr"]
        self.optimizer = build_ipu_optimizer(
            poptorch, device_groups(optimizer, classifier, device), self.spec, self.optim_spec, lr
        )
        self._lr = lr
        self.training_output_mode = self.spec.output_mode
        train_opts = build_options(
            self.spec,
            poptorch,
            self.batch,
            training=True,
            splits=self.splits,
            use_ipu_model=self.use_ipu_model,
        )
        device.train()
        self.train_model = poptorch.trainingModel(_LossOnly(device), train_opts, optimizer=self.optimizer)

    def _device_copy(self, classifier: nn.Module, recompute) -> nn.Module:
        """``classifier`` copied, in the IPU precision, with the pipeline (and recomputation)
        annotations, on the emulator's compute device."""

        device = copy.deepcopy(classifier)
        apply_precision(device.model, self.spec.precision)
        if self.splits or recompute:
            annotate(device.model, self.splits, recompute, self.poptorch)
        return device.to(self.compute)

    # ------------------------------------------------------------------ steps
    def _swap_to(self, model) -> None:
        """One executable on the IPUs at a time (hardware); free in the emulator."""
        for other in [self.train_model, *self.inference_models.values()]:
            if other is not None and other is not model and other.isAttachedToDevice():
                other.detachFromDevice()
        if model.isCompiled() and not model.isAttachedToDevice():
            model.attachToDevice()

    def _check_resumed_state(self) -> None:
        """A checkpoint of a CPU/GPU run holds the host optimiser's state, which PopTorch cannot
        load ("Only IPU optimizer states can be loaded onto the IPU"): say that the optimiser's
        state (momentum, squared averages) starts afresh rather than drop it silently."""
        self._state_checked = True
        if self.host_optimizer.state and not self._device_state_loaded:
            print(
                "warning: the checkpoint holds no IPU optimiser state (it comes from a CPU/GPU run): "
                "the weights carry over, the optimiser's state starts afresh",
                file=sys.stderr,
            )

    def train_step(self, images: Tensor, targets: Tensor) -> Dict[str, Tensor]:
        if not self._state_checked:
            self._check_resumed_state()
        self._swap_to(self.train_model)
        self.device_classifier.train()
        images, targets = images.to(self.compute), targets.to(self.compute)
        try:
            losses = self.train_model(images, targets)
        except ValueError as error:  # the emulator's batch / pipeline checks, PopTorch's rules
            raise BackendError(f"invalid IPU configuration: {error}") from None
        loss = losses.float().mean()
        if self.training_output_mode == "sum":  # each returned loss sums DI × GA micro-batches
            loss = loss / self.batch.micro_batches_per_call
        return {"loss": all_reduce_mean(loss.cpu())}

    def compile(self, images: Tensor, targets: Tensor) -> str:
        """ipu.compile_only: build the training and inference executables from one host batch
        without running them (PopTorch refuses to run on an offline target)."""
        self.device_classifier.train()
        self.train_model.compile(images.to(self.compute), targets.to(self.compute))
        unit = self.eval_batch_size()
        sample = images[:1].expand(unit, *images.shape[1:]).contiguous()
        self._load_weights(self.host_classifier)
        self._inference_model("logits", sample).compile(sample.to(self.compute))
        cache = self.spec.executable_cache
        return "compiled the training and inference executables" + (
            f" (cached in {cache})" if cache else " (set ipu.executable_cache to keep them)"
        )

    def set_lr(self, lr: float) -> None:
        """The rate reaches the device only through setOptimizer (PopTorch converts the optimiser
        to its attribute dict there: python/_poplar_executor.py:631-668), before compilation too,
        so the very first update, and the first after a resume, use it."""
        if lr == self._lr:
            return
        self._lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.train_model.setOptimizer(self.optimizer)

    # ------------------------------------------------------------------ evaluation
    def _load_weights(self, classifier: nn.Module) -> None:
        """Write ``classifier``'s weights into the inference copy (built from the first one
        seen); the executables copy them to the device before they next run."""
        if self._inference_classifier is None:
            self._inference_classifier = self._device_copy(classifier, [])
            self._inference_classifier.eval()
        target = self._inference_classifier.model.state_dict()
        with torch.no_grad():
            for name, value in classifier.model.state_dict().items():
                target[name].copy_(value.to(target[name].dtype))
        self._weights_version += 1

    @contextlib.contextmanager
    def evaluating(self, classifier: Optional[nn.Module] = None) -> Iterator[None]:
        if classifier is None:
            if self.train_model is None:
                raise BackendError(
                    "nothing to evaluate: no training model was prepared and no weights were given"
                )
            self.sync_to_host()  # the trained weights, from the device
            classifier = self.host_classifier
        self._load_weights(classifier)
        yield

    def _inference_model(self, graph: str, sample: Tensor):
        """The inference executable of ``graph`` ("logits" or "bn-statistics") for inputs shaped
        like ``sample``: PopTorch compiles for fixed input shapes."""
        key = (graph, tuple(sample.shape))
        if key not in self.inference_models:
            module = (
                self._inference_classifier
                if graph == "logits"
                else BatchNormProbe(self._inference_classifier)
            )
            self.inference_models[key] = self.poptorch.inferenceModel(module, self.eval_opts)
        return self.inference_models[key]

    def _run_inference(self, graph: str, images: Tensor):
        """Outputs of ``graph`` over ``images`` in fixed-size host batches (padded at the end),
        with the weights last loaded; returns [(outputs, real rows)] per host batch."""
        if self._inference_classifier is None:
            raise BackendError("evaluate() outside evaluating(): no weights were loaded")
        self._inference_classifier.eval()
        unit = self.eval_batch_size()
        results = []
        for start in range(0, images.shape[0], unit):
            chunk = images[start : start + unit]
            n = chunk.shape[0]
            if n < unit:  # the executable has a fixed batch: pad, then drop the padding
                chunk = torch.cat([chunk, chunk[:1].expand(unit - n, *chunk.shape[1:])])
            model = self._inference_model(graph, chunk)
            key = (graph, tuple(chunk.shape))
            self._swap_to(model)
            if model.isCompiled() and self._uploaded.get(key) != self._weights_version:
                model.copyWeightsToDevice()  # attach uploads too; this covers weights loaded since
            outputs = model(chunk.to(self.compute))
            self._uploaded[key] = self._weights_version
            results.append((outputs, n))
        return results

    @torch.no_grad()
    def evaluate(self, images: Tensor) -> Tensor:
        return torch.cat([logits[:n].float().cpu() for logits, n in self._run_inference("logits", images)])

    @torch.no_grad()
    def batch_norm_statistics(self, classifier: nn.Module, images: Tensor) -> Statistics:
        """Per micro-batch (what a batch norm on the IPU normalises over): micro-batches that
        hold padding are left out."""
        self._load_weights(classifier)
        micro = self.batch.micro_batch
        pieces = []
        for outputs, n in self._run_inference("bn-statistics", images):
            whole = n // micro
            if whole:
                pieces.append([t[:whole].float().cpu() for t in outputs])
        if not pieces:
            raise BackendError(
                f"batch-norm statistics need at least one full micro-batch of {micro} "
                f"images; got {images.shape[0]}"
            )
        return split_statistics([torch.cat(column) for column in zip(*pieces)])

    def sync_to_host(self) -> None:
        if self.train_model is None:
            return
        if self.train_model.isCompiled():
            # Detaching (for evaluation) already copied the weights back; a detached executable
            # cannot be read again, so copy only what the device changed since.
            self.train_model.copyWeightsToHostIfNeeded()
        host = self.host_classifier.model.state_dict()
        with torch.no_grad():
            for name, value in self.device_classifier.model.state_dict().items():
                host[name].copy_(value.to(host[name].dtype))

    def state_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        scale = getattr(self.train_model, "loss_scale", None) if self.train_model else None
        if scale is not None:
            out["loss_scale"] = scale
        if self.train_model is not None and self.train_model.isCompiled():
            # PopTorch reads the optimiser's state back from the device ("ipu_state", "ipu_param"
            # next to torch's own entries): the only form its load_state_dict accepts.
            out["optimizer"] = self.optimizer.state_dict()
        return out

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("loss_scale") and self.train_model is not None:
            self.train_model._loss_scale = float(state["loss_scale"])
        if state.get("optimizer"):
            # Held until the executable attaches, then written to the device (PopTorch does this).
            self.optimizer.load_state_dict(state["optimizer"])
            self._device_state_loaded = True
            self._lr = None  # loading reset every group's rate: the next set_lr sets them all

    def close(self) -> None:
        for model in (self.train_model, *self.inference_models.values()):
            if model is not None and model.isAttachedToDevice():
                model.detachFromDevice()
