"""Data: datasets (ImageNet-style folders, digits, synthetic, generated), transforms, loaders.

Images stay uint8 [3, H, W] on the host; normalisation with IMAGENET_MEAN / IMAGENET_STD happens
on the device (app/objective.py). The constants are on the 0–1 scale (the usual published values);
multiply by 255 to use them on uint8 pixels directly.
"""

from .build import DataSpec, build_loader
from .datasets import BUILTIN, DatasetError, ImageDataset, build_dataset, num_classes_of
from .loader import Loader, SyntheticLoader

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # 0–1 scale: × 255 for uint8 pixels
IMAGENET_STD = (0.229, 0.224, 0.225)  # 0–1 scale: × 255 for uint8 pixels

__all__ = [
    "BUILTIN",
    "DataSpec",
    "DatasetError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageDataset",
    "Loader",
    "SyntheticLoader",
    "build_dataset",
    "build_loader",
    "num_classes_of",
]
