"""Per-IPU memory model: weights, optimiser state, gradient accumulators and the activations
stored for the backward pass, by precision, micro-batch, pipeline split and recomputation.

Activations are counted from the layers' shapes (one shape pass on the meta device: no memory,
no compute) with one rule per layer kind — which tensors the backward pass of that kind needs:
  conv / linear     its input (the producer's output); a conv with asymmetric TF-SAME pads
                    keeps the padded tensor (F.pad's output) instead
  batch/group norm  its input (= the conv output) and per-sample or per-channel statistics
  SiLU              its input (the norm's output) and, where the
                    next layer is a conv or a gate, its output as that layer's input
  proxy norm        the norm's output (φ's input), φ(x) where the scale is applied afterwards
                    (not where it is dropped: the official head), and per channel 2 × C × 200
                    proxy-statistic points (batch independent)
  squeeze-excite    the pooled vector chain (C-sized per sample) and the gated output
  adds, pooling     nothing (their backward needs shapes only)
Each stored tensor is counted once, where it is produced. The rules are checked against the bytes
autograd actually saves (saved-tensor hooks, CPU) across B0–B4, G1/G16, BN/LN+PN in
tests/test_ipu_memory.py (within 15%). On an IPU, PopART's autodiff may keep a slightly different
set (it can recompute cheap element-wise ops), so this is an estimate of the same order.

What the model cannot see, and the margin kept for it (``ipu.plan_margin``, default 30% of the
900 MB): code (vertex code and control programs, typically 10–25% of an IPU for a CNN), exchange
buffers and stream buffers for host I/O, temporary memory of convolutions (bounded by the
available-memory proportion in Poplar's planner, but allocated only while a layer runs), and
per-tile fragmentation — out-of-memory is per tile, so one overloaded tile fails compilation
while the IPU total looks fine. A plan that fits here can still fail to compile; one that does
not fit here will not compile.
"""

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from backends.specs import BatchPlan, OptimSpec
from ipu_options.pipeline import backbone, split_points
from ipu_options.specs import IpuSpec
from model.blocks import ConvNormAct, MBConv
from model.padding import Conv2dSame
from model.proxy_norm import ProxyNormAct

IPU_SRAM_BYTES = 900 * 10**6  # GC200 / Bow: 900 MB In-Processor Memory
MB = 10**6


@dataclass
class Unit:
    """One split point (stem, a block, the head with the classifier), per image unless fixed."""

    name: str
    params: int
    macs: int
    stored: int  # activation elements stored for backward, per image
    fixed: int  # batch-independent stored elements (proxy statistics, batch-norm statistics)
    input_elems: int  # the unit's input per image (what a stage stashes / a checkpoint keeps)
    output_elems: int


def _cna_units(cna: ConvNormAct, deferred: bool = False, output_saved: bool = True) -> int:
    """Stored tensors of a conv-norm-act, in units of its output size."""
    if cna.act is None:
        return 1  # the conv output (the norm's input); the norm output belongs to the block
    if isinstance(cna.act, ProxyNormAct):
        if deferred:
            return 3  # conv out, norm out, φ(x) − μ̃ (kept by the gate)
        if not cna.proxy_scale:
            return 2 + int(output_saved)  # conv out, norm out [+ φ(x) − μ̃]: no scale to apply
        return 3 + int(output_saved)  # conv out, norm out, φ(x) (kept by the scale) [+ output]
    return 2 + int(output_saved)  # conv out, norm out (SiLU's input) [+ SiLU out]


def _padding_growth(conv: nn.Module, channels: int, height: int, width: int) -> int:
    """Elements by which a conv's kept input grows per image when it is padded first (TF SAME
    with unequal pads: F.pad's output replaces the input as what the conv keeps)."""
    if not isinstance(conv, Conv2dSame):
        return 0
    left, right, top, bottom = conv.pads(height, width)
    if left == right and top == bottom:
        return 0  # the conv pads itself
    return channels * ((height + top + bottom) * (width + left + right) - height * width)


def _norm_stats(cna: ConvNormAct) -> Tuple[int, int]:
    """(per-image, fixed) elements of a norm's saved statistics and of proxy norm's points."""
    norm, per_image, fixed = cna.norm, 0, 0
    if isinstance(norm, nn.GroupNorm):
        per_image = 2 * norm.num_groups
    else:
        fixed = 4 * norm.num_features
    if isinstance(cna.act, ProxyNormAct):
        c, points = cna.act.proxy_bias.numel(), cna.act.quantiles.numel()
        fixed += 2 * c * points + c + points
    return per_image, fixed


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def units(model: nn.Module, resolution: int) -> List[Unit]:
    """The model's split points with their cost and per-image storage, from one meta pass."""

    net = backbone(model)
    names = split_points(model)
    shapes: Dict[str, tuple] = {}
    probe = copy.deepcopy(net).to("meta")  # the caller's model stays where it is
    for name in names:
        probe.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: shapes.__setitem__(name, (tuple(i[0].shape), tuple(o.shape)))
        )
    with torch.no_grad():
        probe.eval()(torch.zeros(1, 3, resolution, resolution, device="meta"))

    out: List[Unit] = []
    for name in names:
        module = net.get_submodule(name)
        (_, cin, hin, win), (_, cout, hout, wout) = shapes[name]
        in_elems, out_elems = cin * hin * win, cout * hout * wout
        stored, per_image_stats, fixed, macs = 0, 0, 0, 0
        if isinstance(module, MBConv):
            mid = module.spatial.conv.out_channels
            if module.expand is not None:
                stored += _cna_units(module.expand) * mid * hin * win
                macs += cin * mid * hin * win
            stored += _padding_growth(module.spatial.conv, mid, hin, win)
            stored += _cna_units(module.spatial, deferred=True) * mid * hout * wout
            k = module.spatial.conv.kernel_size[0]
            macs += (mid // module.spatial.conv.groups) * k * k * mid * hout * wout
            red = module.se.reduce.out_channels
            # Under proxy norm the gate times 1/σ̃ keeps the gate (and v1's scaled pool its input).
            proxy = isinstance(module.spatial.act, ProxyNormAct)
            se_small = 4 * mid + 2 * red + (mid if proxy else 0)
            se_small += mid if proxy and module.se.scale_pooled else 0
            stored += mid * hout * wout + se_small  # gated output (the projection's input)
            macs += 2 * mid * red
            stored += _cna_units(module.project) * cout * hout * wout
            macs += mid * cout * hout * wout
            stored += out_elems  # the block output, kept by the next conv
            cnas = [c for c in (module.expand, module.spatial, module.project) if c is not None]
        elif name == "stem":
            stored += in_elems  # the image, kept by the stem conv
            stored += _padding_growth(module.conv, cin, hin, win)
            stored += _cna_units(module) * out_elems
            macs += 3 * 9 * cout * hout * wout
            cnas = [module]
        else:  # head, with pooling and the classifier after it
            stored += _cna_units(module, output_saved=False) * out_elems
            macs += cin * cout * hout * wout
            classifier = net.classifier
            stored += classifier.in_features + classifier.out_features  # pooled features, logits
            dropout = getattr(net, "dropout", None)
            if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                stored += classifier.in_features // 4  # the bool mask, in 4-byte units
            macs += classifier.in_features * classifier.out_features
            cnas = [module]
        for cna in cnas:
            per, fix = _norm_stats(cna)
            per_image_stats += per
            fixed += fix
        params = _params(module) + (_params(net.classifier) if name == "head" else 0)
        out.append(Unit(name, params, macs, stored + per_image_stats, fixed, in_elems, out_elems))
    return out


# ----------------------------------------------------------------------------- per-IPU memory

OPTIMIZER_STATES = {"sgd": 1, "rmsprop": 2, "adamw": 2}  # state tensors per parameter


@dataclass
class Precision:
    activation_bytes: int
    weight_bytes: int
    accumulator_bytes: int
    state_bytes: int = 4  # optimiser state: fp32 (PopTorch's default accum types)

    @staticmethod
    def of(name: str) -> "Precision":
        if name == "32.32":
            return Precision(4, 4, 4)
        if name == "16.32":
            return Precision(2, 4, 4)
        return Precision(2, 2, 2)  # 16.16: fp16 weights and gradient accumulators


@dataclass
class IPUMemory:
    ipu: int
    units: List[str]
    weights: int = 0  # bytes: weights and their gradients
    optimizer: int = 0  # bytes: optimiser state and gradient accumulators
    activations: int = 0  # bytes stored for backward (incl. pipeline stash, recomputation peak)
    macs: int = 0
    checkpoints: List[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations


def activations_bytes(
    us: List[Unit],
    micro_batch: int,
    act_bytes: int,
    checkpoints: Optional[List[str]] = None,
    recompute_all: bool = False,
) -> int:
    """Bytes stored for backward by a run of units for one micro-batch. With checkpoints (or
    ``recompute_all``: everything recomputed from the run's input), only checkpoint outputs and
    the run's input are stored, plus — during the backward pass — one recomputed segment at a
    time: the largest segment's activations count as the peak."""
    fixed = sum(u.fixed for u in us) * 4  # statistics stay fp32
    if not checkpoints and not recompute_all:
        return sum(u.stored for u in us) * micro_batch * act_bytes + fixed
    marks = set(checkpoints or [])
    segments, current = [], 0
    for u in us:
        current += u.stored
        if u.name in marks:
            segments.append(current)
            current = 0
    segments.append(current)
    return (kept_elems(us, checkpoints) + max(segments)) * micro_batch * act_bytes + fixed


def kept_elems(us: List[Unit], checkpoints: Optional[List[str]] = None) -> int:
    """Elements a recomputed run of units keeps per micro-batch: its input and checkpoint outputs."""
    marks = set(checkpoints or [])
    return us[0].input_elems + sum(u.output_elems for u in us if u.name in marks)


@dataclass
class Settings:
    """What besides the layers decides an IPU's memory."""

    precision: str = "16.16"
    optimizer: str = "rmsprop"
    grad_accum: int = 1
    replicas: int = 1
    offchip: bool = False  # optimiser state in streaming memory
    sharded: bool = False  # replicated tensor sharding of the optimiser state
    momentum: bool = True

    @staticmethod
    def of(ipu: IpuSpec, batch: BatchPlan, optim: OptimSpec) -> "Settings":
        return Settings(
            ipu.precision,
            optim.name,
            batch.grad_accum,
            batch.replicas,
            ipu.optimizer_state_offchip,
            ipu.replicated_tensor_sharding,
            optim.momentum > 0,
        )


def stage_memory(
    mine: List[Unit],
    ipu: int,
    index: int,
    stages: int,
    micro_batch: int,
    s: Settings,
    checkpoints: Optional[List[str]] = None,
) -> IPUMemory:
    """One IPU of one replica. In a pipeline of S stages, stage i keeps its input and its
    checkpoint outputs for the 2(S − i) − 1 micro-batches in flight and, with PopTorch's pipeline
    recomputation (on by default), recomputes the rest in the backward pass; the last stage runs
    forward and backward back to back and keeps its activations for one micro-batch."""
    p = Precision.of(s.precision)
    mem = IPUMemory(ipu, [u.name for u in mine])
    params = sum(u.params for u in mine)
    mem.weights = params * p.weight_bytes * 2  # weights and their gradients
    states = OPTIMIZER_STATES[s.optimizer] - (1 if s.optimizer == "sgd" and not s.momentum else 0)
    state = 0 if s.offchip else params * states * p.state_bytes
    if s.sharded and not s.offchip:
        state = -(-state // s.replicas)
    mem.optimizer = state + (params * p.accumulator_bytes if s.grad_accum > 1 else 0)
    mem.checkpoints = [c for c in (checkpoints or []) if c in mem.units]
    if stages > 1 and index < stages - 1:
        in_flight = 2 * (stages - index) - 2  # micro-batches besides the one being recomputed
        stash = kept_elems(mine, mem.checkpoints) * micro_batch * p.activation_bytes * in_flight
        mem.activations = stash + activations_bytes(
            mine, micro_batch, p.activation_bytes, mem.checkpoints, recompute_all=True
        )
    else:
        mem.activations = activations_bytes(mine, micro_batch, p.activation_bytes, mem.checkpoints)
    mem.macs = sum(u.macs for u in mine)
    return mem


def per_ipu(
    us: List[Unit],
    splits: Dict[str, int],
    micro_batch: int,
    s: Settings,
    checkpoints: Optional[List[str]] = None,
) -> List[IPUMemory]:
    """Memory of each IPU of one replica for a pipeline ``splits`` ({unit name: IPU})."""
    stage_of, current = [], 0
    for u in us:
        current = splits.get(u.name, current)
        stage_of.append(current)
    ipus = sorted(set(stage_of))
    return [
        stage_memory(
            [u for u, st in zip(us, stage_of) if st == ipu], ipu, i, len(ipus), micro_batch, s, checkpoints
        )
        for i, ipu in enumerate(ipus)
    ]
