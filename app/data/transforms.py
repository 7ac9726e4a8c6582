"""Image transforms on Pillow images, written for this project (no torchvision in app/).

Training: random-resized-crop (area fraction from ``scale``, aspect ratio log-uniform in
[3/4, 4/3]) to r×r, then an optional horizontal flip. Validation: resize the shorter side to
round(r·256/224), then centre-crop r×r. Both end in a uint8 tensor [3, r, r].

The random crop is a float box handed to ``Image.resize(box=...)``, so one resampling pass does
crop and resize together (antialiased when shrinking) and sub-pixel crops of tiny images (8×8
digits) work.
Randomness comes from a ``numpy.random.Generator`` passed in, so the loader can make every sample's
augmentation a function of (seed, epoch, index) alone, whichever worker process decodes it.
"""
import math
from typing import Sequence, Tuple

import numpy as np
import torch
from PIL import Image

Box = Tuple[float, float, float, float]
RATIO = (3.0 / 4.0, 4.0 / 3.0)
VAL_RESIZE = 256.0 / 224.0  # validation resizes to r·256/224 before the centre crop


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB Pillow image as a uint8 tensor [3, H, W]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    # the HWC → CHW copy in numpy: single-threaded and fast, where torch's threaded uint8 permute
    # can be ~50× slower on a busy host (measured on 2 shared cores)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def random_crop_box(width: int, height: int, scale: Sequence[float], rng: np.random.Generator,
                    ratio: Tuple[float, float] = RATIO, attempts: int = 10) -> Box:
    """A box covering a random fraction ``scale`` of the area with aspect ratio in ``ratio``;
    after ``attempts`` misses (crop larger than the image), the largest centred box whose ratio is
    clamped into ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if w <= width and h <= height:
            x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return (x0, y0, x0 + w, y0 + h)
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, width / aspect) if width / height <= aspect else (height * aspect, height)
    x0, y0 = (width - w) / 2, (height - h) / 2
    return (x0, y0, x0 + w, y0 + h)


def val_resize_size(width: int, height: int, resolution: int) -> Tuple[int, int]:
    """Size after the validation resize: the shorter side becomes round(r·256/224)."""
    short = round(resolution * VAL_RESIZE)
    factor = short / min(width, height)
    return max(round(width * factor), short), max(round(height * factor), short)


def train_transform(image: Image.Image, resolution: int, scale: Sequence[float], hflip: bool,
                    rng: np.random.Generator) -> torch.Tensor:
    box = random_crop_box(image.width, image.height, scale, rng)
    out = image.convert("RGB").resize((resolution, resolution), Image.BILINEAR, box=box)
    if hflip and rng.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(out)


def val_transform(image: Image.Image, resolution: int) -> torch.Tensor:
    width, height = val_resize_size(image.width, image.height, resolution)
    resized = image.convert("RGB").resize((width, height), Image.BILINEAR)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return to_tensor(resized.crop((left, top, left + resolution, top + resolution)))
