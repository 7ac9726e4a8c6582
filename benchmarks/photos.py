"""Real photographs that ship inside installed packages, re-encoded as ImageNet-like JPEGs.

No downloads: scikit-learn's ``load_sample_images`` (china.jpg, flower.jpg, 640×427) and
matplotlib's ``sample_data/grace_hopper.jpg`` (512×600), plus scikit-image's bundled photographs
when that package is installed. They are natural images (edges, textures, smooth sky), which is
what JPEG's DCT and the reduced decode behave differently on; random noise would not show it.

ImageNet's training JPEGs are mostly ~500×375 / 375×500 / 500×333 at quality ~75–96, with a tail of
larger photographs; ``IMAGENET_SIZES`` and ``QUALITIES`` mimic that. Sizes larger than a source are
upsampled from it (smoother than a real large photo, so its reduced-decode error is, if anything,
lower than on real large photographs; the report says so).
"""

import io
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

IMAGENET_SIZES = ((500, 375), (375, 500), (500, 333), (640, 480), (500, 500), (1200, 900))
# the benchmark's mix, 20 long: ImageNet's common sizes (~500×375 in both orientations, 500×333,
# 500×500, 640×480 and 640×427 as scikit-learn's photographs), and one in twenty a large photograph
_COMMON = (
    (500, 375),
    (375, 500),
    (500, 333),
    (500, 375),
    (333, 500),
    (500, 500),
    (640, 480),
    (375, 500),
    (500, 375),
    (640, 427),
)
IMAGENET_MIX = _COMMON + _COMMON[:-1] + ((1200, 900),)
QUALITIES = (75, 90, 95)
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # colour photographs it ships


@lru_cache(maxsize=1)
def _sources() -> Tuple[Tuple[str, np.ndarray], ...]:
    found: List[Tuple[str, np.ndarray]] = []
    from sklearn.datasets import load_sample_images  # (bundled, no download)

    sample = load_sample_images()
    for name, pixels in zip(sample.filenames, sample.images):
        found.append((Path(name).stem, np.asarray(pixels, dtype=np.uint8)))
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if path.is_file():
            with Image.open(path) as image:
                found.append(("grace_hopper", np.asarray(image.convert("RGB"))))
    except ImportError:
        pass
    try:
        from skimage import data as skdata
    except ImportError:
        skdata = None
    for name in SKIMAGE_PHOTOS if skdata is not None else ():
        try:
            pixels = getattr(skdata, name)()
        except Exception:  # a photo that needs a download in this version: not used
            continue
        if pixels.ndim == 3 and pixels.shape[2] == 3:
            found.append((name, np.asarray(pixels, dtype=np.uint8)))
    return tuple(found)


def photographs() -> Dict[str, Image.Image]:
    """name → RGB photograph, every one found installed."""
    return {name: Image.fromarray(pixels) for name, pixels in _sources()}


def reencode(photo: Image.Image, size: Tuple[int, int], quality: int, shift: int = 0) -> bytes:
    """``photo`` cut to ``size``'s aspect ratio (the window slid by ``shift`` pixels, so one
    photograph gives several different images), resized to ``size``, saved as a JPEG."""
    width, height = photo.size
    aspect = size[0] / size[1]
    w, h = (width, round(width / aspect)) if width / height <= aspect else (round(height * aspect), height)
    x = (shift * 37) % (width - w + 1)
    y = (shift * 23) % (height - h + 1)
    window = photo.crop((x, y, x + w, y + h))
    if shift % 2:
        window = window.transpose(Image.FLIP_LEFT_RIGHT)
    out = io.BytesIO()
    window.resize(size, Image.LANCZOS).save(out, "JPEG", quality=quality)
    return out.getvalue()


def make_folder(
    root: Path,
    images_per_class: int,
    sizes: Sequence[Tuple[int, int]] = IMAGENET_SIZES,
    qualities: Sequence[int] = QUALITIES,
    val_per_class: int = 0,
) -> Path:
    """An ImageNet-style folder ``root/{train,val}/<photograph>/<n>.jpg``: one class per
    photograph, its images cycling through ``sizes`` and ``qualities``."""
    root = Path(root)
    for split, count in (("train", images_per_class), ("val", val_per_class or images_per_class)):
        for name, photo in photographs().items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                size = sizes[n % len(sizes)]
                quality = qualities[(n // len(sizes)) % len(qualities)]
                (folder / f"{n:05d}.jpg").write_bytes(reencode(photo, size, quality, shift=n))
    return root
