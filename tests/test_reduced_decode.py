"""Reduced JPEG decoding (app/data/transforms.py): the reduction it picks, the size it decodes
to, how close its crops are to the full decode's on real photographs, and exact resume with it on."""

import io

import numpy as np
import pytest
from PIL import Image

from app.config import build_config
from app.data import build_dataset
from app.data.transforms import (
    decode_reduced,
    random_crop_box,
    reduction_for,
    to_tensor,
    train_transform,
    val_resize_size,
    val_transform,
)
from benchmarks.photos import make_folder, photographs, reencode
from tests.test_app_train import full_and_resumed_losses

# The stated bound, in 8-bit levels (0–255): the mean absolute difference of one reduced-decode
# crop from the full-decode crop of the same box. Measured on the bundled photographs at
# 500×375…1200×900, qualities 75–95, outputs 128–224: worst crop ~3.2, mean over crops ~0.5–1.2.
MAX_CROP_MAD = 4.0
MAX_MEAN_MAD = 1.5


@pytest.mark.parametrize(
    "region, output, factor",
    [
        ((448, 448), (224, 224), 2),  # exactly twice the output: 1/2 still holds 224
        ((447.9, 900), (224, 224), 1),  # one side a fraction short of 2×: no reduction
        ((1792, 1800), (224, 224), 8),  # 1/8 is the largest libjpeg offers
        ((1000, 900), (224, 224), 4),  # 1/4 holds 250×225; 1/8 would be 125×112
        ((500, 375), (160, 160), 2),  # an ImageNet-sized photo's whole frame at half resolution
        ((500, 375), (341, 256), 1),  # its validation resize at 224 (shorter side 256)
        ((500, 375), (97, 73), 4),  # its validation resize at 64 (shorter side 73)
    ],
)
def test_reduction_is_the_largest_that_still_covers_the_output(region, output, factor):
    assert reduction_for(region, output) == factor


@pytest.mark.parametrize(
    "size, factor, decoded",
    [
        ((500, 375), 2, (250, 188)),  # libjpeg rounds up: ceil(375 / 2)
        ((500, 375), 8, (63, 47)),
        ((1200, 900), 4, (300, 225)),
    ],
)
def test_jpeg_decodes_at_the_reduction(size, factor, decoded):
    jpeg = reencode(photographs()["china"], size, 90)
    image, applied = decode_reduced(Image.open(io.BytesIO(jpeg)), factor)
    assert (image.size, image.mode, applied) == (decoded, "RGB", factor)


def test_no_reduction_for_png_or_small_crops_is_the_full_decode_exactly():
    photo = photographs()["flower"].resize((500, 375))
    png = io.BytesIO()
    photo.save(png, "PNG")
    jpeg = reencode(photo, (500, 375), 90)
    for data in (png.getvalue(), jpeg):
        for seed in range(6):
            # at 224 most of a 500×375 image's crops hold < 448 px a side, and PNG never reduces
            reduced = train_transform(
                Image.open(io.BytesIO(data)), 224, (0.08, 1.0), True, np.random.default_rng(seed)
            )
            box = random_crop_box(500, 375, (0.08, 1.0), np.random.default_rng(seed))
            full = train_transform(
                Image.open(io.BytesIO(data)),
                224,
                (0.08, 1.0),
                True,
                np.random.default_rng(seed),
                reduced=False,
            )
            if data is not jpeg or reduction_for((box[2] - box[0], box[3] - box[1]), (224, 224)) == 1:
                assert (reduced == full).all()
        assert (
            val_transform(Image.open(io.BytesIO(data)), 224)
            == val_transform(Image.open(io.BytesIO(data)), 224, reduced=False)
        ).all()


def mad(a, b) -> float:
    return float((a.float() - b.float()).abs().mean())


def test_reduced_crops_match_full_decode_crops_on_real_photographs():
    train_mads, reduced = [], 0
    for name, photo in photographs().items():
        for size, quality in (((500, 375), 75), ((375, 500), 95), ((1200, 900), 90)):
            jpeg = reencode(photo, size, quality)
            for resolution in (224, 128):
                for seed in range(5):
                    box = random_crop_box(*size, (0.08, 1.0), np.random.default_rng(seed))
                    reduced += reduction_for((box[2] - box[0], box[3] - box[1]), (resolution, resolution)) > 1
                    a, b = (
                        train_transform(
                            Image.open(io.BytesIO(jpeg)),
                            resolution,
                            (0.08, 1.0),
                            True,
                            np.random.default_rng(seed),
                            reduced=flag,
                        )
                        for flag in (True, False)
                    )
                    assert a.shape == b.shape == (3, resolution, resolution)
                    train_mads.append(mad(a, b))
                a, b = (
                    val_transform(Image.open(io.BytesIO(jpeg)), resolution, reduced=flag)
                    for flag in (True, False)
                )
                assert mad(a, b) <= MAX_CROP_MAD, (name, size, quality, resolution)
    assert reduced >= len(train_mads) // 4  # the comparison is not vacuous: many crops were reduced
    assert max(train_mads) <= MAX_CROP_MAD and np.mean(train_mads) <= MAX_MEAN_MAD
    # and the bound is tight enough to notice a wrong box: the full decode 8 px off differs far more
    jpeg = reencode(photographs()["china"], (1200, 900), 90)
    right = train_transform(Image.open(io.BytesIO(jpeg)), 128, (0.5, 0.5), False, np.random.default_rng(1))
    box = random_crop_box(1200, 900, (0.5, 0.5), np.random.default_rng(1))
    off = (
        Image.open(io.BytesIO(jpeg))
        .convert("RGB")
        .resize((128, 128), Image.BILINEAR, box=tuple(v + 8 for v in box))
    )
    assert mad(right, to_tensor(off)) > 2 * MAX_CROP_MAD


def test_the_config_switch_reaches_the_dataset(tmp_path):
    root = make_folder(tmp_path / "photos", 1, sizes=((1200, 900),), qualities=(90,))
    on, off = (
        build_dataset(build_config(None, [f"data.dataset={root}", f"data.reduced_decode={flag}"]), "val", 96)
        for flag in ("true", "false")
    )
    assert on.reduced_decode and not off.reduced_decode
    a, b = on.sample(0, 7)[0], off.sample(0, 7)[0]
    assert not (a == b).all() and mad(a, b) <= MAX_CROP_MAD  # 1200×900 at 96: decoded at 1/8


def test_validation_keeps_the_geometry_of_the_full_decode():
    # a white square centred in a black JPEG lands on the same output pixels either way
    pixels = np.zeros((900, 1200, 3), dtype=np.uint8)
    pixels[250:650, 400:800] = 255
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, "JPEG", quality=95)
    assert val_resize_size(1200, 900, 64) == (97, 73)
    outs = [
        val_transform(Image.open(io.BytesIO(data.getvalue())), 64, reduced=flag) for flag in (True, False)
    ]
    masks = [(o[0] > 127).numpy() for o in outs]
    assert (masks[0] != masks[1]).sum() <= 2 * 64  # at most the blurred rim differs
    extents = []
    for mask in masks:
        rows, cols = np.nonzero(mask)
        extents.append((rows.min(), rows.max(), cols.min(), cols.max()))
    # the square spans rows 250–650 of 900 → 16.3–48.7 after the resize to 73 and the crop from 4
    assert extents[0] == extents[1] == (16, 48, 16, 48)


def test_resume_is_exact_with_reduced_decode(tmp_path, monkeypatch):
    """Real photographs at 640×480 trained at 32 px: most crops decode at 1/4 or 1/8, in a
    worker process; interrupted at step 2 and resumed through the epoch boundary."""
    data = make_folder(tmp_path / "photos", 4, sizes=((640, 480),), qualities=(85,), val_per_class=1)
    args = [
        "train",
        "--device",
        "cpu",
        f"data.dataset={data}",
        "data.resolution=32",
        "data.workers=1",
        "data.reduced_decode=true",
        "train.micro_batch=4",
        "train.epochs=2",
        "train.log_every=1",
        "train.val_every=100",
        "train.ema_decay=0",
    ]
    full, resumed = full_and_resumed_losses(args, tmp_path, monkeypatch, at_step=2)
    assert len(full) == len(photographs()) * 4 // 4 * 2 and resumed == full  # 2 epochs, batch 4
