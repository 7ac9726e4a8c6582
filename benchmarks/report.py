"""Result rows → Markdown report and PNG plots (generated; never edit the outputs by hand).

    python -m benchmarks.report [results.jsonl ...] [--out benchmarks/results/report.md]

Without files it reads every benchmarks/results/*.jsonl."""
import argparse
import glob
import json
import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from app.resolution import half_resolution, native_resolution

from . import RESULTS_DIR
from .paper_accuracy import paper_top1

SETTING = ("device", "resolution", "batch", "precision", "layout", "compile", "mode")


def load_rows(paths: Sequence[str]) -> List[Dict[str, object]]:
    rows = []
    for path in paths:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise SystemExit(f"error: {path}:{number} is not a JSON line ({error})") from None
                    row["source"] = os.path.basename(path)
                    rows.append(row)
    return rows


def _setting(row) -> Tuple:
    return tuple(row.get(k) for k in SETTING)


def _find(rows, name: str, setting: Tuple) -> Optional[Dict[str, object]]:
    for row in rows:
        if row.get("status") == "ok" and row["name"] == name and _setting(row) == setting:
            return row
    return None


def ratios(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """The comparisons the goals name, wherever both sides were measured under one setting:
    ours-vs-peer throughput (>= 1 means ours is faster) and variant step-cost ratios."""
    out = []
    pairs = [  # (what, or per mode; numerator name, denominator name, figure)
        ("ours B0 vs timm B0 (img/s ratio, >=1: ours faster)", "ours-b0-g1-e6-bn",
         "timm/efficientnet_b0", "speed"),
        ("ours B0 vs torchvision B0 (img/s ratio)", "ours-b0-g1-e6-bn",
         "torchvision/efficientnet_b0", "speed"),
        ("ours G16 B0 vs timm G16 B0 (img/s ratio)", "ours-b0-g16-e6-bn",
         "timm/efficientnet_b0_g16_evos", "speed"),
        ({"train": "G16-LN+PN vs G16-BN step cost (goal <= 1.25)",
          # No goal: at inference batch norm folds into its conv, LN must still normalise.
          "infer": "G16-LN+PN vs G16-BN step cost (no goal: BN folds into the conv)"},
         "ours-b0-g16-e6-ln+pn", "ours-b0-g16-e6-bn", "cost"),
        ("G16-BN vs G1-BN step cost", "ours-b0-g16-e6-bn", "ours-b0-g1-e6-bn", "cost"),
    ]
    for what, a_name, b_name, figure in pairs:
        for a in rows:
            if a.get("status") != "ok" or a["name"] != a_name:
                continue
            b = _find(rows, b_name, _setting(a))
            if b is None:
                continue
            if figure == "speed":
                value = a["images_per_s"] / b["images_per_s"]
            else:
                value = a["step_ms_median"] / b["step_ms_median"]
            per_repeat = _repeat_ratios(a, b, figure)
            label = what[a["mode"]] if isinstance(what, dict) else what
            out.append({"what": label, "mode": a["mode"], "setting": _describe(a),
                        "ratio": round(value, 3), "per_repeat": per_repeat,
                        "load": max(a.get("load_avg", 0), b.get("load_avg", 0))})
    return out


def _repeat_ratios(a, b, figure) -> List[float]:
    """Ratios repeat by repeat (interleaved runs): their spread shows how noisy the machine was."""
    ra, rb = a.get("repeat_ms_median") or [], b.get("repeat_ms_median") or []
    if len(ra) != len(rb) or len(ra) < 2:
        return []
    return [round(y / x if figure == "speed" else x / y, 3) for x, y in zip(ra, rb)]


def describe_setting(row, with_layout: bool = True) -> str:
    return (f"{row['device']} {row['resolution']}px b{row['batch']} {row['precision']}"
            + (f" {row['layout']}" if with_layout else "")
            + (" compiled" if row.get("compile") else ""))


_describe = describe_setting


def best_layouts(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Per subject and setting (all but layout), the faster memory layout, when both ran."""
    groups: Dict[Tuple, List[Dict[str, object]]] = {}
    for row in rows:
        if row.get("status") == "ok":
            key = (row["name"],) + tuple(row.get(k) for k in SETTING if k != "layout")
            groups.setdefault(key, []).append(row)
    out = []
    for members in groups.values():
        if len({m["layout"] for m in members}) < 2:
            continue
        best = max(members, key=lambda m: m["images_per_s"])
        worst = min(members, key=lambda m: m["images_per_s"])
        out.append({"name": best["name"], "mode": best["mode"],
                    "setting": describe_setting(best, with_layout=False),
                    "best_layout": best["layout"], "images_per_s": best["images_per_s"],
                    "speedup_vs_other": round(best["images_per_s"] / worst["images_per_s"], 3),
                    "utilisation": best.get("utilisation")})
    return out


def _fmt(value, digits=1) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _table(header: List[str], lines: List[List[str]]) -> List[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(line) + " |" for line in lines])


def _environment(rows) -> List[str]:
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return ["No successful rows."]
    loads = [r["load_avg"] for r in ok if "load_avg" in r]
    first = ok[0]
    emulated = any(r.get("emulated") for r in ok)
    lines = [f"- device: {first['device_name']} ({first['device']}), torch {first['torch']}"
             + (f", CUDA {first['cuda']}" if first.get("cuda") else "")
             + f", {first['threads']} threads",
             f"- date: {first['date']}, commit {first['commit']}, host {first.get('hostname', '?')}",
             f"- 1-min load average during the rows: {min(loads):.2f}–{max(loads):.2f} "
             "(shared machine: higher load, noisier rows)" if loads else "- load: not recorded"]
    if emulated:
        lines.append("- **EMULATED**: ipu-model rows run the PopTorch emulator on the host; they show "
                     "that the path works, not IPU speed.")
    return lines


def markdown(rows: List[Dict[str, object]], commands: Dict[str, str],
             plots: Sequence[str] = ()) -> str:
    lines = ["# Benchmark report", "",
             "Generated by `python -m benchmarks.report` from the result files below; do not edit.",
             "Images/s = batch / median step time. A training step is zero_grad, forward, "
             "cross-entropy, backward and an SGD step. TFLOP/s counts 2 FLOPs per multiply-add "
             "(training: 3× the forward); utilisation is against the best large-matmul rate "
             "measured in the same run and precision. Peak MB is per case: the tensors it "
             "keeps between steps (weights, gradients, optimiser state, inputs) plus what one "
             "extra untimed step adds (CUDA allocator, or resident set on a CPU); rows of "
             "kind `process-peak-rss` could only give the process's lifetime peak.", ""]
    for source in sorted({r["source"] for r in rows}):
        part = [r for r in rows if r["source"] == source]
        lines += [f"## {source}", ""]
        if source in commands:
            lines += [f"Command: `{commands[source]}`", ""]
        lines += _environment(part) + [""]
        table = []
        for r in part:
            if r.get("status") != "ok":
                table.append([r["name"], r["mode"], str(r["resolution"]), str(r["batch"]),
                              r["precision"], r["layout"], "yes" if r.get("compile") else "no",
                              f"{r['status']}: {r.get('reason', '')}"] + ["–"] * 7)
                continue
            table.append([
                r["name"] + (" (emulated)" if r.get("emulated") else ""), r["mode"],
                str(r["resolution"]), str(r["batch"]), r["precision"], r["layout"],
                "yes" if r.get("compile") else "no", _fmt(r["images_per_s"]),
                f"{_fmt(r['step_ms_median'])} / {_fmt(r['step_ms_p90'])}",
                _fmt(r["params"] / 1e6, 2), _fmt(r["gmacs"], 3), _fmt(r["achieved_tflops"], 4),
                _fmt(None if r.get("utilisation") is None else 100 * r["utilisation"]),
                _fmt(r.get("peak_mem_mb"), 0), _fmt(r.get("load_avg"), 2)])
        lines += _table(["model", "mode", "px", "batch", "precision", "layout", "compiled",
                         "img/s", "step ms p50 / p90", "params M", "GMACs", "TFLOP/s",
                         "util %", "peak MB", "load"], table) + [""]
        found = ratios(part)
        if found:
            lines += ["### Ratios (same run, same setting)", ""]
            lines += ["`ratio` compares the medians of all timed steps; `median of repeats` is the "
                      "median of the per-repeat ratios (the steadier figure on a busy machine).", ""]
            lines += _table(["comparison", "mode", "setting", "ratio", "median of repeats",
                             "per repeat", "load"],
                            [[f["what"], f["mode"], f["setting"], _fmt(f["ratio"], 3),
                              _fmt(statistics.median(f["per_repeat"]), 3) if f["per_repeat"] else "–",
                              ", ".join(f"{v:.2f}" for v in f["per_repeat"]) or "–",
                              _fmt(f["load"], 2)] for f in found]) + [""]
        layouts = best_layouts(part)
        if layouts:
            lines += ["### Faster layout per variant (picked automatically)", ""]
            lines += _table(["model", "mode", "setting", "faster layout", "img/s",
                             "× the other", "util %"],
                            [[b["name"], b["mode"], b["setting"], b["best_layout"],
                              _fmt(b["images_per_s"]), _fmt(b["speedup_vs_other"], 2),
                              _fmt(None if b["utilisation"] is None else 100 * b["utilisation"])]
                             for b in layouts]) + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                     for p in plots] + [""]
    return "\n".join(lines)


def accuracy_points(rows) -> List[Dict[str, object]]:
    """Our training rows whose variant the paper reports an accuracy for."""
    points = []
    for r in rows:
        if r.get("status") != "ok" or r["subject"] != "ours" or r["mode"] != "train":
            continue
        try:
            native, half_size = native_resolution(r["model"]), half_resolution(r["model"])
        except (ValueError, KeyError):
            continue
        if r["resolution"] not in (native, half_size):
            continue  # the paper's accuracies belong to its training sizes only
        half = r["resolution"] == half_size
        top1 = paper_top1(r["model"], r["group_size"], r["expand_ratio"], r["norm"], half)
        if top1 is not None:
            points.append({**r, "top1": top1, "half": half})
    return points


def plot(rows: List[Dict[str, object]], out_dir: str) -> List[str]:
    """images/s per variant and peer (one figure per result file and mode), and accuracy
    against training throughput for the variants the paper reports."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for source in sorted({r["source"] for r in rows}):
        ok = [r for r in rows if r["source"] == source and r.get("status") == "ok"]
        if not ok:
            continue
        stem = os.path.splitext(source)[0]
        fig, axes = plt.subplots(1, 2, figsize=(13, max(3, 0.3 * len(ok))), squeeze=False)
        for ax, mode in zip(axes[0], ("train", "infer")):
            part = [r for r in ok if r["mode"] == mode]
            labels = [f"{r['name']} {r['resolution']}px {r['precision']} {r['layout']}"
                      + (" compiled" if r.get("compile") else "") for r in part]
            colours = ["tab:blue" if r["subject"] == "ours" else "tab:grey" for r in part]
            ax.barh(range(len(part)), [r["images_per_s"] for r in part], color=colours)
            ax.set_yticks(range(len(part)))
            ax.set_yticklabels(labels, fontsize=7)
            ax.invert_yaxis()
            emulated = " (EMULATED)" if any(r.get("emulated") for r in part) else ""
            ax.set_title(f"{mode}: images/s{emulated} (blue: ours, grey: peers)", fontsize=9)
            ax.set_xlabel("images/s")
        fig.suptitle(f"{stem}: {ok[0]['device_name']}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}-throughput.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
        points = accuracy_points(ok)
        if points:
            fig, ax = plt.subplots(figsize=(6, 4))
            for p in points:
                marker = "o" if not p["half"] else "s"
                ax.scatter(p["images_per_s"], p["top1"], marker=marker)
                ax.annotate(f"{p['model']} G{p['group_size']} {p['norm'].upper()}"
                            + (" half-res" if p["half"] else ""),
                            (p["images_per_s"], p["top1"]), fontsize=6)
            ax.set_xscale("log")
            ax.set_xlabel(f"training images/s measured here ({ok[0]['device_name']})")
            ax.set_ylabel("ImageNet top-1 % (paper, Figure 1)")
            ax.set_title("Accuracy (paper) vs throughput (measured)", fontsize=9)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{stem}-accuracy.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", help="result .jsonl files (default: benchmarks/results/*.jsonl)")
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "report.md"),
                   help="Markdown path; plots go next to it")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(RESULTS_DIR, "*.jsonl")))
    missing = [f for f in files if not os.path.isfile(f)]
    if missing or not files:
        raise SystemExit(f"error: no result files {'at ' + ', '.join(missing) if missing else 'found'}; "
                         "run `python -m benchmarks` first")
    rows = load_rows(files)
    commands = {}
    for f in files:
        cmd = os.path.splitext(f)[0] + ".cmd"
        if os.path.isfile(cmd):
            with open(cmd) as fh:
                commands[os.path.basename(f)] = fh.read().strip()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    plots = [] if args.no_plots else plot(rows, out_dir)
    with open(args.out, "w") as f:
        f.write(markdown(rows, commands, plots))
    print(f"wrote {args.out}" + (f" and {len(plots)} plot(s)" if plots else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
