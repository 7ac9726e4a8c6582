"""ImageNet top-1 (%) the paper reports for its variants, read off its Figure 1 (±0.1), as
recorded in the team's reference notes (shared/reference/paper.md). The paper's G1 models use
expansion 6; its G16 models use expansion 4 (about the same parameter count).

Keys: (model, group size, expansion, norm label, half-resolution training)."""

from typing import Dict, Optional, Tuple

_COLUMNS = (  # (group, expansion, norm, half-res) of each column after the baseline
    (1, 6, "gn", False),
    (16, 4, "gn", False),
    (16, 4, "ln+pn", False),
    (16, 4, "gn", True),
    (16, 4, "ln+pn", True),
)
_ROWS = {
    "b0": (79.1, 79.1, 79.4, 77.9, 78.3),
    "b1": (80.8, 80.8, 81.35, 80.0, 80.5),
    "b2": (81.4, 81.5, 81.8, 80.8, 81.2),
    "b3": (82.1, 82.3, 82.6, 81.7, 82.0),
    "b4": (82.9, 83.2, 83.4, 82.75, 83.0),
    "b5": (83.4, 83.9, 84.0, 83.6, 83.8),
}
PAPER_TOP1: Dict[Tuple[str, int, int, str, bool], float] = {
    (model, g, e, norm, half): acc
    for model, accs in _ROWS.items()
    for (g, e, norm, half), acc in zip(_COLUMNS, accs)
}


def paper_top1(model: str, group_size: int, expand_ratio: int, norm: str, half_res: bool) -> Optional[float]:
    return PAPER_TOP1.get((model, group_size, expand_ratio, norm, half_res))
