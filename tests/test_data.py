"""app/data: transforms, folders with a corrupt file, built-ins, determinism, resume, mixing."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from app.config import build_config
from app.data import IMAGENET_MEAN, IMAGENET_STD, DatasetError, build_dataset, build_loader
from app.data.datasets import ImageDataset, digits_split
from app.data.mixing import cutmix, mixup, one_hot
from app.data.transforms import train_transform, val_resize_size, val_transform
from app.specs import data_spec


def make_cfg(*overrides):
    return build_config(None, list(overrides))


# ----------------------------------------------------------------------------- transforms


def test_train_transform_shape_dtype_and_flip_varies():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8))
    outs = [train_transform(image, 32, (0.08, 1.0), True, np.random.default_rng(s)) for s in range(4)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.uint8 for o in outs)
    assert not torch.equal(outs[0], outs[1])  # different seeds, different crops
    again = train_transform(image, 32, (0.08, 1.0), True, np.random.default_rng(0))
    assert torch.equal(outs[0], again)  # same seed, same crop


def test_val_transform_resizes_shorter_side_then_centre_crops():
    # shorter side 100 → round(56·256/224) = 64 (factor 0.64), so the 200×100 image becomes 128×64,
    # then the centre 56×56 is kept. A centred white 50×50 square becomes a centred 32×32 one.
    assert val_resize_size(200, 100, 56) == (128, 64)
    assert val_resize_size(100, 300, 224) == (256, 768)
    pixels = np.zeros((100, 200), dtype=np.uint8)
    pixels[25:75, 75:125] = 255
    out = val_transform(Image.fromarray(pixels), 56)
    assert out.shape == (3, 56, 56) and out.dtype == torch.uint8
    white = (out[0] > 127).numpy()
    rows, cols = np.nonzero(white)
    assert rows.min() == 12 and rows.max() == 43  # 32 rows centred in 56
    assert cols.min() == 12 and cols.max() == 43


# ----------------------------------------------------------------------------- folders


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """train/ with 3 classes × 4 JPEGs, one of them corrupt (dog/3.jpg), val/ with 2 per class."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for c in ("cat", "dog", "eel"):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(40, 90, 2)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    (root / "train" / "dog" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated: not a jpeg")
    truncated = root / "val" / "eel" / "1.jpg"  # a real JPEG cut in half: opens, fails to decode
    truncated.write_bytes(truncated.read_bytes()[:300])
    (root / "train" / "dog" / "notes.txt").write_text("not an image extension: ignored")
    return root


def test_folder_dataset_classes_and_labels(image_folder):
    cfg = make_cfg(f"data.dataset={image_folder}")
    train = build_dataset(cfg, "train", 32)
    val = build_dataset(cfg, "val", 32)
    assert train.classes == val.classes == ["cat", "dog", "eel"] and train.num_classes == 3
    assert len(train) == 12 and len(val) == 6  # the corrupt .jpg is listed, the .txt is not
    image, label = val[4]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_skipped_counted_and_batches_full(image_folder, workers):
    cfg = make_cfg(f"data.dataset={image_folder}", f"data.workers={workers}")
    dataset = build_dataset(cfg, "train", 32)
    loader = build_loader(dataset, 4, train=True, spec=data_spec(cfg), seed=0)
    assert len(loader) == 3  # 12 images: every one is asked for once per epoch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert [b[0].shape for b in batches] == [(4, 3, 32, 32)] * 3
            assert all(b[1].dtype == torch.int64 and b[1].shape == (4,) for b in batches)
    broken = str(image_folder / "train" / "dog" / "3.jpg")
    assert loader.skipped == 2 and loader.skipped_files == {broken}  # once per epoch, both counted
    named = [w for w in caught if broken in str(w.message)]
    assert len(named) == 1  # warned once per file, not once per hit
    val = build_loader(build_dataset(cfg, "val", 32), 4, train=False, spec=data_spec(cfg))
    with pytest.warns(RuntimeWarning, match="val/eel/1.jpg"):
        shapes = [tuple(images.shape) for images, _ in val]
    assert shapes == [(4, 3, 32, 32), (2, 3, 32, 32)] and val.skipped == 1  # val keeps its last batch


def test_folder_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        build_dataset(make_cfg(f"data.dataset={tmp_path / 'missing'}"), "train", 32)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no val/ folder.*train/<class>"):
        build_dataset(make_cfg(f"data.dataset={tmp_path}"), "val", 32)
    with pytest.raises(DatasetError, match="holds no images"):
        build_dataset(make_cfg(f"data.dataset={tmp_path}"), "train", 32)


# ----------------------------------------------------------------------------- built-ins


def test_digits_split_stratified_disjoint_deterministic():
    tx, ty, vx, vy = digits_split()
    assert len(ty) + len(vy) == 1797 and abs(len(vy) - 0.2 * 1797) <= 1
    assert tx.dtype == np.uint8 and tx.max() == 255
    counts_t, counts_v = np.bincount(ty, minlength=10), np.bincount(vy, minlength=10)
    assert np.all(np.abs(counts_v / counts_t - 0.25) < 0.03)  # every class 80/20
    train_rows = {r.tobytes() for r in tx.reshape(len(tx), -1)}
    val_rows = [r.tobytes() for r in vx.reshape(len(vx), -1)]
    # disjoint as samples (a few digits are pixel-identical duplicates in the source data)
    assert sum(r in train_rows for r in val_rows) < 5
    digits_split.cache_clear()
    tx2, ty2, _, vy2 = digits_split()
    assert np.array_equal(tx, tx2) and np.array_equal(ty, ty2) and np.array_equal(vy, vy2)
    cfg = make_cfg()
    train = build_dataset(cfg, "train", 40)
    image, label = train[0]
    assert image.shape == (3, 40, 40) and image.dtype == torch.uint8 and 0 <= label < 10
    assert torch.equal(image[0], image[1])  # grey replicated to RGB


def test_synthetic_fixed_batch_on_device():
    cfg = make_cfg("data.dataset=synthetic", "data.synthetic_images=12")
    dataset = build_dataset(cfg, "train", 32)
    loader = build_loader(dataset, 4, train=True, spec=data_spec(cfg), device="cpu", seed=0)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    first = batches[0]
    assert first[0].device.type == "cpu" and first[0].dtype == torch.uint8
    assert all(b[0] is first[0] and b[1] is first[1] for b in batches)  # the same tensors, no I/O
    assert first[1].dtype == torch.int64 and int(first[1].max()) < dataset.num_classes
    ipu = build_loader(dataset, 4, train=True, spec=data_spec(cfg), device="ipu-model", seed=0)
    assert next(iter(ipu))[0].device.type == "cpu"  # PopTorch copies host tensors itself
    if torch.cuda.is_available():
        cuda = build_loader(dataset, 4, train=True, spec=data_spec(cfg), device="cuda", seed=0)
        assert next(iter(cuda))[0].device.type == "cuda"


def test_generated_goes_through_collate():
    cfg = make_cfg("data.dataset=generated", "data.synthetic_images=8", "data.workers=0")
    loader = build_loader(build_dataset(cfg, "train", 32), 4, train=True, spec=data_spec(cfg), seed=0)
    a, b = list(loader)
    assert a[0].shape == (4, 3, 32, 32) and not torch.equal(a[0], b[0])


# ----------------------------------------------------------------------------- order and resume


class TinyDataset(ImageDataset):
    """Random 12×12 images in memory, through the real training transform; label = index."""

    def __init__(self, size):
        super().__init__("train", 16, scale=(0.5, 1.0), hflip=True)
        rng = np.random.default_rng(1)
        self.pixels = rng.integers(0, 256, (size, 12, 12, 3), dtype=np.uint8)
        self.classes = [str(i) for i in range(size)]

    def __len__(self):
        return len(self.pixels)

    def label(self, index):
        return index

    def image(self, index):
        return Image.fromarray(self.pixels[index])


def test_order_deterministic_per_seed_epoch_and_resume_equals_tail():
    cfg = make_cfg("data.workers=0")
    small = TinyDataset(40)

    def epoch_batches(seed, epoch, start=0, config=cfg):
        loader = build_loader(small, 8, train=True, spec=data_spec(config), seed=seed)
        loader.set_epoch(epoch)
        return list(loader.iterate(start_batch=start))

    a, b = epoch_batches(0, 1), epoch_batches(0, 1)
    assert len(a) == 5
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    other_epoch = epoch_batches(0, 2)
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, other_epoch))
    tail = epoch_batches(0, 1, start=3)
    assert len(tail) == 2
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a[3:], tail))
    # worker processes change nothing: augmentation is seeded per sample, not per worker
    tail_workers = epoch_batches(0, 1, start=3, config=make_cfg("data.workers=2"))
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(tail, tail_workers))


@pytest.mark.parametrize("workers", [0, 1])
def test_loading_never_draws_from_the_global_rng(workers):
    """Creating an iterator draws the workers' base seed: from the loader's own generator, so the
    model's random streams (dropout, drop path) do not depend on when iterators are made."""
    spec = data_spec(make_cfg(f"data.workers={workers}"))
    loader = build_loader(TinyDataset(24), 8, train=True, spec=spec, seed=0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for epoch in range(3):
        loader.set_epoch(epoch)
        assert len(list(loader.iterate(start_batch=epoch % 2))) == 3 - epoch % 2
    assert torch.equal(torch.get_rng_state(), state)


def test_distributed_sampler_splits_the_epoch():
    cfg = make_cfg("data.workers=0")
    small = TinyDataset(40)
    seen = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(small, num_replicas=2, rank=rank, seed=5)
        loader = build_loader(small, 4, train=True, spec=data_spec(cfg), sampler=sampler, seed=0)
        loader.set_epoch(3)  # passed on to the sampler
        assert len(loader) == 5
        seen.append(torch.cat([targets for _, targets in loader]).tolist())
    assert sorted(seen[0] + seen[1]) == list(range(40))  # disjoint, together the whole epoch


# ----------------------------------------------------------------------------- mixing


def two_images(size, value):
    """A black image and a uniform one of ``value``."""
    return torch.stack(
        [torch.zeros(3, size, size, dtype=torch.uint8), torch.full((3, size, size), value, dtype=torch.uint8)]
    )


def test_mixup_soft_targets():
    images = two_images(8, 200)
    targets = torch.tensor([1, 3])
    mixed, soft = mixup(images, one_hot(targets, 5), np.array([0.75, 0.75]))
    assert mixed.dtype == torch.uint8 and int(mixed[0, 0, 0, 0]) == 50 and int(mixed[1, 0, 0, 0]) == 150
    assert torch.allclose(soft.sum(1), torch.ones(2))
    assert soft[0, 1] == pytest.approx(0.75) and soft[0, 3] == pytest.approx(0.25)


def test_cutmix_area_matches_lambda():
    rng = np.random.default_rng(3)
    images = two_images(32, 255)
    targets = torch.tensor([0, 1])
    for lam in (0.2, 0.5, 0.9):
        out, soft, kept = cutmix(images, one_hot(targets, 2), lam, rng)
        pasted = (out[0, 0] == 255).float().mean().item()  # sample 0 got this much of sample 1
        assert soft[0, 1].item() == pytest.approx(pasted) and soft[0, 0].item() == pytest.approx(1 - pasted)
        assert kept == pytest.approx(1 - pasted) and abs(kept - lam) < 0.1  # the box fits: no clipping
        assert torch.allclose(soft.sum(1), torch.ones(2))


def test_loader_mixes_when_configured():
    cfg = make_cfg("data.workers=0", "data.mixup=0.2", "data.cutmix_lambda=0.8")
    loader = build_loader(build_dataset(cfg, "train", 32), 16, train=True, spec=data_spec(cfg), seed=0)
    images, targets = next(iter(loader))
    assert images.dtype == torch.uint8 and targets.shape == (16, 10) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(1), torch.ones(16))
    val = build_loader(build_dataset(cfg, "val", 32), 16, train=False, spec=data_spec(cfg))
    assert next(iter(val))[1].dtype == torch.int64  # no mixing in validation
    assert len(IMAGENET_MEAN) == 3 and all(0 < m < 1 for m in IMAGENET_MEAN + IMAGENET_STD)  # 0–1 scale
