"""Recomputation as the IPU does it: only checkpointed activations (and chain inputs) are kept
for the backward pass; everything between two checkpoints is recomputed from the earlier one.

PopTorch marks tensors inside the traced graph. The emulator works at module level: a module
whose forward hook is marked ``recomputation_checkpoint = True`` (what ``ipu_options.pipeline``
installs, calling ``recomputationCheckpoint`` on the module's output) ends a segment. Within each
chain of modules — an ``nn.Sequential``, nested sequentials flattened — the modules between two
checkpoints (or a pipeline stage boundary) run under ``torch.utils.checkpoint`` (non-reentrant),
so their internal activations are freed after the forward pass and recomputed in the backward.
The chain's input and output stay stored (the modules around the chain consume them)."""

from typing import Callable, List, Optional

import torch
from torch import nn

from .blocks import _BlockHook


def _checkpoint(fn: Callable, x: torch.Tensor) -> torch.Tensor:
    from torch.utils.checkpoint import checkpoint

    try:
        return checkpoint(fn, x, use_reentrant=False)
    except TypeError:  # a torch without the keyword: the reentrant form (inputs need grad)
        return checkpoint(fn, x)


def is_checkpoint(module: nn.Module) -> bool:
    return any(getattr(h, "recomputation_checkpoint", False) for h in module._forward_hooks.values())


def _starts_block(module: nn.Module) -> bool:
    return any(isinstance(h, _BlockHook) for h in module._forward_pre_hooks.values())


def _chain(seq: nn.Sequential) -> List[nn.Module]:
    out: List[nn.Module] = []
    for child in seq:
        plain = not child._forward_hooks and not child._forward_pre_hooks
        if isinstance(child, nn.Sequential) and plain:
            out.extend(_chain(child))
        else:
            out.append(child)
    return out


def _segments(modules: List[nn.Module], pipelined: bool) -> List[List[nn.Module]]:
    """Cut the chain after every checkpoint and before every stage start."""
    segments: List[List[nn.Module]] = [[]]
    for m in modules:
        if pipelined and _starts_block(m) and segments[-1]:
            segments.append([])
        segments[-1].append(m)
        if is_checkpoint(m):
            segments.append([])
    return [s for s in segments if s]


class _SegmentRunner:
    """Runs one segment; on the recomputation pass, keeps norm running statistics as they were
    after the first pass (the IPU recomputes activations, not statistic updates)."""

    def __init__(self, modules: List[nn.Module]):
        self.modules = modules
        self.recomputing = False  # set after the forward pass: any later call is the backward's

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.recomputing:
            for m in self.modules:
                x = m(x)
            self.recomputing = True
            return x
        buffers = [b for m in self.modules for b in m.buffers()]
        saved = [b.detach().clone() for b in buffers]
        try:
            for m in self.modules:
                x = m(x)
            return x
        finally:
            # torch >= 2.1 stops a recomputation early by raising out of it once every needed
            # activation exists, so the statistics are put back whichever way it ends.
            with torch.no_grad():
                for b, value in zip(buffers, saved):
                    b.copy_(value)


class Recomputation:
    """Installs segmented forwards on the outermost sequentials that hold checkpoints."""

    def __init__(self, model: nn.Module, pipelined: bool):
        self.patched: List[nn.Sequential] = []
        self._install(model, pipelined)

    def _install(self, module: nn.Module, pipelined: bool) -> None:
        for child in module.children():
            if isinstance(child, nn.Sequential):
                chain = _chain(child)
                segments = _segments(chain, pipelined)
                if any(is_checkpoint(m) for m in chain) or (pipelined and len(segments) > 1):
                    self._patch(child, segments)
                    continue
            self._install(child, pipelined)

    def _patch(self, seq: nn.Sequential, segments: List[List[nn.Module]]) -> None:
        runners = [_SegmentRunner(s) for s in segments]

        def forward(x: torch.Tensor) -> torch.Tensor:
            for runner in runners:
                runner.recomputing = False
                if torch.is_grad_enabled() and seq.training:
                    x = _checkpoint(runner, x)
                else:
                    x = runner(x)
            return x

        seq.forward = forward
        self.patched.append(seq)

    def remove(self) -> None:
        for seq in self.patched:
            del seq.forward  # back to the class's forward
        self.patched = []


def install(model: nn.Module, pipelined: bool) -> Optional[Recomputation]:
    rec = Recomputation(model, pipelined)
    return rec if rec.patched else None
