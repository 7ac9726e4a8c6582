"""The comparisons a report shows: ours against the peers and our variants against each other,
wherever both sides ran under one setting (device, resolution, batch, precision, layout, ...).

Sides are paired by what was measured (model size, group size, expansion ratio, norm), never by
one fixed name, so a matrix at other sizes or expansions (gpu.sh: B0-B4, G16 at e4) still gets
its rows."""

from typing import Callable, Dict, List, Optional, Tuple

OURS = "ours"
SETTING = ("device", "resolution", "batch", "precision", "layout", "compile", "mode")

_SPEED_OURS = "ours {size} vs timm {size} (img/s ratio, >=1: ours faster)"
# Peer → the variant of ours built like it (group size, expansion, norm) and the label; {size} is
# the model size both sides share. timm's G16 B0 keeps expansion 6, as our G16-e6.
PEER_PAIRS: Tuple[Tuple[str, Tuple[int, int, str], str], ...] = (
    ("timm/efficientnet_b0", (1, 6, "bn"), _SPEED_OURS),
    ("timm/efficientnet_b2", (1, 6, "bn"), _SPEED_OURS),
    ("torchvision/efficientnet_b0", (1, 6, "bn"), "ours {size} vs torchvision {size} (img/s ratio)"),
    ("timm/efficientnet_b0_g16_evos", (16, 6, "bn"), "ours G16 {size} vs timm G16 {size} (img/s ratio)"),
)
# The goals are stated for B0 at expansion 6; a variant label names the size and expansion only
# when they differ from that, so the CPU presets' rows read as they always did.
GOAL_VARIANT = ("b0", 6)


def setting_of(row) -> Tuple:
    return tuple(row.get(k) for k in SETTING)


def precision_label(row) -> str:
    """'fp32 (TF32)' where fp32 convolutions (and the peak they are held against) ran in TF32."""
    return row["precision"] + (" (TF32)" if row.get("tf32") and row["precision"] == "fp32" else "")


def describe_setting(row, with_layout: bool = True) -> str:
    """'cuda 224px b128 fp32 (TF32) nchw compiled'."""
    return (
        f"{row['device']} {row['resolution']}px b{row['batch']} {precision_label(row)}"
        + (f" {row['layout']}" if with_layout else "")
        + (" compiled" if row.get("compile") else "")
    )


def variant(row) -> Tuple:
    """(model size, group size, expansion, norm) of one of our rows."""
    return (row.get("model"), row.get("group_size"), row.get("expand_ratio"), row.get("norm"))


def _ok(row) -> bool:
    return row.get("status") == "ok"


def _ours(row) -> bool:
    return _ok(row) and row.get("subject") == OURS


def _find(rows, match: Callable[[Dict], bool], setting: Tuple) -> Optional[Dict[str, object]]:
    for row in rows:
        if _ok(row) and setting_of(row) == setting and match(row):
            return row
    return None


def _qualifier(model: str, expand: int) -> str:
    return "" if (model, expand) == GOAL_VARIANT else f"{model.upper()} e{expand}: "


def _norm_vs_bn(a) -> Optional[Tuple[Tuple, object]]:
    """Another norm (LN+PN, GN, LN) against BN: same size, group size and expansion."""
    model, group, expand, norm = variant(a)
    if norm == "bn":
        return None
    head = f"{_qualifier(model, expand)}G{group}-{norm.upper()} vs G{group}-BN step cost"
    if norm != "ln+pn":
        return (model, group, expand, "bn"), head
    label = {
        "train": f"{head} (goal <= 1.25)",
        # No goal: at inference batch norm folds into its conv, LN must still normalise.
        "infer": f"{head} (no goal: BN folds into the conv)",
    }
    return (model, group, expand, "bn"), label


def _grouped_vs_depthwise(a) -> Optional[Tuple[Tuple, object]]:
    """Grouped (G16) against depthwise (G1) convolutions: same size, expansion and norm."""
    model, group, expand, norm = variant(a)
    if group == 1:
        return None
    name = norm.upper()
    return (model, 1, expand, norm), f"{_qualifier(model, expand)}G{group}-{name} vs G1-{name} step cost"


VARIANT_PAIRS = (_norm_vs_bn, _grouped_vs_depthwise)


def _entry(label, a, b, figure: str) -> Dict[str, object]:
    if figure == "speed":
        value = a["images_per_s"] / b["images_per_s"]
    else:
        value = a["step_ms_median"] / b["step_ms_median"]
    return {
        "what": label[a["mode"]] if isinstance(label, dict) else label,
        "mode": a["mode"],
        "setting": describe_setting(a),
        "ratio": round(value, 3),
        "per_repeat": _repeat_ratios(a, b, figure),
        "load": max(a.get("load_avg", 0), b.get("load_avg", 0)),
        "utilisation": (a.get("utilisation"), b.get("utilisation")),
    }


def ratios(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Ours-vs-peer throughput (>= 1: ours faster), then variant step-cost ratios, each in row
    order, so every layout and precision that ran both sides gets its own line."""
    out = []
    for peer, ours_variant, template in PEER_PAIRS:
        for a in rows:
            if not _ours(a) or variant(a)[1:] != ours_variant:
                continue
            b = _find(
                rows,
                lambda r, a=a, peer=peer: r.get("name") == peer and r.get("model") == a["model"],
                setting_of(a),
            )
            if b is not None:
                out.append(_entry(template.format(size=a["model"].upper()), a, b, "speed"))
    for pair in VARIANT_PAIRS:
        for a in rows:
            found = pair(a) if _ours(a) else None
            if found is None:
                continue
            other, label = found
            b = _find(rows, lambda r, other=other: _ours(r) and variant(r) == other, setting_of(a))
            if b is not None:
                out.append(_entry(label, a, b, "cost"))
    return out


def _repeat_ratios(a, b, figure) -> List[float]:
    """Ratios repeat by repeat (interleaved runs): their spread shows how noisy the machine was."""
    ra, rb = a.get("repeat_ms_median") or [], b.get("repeat_ms_median") or []
    if len(ra) != len(rb) or len(ra) < 2:
        return []
    return [round(y / x if figure == "speed" else x / y, 3) for x, y in zip(ra, rb)]
