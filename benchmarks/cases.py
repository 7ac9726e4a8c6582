"""What one measurement is (a Case) and the named matrices of cases (presets)."""

import itertools
from dataclasses import asdict, dataclass, replace
from typing import Dict, Iterable, List, Optional, Tuple

from app.resolution import half_resolution, native_resolution

from .peers import PEERS, peer_model

OURS = "ours"
# Our norm labels → build_model keywords. LN+PN is the paper's LayerNorm with Proxy Norm.
NORMS: Dict[str, Dict[str, object]] = {
    "bn": {"norm": "batch", "proxy_norm": False},
    "gn": {"norm": "group", "proxy_norm": False},
    "ln": {"norm": "layer", "proxy_norm": False},
    "ln+pn": {"norm": "layer", "proxy_norm": True},
}
PRECISIONS = ("fp32", "bf16", "fp16")
LAYOUTS = ("nchw", "channels_last")
MODES = ("train", "infer")
DEVICES = ("cpu", "cuda", "ipu", "ipu-model")


@dataclass(frozen=True)
class Case:
    """One configuration to time. ``subject`` is ``ours`` or a peer name from peers.PEERS; for a
    peer, the variant fields (group size, expansion, norm) describe nothing and stay at defaults."""

    subject: str = OURS
    model: str = "b0"
    group_size: int = 1
    expand_ratio: int = 6
    norm: str = "bn"
    resolution: int = 224
    batch: int = 32
    precision: str = "fp32"
    layout: str = "nchw"
    compile: bool = False
    mode: str = "train"
    device: str = "cpu"

    def __post_init__(self):
        checks = (
            ("subject", self.subject, (OURS,) + tuple(PEERS)),
            ("norm", self.norm, tuple(NORMS)),
            ("precision", self.precision, PRECISIONS),
            ("layout", self.layout, LAYOUTS),
            ("mode", self.mode, MODES),
            ("device", self.device, DEVICES),
        )
        for field, value, valid in checks:
            if value not in valid:
                raise ValueError(f"{field}={value!r} is not one of {', '.join(valid)}")
        for field in ("group_size", "expand_ratio", "resolution", "batch"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"{field}={getattr(self, field)} must be a positive integer")

    @property
    def name(self) -> str:
        """Short label of what is measured (not how): 'ours-b0-g16-e6-ln+pn' or the peer's name."""
        if self.subject != OURS:
            return self.subject
        return f"ours-{self.model}-g{self.group_size}-e{self.expand_ratio}-{self.norm}"

    def as_dict(self) -> Dict[str, object]:
        row = asdict(self)
        row["name"] = self.name
        return row


def resolve_resolution(model: str, label: str) -> int:
    """'native', 'half' (the paper's reduced training size) or an explicit number of pixels."""
    if label == "native":
        return native_resolution(model)
    if label == "half":
        return half_resolution(model)
    try:
        return int(label)
    except ValueError:
        raise ValueError(f"resolution {label!r} must be native, half or a number of pixels") from None


def parse_variant(text: str) -> Tuple[int, int, str]:
    """'g16-e4-ln+pn' → (16, 4, 'ln+pn'): group size, expansion ratio, norm label."""
    parts = text.lower().split("-", 2)
    try:
        if len(parts) != 3 or parts[0][0] != "g" or parts[1][0] != "e" or parts[2] not in NORMS:
            raise ValueError
        return int(parts[0][1:]), int(parts[1][1:]), parts[2]
    except (ValueError, IndexError):
        raise ValueError(
            f"variant {text!r} must look like g16-e4-ln+pn (group size, expansion, "
            f"norm in {', '.join(NORMS)})"
        ) from None


def our_cases(
    models: Iterable[str],
    groups: Iterable[int],
    expands: Iterable[int],
    norms: Iterable[str],
    resolutions: Iterable[str],
    variants: Optional[Iterable[str]] = None,
    **common,
) -> List[Case]:
    """Each model × variant × resolution. ``variants`` ('g16-e4-ln+pn', ...) names exact
    combinations; without it groups × expands × norms are crossed."""
    if variants:
        combos = [parse_variant(v) for v in variants]
    else:
        combos = list(itertools.product(groups, expands, norms))
    cases = []
    for model, (g, e, norm), res in itertools.product(models, combos, resolutions):
        cases.append(Case(OURS, model, int(g), int(e), norm, resolve_resolution(model, res), **common))
    return cases


def peer_cases(peers: Iterable[str], resolutions: Iterable[str], **common) -> List[Case]:
    """Each peer at each resolution label, read for the size it corresponds to (timm B2 at
    native runs at 260 like our B2; an explicit number applies to all)."""
    return [
        Case(peer, model=peer_model(peer), resolution=resolve_resolution(peer_model(peer), res), **common)
        for peer in peers
        for res in resolutions
    ]


def expand(cases: Iterable[Case], **axes: Iterable[object]) -> List[Case]:
    """Every case crossed with every value of each named axis (precision, layout, mode, ...)."""
    out = []
    for case in cases:
        names = list(axes)
        for values in itertools.product(*(axes[n] for n in names)):
            out.append(replace(case, **dict(zip(names, values))))
    return out
