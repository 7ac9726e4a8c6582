"""``poptorch.DataLoader`` and ``poptorch.AsynchronousDataAccessor`` with PopTorch 3.4's rules.

Sources (graphcore/poptorch, tag sdk/poptorch/3.4.0): python/__init__.py:229-520 (DataLoader:
batch sizes, batch_sampler rules, the AsyncRebatched set-up, __len__, __iter__),
python/__init__.py:526-650 (AsynchronousDataAccessor), python/_dataloader.py (its worker:
start-up, ring buffer, rebatching, end of file), python/_utils.py:151-176 (combining a
batch_sampler's batches in Sync mode).

What the emulator keeps of them:
  * a host batch is batch_size × deviceIterations × (replicationFactor / inputGroupSize) ×
    gradientAccumulation samples (the "combined batch size");
  * a ``batch_sampler`` excludes batch_size and shuffle; its own ``batch_size`` is the
    micro-batch; in Sync mode its batches are concatenated ``num_batches_to_combine`` at a time;
  * Async / AsyncRebatched: the DataLoader is pickled (the worker process receives it so) and
    iterated by a worker of its own, with its own random state, never the caller's; the caller's
    object is never iterated, so what the caller changes on it afterwards (a sampler's epoch)
    does not reach the worker. Each element must be a tensor, a dict of tensors or a flat tuple
    of tensors whose first dimension is the batch; AsyncRebatched concatenates them into combined
    batches. Returned tensors live in a ring buffer of ``buffer_size`` slots reused in place (an
    element kept past later requests is overwritten, as in PopTorch's shared memory);
    ``load_indefinitely`` starts the next pass over the data at the end of one; a new iterator
    asked for part-way through a pass restarts the data from its beginning (resetIterator).
The emulator's worker is a thread over the pickled copy rather than a process: the isolation
of state is the same, the parallelism is not (it shares the interpreter).
"""

import pickle
import threading
import traceback
from collections import deque
from typing import Any, Dict, Optional

import torch

from .custom_args import custom_parser, empty_template
from .enums import DataLoaderMode
from .errors import RuntimeRefusal
from .options import Options

# A fresh process's torch default generator seed (c10 default_rng_seed_val): the RNG state the
# real worker process (forkserver: a new interpreter) starts from.
FRESH_PROCESS_SEED = 67280421310721


class _ProcessShard(torch.utils.data.Dataset):
    """This process's contiguous block of the dataset (python/__init__.py:126-212): process 0's
    elements, then process 1's, ... With drop_last every process gets the same whole number of
    combined batches; without it the elements are spread as evenly as possible. Shuffling permutes
    the global indices with the options' seed (the same order in every process) and alternates
    the block's start by the leftovers each epoch, so that they get used too."""

    def __init__(self, dataset, options: Options, step: int, drop_last: bool):
        total, count, rank = len(dataset), options.Distributed.numProcesses, options.Distributed.processId
        if drop_last:  # __init__.py:143-148: all processes must run the same number of steps
            per_process = step * (total // (step * count))
            self._start = rank * per_process
            self._length = min(per_process, total - self._start)
            self._leftovers = total % per_process
        else:  # __init__.py:149-158
            sizes = [total // count + (total % count > p) for p in range(count)]
            self._start, self._length, self._leftovers = sum(sizes[:rank]), sizes[rank], 0
        self._first_start = self._start
        self._dataset = dataset
        self._seed = options.random_seed
        self._generator_state = None
        self._order: Optional[torch.Tensor] = None

    def shuffle_global_indices(self) -> None:
        """A new permutation of the whole dataset, continuing the seeded generator (:166-183)."""
        generator = torch.Generator()
        if self._generator_state is None:
            assert self._seed is not None, (
                "Seed must be set when shuffling so that all "
                "instances end up with the same shuffled global indices."
            )
            generator.manual_seed(self._seed)
        else:
            generator.set_state(self._generator_state)
        order = torch.randperm(len(self._dataset), generator=generator)
        if self._order is None:
            self._order = order.share_memory_()  # persistent torch workers see later epochs' orders
        else:
            self._order.copy_(order)
        self._generator_state = generator.get_state()

    def swap_range(self) -> None:
        """Alternate the block's start between its base and base + leftovers (:185-201)."""
        self._start = (
            self._first_start + self._leftovers if self._start == self._first_start else self._first_start
        )

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int):
        position = index + self._start
        return self._dataset[position if self._order is None else self._order[position]]


class DataLoader(torch.utils.data.DataLoader):
    def __init__(
        self,
        options: Options,
        dataset: torch.utils.data.Dataset,
        batch_size: int = 1,
        shuffle: Optional[bool] = None,
        num_workers: int = 0,
        drop_last: bool = True,
        persistent_workers: Optional[bool] = None,
        auto_distributed_partitioning: bool = True,
        mode: DataLoaderMode = DataLoaderMode.Sync,
        async_options: Optional[Dict[str, Any]] = None,
        rebatched_worker_size: Optional[int] = None,
        batch_sampler=None,
        **kwargs,
    ):
        self.options = options if options is not None else Options()
        self.options._freeze()  # PopTorch's DataLoader freezes the options it is given
        o = self.options
        self._is_user_batch_sampler_set = batch_sampler is not None
        if self._is_user_batch_sampler_set:
            # __init__.py:292-305
            if batch_size != 1 or shuffle:
                raise RuntimeError("`batch_sampler` option is mutually exclusive with batch_size, shuffle.")
            batch_size = getattr(batch_sampler, "batch_size", batch_size)
            self.batch_sampler_drop_last = drop_last
            drop_last = None
        elif shuffle is None:
            shuffle = False
        if persistent_workers is None:
            persistent_workers = num_workers > 0
        # __init__.py:318-330: batch_size=None hands the dataset's items through unbatched
        self._num_batches_to_combine: Optional[int] = None
        self.combined_batch_size: Optional[int] = None
        if batch_size is not None:
            groups = o.replication_factor // getattr(o, "input_group_size", 1)
            self._num_batches_to_combine = o.device_iterations * groups * o.Training.gradient_accumulation
            self.combined_batch_size = batch_size * self._num_batches_to_combine
        self.mode = mode
        self._shuffle_shards = False
        if o.Distributed.numProcesses > 1 and auto_distributed_partitioning:
            dataset, shuffle = self._shard(dataset, shuffle, drop_last, batch_sampler)
        dataset_batch_size = 1 if self._is_user_batch_sampler_set else self.combined_batch_size
        real_drop_last = self.batch_sampler_drop_last if self._is_user_batch_sampler_set else drop_last
        # __init__.py:431-449: AsyncRebatched (or Async with a remainder) rebatches in the worker
        rebatched_size = None
        if mode == DataLoaderMode.AsyncRebatched or (
            mode == DataLoaderMode.Async and not real_drop_last and (self.combined_batch_size or 0) > 1
        ):
            mode = DataLoaderMode.Async
            rebatched_size = self.combined_batch_size
            self.rebatched_drop_last = drop_last
            drop_last = False
            if rebatched_worker_size is not None:
                assert rebatched_worker_size <= self.combined_batch_size, (
                    f"The rebatched_worker_size ({rebatched_worker_size}) must be <= to the combined "
                    f"batch size ({self.combined_batch_size})"
                )
                dataset_batch_size = rebatched_worker_size
        super().__init__(
            dataset,
            batch_size=dataset_batch_size,
            shuffle=bool(shuffle),
            batch_sampler=batch_sampler,
            num_workers=num_workers,
            drop_last=drop_last,
            persistent_workers=persistent_workers and num_workers > 0,
            **kwargs,
        )
        self._accessor = None
        if mode == DataLoaderMode.Async:
            async_options = dict(async_options or {})
            assert "rebatched_size" not in async_options, (
                "You cannot use DataLoaderMode.AsyncRebatched and manually specify the rebatched_size "
                "in async_options"
            )
            self._accessor = AsynchronousDataAccessor(self, **async_options, rebatched_size=rebatched_size)

    def _shard(self, dataset, shuffle, drop_last, batch_sampler):
        """This process's part of the dataset, and whether torch still shuffles it."""
        if batch_sampler is not None:  # __init__.py:298-302
            raise RuntimeError(
                "`batch_sampler` option is mutually exclusive with auto_distributed_partitioning=True."
            )
        if isinstance(dataset, torch.utils.data.IterableDataset):  # __init__.py:341-345
            raise AssertionError("auto_distributed_partitioning not supported for IterableDataset")
        # __init__.py:401-418: a seed keeps the order the same in every process; the shard shuffles
        assert not shuffle or self.options.random_seed is not None, (
            "When using auto_distributed_partitioning you must set poptorch.Options.randomSeed() "
            "to ensure that tensors are in the same order in all processes."
        )
        assert self.combined_batch_size is not None, (  # __init__.py:405-407
            "batch_size=None not allowed when using auto_distributed_partitioning."
        )
        self._shuffle_shards = bool(shuffle)
        return _ProcessShard(dataset, self.options, self.combined_batch_size, drop_last), False

    @property
    def combinedBatchSize(self) -> Optional[int]:  # noqa: N802  (PopTorch's name)
        return self.combined_batch_size

    def __len__(self) -> int:
        # __init__.py:468-478: rebatching counts combined batches of the dataset's length
        if self._accessor is not None and self._accessor.rebatched_size:
            count, rest = divmod(len(self.dataset), self._accessor.rebatched_size)
            return count + (1 if rest and not self.rebatched_drop_last else 0)
        return super().__len__()

    def terminate(self) -> None:
        if getattr(self, "_accessor", None) is not None:
            self._accessor.terminate()

    def __del__(self) -> None:
        self.terminate()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_accessor"] = None  # the worker's copy has no accessor of its own
        return state

    def __iter__(self):
        if self._shuffle_shards:  # __init__.py:510-513: a new global order each epoch
            self.dataset.shuffle_global_indices()
            self.dataset.swap_range()
        if self._accessor is not None:
            return iter(self._accessor)
        if self._is_user_batch_sampler_set and self._num_batches_to_combine != 1:
            return _combined(super().__iter__(), self._num_batches_to_combine, self.batch_sampler_drop_last)
        return super().__iter__()


def _flat(batch):
    """The batch's tensors and what rebuilds it: a dict's keys, a custom type's object, or None."""
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    parser = custom_parser(batch)
    if parser is not None:  # _dataloader.py:321-334,457-459: taken apart by its parser
        return tuple(parser.yieldTensors(batch)), batch
    if isinstance(batch, dict):
        return tuple(batch.values()), list(batch.keys())
    return tuple(batch), None


def _shape(tensors, structure, single):
    if single:
        return tensors[0]
    parser = custom_parser(structure)
    if parser is not None:
        return parser.reconstruct(structure, iter(tensors))
    if structure is not None:
        return dict(zip(structure, tensors))
    return list(tensors)


def _combined(batches, count: int, drop_last: bool):
    """_utils.py:151-176: concatenate ``count`` consecutive batches along dim 0."""
    pending = []
    for batch in batches:
        pending.append(batch)
        if len(pending) == count:
            yield _concat(pending)
            pending = []
    if pending and not drop_last:
        yield _concat(pending)


def _concat(batches):
    tensors, keys = _flat(batches[0])
    parts = [_flat(b)[0] for b in batches]
    joined = [torch.cat([p[i] for p in parts]) for i in range(len(tensors))]
    return _shape(joined, keys, isinstance(batches[0], torch.Tensor))


class AsynchronousDataAccessor:
    """__init__.py:526-650 and _dataloader.py's worker, emulated with a thread (see the module)."""

    def __init__(
        self,
        dataset,
        buffer_size: int = 3,
        miss_sleep_time_in_ms: float = 0.1,
        load_indefinitely: bool = True,
        early_preload: bool = False,
        sharing_strategy=None,
        rebatched_size: Optional[int] = None,
    ):
        if isinstance(dataset, DataLoader) and dataset._accessor is not None:
            raise RuntimeError(
                "The DataLoader already uses an AsynchronousDataAccessor internally. Either "
                "use the existing one or set mode='poptorch.DataLoaderMode.Sync' in the "
                "DataLoader."
            )
        if rebatched_size is not None:
            assert rebatched_size > 1, "rebatched_size must be None or greater than 1"
        self.rebatched_size = rebatched_size
        self._dataset = dataset
        self._buffer_size, self._load_indefinitely = max(int(buffer_size), 2), load_indefinitely
        self._drop_last = getattr(dataset, "rebatched_drop_last", True)
        # _dataloader.py:202-233 (_start): the worker gets a pickled copy (a process boundary)
        self._copy = pickle.loads(pickle.dumps(dataset, protocol=4))
        if isinstance(self._copy, torch.utils.data.DataLoader):
            # the worker process's own RNG: a fresh interpreter's default generator
            self._copy.generator = torch.Generator().manual_seed(FRESH_PROCESS_SEED)
        self._cond = threading.Condition()
        self._ready: deque = deque()  # (generation, element or None at the end of a pass)
        self._generation = 0  # bumped by a reset: the worker restarts, stale elements are dropped
        self._stop, self._error = False, None
        self._used = self._at_eof = False
        self._slots, self._slot, self._structure = None, 0, None
        # _dataloader.py:294-367: at start-up the worker makes its iterator and loads the first
        # element, whose structure sizes the ring buffer; the constructor waits for that and fails
        # when the worker does (_dataloader.py:233-256). Done here, on the caller's thread, so that
        # the torch workers the iterator may start are not forked from a thread.
        # Any failure there ends the worker process, which prints its traceback; the parent then
        # raises this one Error (_dataloader.py:251-256, tests/dataloader_test.py:605-632).
        try:
            self._iterator = iter(self._copy)
            try:
                self._first = next(self._iterator)
            except StopIteration:
                raise RuntimeError("The Dataset is empty") from None  # _dataloader.py:301-306
            self._check(self._first)
        except Exception as error:
            traceback.print_exc()
            raise RuntimeRefusal(
                f"AsynchronousDataAccessor worker thread failed to start (Check above for details): {error}"
            ) from error
        self._thread = threading.Thread(target=self._run, name="poptorch-emulator-async", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the worker
    @staticmethod
    def _check(data):
        """_dataloader.py:358-367: a flat container of tensors, nothing else."""
        tensors, keys = _flat(data)
        for index, tensor in enumerate(tensors):
            assert isinstance(tensor, torch.Tensor), (
                f"Tensor at index {index} is not a torch tensor ({type(tensor)}). "
                "AsynchronousDataAccessor expects data to be organised as a flat 1D container of tensors."
            )
        return tensors, keys

    def _run(self) -> None:
        try:
            generation, iterator, first = self._generation, self._iterator, self._first
            pending, filled = [], 0
            while not self._stop:
                if self._generation != generation:  # _dataloader.py:418-433: reset
                    generation, iterator, pending, filled = self._generation, iter(self._copy), [], 0
                    first = None
                try:
                    data = first if first is not None else next(iterator)
                    first = None
                except StopIteration:
                    if pending and not self._drop_last:
                        self._publish(generation, pending)
                    pending, filled = [], 0
                    self._publish(generation, None)  # end of file
                    if not self._load_indefinitely:
                        return
                    iterator = iter(self._copy)
                    continue
                tensors, keys = self._check(data)
                if self._structure is None:
                    parser = custom_parser(data)
                    template = keys if parser is None else empty_template(data, parser)
                    self._structure = (isinstance(data, torch.Tensor), template)
                if not self.rebatched_size:
                    self._publish(generation, [tensors])
                    continue
                # _dataloader.py:533-552: copy into the combined batch, keep the overflow
                while tensors:
                    take = min(self.rebatched_size - filled, len(tensors[0]))
                    pending.append(tuple(t[:take] for t in tensors))
                    filled += take
                    tensors = tuple(t[take:] for t in tensors) if take < len(tensors[0]) else ()
                    if filled == self.rebatched_size:
                        self._publish(generation, pending)
                        pending, filled = [], 0
        except BaseException as error:  # surfaced on the caller's next request
            with self._cond:
                self._error = error
                self._cond.notify_all()

    def _publish(self, generation: int, parts) -> None:
        with self._cond:
            # one slot stays with the reader: at most buffer_size - 1 elements wait
            while (
                len(self._ready) >= self._buffer_size - 1
                and not self._stop
                and generation == self._generation
            ):
                self._cond.wait(0.05)
            if self._stop or generation != self._generation:
                return
            element = (
                None
                if parts is None
                else [
                    torch.cat([p[i] for p in parts]) if len(parts) > 1 else parts[0][i]
                    for i in range(len(parts[0]))
                ]
            )
            self._ready.append((generation, element))
            self._cond.notify_all()

    # ---------------------------------------------------------------- the reader
    def _into_slot(self, tensors):
        """The element copied into the ring buffer's next slot (reused in place later)."""
        if self._slots is None:
            self._slots = [[torch.empty_like(t) for t in tensors] for _ in range(self._buffer_size)]
        slot = self._slots[self._slot]
        if any(s.shape != t.shape for s, t in zip(slot, tensors)):
            slot = [t.clone() for t in tensors]  # a short last element: tensors of its own
        else:
            for s, t in zip(slot, tensors):
                s.copy_(t)
        self._slot = (self._slot + 1) % self._buffer_size
        return slot

    def __iter__(self):
        # __init__.py resetIterator (_dataloader.py:45-74): part-way through a pass, restart it
        if self._used and not self._at_eof:
            with self._cond:
                self._generation += 1
                self._ready.clear()
                self._cond.notify_all()
        self._used = self._at_eof = False
        return self._elements(self._generation)

    def _elements(self, generation: int):
        while True:
            with self._cond:
                while not self._ready and self._error is None and self._thread.is_alive():
                    self._cond.wait(0.05)
                if self._error is not None:
                    error, self._error = self._error, None
                    raise error
                if generation != self._generation or not self._ready:
                    return  # superseded by a newer iterator, or the worker has ended
                stamp, element = self._ready.popleft()
                self._cond.notify_all()
            if stamp != generation:
                continue
            if element is None:
                self._at_eof = True
                return
            self._used = True
            single, keys = self._structure
            yield _shape(self._into_slot(element), keys, single)

    def __len__(self) -> int:
        length = len(self._dataset)
        if self.rebatched_size and getattr(self._dataset, "_accessor", None) is not self:
            length = length * self._dataset.batch_size // self.rebatched_size
        return length

    def terminate(self) -> None:
        if not hasattr(self, "_thread"):  # the constructor failed before the worker started
            return
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def __del__(self) -> None:
        self.terminate()


__all__ = ["AsynchronousDataAccessor", "DataLoader"]
