"""Which backend a run gets: the one place where the application picks a device kind.

The contract every backend implements (``Backend``, ``BackendError``) is ``backends/contract.py``;
``NativeBackend`` (CPU/CUDA) is ``backends/native.py`` and ``PopTorchBackend`` (IPU, or its
emulator) ``ipu_options/backend.py``. Both are handed what they need — the run's sizes
(``BatchPlan``) and ``DeviceSpec``, the PopTorch one its ``IpuSpec``, ``OptimSpec``, ``ModelSpec``
and the network's builder (app/specs.py builds them all) — and never import the application.
"""

from typing import Callable, Optional

from torch import nn

from app.config import Config
from app.objective import network_builder
from app.specs import IPU_DEVICES, batch_plan, device_spec, ipu_spec, model_spec, optim_spec
from backends.contract import Backend, BackendError
from backends.native import NativeBackend
from ipu_options.backend import PopTorchBackend

__all__ = ["Backend", "BackendError", "NativeBackend", "create_backend"]


def create_backend(cfg: Config, network: Optional[Callable[[], nn.Module]] = None) -> Backend:
    """cpu / cuda / auto → NativeBackend; ipu / ipu-model → PopTorchBackend, handed ``network``,
    the builder of the run's network (default: ``cfg``'s, see ``app.objective.network_builder``)."""
    batch = batch_plan(cfg)
    if cfg.device in IPU_DEVICES:
        return PopTorchBackend(
            device_spec(cfg),
            ipu_spec(cfg),
            batch,
            optim_spec(cfg),
            model_spec(cfg),
            network or network_builder(cfg),
        )
    return NativeBackend(device_spec(cfg), batch)
