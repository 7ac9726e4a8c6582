"""Training data for the PopTorch backends: poptorch.DataLoader in AsyncRebatched mode (on the
emulator, which keeps PopTorch 3.4's DataLoader rules), batch for batch the synchronous loader's."""

import pickle

import pytest
import torch

from app.config import build_config
from app.data import build_dataset, build_loader
from app.data.poptorch_loader import PopTorchLoader
from app.specs import batch_plan, data_spec
from benchmarks.photos import make_folder
from ipu_options import emulator as poptorch

HOST = ["train.micro_batch=2", "train.grad_accum=2", "ipu.device_iterations=2"]  # host batch 8


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """24 training JPEGs (3 photographs × 8): 3 host batches per epoch."""
    return make_folder(tmp_path_factory.mktemp("photos"), 8, sizes=((200, 150), (150, 200)), qualities=(90,))


def loaders(folder, workers=0):
    overrides = HOST + [f"data.dataset={folder}", f"data.workers={workers}", "data.reduced_decode=true"]
    sync_cfg = build_config(None, overrides + ["data.async_loader=false"])
    cfg = build_config(None, overrides)
    cfg.device = "ipu-model"  # what --device ipu-model sets
    dataset = build_dataset(cfg, "train", 32)
    fast = build_loader(dataset, batch_plan(cfg), train=True, spec=data_spec(cfg), seed=3)
    return fast, build_loader(dataset, 8, train=True, spec=data_spec(sync_cfg), seed=3)


def epoch(loader, number, start=0):
    loader.set_epoch(number)
    return [(x.clone(), y.clone()) for x, y in loader.iterate(start_batch=start)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("workers", [0, 1])
def test_async_rebatched_batches_are_the_sync_loaders_across_epochs_and_resume(photos, workers):
    fast, plain = loaders(photos, workers)
    assert isinstance(fast, PopTorchLoader) and len(fast) == len(plain) == 3
    torch.manual_seed(5)
    state = torch.get_rng_state()
    for number in (0, 1):  # one stream, continued across the epoch boundary
        assert same(epoch(fast, number), epoch(plain, number))
    assert fast._loader._accessor.rebatched_size == 8  # PopTorch combined 2 × 2 × 2 micro-batches
    opened = fast._loader
    assert same(epoch(fast, 4, start=1), epoch(plain, 4, start=1))  # a resume: a new stream there
    assert fast._loader is not opened
    assert same(epoch(fast, 5), epoch(plain, 5))
    assert torch.equal(torch.get_rng_state(), state)  # the worker's RNG is its own
    fast.close()


def test_the_worker_never_sees_later_changes_to_the_callers_loader():
    ds = torch.utils.data.TensorDataset(torch.arange(24).float())
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(range(24)), 4, True)
    loader = poptorch.DataLoader(
        poptorch.Options(), ds, batch_sampler=sampler, mode=poptorch.DataLoaderMode.AsyncRebatched
    )
    sampler.batch_size = 12  # after construction: the worker iterates its own pickled copy
    (first,) = next(iter(loader))
    assert first.tolist() == [0, 1, 2, 3]
    loader.terminate()


def test_poptorch_rules_the_emulator_keeps():
    o = poptorch.Options().deviceIterations(2)
    ds = torch.utils.data.TensorDataset(torch.arange(40).float())
    sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(range(40)), 5, True)
    with pytest.raises(RuntimeError, match="mutually exclusive with batch_size, shuffle"):
        poptorch.DataLoader(o, ds, batch_size=4, batch_sampler=sampler)
    with pytest.raises(AssertionError, match="must be <= to the combined batch size"):
        poptorch.DataLoader(
            o, ds, batch_size=2, mode=poptorch.DataLoaderMode.AsyncRebatched, rebatched_worker_size=8
        )
    # Sync with a batch_sampler: its batches combined device_iterations at a time
    combined = [b[0].tolist() for b in poptorch.DataLoader(o, ds, batch_sampler=sampler)]
    assert combined[0] == list(range(10)) and len(combined) == 4
    # AsyncRebatched: the length counts combined batches; partial ones dropped (drop_last)
    rebatched = poptorch.DataLoader(o, ds, batch_size=3, mode=poptorch.DataLoaderMode.AsyncRebatched)
    assert len(rebatched) == 6 and [b[0].shape[0] for b in rebatched] == [6] * 6
    # a new iterator part-way through a pass restarts it (resetIterator)
    stream = iter(rebatched)
    next(stream)
    assert next(iter(rebatched))[0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    rebatched.terminate()
    with pytest.raises(RuntimeError, match="failed to start.*flat 1D container of tensors"):
        poptorch.DataLoader(
            o, Strings(), batch_size=1, mode=poptorch.DataLoaderMode.AsyncRebatched, collate_fn=with_paths
        )
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):  # it must cross a process
        poptorch.DataLoader(
            o, ds, batch_size=2, mode=poptorch.DataLoaderMode.AsyncRebatched, collate_fn=lambda s: s
        )


class Strings(torch.utils.data.Dataset):
    """Samples whose second field is a string: not for PopTorch's shared-memory ring buffer."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.ones(1), "a path"


def with_paths(samples):
    return torch.cat([x for x, _ in samples]), [p for _, p in samples]


def test_prefetch_below_one_is_refused_naming_the_field():
    from app.config import ConfigError

    with pytest.raises(ConfigError, match="data.prefetch"):
        build_config(None, ["data.prefetch=0"]).validate()
