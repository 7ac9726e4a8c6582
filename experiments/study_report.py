"""A study's rows (``experiments/study.py``) → its Markdown report and plot, regenerated from the rows alone.

Every number in a report is a mean over seeds ± the sample standard deviation (n − 1), with the
number of seeds. A comparison between two variants is called *separated* only when the
difference of their means exceeds twice its standard error (sqrt(s₁²/n₁ + s₂²/n₂)); otherwise the
report says that these runs cannot tell the two apart. With three seeds this is a coarse test: it
says what the rows can and cannot support, not a significance level.
"""

import json
import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from app.plotting import pyplot, save
from app.run_folder import RunFolder

Rows = List[Dict[str, Any]]


def load_rows(path: Path) -> Rows:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def summary(values: Sequence[float]) -> Tuple[float, float, int]:
    """(mean, sample standard deviation (0 for one value), n)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan"), 0
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def by_variant(rows: Rows, key: str) -> Dict[str, Tuple[float, float, int]]:
    out: Dict[str, List[float]] = {}
    for row in rows:
        out.setdefault(row["variant"], []).append(row.get(key))
    return {variant: summary(values) for variant, values in out.items()}


def fmt(stat: Tuple[float, float, int], digits: int = 2) -> str:
    mean, sd, n = stat
    if n == 0 or math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def compare(a: Tuple[float, float, int], b: Tuple[float, float, int]) -> Tuple[float, bool]:
    """(mean of a − mean of b, whether the rows separate them: |Δ| > 2·standard error, n ≥ 2)."""
    (ma, sa, na), (mb, sb, nb) = a, b
    diff = ma - mb
    if na < 2 or nb < 2:
        return diff, False
    return diff, abs(diff) > 2 * math.sqrt(sa**2 / na + sb**2 / nb)


Stats = Dict[str, Tuple[float, float, int]]


def verdict(name_a: str, name_b: str, stats: Stats, unit: str = "points") -> str:
    if name_a not in stats or name_b not in stats:
        return f"{name_a} vs {name_b}: not measured."
    diff, separated = compare(stats[name_a], stats[name_b])
    if min(stats[name_a][2], stats[name_b][2]) < 2:
        return (
            f"{name_a} vs {name_b}: {diff:+.2f} {unit} top-1 — one seed of "
            f"{name_a if stats[name_a][2] < 2 else name_b} only: no spread to test it against."
        )
    if separated:
        return (
            f"{name_a} vs {name_b}: {diff:+.2f} {unit} top-1 — separated by these runs "
            f"(|Δ| > 2 standard errors)."
        )
    return (
        f"{name_a} vs {name_b}: {diff:+.2f} {unit} top-1 — within the seeds' spread: these runs "
        "cannot tell them apart."
    )


def provenance(rows: Rows) -> List[str]:
    first = rows[0]
    dates = sorted(r["date"] for r in rows)
    loads = [r.get(k) for r in rows for k in ("load_before", "load_after") if r.get(k) is not None]
    seeds = sorted({r["seed"] for r in rows})
    commands = list(
        dict.fromkeys(f"`{r['command']}` (commit {r['commit']}, torch {r['torch']})" for r in rows)
    )
    return [
        ("Command: " if len(commands) == 1 else "Commands (rows of several runs of the study): ")
        + "; ".join(commands)
        + ".",
        f"Machine: {first['device']} — {first['cpu']}, {first['cores']} cores, {first['threads']} torch "
        f"thread(s). Runs from {dates[0]} to {dates[-1]}, seeds {seeds}.",
        f"1-minute load average during the runs: {min(loads):.2f}–{max(loads):.2f} (the machine is "
        "shared: timings are noisy, accuracy is not affected).",
    ]


# ----------------------------------------------------------------------------- plots


def plot_norms(rows: Rows, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for norm in dict.fromkeys(r["norm"] for r in rows):
        mine = [r for r in rows if r["norm"] == norm]
        micro = sorted({r["micro_batch"] for r in mine})
        stats = [summary([r["top1"] for r in mine if r["micro_batch"] == m]) for m in micro]
        ax.errorbar(
            micro, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=norm
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("micro-batch (same global batch by accumulation)")
    ax.set_ylabel("top-1 % (mean ± sd over seeds)")
    ax.set_title("Normalisation against micro-batch")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)


def plot_groups(rows: Rows, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.8))
    groups = sorted({r["group_size"] for r in rows})
    for ax, key, label in ((left, "top1", "top-1 %"), (right, "images_per_s", "training images/s (CPU)")):
        stats = [summary([r[key] for r in rows if r["group_size"] == g]) for g in groups]
        ax.errorbar(groups, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("group size G")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Group size: accuracy and CPU training throughput (mean ± sd over seeds)")
    save(fig, path)


def plot_resolution(rows: Rows, path: Path) -> None:
    plt = pyplot()
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    acc = by_variant(rows, "top1")
    secs = by_variant(rows, "total_seconds")
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.8))
    xs = range(len(variants))
    left.bar(xs, [acc[v][0] for v in variants], yerr=[acc[v][1] for v in variants], capsize=3)
    right.bar(xs, [secs[v][0] for v in variants], yerr=[secs[v][1] for v in variants], capsize=3)
    for ax, label in (
        (left, "top-1 % at the native resolution"),
        (right, "training seconds (incl. fine-tune)"),
    ):
        ax.set_xticks(list(xs))
        ax.set_xticklabels(variants, rotation=20, ha="right")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Native vs half resolution, both fine-tuned (mean ± sd over seeds)")
    save(fig, path)


# ----------------------------------------------------------------------------- reports


def norms_lines(rows: Rows) -> List[str]:
    micro = sorted({r["micro_batch"] for r in rows})
    norms = list(dict.fromkeys(r["norm"] for r in rows))
    stats = by_variant(rows, "top1")
    accum = {r["micro_batch"]: r["grad_accum"] for r in rows}
    lines = [
        "| norm | " + " | ".join(f"mb {m} (× {accum[m]})" for m in micro) + " |",
        "|---|" + "---:|" * len(micro),
    ]
    for norm in norms:
        lines.append(
            f"| {norm} | "
            + " | ".join(fmt(stats.get(f"{norm} mb{m}", (float("nan"), 0, 0))) for m in micro)
            + " |"
        )
    small, large = f"mb{micro[0]}", f"mb{micro[-1]}"
    lines += [
        "",
        "Top-1 % on the validation split, mean ± sd over seeds; mb = micro-batch, × = "
        "gradient accumulation (same global batch, same updates).",
        "",
        "What the rows show, claim by claim:",
        "",
        f"- BN degrades at small micro-batches: {verdict(f'BN {small}', f'BN {large}', stats)}",
        f"- GN / LN alone lose accuracy against large-batch BN: "
        f"{verdict(f'GN {large}', f'BN {large}', stats)} "
        f"{verdict(f'LN {large}', f'BN {large}', stats)}",
        f"- LN+PN matches large-batch BN: {verdict(f'LN+PN {small}', f'BN {large}', stats)} "
        f"{verdict(f'LN+PN {large}', f'BN {large}', stats)}",
        f"- LN+PN is batch-independent: {verdict(f'LN+PN {small}', f'LN+PN {large}', stats)}",
        f"- LN+PN against LN alone: {verdict(f'LN+PN {large}', f'LN {large}', stats)}",
    ]
    return lines


def groups_lines(rows: Rows) -> List[str]:
    acc, speed = by_variant(rows, "top1"), by_variant(rows, "images_per_s")
    variants = sorted(
        dict.fromkeys(r["variant"] for r in rows),
        key=lambda v: next(r["group_size"] for r in rows if r["variant"] == v),
    )
    size = {r["variant"]: (r.get("parameters_1000"), r.get("macs_224")) for r in rows}
    base = variants[0]
    lines = [
        "| variant | B0 parameters / multiply-adds (1000 classes, 224) | top-1 % | training images/s | "
        f"images/s vs {base} |",
        "|---|---:|---:|---:|---:|",
    ]
    for v in variants:
        params, macs = size[v]
        ratio = speed[v][0] / speed[base][0] if speed[base][0] else float("nan")
        lines.append(
            f"| {v} | {params / 1e6:.2f}M / {macs / 1e9:.2f}G | {fmt(acc[v])} | "
            f"{fmt(speed[v], 1)} | {ratio:.2f}× |"
        )
    lines += [
        "",
        "Throughput: images per second of each run's training loop on this CPU (no validation), "
        "mean ± sd over seeds; the paper's throughputs are IPU ones, these are CPU timings.",
        "",
    ]
    noisy = [v for v in variants if speed[v][2] > 1 and speed[v][1] > 0.3 * speed[v][0]]
    if noisy:
        lines += [
            f"The throughput of {', '.join(noisy)} varies by more than 30 % of its mean between "
            "seeds: the machine's load (see above), not the variant, set these timings, so they "
            "cannot rank the group sizes.",
            "",
        ]
    lines += ["What the rows show:", ""]
    lines += [f"- {verdict(v, base, acc)}" for v in variants[1:]]
    best = max(variants, key=lambda v: acc[v][0])
    lines.append(f"- Highest mean top-1: {best} (the paper: G4 most accurate, G16 chosen for the trade-off).")
    return lines


def resolution_lines(rows: Rows) -> List[str]:
    acc, secs = by_variant(rows, "top1"), by_variant(rows, "total_seconds")
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    res = {r["variant"]: r["train_resolution"] for r in rows}
    test = rows[0]["test_resolution"]
    native_total = secs.get("native + fine-tune", (float("nan"), 0, 0))[0]
    lines = [
        f"| variant | trained at | top-1 % at {test} | training seconds (incl. fine-tune) | "
        "vs native + fine-tune |",
        "|---|---:|---:|---:|---:|",
    ]
    for v in variants:
        lines.append(
            f"| {v} | {res[v]} | {fmt(acc[v])} | {fmt(secs[v], 1)} | {secs[v][0] / native_total:.2f}× |"
        )
    lines += [
        "",
        "What the rows show:",
        "",
        f"- {verdict('half + fine-tune', 'native + fine-tune', acc)}",
        f"- {verdict('half + fine-tune', 'half', acc)}",
        f"- {verdict('native + fine-tune', 'native', acc)}",
        f"- Training time, half + fine-tune vs native + fine-tune: "
        f"{secs.get('half + fine-tune', (float('nan'),))[0] / native_total:.2f}× (same epochs; "
        "a CPU's cost is close to proportional to pixels, an IPU's is not measured here).",
    ]
    return lines


SECTIONS = {
    "norms": (
        "Normalisation against micro-batch",
        norms_lines,
        plot_norms,
        "BN, GN (4 groups), LN and LN + Proxy Norm, each at several micro-batches with the same "
        "global batch by gradient accumulation and the same number of updates.",
    ),
    "groups": (
        "Group size: accuracy and CPU throughput",
        groups_lines,
        plot_groups,
        "Group sizes 1, 4, 16 and 64 with expansion ratios 6, 5, 4 and 2 (G1 e6 and G16 e4 "
        "from the paper's configs; G4 and G64 chosen to keep FLOPs near G1's, see "
        "experiments/study.py).",
    ),
    "resolution": (
        "Native vs half resolution, both fine-tuned",
        resolution_lines,
        plot_resolution,
        "Each seed trains at the native and at the half resolution for the same epochs, then "
        "fine-tunes both at the native one (last layers, validation preprocessing, SGD) — "
        "the paper's protocol for every model it reports.",
    ),
}


def write_report(name: str, rows_path: Path, out: Optional[Path] = None) -> Path:
    """``<rows>.md`` and ``<rows>.png`` beside the rows (or ``out``), from the rows alone."""
    rows_path = Path(rows_path)
    rows = load_rows(rows_path)
    if not rows:
        raise ValueError(f"{rows_path} holds no rows")
    title, lines_fn, plot_fn, what = SECTIONS[name]
    out = out or rows_path.with_suffix(".md")
    plot = out.with_suffix(".png")
    plot_fn(rows, plot)
    first = rows[0]
    text = [
        f"# Study: {title} ({first['dataset']}, {first['device']})",
        "",
        "Generated from the rows in "
        f"`{rows_path.name}` by `experiments/study_report.py`; do not edit by hand "
        f"(regenerate: `python -m experiments study {name} study.report_only=true`).",
        "",
        *provenance(rows),
        "",
        f"{what} Each run: {first['epochs']:g} epochs of {first['dataset']} "
        f"({first['model']}), global batch {first['global_batch']}, validated once at its end with "
        "its raw weights.",
        "",
        *lines_fn(rows),
        "",
        f"![{name}]({plot.name})",
        "",
    ]
    RunFolder(out.parent).write_document(out.name, "\n".join(text))
    return out
