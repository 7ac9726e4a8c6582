"""The run's sizes and device settings as small typed values, built once from the configuration
by the application (app/specs.py) and handed to the components that use them; nothing here knows
the configuration's sections."""

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class BatchPlan:
    """How many images go where. Every batch size of a run is read from here.

    A replica runs ``micro_batch`` images per forward pass and ``grad_accum`` of them per weight
    update; a ``train_step`` call runs ``device_iterations`` updates (IPU; 1 elsewhere) on each of
    the ``local_replicas`` this process drives (IPU: its share of ``replicas``; a CPU/GPU process
    is one replica)."""

    micro_batch: int
    grad_accum: int = 1
    device_iterations: int = 1
    replicas: int = 1
    local_replicas: int = 1

    @property
    def update_batch(self) -> int:
        """Images of one replica's weight update."""
        return self.micro_batch * self.grad_accum

    @property
    def micro_batches_per_call(self) -> int:
        """Micro-batches each replica runs in one ``train_step`` call."""
        return self.grad_accum * self.device_iterations

    @property
    def host_batch(self) -> int:
        """Images of one ``train_step`` call: what the training loader yields."""
        return self.micro_batch * self.micro_batches_per_call * self.local_replicas

    @property
    def global_batch(self) -> int:
        """Images of one weight update across the job (the learning rate scales with it)."""
        return self.update_batch * self.replicas

    def eval_batch(self, iterations: int = 1) -> int:
        """Images of one evaluation call running ``iterations`` micro-batches on each replica."""
        return self.micro_batch * iterations * self.local_replicas


@dataclass(frozen=True)
class DeviceSpec:
    """Where and how the native backend computes."""

    kind: str = "auto"  # auto | cpu | cuda (ipu, ipu-model: the PopTorch backend)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    channels_last: bool = False
    cpu_threads: Optional[int] = None  # torch intra-op threads; None: torch's default


@dataclass(frozen=True)
class OptimSpec:
    """The optimiser's kind and hyper-parameters, as a device's optimiser builder reads them (the
    learning rate comes from the schedule, step by step)."""

    name: str = "rmsprop"  # sgd | rmsprop | adamw
    momentum: float = 0.9
    nesterov: bool = False
    alpha: float = 0.9  # RMSprop squared-gradient decay
    eps: float = 1e-3
    betas: Tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class ModelSpec:
    """The network as a device layer describes it: a label for its reports and the input side."""

    label: str  # e.g. "efficientnet-b0 G16 e4 group+proxy"
    resolution: int
