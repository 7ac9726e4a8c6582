"""Image transforms on Pillow images, written for this project (no torchvision in app/).

Training: random-resized-crop (area fraction from ``scale``, aspect ratio log-uniform in
[3/4, 4/3]) to r×r, then an optional horizontal flip. Validation: resize the shorter side to
round(r·256/224), then centre-crop r×r. Both end in a uint8 tensor [3, r, r].

The random crop is a float box handed to ``Image.resize(box=...)``, so one resampling pass does
crop and resize together (antialiased when shrinking) and sub-pixel crops of tiny images (8×8
digits) work.

Reduced decoding (``reduced=True``, the default). A JPEG's 8×8 DCT blocks can be decoded straight
to 4×4, 2×2 or 1×1 pixels (libjpeg's scaled IDCT, Pillow's ``Image.draft``), which skips most of
the decoding work. The crop box is drawn first, from the header's size, exactly as for a full
decode; then the image is decoded at the largest reduction 1/2, 1/4 or 1/8 under which the box
still holds at least the output's pixels on both sides (so the final resize still only shrinks),
and the same box, divided by the reduction, is resized. The augmentation is therefore the same
function of the seed either way; only the pixels differ, by the small amount the quality test
bounds (tests/test_reduced_decode.py). Where no reduction fits, or the file is not a JPEG, the
output is bit-for-bit the full decode's.

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
REDUCTIONS = (8, 4, 2)  # the scales libjpeg's IDCT decodes at, largest first


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB Pillow image as a uint8 tensor [3, H, W]."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    # the HWC → CHW copy in numpy: single-threaded and fast, where torch's threaded uint8 permute
    # can be ~50× slower on a busy host (measured on 2 shared cores)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def random_crop_box(
    width: int,
    height: int,
    scale: Sequence[float],
    rng: np.random.Generator,
    ratio: Tuple[float, float] = RATIO,
    attempts: int = 10,
) -> Box:
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


def reduction_for(region: Tuple[float, float], output: Tuple[int, int]) -> int:
    """The largest of 8, 4, 2 by which a ``region`` (width, height in source pixels) can be
    divided and still hold ``output`` (width, height) on both sides; 1 when none can."""
    for factor in REDUCTIONS:
        if region[0] / factor >= output[0] and region[1] / factor >= output[1]:
            return factor
    return 1


def decode_reduced(image: Image.Image, factor: int) -> Tuple[Image.Image, int]:
    """``image`` (opened, not yet loaded) decoded to RGB at 1/``factor`` of its size where its
    decoder can (a JPEG), else in full; returns the RGB image and the reduction applied."""
    applied = 1
    if factor > 1:
        width = image.width
        # draft picks min(W // w, H // h) rounded down to 8/4/2/1: for (W // f, H // f) that is f
        drafted = image.draft("RGB", (image.width // factor, image.height // factor))
        if drafted is not None:  # None: not a JPEG, or already decoded
            applied = round(width / drafted[1][2])  # the box it returns is the source in new pixels
    return image.convert("RGB"), applied


def train_transform(
    image: Image.Image,
    resolution: int,
    scale: Sequence[float],
    hflip: bool,
    rng: np.random.Generator,
    reduced: bool = True,
) -> torch.Tensor:
    box = random_crop_box(image.width, image.height, scale, rng)
    flip = hflip and rng.random() < 0.5
    factor = reduction_for((box[2] - box[0], box[3] - box[1]), (resolution, resolution)) if reduced else 1
    decoded, applied = decode_reduced(image, factor)
    box = tuple(v / applied for v in box)
    out = decoded.resize((resolution, resolution), Image.BILINEAR, box=box)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(out)


def val_transform(image: Image.Image, resolution: int, reduced: bool = True) -> torch.Tensor:
    width, height = val_resize_size(image.width, image.height, resolution)
    # the resized image must stay a shrink of the decoded one on both sides
    factor = reduction_for((image.width, image.height), (width, height)) if reduced else 1
    source = (image.width, image.height)
    decoded, applied = decode_reduced(image, factor)
    if applied == 1:
        resized = decoded.resize((width, height), Image.BILINEAR)
    else:  # the decoded image is ceil(W/f) wide: the box keeps exactly the source's W/f pixels
        box = (0.0, 0.0, source[0] / applied, source[1] / applied)
        resized = decoded.resize((width, height), Image.BILINEAR, box=box)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    return to_tensor(resized.crop((left, top, left + resolution, top + resolution)))
