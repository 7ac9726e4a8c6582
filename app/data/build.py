"""``build_loader``: the loader a dataset and a configuration call for — one fixed synthetic batch,
the PopTorch DataLoader of an IPU run's training data, or the host ``Loader`` (app/data/loader.py)."""
from typing import Optional

import torch
from torch.utils.data import Sampler

from ipu_options import poptorch  # the real one, or the emulator

from .datasets import ImageDataset, SyntheticDataset
from .loader import Loader, SyntheticLoader
from .poptorch_loader import PopTorchLoader, uses_poptorch_loader


def _torch_device(device) -> torch.device:
    """The device to create synthetic data on: cpu/cuda as given; other kinds (ipu) take host
    tensors, which PopTorch copies itself."""
    try:
        dev = torch.device(device) if device is not None else torch.device("cpu")
    except RuntimeError:  # a name torch does not know ("ipu-model", "auto"): host tensors
        return torch.device("cpu")
    return dev if dev.type in ("cpu", "cuda") else torch.device("cpu")


def build_loader(dataset: ImageDataset, batch_size: int, *, train: bool, cfg, device=None,
                 sampler: Optional[Sampler] = None, seed: int = 0):
    """The loader for ``dataset`` (see app/data/loader.py): fixed batch size (the last partial
    batch is dropped when training, kept for validation), ``cfg.data.workers`` worker processes
    (persistent, ``cfg.data.prefetch`` batches ahead each), pinned memory on CUDA, mixup/cutmix
    from ``cfg.data`` when training."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: expected an integer >= 1")
    dev = _torch_device(device)
    # cutmix: CutMix v1's λ₀, 1 = off (app/data/mixing.py)
    mixup, cutmix = (cfg.data.mixup, cfg.data.cutmix_lambda) if train else (0.0, 1.0)
    if isinstance(dataset, SyntheticDataset):
        return SyntheticLoader(dataset, batch_size, device=dev, mixup=mixup, cutmix=cutmix, seed=seed)
    if uses_poptorch_loader(cfg, train):
        micro, accumulation = cfg.train.micro_batch, cfg.train.grad_accum * cfg.ipu.device_iterations
        replicas, rest = divmod(batch_size, micro * accumulation)
        if rest or replicas < 1:
            raise ValueError(f"batch_size={batch_size} is not a host batch of train.micro_batch={micro} "
                             f"× train.grad_accum × ipu.device_iterations ({accumulation}) × replicas")
        return PopTorchLoader(dataset, micro, (cfg.ipu.device_iterations, replicas, cfg.train.grad_accum),
                              poptorch=poptorch, workers=cfg.data.workers, prefetch=cfg.data.prefetch,
                              mixup=mixup, cutmix=cutmix, seed=seed, sampler=sampler)
    return Loader(dataset, batch_size, train=train, workers=cfg.data.workers,
                  pin_memory=dev.type == "cuda", mixup=mixup, cutmix=cutmix, seed=seed,
                  sampler=sampler, prefetch=cfg.data.prefetch)
