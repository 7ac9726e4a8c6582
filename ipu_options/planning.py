"""SRAM-aware planning: ``python -m app plan`` and ``ipu.pipeline: auto``.

For a configuration (model, resolution, precision, optimiser, micro-batch, gradient accumulation,
replicas) it estimates each IPU's memory (ipu_options/memory.py), and proposes
  * pipeline splits that balance compute (multiply-adds per IPU) among the splits that fit,
  * recomputation checkpoints where an IPU does not fit without them,
  * the largest micro-batch that fits with those splits.
Budget per IPU: 900 MB × (1 − ipu.plan_margin); the margin (default 30%) is kept for what the
model cannot see — code, exchange and stream buffers, convolution temporaries, per-tile
fragmentation (see memory.py). Every figure is an estimate, not an IPU measurement.
"""

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import torch

from backends.specs import BatchPlan, ModelSpec, OptimSpec
from ipu_options import memory
from ipu_options.emulator.executor import TRAINING_PIPELINE_RULE
from ipu_options.memory import IPU_SRAM_BYTES, MB, IPUMemory, Settings, Unit
from ipu_options.pipeline import canonical_names, check_splits, split_points
from ipu_options.specs import IpuSpec

IPU_COUNTS = (1, 2, 4, 8, 16)
MAX_MICRO_BATCH = 1024
CHECKPOINT_SPACINGS = (1, 2, 3, 4, 6, 8)  # every k-th unit of an IPU (tried when it does not fit)


class PlanError(ValueError):
    """No plan fits: the message names what to change."""


@dataclass
class Plan:
    splits: Dict[str, int]
    checkpoints: List[str]
    micro_batch: int
    ipus: List[IPUMemory]
    budget: int
    max_micro_batch: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(m.total <= self.budget for m in self.ipus)

    @property
    def stages(self) -> int:
        return len(self.ipus)


def budget_bytes(ipu: IpuSpec) -> int:
    return int(IPU_SRAM_BYTES * (1.0 - ipu.plan_margin))


def plan_units(spec: ModelSpec, model: torch.nn.Module) -> List[Unit]:
    """The planner's units of ``model``, the network the run trains (the application builds it:
    its number of classes comes from the data, which the planner never reads)."""
    return memory.units(model, spec.resolution)


# ----------------------------------------------------------------------------- search


def _stage_fit(
    us: Tuple[Unit, ...], index: int, stages: int, micro: int, s: Settings, budget: int, allow_recompute: bool
) -> Optional[Tuple[IPUMemory, List[str]]]:
    """The stage's memory without checkpoints, else with the best spacing of checkpoints."""
    ipu = index
    plain = memory.stage_memory(list(us), ipu, index, stages, micro, s)
    if plain.total <= budget or not allow_recompute:
        return (plain, []) if plain.total <= budget else None
    best = None
    for k in CHECKPOINT_SPACINGS:
        marks = [u.name for i, u in enumerate(us[:-1]) if (i + 1) % k == 0]
        if not marks:
            continue
        mem = memory.stage_memory(list(us), ipu, index, stages, micro, s, marks)
        if mem.total <= budget and (best is None or mem.total < best[0].total):
            best = (mem, marks)
    return best


def balanced_plan(
    us: List[Unit], stages: int, micro: int, s: Settings, budget: int, allow_recompute: bool = True
) -> Optional[Plan]:
    """Contiguous stages over the units minimising the largest stage's compute, each stage
    fitting the budget (dynamic programming over split positions)."""
    n = len(us)
    if stages > n:
        return None
    prefix = [0]
    for u in us:
        prefix.append(prefix[-1] + u.macs)

    @lru_cache(maxsize=None)
    def fit(lo: int, hi: int, index: int) -> Optional[Tuple[IPUMemory, List[str]]]:
        return _stage_fit(tuple(us[lo:hi]), index, stages, micro, s, budget, allow_recompute)

    @lru_cache(maxsize=None)
    def best(start: int, index: int) -> Optional[Tuple[int, List[int]]]:
        """(max stage macs, [stage ends]) for units[start:] over stages index..stages-1."""
        if index == stages - 1:
            return (prefix[n] - prefix[start], [n]) if fit(start, n, index) else None
        result = None
        for end in range(start + 1, n - (stages - 1 - index) + 1):
            if fit(start, end, index) is None:
                continue
            rest = best(end, index + 1)
            if rest is None:
                continue
            cost = max(prefix[end] - prefix[start], rest[0])
            if result is None or cost < result[0]:
                result = (cost, [end] + rest[1])
        return result

    found = best(0, 0)
    if found is None:
        return None
    ends, start = found[1], 0
    splits, marks, ipus = {}, [], []
    for index, end in enumerate(ends):
        mem, stage_marks = fit(start, end, index)
        if index > 0:
            splits[us[start].name] = index
        marks += stage_marks
        ipus.append(mem)
        start = end
    return Plan(splits, marks, micro, ipus, budget)


def largest_micro_batch(us: List[Unit], stages: int, s: Settings, budget: int) -> int:
    lo, hi = 0, 1
    while hi <= MAX_MICRO_BATCH and balanced_plan(us, stages, hi, s, budget) is not None:
        lo, hi = hi, hi * 2
    hi = min(hi, MAX_MICRO_BATCH + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if balanced_plan(us, stages, mid, s, budget) is not None:
            lo = mid
        else:
            hi = mid
    return lo


def _fixes(ipu: IpuSpec, batch: BatchPlan, stages: int, tried_recompute: bool = False) -> str:
    """The remedies not already in effect."""
    fixes = [
        f"lower train.micro_batch (now {batch.micro_batch})",
        f"use more IPUs per replica (ipu.plan_ipus / ipu.pipeline, now {stages})",
    ]
    if not tried_recompute:
        fixes.append("add recomputation checkpoints (ipu.recompute, or ipu.pipeline=auto)")
    if ipu.precision != "16.16":
        fixes.append("ipu.precision=16.16")
    if not ipu.optimizer_state_offchip:
        fixes.append("ipu.optimizer_state_offchip=true")
    return ", ".join(fixes) + " or lower data.resolution"


def make_plan(
    model: torch.nn.Module,
    spec: ModelSpec,
    ipu: IpuSpec,
    batch: BatchPlan,
    optim: OptimSpec,
    propose: Optional[bool] = None,
) -> Plan:
    """The plan for ``model``: the explicit ``ipu.pipeline`` checked (``{}``: one IPU), or, when
    proposing (``auto``; ``python -m app plan`` without splits), the best balanced split on
    ipu.plan_ipus IPUs, else on the fewest IPUs that fit."""
    us = plan_units(spec, model)
    s, budget, micro = Settings.of(ipu, batch, optim), budget_bytes(ipu), batch.micro_batch
    pipeline = ipu.pipeline
    if propose is None:
        propose = pipeline == "auto"
    if not propose:
        splits = check_splits(model, pipeline, list(ipu.recompute))
        marks = canonical_names(model, list(ipu.recompute), "ipu.recompute")
        ipus = memory.per_ipu(us, splits, micro, s, marks)
        plan = Plan(splits, marks, micro, ipus, budget)
        plan.max_micro_batch = _largest_for_splits(us, splits, s, budget, marks)
        return plan
    wanted = ipu.plan_ipus
    counts = [wanted] if wanted else [c for c in IPU_COUNTS if c <= len(us)]
    for count in counts:
        plan = balanced_plan(us, count, micro, s, budget)
        if plan is not None:
            plan.max_micro_batch = largest_micro_batch(us, count, s, budget)
            return plan
    largest = largest_micro_batch(us, counts[-1], s, budget)
    hint = f"micro-batch {largest} would fit on {counts[-1]} IPU(s); " if largest else ""
    raise PlanError(
        f"no pipeline of {'up to ' if len(counts) > 1 else ''}{counts[-1]} IPU(s) fits "
        f"{spec.label} at micro-batch {micro} and resolution {spec.resolution} in "
        f"{budget / MB:.0f} MB per IPU (900 MB less the {ipu.plan_margin:.0%} margin), "
        f"even with recomputation: {hint}{_fixes(ipu, batch, counts[-1], tried_recompute=True)}"
    )


def _largest_for_splits(us, splits, s, budget, marks) -> int:
    best = 0
    for micro in range(1, MAX_MICRO_BATCH + 1):
        if any(m.total > budget for m in memory.per_ipu(us, splits, micro, s, marks)):
            break
        best = micro
    return best


# ----------------------------------------------------------------------------- checks, report


def resolve_pipeline(
    model: torch.nn.Module,
    spec: ModelSpec,
    ipu: IpuSpec,
    batch: BatchPlan,
    optim: OptimSpec,
    training: bool = True,
) -> Tuple[Dict[str, int], List[str], Plan]:
    """The splits and checkpoints a run uses; raises with the fix named when the configuration
    cannot run: unknown split names, too little gradient accumulation for the pipeline, or an
    estimated memory that does not fit."""
    marks = canonical_names(model, list(ipu.recompute), "ipu.recompute")
    plan = make_plan(model, spec, ipu, batch, optim)
    if ipu.pipeline == "auto":
        recompute = sorted(set(plan.checkpoints) | set(marks), key=split_points(model).index)
    else:
        recompute = list(plan.checkpoints)
        if training and not plan.fits:
            over = [m for m in plan.ipus if m.total > plan.budget]
            raise PlanError(
                "estimated memory does not fit: "
                + ", ".join(f"IPU{m.ipu} {m.total / MB:.0f} MB > {plan.budget / MB:.0f} MB" for m in over)
                + f". Fix: {_fixes(ipu, batch, plan.stages)}, or let the planner choose (ipu.pipeline=auto, "
                f"see `python -m app plan`); ipu.plan_margin={ipu.plan_margin} lowers the margin"
            )
    stages = plan.stages
    if training and stages > 1 and batch.grad_accum < 2 * stages - 1:
        raise PlanError(
            f"a pipeline of {stages} IPUs has {2 * stages - 1} stages in training, but "
            f'train.grad_accum={batch.grad_accum}. PopTorch: "{TRAINING_PIPELINE_RULE}" '
            f"Set train.grad_accum >= {2 * stages - 1}."
        )
    return plan.splits, recompute, plan


def report(plan: Plan, spec: ModelSpec, ipu: IpuSpec, batch: BatchPlan, optim: OptimSpec) -> str:
    total_macs = sum(x.macs for x in plan.ipus) or 1
    lines = [
        f"IPU memory plan (estimated, not measured on an IPU): {spec.label} at {spec.resolution}px, "
        f"precision {ipu.precision}, {optim.name}, micro-batch {plan.micro_batch}, "
        f"gradient accumulation {batch.grad_accum}, {batch.replicas} replica(s)",
        f"budget per IPU: 900 MB x {1 - ipu.plan_margin:.2f} = {plan.budget / MB:.0f} MB "
        f"(margin {ipu.plan_margin:.0%} for code, exchange buffers, conv temporaries, fragmentation)",
        "",
        f"{'IPU':>3}  {'from':<12} {'to':<12} {'weights':>8} {'optimiser':>9} {'activations':>11} "
        f"{'total':>8} {'budget':>7}  {'fits':<4} {'compute':>7}",
    ]
    for mem in plan.ipus:
        lines.append(
            f"{mem.ipu:>3}  {mem.units[0]:<12} {mem.units[-1]:<12} {mem.weights / MB:>6.1f}MB "
            f"{mem.optimizer / MB:>7.1f}MB {mem.activations / MB:>9.1f}MB {mem.total / MB:>6.1f}MB "
            f"{plan.budget / MB:>5.0f}MB  {'yes' if mem.total <= plan.budget else 'NO':<4} "
            f"{100.0 * mem.macs / total_macs:>6.1f}%"
        )
    pipeline = "{" + ", ".join(f"{k}: {v}" for k, v in plan.splits.items()) + "}"
    lines += [
        "",
        f"proposal: ipu.pipeline='{pipeline}'" if plan.splits else "proposal: one IPU per replica",
        f"          ipu.recompute=[{','.join(plan.checkpoints)}]"
        if plan.checkpoints
        else "          no recomputation checkpoints needed",
        f"largest micro-batch that fits this split: {plan.max_micro_batch}",
    ]
    if plan.stages > 1:
        lines.append(
            f"pipeline of {plan.stages} IPUs: needs train.grad_accum >= {2 * plan.stages - 1} "
            f"(now {batch.grad_accum}); IPUs per job: {plan.stages * batch.replicas}"
        )
    if not plan.fits:
        lines.append(f"does NOT fit: {_fixes(ipu, batch, plan.stages)}")
    return "\n".join(lines)


def print_plan(
    model: torch.nn.Module, spec: ModelSpec, ipu: IpuSpec, batch: BatchPlan, optim: OptimSpec
) -> int:
    """``python -m app plan`` (app/plan.py hands over the network): print the per-IPU table and
    the proposal for the configuration; the exit status says whether it fits."""
    try:
        propose = not ipu.pipeline or ipu.pipeline == "auto"
        plan = make_plan(model, spec, ipu, batch, optim, propose=propose)
    except (PlanError, ValueError) as error:
        print(f"error: {error}")
        return 2
    print(report(plan, spec, ipu, batch, optim))
    return 0 if plan.fits else 1
