"""Map a peer's EfficientNet checkpoint (timm or torchvision; G=1, batch norm) onto our names.

Files only: the caller loads the peer's state dict from disk with
``torch.load(path, weights_only=True)``; nothing is downloaded here.
"""

import re
from typing import Callable, Dict, Optional

from torch import Tensor

SOURCES = ("timm", "torchvision")

_TIMM_TOP = {
    "conv_stem": "stem.conv",
    "bn1": "stem.norm",
    "conv_head": "head.conv",
    "bn2": "head.norm",
    "classifier": "classifier",
}
# Inside a block, timm names layers by position; which position is which depends on whether the
# block has an expansion conv (inverted residual) or not (depthwise-separable first stage).
_TIMM_INVERTED = {
    "conv_pw": "expand.conv",
    "bn1": "expand.norm",
    "conv_dw": "spatial.conv",
    "bn2": "spatial.norm",
    "conv_pwl": "project.conv",
    "bn3": "project.norm",
}
_TIMM_SEPARABLE = {
    "conv_dw": "spatial.conv",
    "bn1": "spatial.norm",
    "conv_pw": "project.conv",
    "bn2": "project.norm",
}
_SE = {
    "se.conv_reduce": "se.reduce",
    "se.conv_expand": "se.expand",
    "se.fc1": "se.reduce",
    "se.fc2": "se.expand",
}


def _timm_key(key: str, inverted_blocks: set) -> Optional[str]:
    m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(.+)\.(\w+)", key)
    if m:
        stage, index, layer, leaf = m.groups()
        table = _TIMM_INVERTED if (stage, index) in inverted_blocks else _TIMM_SEPARABLE
        name = table.get(layer) or _SE.get(layer)
        return name and f"blocks.{stage}.{index}.{name}.{leaf}"
    layer, _, leaf = key.rpartition(".")
    return layer in _TIMM_TOP and f"{_TIMM_TOP[layer]}.{leaf}" or None


def _torchvision_key(key: str, inverted_blocks: set) -> Optional[str]:
    if key.startswith("classifier.1."):
        return "classifier." + key.rsplit(".", 1)[1]
    m = re.fullmatch(r"features\.(\d+)\.(\d)\.(\w+)", key)  # stem (features.0) and head (last)
    if m:
        part, sub, leaf = m.groups()
        where = "stem" if part == "0" else "head"
        return f"{where}.{'conv' if sub == '0' else 'norm'}.{leaf}"
    m = re.fullmatch(r"features\.(\d+)\.(\d+)\.block\.(\d+)\.(.+)", key)
    if not m:
        return None
    stage, index, position, rest = m.groups()
    stage = str(int(stage) - 1)
    order = (["expand"] if (stage, index) in inverted_blocks else []) + ["spatial", "se", "project"]
    part = order[int(position)] if int(position) < len(order) else None
    if part == "se":
        name = _SE.get("se." + rest.rsplit(".", 1)[0])
        return name and f"blocks.{stage}.{index}.{name}.{rest.rsplit('.', 1)[1]}"
    sub, _, leaf = rest.partition(".")
    return part and f"blocks.{stage}.{index}.{part}.{'conv' if sub == '0' else 'norm'}.{leaf}"


def convert_state_dict(state_dict: Dict[str, Tensor], source: str) -> Dict[str, Tensor]:
    """Rename a timm or torchvision EfficientNet state dict to this project's module names.

    The result loads with ``model.load_state_dict(converted)`` into ``build_model(name,
    group_size=1, expand_ratio=6, norm="batch")`` of the same size; with the source's padding
    (``padding="symmetric"`` for torchvision and timm's efficientnet_*, ``"same"`` for timm's
    tf_efficientnet_*) it gives the source's outputs."""
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is not one of {', '.join(SOURCES)}")
    if source == "timm":
        inverted = {
            m.groups() for k in state_dict for m in [re.match(r"blocks\.(\d+)\.(\d+)\.conv_pwl\.", k)] if m
        }
        rename: Callable[[str, set], Optional[str]] = _timm_key
    else:
        # A torchvision block with an expansion conv has four parts (block.0 … block.3).
        inverted = {
            m.groups() for k in state_dict for m in [re.match(r"features\.(\d+)\.(\d+)\.block\.3\.", k)] if m
        }
        inverted = {(str(int(s) - 1), i) for s, i in inverted}
        rename = _torchvision_key
    converted, unknown = {}, []
    for key, value in state_dict.items():
        new = rename(key, inverted)
        if new is None:
            unknown.append(key)
        else:
            converted[new] = value
    if unknown:
        raise ValueError(
            f"{len(unknown)} {source} keys have no counterpart in this EfficientNet "
            f"(is it a {source} EfficientNet B0–B7 checkpoint?): {unknown[:5]}"
        )
    return converted
