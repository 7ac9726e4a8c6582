"""Data: datasets (ImageNet-style folders, digits, synthetic, generated), transforms, loaders.

Images stay uint8 [3, H, W] on the host; normalisation with IMAGENET_MEAN / IMAGENET_STD happens
on the device (app/objective.py). The constants are on the 0–255 scale of those uint8 pixels.
"""
from .datasets import BUILTIN, DatasetError, ImageDataset, build_dataset
from .loader import Loader, SyntheticLoader, build_loader

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 0–255 scale (= 255 × (0.485, 0.456, 0.406))
IMAGENET_STD = (58.395, 57.12, 57.375)  # 0–255 scale (= 255 × (0.229, 0.224, 0.225))

__all__ = ["BUILTIN", "DatasetError", "IMAGENET_MEAN", "IMAGENET_STD", "ImageDataset", "Loader",
           "SyntheticLoader", "build_dataset", "build_loader"]
