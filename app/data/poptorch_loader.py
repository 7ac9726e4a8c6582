"""Training batches for the PopTorch backends: ``poptorch.DataLoader`` in ``AsyncRebatched`` mode.

As Graphcore's CNN application feeds its IPU runs (graphcore/examples v3.4.1,
vision/cnns/pytorch/datasets/dataset.py:145-178): ``batch_size`` is the micro-batch, PopTorch
combines deviceIterations × replicas × gradientAccumulation of them into the host batch, a
worker process of PopTorch's own (the ``AsynchronousDataAccessor``) fills a ring buffer of host
batches in shared memory ahead of the device, ``persistent_workers=True`` and
``async_options={"load_indefinitely": True}``. The same code runs on the emulator
(ipu_options/emulator/dataloader.py), which keeps PopTorch's rules.

What that worker changes, and how the loader keeps its guarantees (app/data/loader.py):
  * The worker gets a pickled copy of the DataLoader (poptorch python/_dataloader.py:202-233)
    and the main process never iterates its own: ``set_epoch`` cannot reach it. So the batch
    sampler here is a pure function of where the stream starts, (epoch, batch): that epoch from
    that batch, then every following epoch, endlessly (with ``load_indefinitely`` the worker
    never has to restart). ``iterate`` pulls exactly one epoch's batches from the stream; an
    ``iterate`` that is not the stream's continuation (a resume elsewhere, a jump) opens a new
    stream there.
  * The host batches are those of the synchronous loader: the same (index, epoch) keys, the same
    sample seeds, split into micro-batches in order and concatenated back by PopTorch.
    Mixup/cutmix (when on) is drawn per micro-batch here, where the collate runs.
  * Elements must be tensors (_dataloader.py:358-367: "a flat 1D container of tensors"): unreadable
    images travel as a per-sample count; their paths are warned by the worker that met them.
  * A batch is a view of PopTorch's ring buffer, valid until later batches are asked for: the
    training step consumes it before the next one.
"""

import warnings
from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import Sampler

from backends.specs import BatchPlan

from .datasets import ImageDataset
from .loader import Collate, EpochBatches, SeededView, check_batches


class StreamBatches(Sampler):
    """Micro-batches of (index, epoch) keys from (epoch, batch) on, through every later epoch.
    ``len``: micro-batches per epoch (PopTorch reads it only to warn about remainders)."""

    def __init__(self, epochs: EpochBatches, micro_batch: int, epoch: int, start: int):
        self.epochs, self.batch_size = epochs, micro_batch
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return len(self.epochs) * (self.epochs.batch_size // self.batch_size)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        epoch, start = self.epoch, self.start
        while True:
            self.epochs.set_epoch(epoch)
            self.epochs.start = start
            for host in iter(self.epochs):
                for first in range(0, len(host), self.batch_size):
                    yield host[first : first + self.batch_size]
            epoch, start = epoch + 1, 0


class TensorCollate(Collate):
    """The loader's collate with tensors only: unreadable images as a per-sample count, their
    paths warned here, in the worker."""

    def __call__(self, samples: List[Tuple[Tensor, int, List[str]]]) -> Tuple[Tensor, Tensor, Tensor]:
        counts = torch.tensor([len(s[2]) for s in samples], dtype=torch.int32)
        for path in (p for s in samples for p in s[2]):
            warnings.warn(
                f"skipped an unreadable image (replaced by the next readable one): {path}",
                RuntimeWarning,
                stacklevel=2,
            )
        images, targets, _ = super().__call__(samples)
        return images, targets, counts


class PopTorchLoader:
    """The Loader's interface (``set_epoch``, ``iterate(start_batch)``, ``len``, ``skipped``) over
    ``poptorch.DataLoader(mode=AsyncRebatched)``; see the module docstring."""

    def __init__(
        self,
        dataset: ImageDataset,
        plan: BatchPlan,
        *,
        poptorch: Any,
        workers: int,
        prefetch: int,
        mixup: float,
        cutmix: float,
        seed: int,
        sampler: Optional[Sampler] = None,
    ):
        host_batch = plan.host_batch
        self.dataset, self.batch_size, self.train = dataset, host_batch, True
        self.plan, self.poptorch = plan, poptorch
        self.workers, self.prefetch, self.seed = workers, prefetch, seed
        self.collate = TensorCollate(dataset.num_classes, mixup, cutmix)
        self.batches = EpochBatches(
            len(dataset), host_batch, shuffle=True, drop_last=True, seed=seed, sampler=sampler
        )
        check_batches(dataset, self.batches, host_batch, sampler)
        self.skipped = 0
        self.skipped_files: set = set()  # paths are warned by the workers (tensors only cross over)
        self._loader = None
        self._stream = None
        self._position: Optional[Tuple[int, int]] = None  # (epoch, batch) the stream is at

    @property
    def epoch(self) -> int:
        return self.batches.epoch

    def set_epoch(self, epoch: int) -> None:
        self.batches.epoch = epoch  # the worker's copy follows its own stream (see the module)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return self.iterate(0)

    def _open(self, epoch: int, start: int) -> None:
        self.close()
        poptorch, plan = self.poptorch, self.plan
        options = poptorch.Options()  # the loader's own: PopTorch freezes the options it is given
        options.deviceIterations(plan.device_iterations)
        options.replicationFactor(plan.local_replicas)
        options.Training.gradientAccumulation(plan.grad_accum)
        extra = dict(prefetch_factor=self.prefetch) if self.workers > 0 else {}
        self._loader = poptorch.DataLoader(
            options,
            SeededView(self.dataset, self.seed),
            num_workers=self.workers,
            batch_sampler=StreamBatches(self.batches, plan.micro_batch, epoch, start),
            collate_fn=self.collate,
            drop_last=True,
            persistent_workers=self.workers > 0,
            auto_distributed_partitioning=False,  # the sampler already holds this process's share
            mode=poptorch.DataLoaderMode.AsyncRebatched,
            async_options={"load_indefinitely": True},
            **extra,
        )
        self._stream = iter(self._loader)
        self._position = (epoch, start)

    def iterate(self, start_batch: int = 0) -> Iterator[Tuple[Tensor, Tensor]]:
        """This epoch's batches from ``start_batch`` on, from the open stream when it is there."""
        epoch, per_epoch = self.batches.epoch, len(self.batches)
        if self._stream is None or self._position != (epoch, start_batch):
            self._open(epoch, start_batch)
        for batch in range(start_batch, per_epoch):
            images, targets, counts = next(self._stream)
            self._position = (epoch, batch + 1) if batch + 1 < per_epoch else (epoch + 1, 0)
            self.skipped += int(counts.sum())
            yield images, targets

    def close(self) -> None:
        """Stop PopTorch's worker (also done when the loader is garbage-collected or at exit)."""
        if self._loader is not None:
            self._loader.terminate()
        self._loader = self._stream = self._position = None

    def __del__(self) -> None:
        self.close()


__all__ = ["PopTorchLoader", "StreamBatches", "TensorCollate"]
