"""Reduced-resolution training: which sizes to train and test at (the paper's third idea).

The recipe: train at about half the native pixel count, fine-tune briefly at the test resolution,
and test only at resolutions with the same residue as the training resolution modulo the
network's total stride, 2^n for n stride-2 stages (32 for EfficientNet's 5).

Why the residue. A stride-2 conv with kernel k and TensorFlow's SAME padding (or k//2 on each
side) maps a side of H pixels to ceil(H/2), so stage i of the network sees ceil(H/2^i). Whether
that size is odd — whether the stage pads one side more than the other, shifting its sampling grid
by half a pixel relative to the input — is bit i of (H - 1). The sizes at stages 0 … n-1 are
therefore all even/odd in the same places for two resolutions exactly when they agree modulo 2^n.
Keeping the residue keeps every downsampling step aligned as in training; breaking it moves the
asymmetric padding to other stages, and the features the network learned are sampled on shifted
grids (aliasing). This holds for odd sizes too (225 ≡ 257 ≡ 1 mod 32: both odd at the same
stages), and for a network with a different number of stride-2 stages the modulus is 2^n for its
own n (``downsampling_stages``).

Half resolution. ``half_resolution`` is the size with the native size's residue modulo 2^n
nearest to 0.7 × native (ties go to the smaller, cheaper size). That rule reproduces the paper's
table exactly (B0 224→160, B1 240→176, B2 260→196, B3 300→204, B4 380→252, B5 456→328) and
gives B6 528→368 and B7 600→408. 0.7 means 49 % of the native pixels; the literal half,
native/√2 ≈ 0.7071 × native, would give B4 284 instead of the paper's 252 (268.7 is just past the
midpoint 268 of 252 and 284). Every factor in (0.6923, 0.7053) reproduces the table; 0.7 is the
round one inside it.
"""

import sys
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from app.plotting import pyplot, save
from app.run_folder import RunFolder
from model.efficientnet import VARIANTS, build_model, variant_key

EFFICIENTNET_STAGES = 5  # the stem and the first block of stages 2, 3, 4 and 6 have stride 2
HALF_RESOLUTION_FACTOR = 0.7  # of the native side: 49 % of the native pixels (see the docstring)


class ResolutionWarning(UserWarning):
    """A test or fine-tuning resolution does not keep the training resolution's residue."""


# ----------------------------------------------------------------------------- the rule


def _check_size(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def residue(resolution: int, stages: int = EFFICIENTNET_STAGES) -> int:
    """``resolution`` modulo the total stride 2^stages."""
    _check_size("resolution", resolution)
    _check_size("stages", stages, 0)
    return resolution % (2**stages)


def keeps_residue(train_resolution: int, test_resolution: int, stages: int = EFFICIENTNET_STAGES) -> bool:
    """True when the two resolutions agree modulo 2^stages (the paper's test-resolution rule)."""
    return residue(train_resolution, stages) == residue(test_resolution, stages)


def feature_sizes(resolution: int, stages: int = EFFICIENTNET_STAGES) -> List[int]:
    """Side of the input and of the map after each stride-2 stage: [H, ceil(H/2), …] (stages + 1
    values), as a k×k stride-2 conv with padding k//2 computes it."""
    _check_size("resolution", resolution)
    _check_size("stages", stages, 0)
    sizes = [resolution]
    for _ in range(stages):
        sizes.append(-(-sizes[-1] // 2))
    return sizes


def compatible_resolutions(
    train_resolution: int, low: int, high: int, stages: int = EFFICIENTNET_STAGES
) -> List[int]:
    """Every resolution in [low, high] (both included) that keeps ``train_resolution``'s residue."""
    _check_size("low", low)
    _check_size("high", high)
    if high < low:
        raise ValueError(f"high={high} is below low={low}: give the range as low <= high")
    step, r = 2**stages, residue(train_resolution, stages)
    first = low + (r - low) % step
    return list(range(first, high + 1, step))


def nearest_compatible(
    train_resolution: int, resolution: int, stages: int = EFFICIENTNET_STAGES
) -> Tuple[Optional[int], int]:
    """The closest sizes below (None when there is none >= 1) and above ``resolution`` (either may
    equal it when it keeps the residue) that keep ``train_resolution``'s residue."""
    step, r = 2**stages, residue(train_resolution, stages)
    below = resolution - (resolution - r) % step
    above = resolution + (r - resolution) % step
    return (below if below >= 1 else None), above


# ----------------------------------------------------------------------------- sizes per model


def native_resolution(model_name: str) -> int:
    """The resolution EfficientNet-<model> was designed for (B0 224 … B7 600)."""
    return VARIANTS[variant_key(model_name)].resolution


def recipe_native(cfg: Any, finetune_resolution_given: bool) -> int:
    """The native size N of the reduced-resolution recipe (``make paper``, ``study resolution``):
    ``finetune.resolution`` when the command line gives it, else ``data.native_resolution`` (the
    data's own test size: digits 96), else ``finetune.resolution``, else the model's native.
    ``cfg`` is the run's app.config.Config, which imports this module (so no annotation names it)."""
    given = cfg.finetune.resolution if finetune_resolution_given else None
    return given or cfg.data.native_resolution or cfg.finetune.resolution or native_resolution(cfg.model.name)


def half_resolution(model_or_native: Union[str, int], stages: int = EFFICIENTNET_STAGES) -> int:
    """Reduced training resolution for a model name ('b0', 'efficientnet-b3') or a native size:
    the size with the native residue modulo 2^stages nearest to 0.7 × native (ties: the smaller).
    A ValueError when that is native itself: 2^stages is too coarse a grid at that size."""
    native = native_resolution(model_or_native) if isinstance(model_or_native, str) else model_or_native
    _check_size("native resolution", native)
    candidates = compatible_resolutions(native, 1, native, stages)
    target = HALF_RESOLUTION_FACTOR * native
    half = min(candidates, key=lambda size: (abs(size - target), size))
    if half == native:
        raise ValueError(
            f"no reduced resolution for native {native} keeps its residue modulo "
            f"{2**stages} near {target:.0f}: the sizes with that residue are "
            f"{', '.join(map(str, candidates))}; choose a native resolution of at least "
            f"{int(2**stages / (1 - HALF_RESOLUTION_FACTOR) / 2) + 1} or fewer stages"
        )
    return half


HALF_RESOLUTIONS: Dict[str, int] = {key: half_resolution(key) for key in VARIANTS}


# ----------------------------------------------------------------------------- from a model


def _strides(module: nn.Module) -> Tuple[int, ...]:
    stride = getattr(module, "stride", None)
    if stride is None or isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return ()
    return tuple(stride) if isinstance(stride, (tuple, list)) else (stride, stride)


def downsampling_stages(model: nn.Module, in_channels: int = 3) -> int:
    """n such that the model's total stride is 2^n, read off the model itself.

    Every conv/pool with a stride > 1 is a downsampling step, but parallel branches (a residual
    shortcut conv beside a strided main conv) downsample the same map once, so steps are grouped
    by the size of their input, seen in one forward pass of a probe image large enough that no
    map reaches 1×1 before the last step. A stride of 2^k counts as k stages."""
    strided = [m for m in model.modules() if max(_strides(m), default=1) > 1]
    bound = 0  # log2 of the largest possible total stride: every strided module in sequence
    for m in strided:
        s = max(_strides(m))
        if s & (s - 1):
            raise ValueError(
                f"{type(m).__name__} has stride {s}, not a power of two: the "
                "residue rule modulo 2^n does not apply to this model"
            )
        bound += s.bit_length() - 1
    if bound == 0:
        return 0
    if bound > 11:
        raise ValueError(f"{len(strided)} strided layers: too many to probe the total stride")
    steps: Dict[Tuple[int, int], int] = {}

    def record(module: nn.Module, inputs: Tuple[Tensor, ...], output: Tensor) -> None:
        h, w = inputs[0].shape[-2:]
        steps[(int(h), int(w))] = max(steps.get((int(h), int(w)), 1), max(_strides(module)))

    handles = [m.register_forward_hook(record) for m in strided]
    was_training = model.training
    probe = 2 ** (bound + 1)
    try:
        model.eval()
        param = next(model.parameters(), None)
        x = torch.zeros(
            1,
            in_channels,
            probe,
            probe,
            device=param.device if param is not None else None,
            dtype=param.dtype if param is not None else None,
        )
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sum(s.bit_length() - 1 for s in steps.values())


@lru_cache(maxsize=None)
def model_stages(model_name: str) -> int:
    """``downsampling_stages`` of EfficientNet-<model_name> (5 for every one; read off a built model
    so that a change to the stage table shows here). Built on the meta device: shapes only, no
    memory or initialisation cost."""
    with torch.device("meta"):
        model = build_model(model_name, num_classes=1)
    return downsampling_stages(model)


# ----------------------------------------------------------------------------- the warning


def rule_message(train_resolution: int, resolution: int, stages: int, what: str) -> str:
    step = 2**stages
    below, above = nearest_compatible(train_resolution, resolution, stages)
    nearby = " or ".join(str(s) for s in (below, above) if s is not None)
    return (
        f"{what} resolution {resolution} does not keep the training resolution "
        f"{train_resolution}'s residue modulo {step} ({resolution} mod {step} = "
        f"{resolution % step}, {train_resolution} mod {step} = {train_resolution % step}): "
        f"its {stages} stride-2 stages pad asymmetrically at other stages than in training, "
        f"which costs accuracy. Nearby sizes that keep it: {nearby}"
    )


def check_resolutions(
    train_resolution: int, resolutions: Iterable[int], stages: int = EFFICIENTNET_STAGES, what: str = "test"
) -> List[int]:
    """Warn (a ResolutionWarning and a console line) for each resolution that breaks the rule
    relative to ``train_resolution``; return those resolutions (empty when all keep it)."""
    broken = [r for r in resolutions if not keeps_residue(train_resolution, r, stages)]
    for r in broken:
        message = rule_message(train_resolution, r, stages, what)
        print(f"warning: {message}", flush=True)
        warnings.warn(message, ResolutionWarning, stacklevel=2)
    return broken


# ----------------------------------------------------------------------------- sweeps


def parse_resolutions(text: str) -> List[int]:
    """'224,256,288' or an inclusive range 'low:high[:step]' (step 8 by default) → sizes."""
    text = text.strip()
    try:
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            low, high, step = (parts + [8])[:3]
            if step < 1 or high < low:
                raise ValueError
            sizes = list(range(low, high + 1, step))
        else:
            sizes = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(
            f"--resolutions {text!r} is invalid: give sizes as '224,256,288' or a range "
            "'low:high[:step]' such as '160:320:16'"
        ) from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--resolutions {text!r} is invalid: expected positive sizes")
    return sorted(set(sizes))


SweepRows = List[Dict[str, Union[int, float, bool, str]]]


def sweep(
    evaluate_at: Callable[[int], Dict[str, Dict[str, float]]],
    resolutions: Sequence[int],
    train_resolution: int,
    stages: int = EFFICIENTNET_STAGES,
) -> SweepRows:
    """Accuracy at every resolution. ``evaluate_at(r)`` returns {"raw": {"top1": …}, "ema": …};
    one row per (resolution, weights) with whether r keeps the training residue."""
    return [
        _row(r, weights, metrics, train_resolution, stages)
        for r in resolutions
        for weights, metrics in evaluate_at(r).items()
    ]


def _row(
    resolution: int, weights: str, metrics: Dict[str, float], train_resolution: int, stages: int
) -> Dict[str, Union[int, float, bool, str]]:
    return {
        "resolution": resolution,
        "weights": weights,
        "top1": metrics["top1"],
        "top5": metrics["top5"],
        "keeps_residue": keeps_residue(train_resolution, resolution, stages),
    }


def sweep_table(rows: SweepRows, train_resolution: int, stages: int = EFFICIENTNET_STAGES) -> str:
    """Markdown: one row per resolution, a column of top-1 per weights kind, ✓ where the residue is kept."""
    kinds = sorted({str(row["weights"]) for row in rows})
    by_res: Dict[int, Dict[str, float]] = {}
    for row in rows:
        by_res.setdefault(int(row["resolution"]), {})[str(row["weights"])] = float(row["top1"])
    step = 2**stages
    lines = [
        f"Trained at {train_resolution} ({train_resolution} mod {step} = {train_resolution % step}); "
        f"✓ marks test resolutions with the same residue modulo {step}.",
        "",
        "| resolution | mod "
        + str(step)
        + " | keeps residue | "
        + " | ".join(f"{k} top-1 %" for k in kinds)
        + " |",
        "|---:|---:|:---:|" + "---:|" * len(kinds),
    ]
    for r in sorted(by_res):
        cells = " | ".join(f"{by_res[r][k]:.2f}" if k in by_res[r] else "–" for k in kinds)
        mark = "✓" if keeps_residue(train_resolution, r, stages) else ""
        lines.append(f"| {r} | {r % step} | {mark} | {cells} |")
    return "\n".join(lines) + "\n"


def plot_sweep(
    rows: SweepRows,
    train_resolution: int,
    path: Union[str, Path],
    stages: int = EFFICIENTNET_STAGES,
    title: Optional[str] = None,
) -> None:
    """Top-1 against resolution, a line per weights kind; resolutions keeping the residue filled."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for kind in sorted({str(row["weights"]) for row in rows}):
        mine = sorted((row for row in rows if row["weights"] == kind), key=lambda row: row["resolution"])
        xs = [row["resolution"] for row in mine]
        ys = [row["top1"] for row in mine]
        (line,) = ax.plot(xs, ys, label=kind)
        kept = [(x, y) for x, y, row in zip(xs, ys, mine) if row["keeps_residue"]]
        ax.scatter([x for x, _ in kept], [y for _, y in kept], color=line.get_color(), zorder=3)
        other = [(x, y) for x, y, row in zip(xs, ys, mine) if not row["keeps_residue"]]
        ax.scatter(
            [x for x, _ in other],
            [y for _, y in other],
            facecolors="none",
            edgecolors=line.get_color(),
            zorder=3,
        )
    ax.axvline(train_resolution, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(f"test resolution (filled: ≡ {train_resolution} mod {2**stages})")
    ax.set_ylabel("top-1 %")
    ax.set_title(title or f"accuracy vs test resolution (trained at {train_resolution})")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)


def trained_resolution(payload: Dict) -> Optional[int]:
    """The resolution a checkpoint of ours was (last) trained at, from the configuration it saved
    (a fine-tuning run saves its target resolution there); None for other checkpoints."""
    try:
        return int(payload["config"]["data"]["resolution"])
    except (KeyError, TypeError, ValueError):
        return None


def _new_path(path: Path) -> Path:
    """``path``, or ``name-1.ext``, ``name-2.ext`` … when it exists: earlier reports are kept."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def write_sweep_report(
    results: Dict[str, Dict[str, float]],
    train_resolution: int,
    folder: Path,
    stages: int = EFFICIENTNET_STAGES,
    title: Optional[str] = None,
) -> Tuple[Path, Path]:
    """Table (Markdown) and plot (PNG) of validation results keyed "<weights>@<resolution>"
    (what ``app.evaluate`` returns), written as resolution-sweep.md/.png in ``folder``."""
    rows = [
        _row(int(key.rpartition("@")[2]), key.rpartition("@")[0], metrics, train_resolution, stages)
        for key, metrics in results.items()
    ]
    folder = Path(folder)
    md, png = _new_path(folder / "resolution-sweep.md"), _new_path(folder / "resolution-sweep.png")
    heading = f"# {title}\n\n" if title else ""
    plot_sweep(rows, train_resolution, png, stages, title=title)
    RunFolder(folder).write_document(
        md.name,
        heading + sweep_table(rows, train_resolution, stages) + f"\n![accuracy vs resolution]({png.name})\n",
    )
    return md, png


def describe_rule(train_resolution: int, stages: int = EFFICIENTNET_STAGES) -> str:
    """One line for logs: the training size's residue and its feature-map sizes per stage."""
    sizes = "→".join(str(s) for s in feature_sizes(train_resolution, stages))
    return (
        f"training resolution {train_resolution}: residue {residue(train_resolution, stages)} mod "
        f"{2**stages}, feature maps {sizes}"
    )


def _main_table() -> str:  # pragma: no cover - `python -m app.resolution` prints the sizes
    lines = ["| model | native | half | half px / native px |", "|---|---:|---:|---:|"]
    for key, variant in VARIANTS.items():
        half = HALF_RESOLUTIONS[key]
        lines.append(
            f"| {key.upper()} | {variant.resolution} | {half} | {(half / variant.resolution) ** 2:.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(_main_table())
    sys.exit(0)
