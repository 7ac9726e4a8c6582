"""Loaders: fixed-size batches of uint8 images, reproducible from (seed, epoch), resumable mid-epoch.

Reproducibility does not depend on worker processes: the batch sampler hands every sample its
(index, epoch), the worker mixes the sample's seed from (seed, epoch, index), each sample's
augmentation is drawn from that seed alone, and each batch's mixup/cutmix from the seeds of its
samples. So a given epoch yields the same batches with 0
or N workers, and ``iterate(start_batch=k)`` (resume) skips k batches without loading them and
yields exactly the tail the uninterrupted epoch would have.

Usage::

    loader = build_loader(dataset, 64, train=True, spec=data_spec(cfg), device=device, seed=cfg.train.seed)
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)
        for images, targets in loader.iterate(start_batch=k if epoch == start_epoch else 0):
            ...
    loader.skipped  # unreadable images replaced so far, counted across all worker processes
"""

import warnings
from typing import Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .datasets import DatasetError, ImageDataset, SyntheticDataset
from .mixing import mix_batch

MASK64 = (1 << 64) - 1
LOADER_STREAM = 0x6C6F6164  # mixed into loader_seed: not the seeds of samples or orders


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): nearby inputs give unrelated seeds."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & MASK64)) & MASK64
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        state = z ^ (z >> 31)
    return state >> 1


def loader_seed(seed: int, epoch: int) -> int:
    """The seed of a loader's own generator in ``epoch`` (a stream apart from the data order's)."""
    return mix_seed(seed, epoch, LOADER_STREAM)


def epoch_order(size: int, seed: int, epoch: int) -> List[int]:
    """The shuffled order of an epoch's ``size`` samples: a function of (seed, epoch) only, so
    processes that split the epoch between them (app/distributed.py) agree on it."""
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch))
    return torch.randperm(size, generator=generator).tolist()


class EpochBatches(Sampler):
    """Batches of (index, epoch) keys for one epoch. The order is a permutation seeded by
    (seed, epoch) when shuffling, the given sampler's order (after its own set_epoch) when one is
    passed (e.g. a DistributedSampler), else sequential."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int,
        sampler: Optional[Sampler] = None,
    ):
        self.size, self.batch_size = size, batch_size
        self.shuffle, self.drop_last, self.seed, self.sampler = shuffle, drop_last, seed, sampler
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def order(self) -> List[int]:
        if self.sampler is not None:
            return [int(i) for i in self.sampler]
        if self.shuffle:
            return epoch_order(self.size, self.seed, self.epoch)
        return list(range(self.size))

    def _count(self, samples: int) -> int:
        if self.drop_last:
            return samples // self.batch_size
        return -(-samples // self.batch_size)

    def __len__(self) -> int:
        return self._count(len(self.sampler) if self.sampler is not None else self.size)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        # eager: the order and the start are fixed when the DataLoader asks, not at the first batch
        # Keys are (index, epoch): the sample seeds are mixed in the workers (SeededView), so the
        # main process does no per-sample work beyond slicing the order
        order, epoch = self.order(), self.epoch
        return iter(
            [
                [(i, epoch) for i in order[b * self.batch_size : (b + 1) * self.batch_size]]
                for b in range(self.start, self._count(len(order)))
            ]
        )


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation in ``epoch``."""
    return mix_seed(seed, epoch, index)


class SeededView(Dataset):
    """Indexes the dataset by (index, epoch) keys, drawing each sample's augmentation from
    ``sample_seed(seed, epoch, index)`` (here, in the worker); returns that seed and the skipped
    paths too."""

    def __init__(self, dataset: ImageDataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        index, epoch = key
        seed = sample_seed(self.seed, epoch, index)
        image, label, skipped = self.dataset.sample(index, seed)
        return image, label, skipped, seed


class Collate:
    """Stack, then mixup/cutmix (seeded from the batch's sample seeds). Runs in the workers."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_lambda: float):
        self.num_classes, self.mixup_alpha, self.cutmix_lambda = num_classes, mixup_alpha, cutmix_lambda

    def __call__(self, samples: List[Tuple[Tensor, int, List[str]]]) -> Tuple[Tensor, Tensor, List[str]]:
        images = torch.from_numpy(np.stack([s[0].numpy() for s in samples]))  # numpy: see to_tensor
        targets = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        skipped = tuple(path for s in samples for path in s[2])
        rng = np.random.default_rng(mix_seed(len(samples), *[s[3] for s in samples[:4]]))
        images, targets = mix_batch(
            images, targets, self.num_classes, self.mixup_alpha, self.cutmix_lambda, rng
        )
        return images, targets, skipped


def check_batches(
    dataset: ImageDataset, batches: EpochBatches, batch_size: int, sampler: Optional[Sampler]
) -> None:
    """Refuse data that does not fill one batch, naming the fix."""
    if len(batches) == 0:
        share = f" (this process's share: {len(sampler)})" if sampler is not None else ""
        raise DatasetError(
            f"the {dataset.split} data has {len(dataset)} images{share}, fewer than "
            f"one batch of {batch_size}: lower train.micro_batch (or "
            "train.grad_accum / train.replicas), or use more data"
        )


class Loader:
    """Iterable of (images uint8 [B,3,H,W], targets). ``len(loader)``: batches per epoch.
    ``iterate(start_batch=k)``: this epoch from batch k on (resume). ``skipped``: unreadable
    images replaced so far (each replacement counts); ``skipped_files``: their paths."""

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        train: bool,
        workers: int,
        pin_memory: bool,
        mixup: float,
        cutmix: float,
        seed: int,
        sampler: Optional[Sampler] = None,
        prefetch: int = 2,
    ):
        self.dataset, self.batch_size, self.train = dataset, batch_size, train
        self.batches = EpochBatches(
            len(dataset), batch_size, shuffle=train, drop_last=train, seed=seed, sampler=sampler
        )
        check_batches(dataset, self.batches, batch_size, sampler)
        # The DataLoader draws its workers' base seed when an iterator is created (every epoch
        # without workers, once with persistent ones). From the global RNG that draw would happen
        # at different points of an uninterrupted and a resumed process and shift the model's
        # randomness (dropout, drop path); from a generator of its own, seeded by (seed, epoch),
        # it never touches the global streams. (The data itself depends on sample seeds only.)
        self.seed = seed
        self._generator = torch.Generator()
        self._generator.manual_seed(loader_seed(seed, 0))
        # Workers keep up when nothing per sample happens here: decode, augmentation, collation
        # and mixing run in them, each keeping ``prefetch`` batches in flight; the workers persist
        # across epochs (no restart cost per epoch); batches are uint8 (4× less to copy than
        # float32) and, for CUDA, land in pinned memory so the host-to-device copy is async.
        extra = dict(prefetch_factor=prefetch, persistent_workers=True) if workers > 0 else {}
        self._loader = DataLoader(
            SeededView(dataset, seed),
            batch_sampler=self.batches,
            num_workers=workers,
            collate_fn=Collate(dataset.num_classes, mixup if train else 0.0, cutmix if train else 1.0),
            pin_memory=pin_memory,
            generator=self._generator,
            **extra,
        )
        self.skipped = 0
        self.skipped_files: Set[str] = set()

    @property
    def epoch(self) -> int:
        return self.batches.epoch

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)
        self._generator.manual_seed(loader_seed(self.seed, epoch))

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return self.iterate(0)

    def iterate(self, start_batch: int = 0) -> Iterator[Tuple[Tensor, Tensor]]:
        """This epoch's batches from ``start_batch`` on; the first ones are never loaded."""
        self.batches.start = start_batch
        try:
            iterator = iter(self._loader)  # the batch sampler is read here, in this process
        finally:
            self.batches.start = 0
        for images, targets, skipped in iterator:
            self._note(skipped)
            yield images, targets

    def _note(self, skipped: Sequence[str]) -> None:
        self.skipped += len(skipped)
        for path in skipped:
            if path not in self.skipped_files:
                self.skipped_files.add(path)
                warnings.warn(
                    f"skipped an unreadable image (replaced by the next readable one): {path}",
                    RuntimeWarning,
                    stacklevel=2,
                )


class SyntheticLoader:
    """``synthetic``: one fixed random batch made once, directly on the device, yielded every
    step (no host I/O, no copies): measures the device alone. Targets are fixed random labels
    (mixed once into soft targets when mixup/cutmix is on, to keep the loss path the same)."""

    def __init__(
        self,
        dataset: SyntheticDataset,
        batch_size: int,
        *,
        device: torch.device,
        mixup: float,
        cutmix: float,
        seed: int,
    ):
        self.dataset, self.batch_size, self.train = dataset, batch_size, True
        self.skipped, self.skipped_files = 0, set()
        self.length = max(len(dataset) // batch_size, 1)
        self.epoch = 0
        r = dataset.resolution
        generator = torch.Generator(device=device).manual_seed(mix_seed(seed))
        self.images = torch.randint(
            0, 256, (batch_size, 3, r, r), dtype=torch.uint8, device=device, generator=generator
        )
        self.targets = torch.randint(
            0, dataset.num_classes, (batch_size,), device=device, generator=generator
        )
        self.images, self.targets = mix_batch(
            self.images,
            self.targets,
            dataset.num_classes,
            mixup,
            cutmix,
            np.random.default_rng(mix_seed(seed, 1)),
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return self.iterate(0)

    def iterate(self, start_batch: int = 0) -> Iterator[Tuple[Tensor, Tensor]]:
        for _ in range(start_batch, self.length):
            yield self.images, self.targets
