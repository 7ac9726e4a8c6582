"""``NativeBackend``: the backend for ``--device cpu``, ``cuda`` and ``auto``.

CPU or CUDA in this process: autocast (bf16, or fp16 with a GradScaler), loss scaling,
channels-last, gradient accumulation over micro-batches inside one ``train_step``, and
DistributedDataParallel under torchrun (through the process context the application registered,
``backends.process.current``). ``evaluate`` runs a copy of the classifier fused for inference
(model/inference.py), made again after every weight update. Part of the device layer: it imports
nothing of the application.
"""

import contextlib
from typing import Any, ContextManager, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from backends.batch_norm_stats import BatchNormProbe, Statistics, split_statistics
from backends.contract import Backend, BackendError
from backends.process import all_reduce_mean, current
from backends.specs import BatchPlan, DeviceSpec
from model.inference import fuse_for_inference


def _native_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        why = (
            "this PyTorch is a CPU-only build: install a CUDA build of PyTorch"
            if torch.version.cuda is None
            else f"this CUDA {torch.version.cuda} build of PyTorch sees no GPU: check the driver and "
            "CUDA_VISIBLE_DEVICES"
        )
        raise BackendError(f"device=cuda is not available ({why}); or use --device cpu (or auto)")
    return torch.device(requested)


def _grad_scaler(enabled: bool):
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)  # torch 2.0 (the Poplar SDK's)


class NativeBackend(Backend):
    """CPU or CUDA in this process: autocast (bf16, or fp16 with a GradScaler), channels-last,
    and ``grad_accum`` micro-batches accumulated inside one ``train_step``."""

    def __init__(self, spec: DeviceSpec, batch: BatchPlan):
        self.device = _native_device(spec.kind)
        self.name = self.device.type
        self.batch = batch
        if spec.precision == "fp16" and self.device.type != "cuda":
            raise BackendError(
                "train.precision=fp16 needs a CUDA GPU (its loss scaler is CUDA-only); "
                "on the CPU use train.precision=bf16 or fp32"
            )
        if spec.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise BackendError(
                "train.precision=bf16 is not supported by this GPU; use train.precision=fp16 or fp32"
            )
        if spec.cpu_threads is not None:
            torch.set_num_threads(spec.cpu_threads)
        self.precision = spec.precision
        self.grad_accum = batch.grad_accum
        self.channels_last = spec.channels_last
        self.scaler = _grad_scaler(enabled=spec.precision == "fp16")
        self.classifier = None
        self._scoring: Optional[nn.Module] = None  # what evaluate() runs (evaluating() sets it)
        self.optimizer = None
        self.inference_copy = None  # fused for inference; None: the weights changed since

    def autocast(self) -> ContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def prepare(self, classifier: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # Module.to() moves parameters in place, so the optimiser built on them stays valid.
        classifier.to(self.device)
        if self.channels_last:
            classifier.to(memory_format=torch.channels_last)
        self.classifier, self.optimizer = classifier, optimizer
        self.inference_copy = None
        # several processes: gradients are averaged by DistributedDataParallel during backward
        self.trainer = current().wrap(classifier, self.device)

    def _to_device(self, tensor: Tensor) -> Tensor:
        return tensor.to(self.device, non_blocking=True)

    def train_step(self, images: Tensor, targets: Tensor) -> Dict[str, Tensor]:
        """One weight update from ``grad_accum`` micro-batches. The update is not applied when the
        loss or the gradients are not finite (fp16: the scaler skips it; otherwise we do, and say so
        with ``nonfinite_grads``), so weights stay good."""
        images, targets = self._to_device(images), self._to_device(targets)
        self.inference_copy = None  # the weights are about to change
        self.trainer.train()
        self.optimizer.zero_grad(set_to_none=True)
        micro = images.shape[0] // self.grad_accum
        total = torch.zeros((), device=self.device)
        pieces = list(zip(images.split(micro), targets.split(micro)))
        for i, (x, y) in enumerate(pieces):
            # DDP: gradients are all-reduced once, on the last micro-batch of the update
            last = i == len(pieces) - 1
            sync = (
                contextlib.nullcontext()
                if last or not hasattr(self.trainer, "no_sync")
                else self.trainer.no_sync()
            )
            with sync:
                with self.autocast():
                    _, loss = self.trainer(x, y)
                self.scaler.scale(loss / self.grad_accum).backward()
            total += loss.detach().float()
        # the job's loss: every process then takes the same decision about the update below
        loss = all_reduce_mean(total / self.grad_accum)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skipped when gradients hold inf/NaN
            self.scaler.update()
            return {"loss": loss}
        # A finite loss can still have inf/NaN gradients (an overflow in backward); one step with
        # them ruins every weight. DDP has averaged them already: every process decides the same.
        # The loss comes back in the same read-back as the check, before the step is queued: the
        # loop's float(loss) then does not wait for the optimiser step (which can overlap the
        # next batch's loading on a GPU).
        host_loss, finite = self.update_is_finite(loss)
        if not finite:
            return {"loss": host_loss, "nonfinite_grads": torch.ones(())}
        self.optimizer.step()
        return {"loss": host_loss}

    def update_is_finite(self, loss: Tensor) -> Tuple[Tensor, bool]:
        """The loss on the host, and whether it and every gradient are finite: one norm per
        gradient (finite exactly when its tensor is, short of a norm beyond 3e38) and a single
        read-back for all of them."""
        grads = [
            p.grad.detach()
            for group in self.optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        foreach_norm = getattr(torch, "_foreach_norm", None)
        norms = foreach_norm(grads) if foreach_norm is not None else [g.norm() for g in grads]
        checks = [loss.detach().float().reshape(1)] + [n.float().reshape(1) for n in norms]
        checks = torch.cat(checks)
        host = torch.stack([checks[0], torch.isfinite(checks).all().float()]).cpu()
        return host[0], bool(host[1])

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @contextlib.contextmanager
    def evaluating(self, classifier: Optional[nn.Module] = None) -> Iterator[None]:
        if classifier is None and self.classifier is None:
            raise BackendError(
                "nothing to evaluate: the backend has no training model (prepare) and no weights were given"
            )
        previous = self._scoring
        # a given classifier (moved to this device: Module.to() moves in place) is scored through
        # its own fused copy (model/inference.py), like the training classifier
        self._scoring = None if classifier is None else fuse_for_inference(classifier.to(self.device))
        try:
            yield
        finally:
            self._scoring = previous

    @torch.no_grad()
    def evaluate(self, images: Tensor) -> Tensor:
        """Logits with the weights ``evaluating`` chose: a given classifier's fused copy, else the
        training classifier's (made on the first call after the weights changed: ``train_step``,
        ``load_state_dict``, ``prepare``)."""
        model = self._scoring
        if model is None:
            if self.inference_copy is None:
                self.inference_copy = fuse_for_inference(self.classifier)
            model = self.inference_copy
        with self.autocast():
            return model(self._to_device(images)).float()

    @torch.no_grad()
    def batch_norm_statistics(self, classifier: nn.Module, images: Tensor) -> Statistics:
        classifier.to(self.device)
        modes = [(m, m.training) for m in classifier.modules()]
        nn.Module.train(classifier, False)  # the whole tree, frozen layers included
        try:
            with self.autocast():
                return split_statistics(BatchNormProbe(classifier)(self._to_device(images)))
        finally:
            for m, mode in modes:
                m.training = mode

    def state_dict(self) -> Dict[str, Any]:
        return {"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.inference_copy = None
        if "scaler" in state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])

    def close(self) -> None:
        # Let go of DistributedDataParallel (and the process group it holds) before the job's
        # process group is destroyed, not whenever the garbage collector gets to it.
        self.trainer = None
        self.inference_copy = None
