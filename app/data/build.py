"""``build_loader``: the loader a dataset and a configuration call for — one fixed synthetic batch,
the PopTorch DataLoader of an IPU run's training data, or the host ``Loader`` (app/data/loader.py)."""

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch.utils.data import Sampler

from backends.specs import BatchPlan
from ipu_options import poptorch  # the real one, or the emulator

from .datasets import ImageDataset, SyntheticDataset
from .loader import Loader, SyntheticLoader
from .poptorch_loader import PopTorchLoader


@dataclass(frozen=True)
class DataSpec:
    """What the loaders take from the run's configuration (app/specs.py builds it)."""

    workers: int = 2
    prefetch: int = 2  # batches each worker process keeps in flight
    mixup: float = 0.0  # per-sample Beta(α, α) mixup's α; 0 = off
    cutmix_lambda: float = 1.0  # CutMix v1's λ₀; 1 = off
    poptorch_loader: bool = False  # training data through poptorch.DataLoader (IPU runs)


def _torch_device(device: Union[str, torch.device, None]) -> torch.device:
    """The device to create synthetic data on: cpu/cuda as given; other kinds (ipu) take host
    tensors, which PopTorch copies itself."""
    try:
        dev = torch.device(device) if device is not None else torch.device("cpu")
    except RuntimeError:  # a name torch does not know ("ipu-model", "auto"): host tensors
        return torch.device("cpu")
    return dev if dev.type in ("cpu", "cuda") else torch.device("cpu")


def build_loader(
    dataset: ImageDataset,
    batch: Union[int, BatchPlan],
    *,
    train: bool,
    spec: DataSpec,
    device: Union[str, torch.device, None] = None,
    sampler: Optional[Sampler] = None,
    seed: int = 0,
) -> Union[Loader, SyntheticLoader, PopTorchLoader]:
    """The loader for ``dataset`` (see app/data/loader.py): ``batch`` images per batch — a number,
    or the run's ``BatchPlan`` for its training data (its host batch; poptorch.DataLoader
    rebatches its micro-batches) — the last partial batch dropped when training, kept for
    validation; ``spec.workers`` persistent worker processes, ``spec.prefetch`` batches ahead
    each; pinned memory on CUDA; mixup/cutmix from ``spec`` when training."""
    batch_size = batch.host_batch if isinstance(batch, BatchPlan) else batch
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: expected an integer >= 1")
    dev = _torch_device(device)
    # cutmix: CutMix v1's λ₀, 1 = off (app/data/mixing.py)
    mixup, cutmix = (spec.mixup, spec.cutmix_lambda) if train else (0.0, 1.0)
    if isinstance(dataset, SyntheticDataset):
        return SyntheticLoader(dataset, batch_size, device=dev, mixup=mixup, cutmix=cutmix, seed=seed)
    if train and spec.poptorch_loader:
        if not isinstance(batch, BatchPlan):
            raise ValueError("poptorch.DataLoader's training data needs the run's BatchPlan, not a number")
        return PopTorchLoader(
            dataset,
            batch,
            poptorch=poptorch,
            workers=spec.workers,
            prefetch=spec.prefetch,
            mixup=mixup,
            cutmix=cutmix,
            seed=seed,
            sampler=sampler,
        )
    return Loader(
        dataset,
        batch_size,
        train=train,
        workers=spec.workers,
        pin_memory=dev.type == "cuda",
        mixup=mixup,
        cutmix=cutmix,
        seed=seed,
        sampler=sampler,
        prefetch=spec.prefetch,
    )
