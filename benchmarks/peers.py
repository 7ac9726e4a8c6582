"""The models a user would pick instead of ours, each built only if its library is installed."""

import importlib
from typing import Callable, Dict, Optional, Tuple

from torch import nn


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        timm = importlib.import_module("timm")
        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        models = importlib.import_module("torchvision.models")
        return getattr(models, name)(weights=None)

    return build


# timm builds without dropout or stochastic depth unless asked; ours (and torchvision's) train
# with both, so the timm peers get the same rates: identical work per training step.
_B0_REG = dict(drop_rate=0.2, drop_path_rate=0.2)
_B2_REG = dict(drop_rate=0.3, drop_path_rate=0.2)

# name → (library it needs, builder). The G16 peer is timm's own grouped B0 (e=6, 2.5× MACs).
PEERS: Dict[str, Tuple[str, Callable[[], nn.Module]]] = {
    "timm/efficientnet_b0": ("timm", _timm("efficientnet_b0", **_B0_REG)),
    "timm/efficientnet_b2": ("timm", _timm("efficientnet_b2", **_B2_REG)),
    "timm/efficientnet_b0_g16_evos": ("timm", _timm("efficientnet_b0_g16_evos", **_B0_REG)),
    "timm/efficientnet_b0_gn": ("timm", _timm("efficientnet_b0_gn", **_B0_REG)),
    "torchvision/efficientnet_b0": ("torchvision", _torchvision("efficientnet_b0")),
    "torchvision/resnet50": ("torchvision", _torchvision("resnet50")),
}


def peer_model(peer: str) -> str:
    """Which of our sizes (b0…b7) a peer corresponds to, for its native resolution."""
    for key in ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7"):
        if peer.split("/")[-1].startswith(f"efficientnet_{key}"):
            return key
    return "b0"  # resnet50 runs at 224, B0's size


def missing_library(peer: str) -> Optional[str]:
    """Why ``peer`` cannot be built here (its library is not installed), or None when it can."""
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    library = PEERS[peer][0]
    try:
        importlib.import_module(library)
    except ImportError as error:
        return f"{library} not installed ({error}); pip install {library} to benchmark {peer}"
    return None


def build_peer(peer: str) -> nn.Module:
    reason = missing_library(peer)
    if reason:
        raise ImportError(reason)
    return PEERS[peer][1]()
