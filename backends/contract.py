"""The backend contract: what the training loop asks of a device, and nothing more.

The loop hands a backend a host batch of uint8 images and targets and gets back scalar metrics;
how the device turns them into weight updates is the backend's business. Two implement it:
``backends.native.NativeBackend`` (CPU or CUDA in this process) and
``ipu_options.backend.PopTorchBackend`` (PopTorch, or its emulator). This file imports nothing
of the project: the application depends on it, the backends implement it, and neither side
reaches into the other. A backend is handed the specs it needs (backends/specs.py), never the
application's configuration.
"""

from typing import Any, ContextManager, Dict, Optional

import torch
from torch import Tensor, nn

from backends.batch_norm_stats import Statistics
from backends.errors import BackendError
from backends.specs import BatchPlan

__all__ = ["Backend", "BackendError"]


class Backend:
    name: str = "base"
    emulated: bool = False  # True when the device is simulated (figures are not hardware figures)
    device: torch.device = torch.device("cpu")  # where the loader should put its tensors
    compile_only: bool = False  # build the executables and stop (ipu.compile_only)
    batch: BatchPlan = BatchPlan(micro_batch=1)  # the run's sizes (the backend's constructor sets it)

    @property
    def updates_per_step(self) -> int:
        """Weight updates per ``train_step`` call (IPU: the device iterations)."""
        return self.batch.device_iterations

    def host_batch_size(self) -> int:
        """Images per ``train_step`` call."""
        return self.batch.host_batch

    def eval_batch_size(self) -> int:
        """Images per ``evaluate`` call."""
        return self.batch.eval_batch()

    def prepare(self, classifier: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        raise NotImplementedError

    def train_step(self, images: Tensor, targets: Tensor) -> Dict[str, Tensor]:
        """One host batch; returns metrics averaged over every replica of the job (backends
        call ``backends.process.all_reduce_mean``), so all processes see the same figures."""
        raise NotImplementedError

    def set_lr(self, lr: float) -> None:
        raise NotImplementedError

    def compile(self, images: Tensor, targets: Tensor) -> str:
        """Build what ``train_step``/``evaluate`` run, from one host batch, without running it;
        returns what was built (only backends with ``compile_only``)."""
        raise NotImplementedError

    def evaluating(self, classifier: Optional[nn.Module] = None) -> ContextManager[None]:
        """Within it, ``evaluate`` scores with ``classifier``'s weights (a classifier of the run's
        architecture — network plus input normalisation, ``app.objective.Classifier`` — holding
        the EMA copy, a checkpoint's weights, fine-tuning's start), or with the training weights
        when None. Every evaluation of a run goes through this, on the backend's device (IPU: its
        inference executable, the weights copied to it)."""
        raise NotImplementedError

    def evaluate(self, images: Tensor) -> Tensor:
        """Logits of a host batch, with the weights ``evaluating`` chose (default: training's)."""
        raise NotImplementedError

    def batch_norm_statistics(self, classifier: nn.Module, images: Tensor) -> Statistics:
        """Each batch norm's batch mean and unbiased variance over ``images`` with
        ``classifier``'s weights (backends/batch_norm_stats.py), one row per batch the device
        normalises over (IPU: per micro-batch)."""
        raise NotImplementedError

    def sync_to_host(self) -> None:
        """Make the classifier's host-side weights current (a no-op where they live on the host)."""

    def state_dict(self) -> Dict[str, Any]:
        """Backend state a checkpoint must hold (e.g. the fp16 loss scaler)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
