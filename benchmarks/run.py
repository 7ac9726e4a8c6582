"""The benchmark command: expand a preset (plus overrides) into cases, time them, write rows."""

import argparse
import csv
import gc
import json
import os
import signal
import sys
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from . import RESULTS_DIR, SCRATCH_DIR
from .budget import Budget
from .cases import Case, expand, our_cases, peer_cases
from .environment import describe, load_average
from .measure import (
    Prepared,
    measure_peak_flops,
    peak_memory,
    step_memory,
    summarise,
    time_steps,
)
from .peers import missing_library
from .presets import PRESETS
from .report import best_layouts, describe_setting
from .report import main as report_main


def _list(kind=str):
    return lambda text: [kind(v) for v in text.split(",") if v]


def _bools(text: str) -> List[bool]:
    table = {"on": True, "off": False, "true": True, "false": False, "1": True, "0": False}
    try:
        return [table[v.lower()] for v in text.split(",") if v]
    except KeyError:
        raise argparse.ArgumentTypeError(f"--compile takes on/off values, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Training and inference throughput of our EfficientNet variants and their "
        "peers, side by side. A preset sets every axis; the options override it.",
    )
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS))
    p.add_argument("--device", choices=["cpu", "cuda", "ipu", "ipu-model"])
    p.add_argument("--models", type=_list(), help="b0..b7, comma-separated")
    p.add_argument(
        "--variants",
        type=_list(),
        help="exact variants, e.g. g1-e6-bn,g16-e4-ln+pn (overrides groups/expands/norms)",
    )
    p.add_argument("--groups", type=_list(int), help="group sizes, e.g. 1,16")
    p.add_argument("--expands", type=_list(int), help="expansion ratios, e.g. 4,6")
    p.add_argument("--norms", type=_list(), help="bn,gn,ln,ln+pn")
    p.add_argument("--res", type=_list(), help="native, half or pixels, e.g. native,half")
    p.add_argument("--batch", type=_list(int), help="batch sizes")
    p.add_argument("--precisions", type=_list(), help="fp32,bf16,fp16 (autocast)")
    p.add_argument("--layouts", type=_list(), help="nchw,channels_last")
    p.add_argument("--compile", type=_bools, help="off,on (torch.compile)")
    p.add_argument("--modes", type=_list(), help="train,infer")
    p.add_argument("--peers", type=_list(), help="peer names, or 'none'")
    p.add_argument("--warmup", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument(
        "--repeats", type=int, help="rounds over all cases, interleaved (ours and peers alternate)"
    )
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (0: torch's default; the CPU presets use 1)"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        help="start no case that would not end within this many seconds, estimated from "
        "the cases before it (the rest become skipped rows)",
    )
    p.add_argument(
        "--no-report",
        action="store_true",
        help="only write rows (default: also <out>.md and plots via benchmarks.report)",
    )
    p.add_argument(
        "--out",
        help="output path without extension "
        "(default runs/bench/<preset>-<device>, untracked; with --results the committed "
        "benchmarks/results/<preset>-<device>)",
    )
    p.add_argument(
        "--results",
        action="store_true",
        help="write the committed report in benchmarks/results/ (make bench-report)",
    )
    return p


def settings(args: argparse.Namespace) -> Dict[str, object]:
    chosen = dict(PRESETS[args.preset])
    chosen.setdefault("variants", None)
    if any(getattr(args, k) is not None for k in ("groups", "expands", "norms")):
        chosen["variants"] = None  # crossing axes named on the command line replaces the list
    for key in chosen:
        value = getattr(args, key, None)
        if value is not None:
            chosen[key] = value
    if chosen["peers"] in (["none"], ["None"]):
        chosen["peers"] = []
    for key in ("warmup", "steps", "repeats", "threads"):
        if int(chosen[key]) < (0 if key in ("warmup", "threads") else 1):
            raise SystemExit(
                f"error: --{key}={chosen[key]} is too small (warmup, threads >= 0; steps, repeats >= 1)"
            )
    return chosen


def build_cases(s: Dict[str, object]) -> List[Case]:
    axes = dict(
        batch=s["batch"],
        precision=s["precisions"],
        layout=s["layouts"],
        compile=s["compile"],
        mode=s["modes"],
    )
    ours = our_cases(
        s["models"],
        s["groups"],
        s["expands"],
        s["norms"],
        s["res"],
        variants=s.get("variants"),
        device=s["device"],
    )
    peers = peer_cases(s["peers"], s["res"], device=s["device"])
    # Each peer right after our cases of its size: a time budget that ends the run early cuts
    # whole sizes at the end, never the peers of the sizes that were measured.
    order = {m: k for k, m in enumerate(s["models"])}
    merged = sorted(ours + peers, key=lambda c: order.get(c.model, len(order)))  # stable
    return expand(merged, **axes)


def check_device(device: str) -> None:
    """Fail before any work when the device cannot run at all."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "error: --device cuda but torch sees no CUDA device "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "use --device cpu or install a CUDA build of torch"
        )


def _skip_row(case: Case, reason: str, status: str = "skipped") -> Dict[str, object]:
    return {**case.as_dict(), "status": status, "reason": reason}


def run_cases(
    cases: List[Case], warmup: int, steps: int, repeats: int, log=print, budget_s: Optional[float] = None
) -> List[Dict[str, object]]:
    """Time every case. With repeats > 1 all runnable cases are built first and timed round by
    round, so ours and the peers share the machine's good and bad moments alike.

    ``budget_s``: after the first case, a case starts only if the cases so far say it will end
    within that many seconds (budget.Budget; its row says why not), so a slot (gpu.sh: 8 minutes
    of an H100) ends with rows for what ran, most important cases first. An interrupt (Ctrl-C,
    or gpu.sh's hard limit sending SIGINT) ends the run with the rows measured so far.
    Out of device memory, a case retries at half the batch (as timm's benchmark does); its row
    keeps the batch that ran and says it was lowered."""
    cases = list(cases)
    rows, runnable = _skip_missing_libraries(cases, log)
    peaks = _peak_flops(cases[i] for i in runnable)
    rounds = _Rounds(cases, warmup, steps, repeats, log, Budget(budget_s), rows, peaks)
    try:
        for r in range(repeats):
            # Odd rounds run the cases in reverse, so a drift in the machine's load (or the cost
            # of following a particular case) does not always favour the same side of a comparison.
            for i in runnable if r % 2 == 0 else runnable[::-1]:
                if i not in rows:
                    rounds.take_turn(i, r)
    except KeyboardInterrupt:
        # The rows measured so far are worth writing; the case in flight and the rest are not run.
        log("interrupted: keeping the rows measured so far")
        for i, case in enumerate(cases):
            if i not in rows:
                rows[i] = _skip_row(case, "interrupted before this case finished (Ctrl-C or time limit)")
    return [rows[i] for i in range(len(cases)) if i in rows]


def _skip_missing_libraries(cases: List[Case], log) -> Tuple[Dict[int, Dict[str, object]], List[int]]:
    """Skipped rows for the peers whose library is not installed, and the indices of the rest."""
    rows: Dict[int, Dict[str, object]] = {}
    runnable = []
    for i, case in enumerate(cases):
        reason = missing_library(case.subject) if case.subject != "ours" else None
        if reason:
            rows[i] = _skip_row(case, reason)
            log(f"skip {case.name}: {reason}")
        else:
            runnable.append(i)
    return rows, runnable


def _peak_flops(cases: Iterable[Case]) -> Dict[tuple, float]:
    """The large-matmul rate per (device, precision) the cases use: their utilisation's yardstick."""
    peaks: Dict[tuple, float] = {}
    for case in cases:
        key = (case.device, case.precision)
        if key not in peaks:
            peaks[key] = measure_peak_flops(*key)
    return peaks


@dataclass
class _Rounds:
    """One run's cases across its rounds: what is built, the times so far, and the finished rows."""

    cases: List[Case]
    warmup: int
    steps: int
    repeats: int
    log: Callable[[str], None]
    budget: Budget
    rows: Dict[int, Dict[str, object]]
    peaks: Dict[tuple, float]
    prepared: Dict[int, Prepared] = field(default_factory=dict)
    lowered: Dict[int, int] = field(default_factory=dict)  # index → batch asked for, where memory forced less
    times: Dict[int, List[float]] = field(default_factory=lambda: defaultdict(list))
    per_repeat: Dict[int, List[float]] = field(default_factory=lambda: defaultdict(list))
    loads: Dict[int, List[float]] = field(default_factory=lambda: defaultdict(list))

    def take_turn(self, i: int, r: int) -> None:
        """Case ``i`` in round ``r``: time it, and after its last round write its row."""
        interleave = self.repeats > 1
        t = self._time(i, r, interleave)
        if t is None:
            return
        case = self.cases[i]
        self.times[i].extend(t)
        self.per_repeat[i].append(sorted(t)[len(t) // 2] * 1e3)
        self.loads[i].append(load_average())
        if r == self.repeats - 1 or not interleave:
            self.rows[i] = _finish(
                case,
                self.prepared[i],
                self.times[i],
                self.per_repeat[i],
                self.loads[i],
                self.peaks.get((case.device, case.precision)),
            )
            if i in self.lowered:
                self.rows[i]["reason"] = f"batch lowered from {self.lowered[i]} (out of device memory)"
            self.log(_line(self.rows[i]))
        if not interleave:
            del self.prepared[i]
            gc.collect()

    def _time(self, i: int, r: int, interleave: bool) -> Optional[List[float]]:
        """Step times of case ``i`` in round ``r``; None where the budget refuses to start it or
        it fails (its row then says why)."""
        case = self.cases[i]
        fresh = i not in self.prepared  # built this round: its time counts for the budget
        refusal = self.budget.refusal(case) if fresh else None
        if refusal:
            self.rows[i] = _skip_row(case, refusal)
            self.log(f"skip {case.name} {case.mode}: {refusal}")
            return None
        since = self.budget.clock()
        warmup = self.warmup if r == 0 or not interleave else 1
        try:
            return _prepare_and_time(
                i, self.cases, self.prepared, self.lowered, warmup, self.steps, self.log, may_lower=r == 0
            )
        except (RuntimeError, ValueError, NotImplementedError) as error:
            self.rows[i] = _skip_row(
                self.cases[i],
                f"{type(error).__name__}: {str(error).splitlines()[0][:300]}",
                status="error",
            )
            self.prepared.pop(i, None)
            self.log(f"error {case.name} {case.mode}: {self.rows[i]['reason']}")
            return None
        finally:
            if fresh:
                self.budget.record(case, since)


def mark_faster_layout(rows: List[Dict[str, object]]) -> None:
    """Where a case ran in both layouts, flag the faster row (faster_layout: true), so a user
    or a script picks it without rerunning; rows measured in one layout only get None."""
    winners = {(b["name"], b["mode"], b["setting"]): b["best_layout"] for b in best_layouts(rows)}
    for row in rows:
        if row.get("status") != "ok":
            continue
        best = winners.get((row["name"], row["mode"], describe_setting(row, with_layout=False)))
        row["faster_layout"] = None if best is None else row["layout"] == best


def _prepare_and_time(
    i: int,
    cases: List[Case],
    prepared: Dict[int, Prepared],
    lowered: Dict[int, int],
    warmup: int,
    steps: int,
    log,
    may_lower: bool,
) -> List[float]:
    """Step times of case ``i``, building it first if needed. Out of device memory in the first
    repeat (``may_lower``) the batch halves until it fits (``cases[i]`` is replaced; ``lowered``
    remembers the batch asked for); otherwise, or at batch 1, a RuntimeError says so."""
    while True:
        case = cases[i]
        try:
            if i not in prepared:
                _reset_memory(case.device)
                prepared[i] = Prepared(case)
                times = time_steps(prepared[i].step, case.device, warmup, steps)
                prepared[i].transient = step_memory(prepared[i].step, case.device)  # untimed
                return times
            return time_steps(prepared[i].step, case.device, warmup, steps)
        except torch.cuda.OutOfMemoryError:
            prepared.pop(i, None)
            _reset_memory(case.device)
            if not may_lower or case.batch == 1:
                raise RuntimeError(f"out of device memory at batch {case.batch}") from None
            lowered.setdefault(i, case.batch)
            cases[i] = replace(case, batch=case.batch // 2)
            log(f"out of memory: {case.name} {case.mode} retries at batch {cases[i].batch}")


def _reset_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _finish(case, prepared, times, per_repeat, loads, peak) -> Dict[str, object]:
    row = {**case.as_dict(), "status": "ok", "reason": ""}
    row.update(summarise(case, prepared, times, peak))
    row.update(peak_memory(case.device, prepared.resident(), prepared.transient))
    row["repeat_ms_median"] = [round(v, 3) for v in per_repeat]
    row["load_avg"] = max(loads)
    row.update(describe(case.device))
    return row


def _line(row: Dict[str, object]) -> str:
    return (
        f"{row['name']:<34} {row['mode']:<5} {row['precision']:<4} {row['layout']:<13} "
        f"{row['resolution']:>4}px b{row['batch']:<4} {row['step_ms_median']:>9.1f} ms "
        f"{row['images_per_s']:>9.1f} img/s  load {row['load_avg']}"
    )


CSV_SKIP = ("repeat_ms_median",)


def write_rows(rows: List[Dict[str, object]], out: str, log=print) -> List[str]:
    """JSON lines and CSV at ``out``.jsonl / ``out``.csv (written whole, then moved in place)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    paths = [out + ".jsonl", out + ".csv"]
    for path in paths:
        if os.path.exists(path):
            log(f"replacing {path} (generated results; earlier versions are in git)")
    tmp = paths[0] + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, paths[0])
    fields: List[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields and k not in CSV_SKIP]
    tmp = paths[1] + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, paths[1])
    return paths


def main(argv: Optional[Iterable[str]] = None) -> int:
    args = parser().parse_args(None if argv is None else list(argv))
    s = settings(args)
    try:
        cases = build_cases(s)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    check_device(s["device"])
    if s["device"] == "cuda":
        torch.backends.cudnn.benchmark = True  # as timm's benchmark: warm-up absorbs the autotuning
    if int(s["threads"]) > 0:
        torch.set_num_threads(int(s["threads"]))
    folder = RESULTS_DIR if args.results else SCRATCH_DIR
    out = args.out or os.path.join(folder, f"{args.preset}-{s['device']}")
    print(
        f"{len(cases)} cases on {s['device']} ({args.preset}); warm-up {s['warmup']}, "
        f"{s['steps']} timed steps, {s['repeats']} repeat(s); load average {load_average()}",
        flush=True,
    )
    # gpu.sh's time limit sends SIGINT; a shell that starts commands in the background may leave
    # it ignored, so ask for KeyboardInterrupt explicitly (run_cases then keeps the rows so far).
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread (an embedding caller): its own handling stands
        pass
    rows = run_cases(
        cases,
        int(s["warmup"]),
        int(s["steps"]),
        int(s["repeats"]),
        log=lambda m: print(m, flush=True),
        budget_s=args.budget_s,
    )
    mark_faster_layout(rows)
    for path in write_rows(rows, out):
        print(f"wrote {path}")
    command = "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(out + ".cmd", "w") as f:
        f.write(command.strip() + "\n")
    if not args.no_report:
        report_main([out + ".jsonl", "--out", out + ".md"])
    return 0 if any(r["status"] == "ok" for r in rows) else 1
