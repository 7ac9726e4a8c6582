"""The EfficientNet family B0–B7 (Tan & Le 2019) with the paper's knobs: group size, expansion
ratio and batch-independent norms with proxy norm.

Module names are stable because they are how users address layers (pipeline splits and
recomputation checkpoints on the IPU, freezing for fine-tuning):

    stem                      3×3 stride-2 conv → norm → act
    blocks.<stage>.<index>    MBConv blocks, stage 0–6 (index restarts at 0 in every stage)
      .expand .spatial .se .project .drop_path
    head                      1×1 conv → norm → act
    pool, dropout, classifier
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from .blocks import GRAPHS, ConvNormAct, MBConv
from .norms import NormSpec
from .padding import PADDINGS


@dataclass(frozen=True)
class StageSpec:
    repeats: int
    kernel: int
    stride: int
    expand: int  # 1 marks the depthwise-separable first stage; others take the model's ratio
    channels: int


# B0: the stage table every faithful EfficientNet builds from.
B0_STAGES = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24),
    StageSpec(2, 5, 2, 6, 40),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# The std of a unit normal truncated to [-2, 2] (TF1 init_ops.VarianceScaling divides by it).
TRUNCATED_STD = 0.87962566103423978


@dataclass(frozen=True)
class Variant:
    width: float
    depth: float
    resolution: int
    dropout: float


VARIANTS: Dict[str, Variant] = {
    "b0": Variant(1.0, 1.0, 224, 0.2),
    "b1": Variant(1.0, 1.1, 240, 0.2),
    "b2": Variant(1.1, 1.2, 260, 0.3),
    "b3": Variant(1.2, 1.4, 300, 0.3),
    "b4": Variant(1.4, 1.8, 380, 0.4),
    "b5": Variant(1.6, 2.2, 456, 0.4),
    "b6": Variant(1.8, 2.6, 528, 0.5),
    "b7": Variant(2.0, 3.1, 600, 0.5),
}
MODEL_NAMES = tuple(f"efficientnet-{k}" for k in VARIANTS) + tuple(VARIANTS)


def variant_key(name: str) -> str:
    """'efficientnet-b2' or 'b2' → 'b2'; anything else is a ValueError listing the valid names."""
    key = name.lower().replace("efficientnet-", "").replace("efficientnet_", "")
    if key not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return key


def round_channels(channels: float, divisor: int = 8) -> int:
    """Nearest multiple of ``divisor``, never below 90% of the unrounded width."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return int(rounded)


class EfficientNet(nn.Module):
    def __init__(
        self,
        stages: List[StageSpec],
        stem_channels: int,
        head_channels: int,
        norm: NormSpec,
        group_size: int = 1,
        num_classes: int = 1000,
        dropout: float = 0.2,
        drop_path: float = 0.2,
        padding: str = "same",
        graph: str = "official",
    ):
        super().__init__()
        self.norm_spec = norm
        self.padding, self.graph = padding, graph
        self.stem = ConvNormAct(3, stem_channels, 3, norm, stride=2, padding=padding)
        total_blocks = sum(s.repeats for s in stages)
        in_channels, index, stage_modules = stem_channels, 0, []
        for stage in stages:
            blocks = []
            for i in range(stage.repeats):
                blocks.append(
                    MBConv(
                        in_channels,
                        stage.channels,
                        stage.kernel,
                        stage.stride if i == 0 else 1,
                        stage.expand,
                        group_size,
                        norm,
                        drop_path=drop_path * index / total_blocks,
                        padding=padding,
                        graph=graph,
                    )
                )
                in_channels, index = stage.channels, index + 1
            stage_modules.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stage_modules)
        # The official head stops proxy norm before its 1/σ̃ (efficientnet.py:384); v1 applied it.
        self.head = ConvNormAct(in_channels, head_channels, 1, norm, proxy_scale=graph == "v1")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head_channels, num_classes)
        self.num_features = head_channels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation. Convs: TF1's ``variance_scaling_initializer(scale=2)``,
        a normal of std sqrt(2 / fan) / TRUNCATED_STD truncated at ±2 of that std (so the weights'
        std is sqrt(2 / fan)), fan-out for the dense convs and fan-in for the grouped spatial ones
        (efficientnet.py:345, 350; the two fans are equal for those: k²·group size); zero biases
        (:121). Classifier: glorot-uniform, ±sqrt(6 / (fan_in + fan_out)), zero bias (:90,
        ``tf.layers.dense``'s default)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # k²·out for a dense conv (fan-out); k²·in/groups for a grouped spatial conv
                # (fan-in; in = out there)
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                std = math.sqrt(2.0 / fan) / TRUNCATED_STD
                nn.init.trunc_normal_(m.weight, 0.0, std, -2.0 * std, 2.0 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.pool(self.forward_features(x)), 1)
        return self.classifier(self.dropout(x))


def scaled_stages(key: str, expand_ratio: int) -> List[StageSpec]:
    v = VARIANTS[key]
    return [
        StageSpec(
            math.ceil(s.repeats * v.depth),
            s.kernel,
            s.stride,
            1 if s.expand == 1 else expand_ratio,
            round_channels(s.channels * v.width),
        )
        for s in B0_STAGES
    ]


def build_model(
    name: str,
    *,
    group_size: int = 1,
    expand_ratio: int = 6,
    norm: str = "batch",
    proxy_norm: bool = False,
    norm_groups: int = 4,
    norm_eps: float = 1e-3,
    num_classes: int = 1000,
    dropout: Optional[float] = None,
    drop_path: float = 0.2,
    padding: str = "same",
    graph: str = "official",
    norm_grouping: str = "strided",
) -> EfficientNet:
    """An EfficientNet. ``group_size`` is channels per group of every spatial conv (1 = depthwise,
    the paper's choice 16); ``norm`` is one of batch, group, layer; ``proxy_norm`` replaces every
    norm's activation by a proxy-normalised one (the paper pairs it with ``norm="layer"``).
    ``padding``: ``same`` (TensorFlow's, the official code's) or ``symmetric`` (k//2, timm's
    efficientnet_* and torchvision's); ``graph``: ``official`` or ``v1`` (this project's first
    squeeze-excite and head under proxy norm, for checkpoints written with it); ``norm_grouping``:
    group norm's channel grouping, ``strided`` (channel k in group k mod G, the official code's) or
    ``contiguous`` (torch's; layer and batch norm are the same function either way)."""
    key = variant_key(name)
    if padding not in PADDINGS:
        raise ValueError(f"padding={padding!r} is not one of {', '.join(PADDINGS)}")
    if graph not in GRAPHS:
        raise ValueError(f"graph={graph!r} is not one of {', '.join(GRAPHS)}")
    for field, value in (
        ("group_size", group_size),
        ("expand_ratio", expand_ratio),
        ("num_classes", num_classes),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{field}={value!r} must be a positive integer")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout} must be in [0, 1) or None for the model's default")
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path={drop_path} must be in [0, 1)")
    variant = VARIANTS[key]
    spec = NormSpec(norm, norm_groups, norm_eps, proxy_norm, norm_grouping)
    return EfficientNet(
        scaled_stages(key, expand_ratio),
        round_channels(STEM_CHANNELS * variant.width),
        round_channels(HEAD_CHANNELS * variant.width),
        spec,
        group_size,
        num_classes,
        variant.dropout if dropout is None else dropout,
        drop_path,
        padding,
        graph,
    )
