"""Datasets: ImageNet-style folders and the built-ins (digits, synthetic, generated).

Every dataset yields ``(uint8 tensor [3, r, r], int label)`` from ``dataset[i]`` and has
``.num_classes`` and ``.classes``. The loader calls ``dataset.sample(i, seed)`` instead, which
makes the augmentation a function of ``seed`` alone and replaces an unreadable image by the next
readable one, returning the paths it had to skip so the main process can count and report them.
"""

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from app.errors import AppError

from .transforms import train_transform, val_transform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
BUILTIN = ("digits", "synthetic", "generated")
LAYOUT = (
    "expected an ImageNet-style folder: <root>/train/<class>/<image> and "
    "<root>/val/<class>/<image> (one sub-folder per class, images with extensions "
    f"{', '.join(IMAGE_EXTENSIONS)}), or one of the built-in datasets {', '.join(BUILTIN)}"
)
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
GENERATED_CLASSES = 1000  # synthetic/generated data stand in for ImageNet
IMAGENET_CLASSES = 1000  # a folder that is not on this machine (planning without the data)


class DatasetError(AppError, ValueError):
    """The dataset asked for does not exist, has the wrong layout or is too small for a batch; the
    message says the fix. An AppError: the command line prints it without a traceback (status 2)."""


Sample = Tuple[torch.Tensor, int, Tuple[str, ...]]


class ImageDataset(torch.utils.data.Dataset):
    """Common part: the split's transform, seeded sampling, replacement of unreadable images."""

    classes: List[str]

    def __init__(
        self,
        split: str,
        resolution: int,
        scale: Sequence[float] = (0.08, 1.0),
        hflip: bool = True,
        augment: bool = True,
        reduced_decode: bool = True,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is invalid: expected 'train' or 'val'")
        self.split, self.resolution = split, resolution
        self.scale, self.hflip = tuple(scale), hflip
        # augment=False: training images get the validation preprocessing (fine-tuning)
        self.augment = augment
        # decode JPEGs at 1/2, 1/4, 1/8 where the crop allows (app/data/transforms.py)
        self.reduced_decode = reduced_decode

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def label(self, index: int) -> int:
        raise NotImplementedError

    def image(self, index: int) -> Image.Image:
        """The decoded image; raises on unreadable data."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"{type(self).__name__}[{index}]"

    def transform(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        """The split's transform of ``image``, which may be opened but not yet decoded (the
        transform decodes it, reduced where the crop allows)."""
        if self.split == "train" and self.augment:
            return train_transform(
                image, self.resolution, self.scale, self.hflip, rng, reduced=self.reduced_decode
            )
        return val_transform(image, self.resolution, reduced=self.reduced_decode)

    def load(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        """Decode and transform image ``index``; raises on unreadable data."""
        return self.transform(self.image(index), rng)

    def sample(self, index: int, seed: int) -> Sample:
        """(image, label, skipped paths) for ``index``, the augmentation drawn from ``seed``. An image
        that fails to decode is replaced by the next readable one (wrapping around), so a batch
        keeps its size; only when no image at all can be read does this raise."""
        skipped: List[str] = []
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            rng = np.random.default_rng(seed)  # afresh for a replacement: its draws as its own
            try:
                # the decode happens inside the transform (after the crop is drawn), so it too
                # must be inside the try
                image = self.load(i, rng)
            except Exception:  # any decoding failure (truncated, not an image, unreadable) is a skip
                skipped.append(self.describe(i))
                continue
            return image, self.label(i), tuple(skipped)
        raise DatasetError(f"none of the {len(self)} images of {self.describe(0)} could be read")

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        # outside the loader: augmentation seeded from torch's global RNG (torch.manual_seed rules)
        seed = int(torch.randint(0, 2**62, (1,)))
        image, label, _ = self.sample(index, seed)
        return image, label


# ----------------------------------------------------------------------------- folders


def is_a(entry: "os.DirEntry", kind: str) -> bool:
    """Whether a folder entry is a ``kind`` ("dir" or "file"), following symbolic links. A dangling
    link is neither (it is skipped); a link loop, which no scan can follow, is refused by name."""
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError as error:
        raise DatasetError(
            f"{entry.path} cannot be read: {error.strerror or error} (a symbolic link "
            "that points back at itself, or at a link that does): remove it, or point "
            "it at a real folder or image"
        ) from None


def subfolders(folder: Path) -> List[str]:
    """The names of the folders in ``folder`` (through links)."""
    with os.scandir(folder) as entries:
        return [e.name for e in entries if is_a(e, "dir")]


def _scan(split_dir: Path, classes: List[str]) -> List[Tuple[str, int]]:
    items = []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        with os.scandir(class_dir) as entries:
            files = sorted(
                e.path for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS) and is_a(e, "file")
            )
        items.extend((f, label) for f in files)
    return items


class FolderDataset(ImageDataset):
    """``<root>/<split>/<class>/<image>``. Classes are the sub-folders of ``train/`` (sorted), so
    labels agree between splits; a ``val/`` class missing from ``train/`` is an error."""

    def __init__(self, root: str, split: str, resolution: int, **kwargs: Any):
        super().__init__(split, resolution, **kwargs)
        base = Path(root).expanduser()
        if not base.is_dir():
            raise DatasetError(f"data.dataset={root!r}: no such folder; {LAYOUT}")
        split_dir = base / split
        for needed in ("train", split):
            if not (base / needed).is_dir():
                raise DatasetError(f"data.dataset={root!r} has no {needed}/ folder; {LAYOUT}")
        self.classes = sorted(subfolders(base / "train"))
        if not self.classes:
            raise DatasetError(f"data.dataset={root!r}: train/ has no class sub-folders; {LAYOUT}")
        extra = sorted(set(subfolders(split_dir)) - set(self.classes))
        if extra:
            raise DatasetError(
                f"data.dataset={root!r}: {split}/ has classes not in train/: "
                f"{', '.join(extra[:5])}; both splits must use the same class folders"
            )
        self.items = _scan(split_dir, self.classes)
        if not self.items:
            raise DatasetError(f"data.dataset={root!r}: {split}/ holds no images; {LAYOUT}")
        self.root = str(base)

    def __len__(self) -> int:
        return len(self.items)

    def label(self, index: int) -> int:
        return self.items[index][1]

    def image(self, index: int) -> Image.Image:
        with Image.open(self.items[index][0]) as image:
            return image.convert("RGB")  # convert() forces the full decode inside the try

    def load(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        # opened, not decoded: the transform draws the crop from the header's size, then decodes
        # only the resolution it needs; closing the file afterwards in every case
        with Image.open(self.items[index][0]) as image:
            return self.transform(image, rng)

    def describe(self, index: int) -> str:
        return self.items[index][0]


# ----------------------------------------------------------------------------- built-ins


@lru_cache(maxsize=1)
def digits_split() -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1,797 8×8 images, no download) as uint8 0–255, split once
    80/20, stratified by class, with a fixed seed: (train_x, train_y, val_x, val_y)."""
    from sklearn.datasets import load_digits  # (only when digits are used)
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    tx, vx, ty, vy = train_test_split(
        images,
        digits.target,
        test_size=DIGITS_VAL_FRACTION,
        stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    return tx, ty.astype(np.int64), vx, vy.astype(np.int64)


class DigitsDataset(ImageDataset):
    """Handwritten digits, grey 8×8 upscaled by the transforms to r×r RGB."""

    classes = [str(d) for d in range(10)]

    def __init__(self, split: str, resolution: int, **kwargs: Any):
        super().__init__(split, resolution, **kwargs)
        tx, ty, vx, vy = digits_split()
        self.images, self.targets = (tx, ty) if split == "train" else (vx, vy)

    def __len__(self) -> int:
        return len(self.targets)

    def label(self, index: int) -> int:
        return int(self.targets[index])

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])  # 2-D uint8: mode L


class GeneratedDataset(ImageDataset):
    """Random images made on the host per sample, then the split's real transform: measures the
    input pipeline (generation + augmentation + collate + transfer) without any disk."""

    classes = [f"class_{i}" for i in range(GENERATED_CLASSES)]

    def __init__(self, split: str, resolution: int, images: int, **kwargs: Any):
        super().__init__(split, resolution, **kwargs)
        self.length = images
        self.source_size = round(resolution * 256 / 224)  # a little larger than the crop, as on disk

    def __len__(self) -> int:
        return self.length

    def label(self, index: int) -> int:
        return index % self.num_classes

    def image(self, index: int) -> Image.Image:
        # the pixels vary per call (fresh work each step); only the label is tied to the index
        size = self.source_size
        pixels = np.random.default_rng().integers(0, 256, (size, size, 3), dtype=np.uint8)
        return Image.fromarray(pixels)


class SyntheticDataset(GeneratedDataset):
    """Marker for ``synthetic``: build_loader turns it into one fixed batch already on the device.
    Indexing it still works (random images), for code that inspects a dataset."""


def build_dataset(cfg: Any, split: str, resolution: int, root: Optional[str] = None) -> ImageDataset:
    # cfg: the run's app.config.Config, which imports this module (so no annotation naming it)
    """The dataset named by ``cfg.data.dataset`` (or ``root``) for ``split`` at ``resolution``."""
    name = root if root is not None else cfg.data.dataset
    opts = dict(
        scale=cfg.data.random_crop_scale,
        hflip=cfg.data.hflip,
        augment=cfg.data.augment,
        reduced_decode=cfg.data.reduced_decode,
    )
    if name == "digits":
        return DigitsDataset(split, resolution, **opts)
    if name in ("synthetic", "generated"):
        cls = SyntheticDataset if name == "synthetic" else GeneratedDataset
        return cls(split, resolution, cfg.data.synthetic_images, **opts)
    return FolderDataset(name, split, resolution, **opts)


def num_classes_of(name: str) -> int:
    """The number of classes of ``data.dataset`` without reading any image: what a backend or the
    planner needs before the data is loaded. A folder counts the class sub-folders of its
    ``train/``; one that is not on this machine (``python -m app plan`` needs no data) is taken
    as ImageNet's."""
    if name == "digits":
        return len(DigitsDataset.classes)
    if name in ("synthetic", "generated"):
        return GENERATED_CLASSES
    train = Path(name).expanduser() / "train"
    if not train.is_dir():
        return IMAGENET_CLASSES
    return len(subfolders(train)) or IMAGENET_CLASSES
