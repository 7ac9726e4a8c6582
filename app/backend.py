"""Which backend a run gets: the one place where the application picks a device kind.

The contract every backend implements (``Backend``, ``BackendError``) is ``backends/contract.py``;
``NativeBackend`` (CPU/CUDA) is ``backends/native.py`` and ``PopTorchBackend`` (IPU, or its
emulator) ``ipu_options/backend.py``. Both are handed what they need — the configuration and the
network's builder — and never import the application.
"""
import importlib
from typing import Callable, Optional

from torch import nn

from app.objective import network_builder
from backends.contract import Backend, BackendError
from backends.native import NativeBackend

__all__ = ["Backend", "BackendError", "NativeBackend", "create_backend"]


def create_backend(cfg, network: Optional[Callable[[], nn.Module]] = None) -> Backend:
    """cpu / cuda / auto → NativeBackend; ipu / ipu-model → PopTorchBackend (imported only then),
    handed ``network``, the builder of the run's network (default: ``cfg``'s, see
    ``app.objective.network_builder``)."""
    if cfg.device in ("ipu", "ipu-model"):
        try:
            module = importlib.import_module("ipu_options.backend")
        except ModuleNotFoundError as error:
            if error.name != "ipu_options.backend":
                raise
            raise BackendError(f"device={cfg.device} needs ipu_options/backend.py (the PopTorch backend), "
                               "which this checkout does not have yet; use --device cpu or cuda") from None
        if network is None:
            network = network_builder(cfg)
        return module.PopTorchBackend(cfg, network)
    return NativeBackend(cfg)
