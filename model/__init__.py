"""EfficientNet B0–B7 with group convolutions, batch-independent norms and Proxy Norm."""

from .blocks import ConvNormAct, MBConv, SqueezeExcite
from .counting import count_macs, count_parameters
from .efficientnet import MODEL_NAMES, VARIANTS, EfficientNet, build_model, variant_key
from .group_conv import spatial_groups
from .inference import fuse_for_inference
from .norms import NORM_GROUPINGS, NORM_KINDS, GroupNorm, NormSpec
from .proxy_norm import ProxyNormAct, normal_quantiles
from .weight_import import convert_state_dict

__all__ = [
    "build_model",
    "count_parameters",
    "count_macs",
    "convert_state_dict",
    "EfficientNet",
    "ConvNormAct",
    "MBConv",
    "SqueezeExcite",
    "ProxyNormAct",
    "NormSpec",
    "GroupNorm",
    "NORM_GROUPINGS",
    "normal_quantiles",
    "spatial_groups",
    "variant_key",
    "fuse_for_inference",
    "MODEL_NAMES",
    "NORM_KINDS",
    "VARIANTS",
]
