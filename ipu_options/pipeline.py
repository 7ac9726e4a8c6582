"""Pipeline splits and recomputation checkpoints, addressed by module name.

``annotate(model, splits, recompute, poptorch)`` applies them with PopTorch's own annotations, so
the same call serves the real module and the emulator:
  * splits ``{"blocks.3.0": 1}``: ``poptorch.BeginBlock(module, user_id=name, ipu_id=1)`` — a
    forward pre-hook on the module that starts a block; no graph rewriting.
  * recompute ``["blocks.2.0", ...]``: a forward hook passing the module's output through
    ``poptorch.recomputationCheckpoint`` (that activation is kept; the ones between checkpoints
    are recomputed in the backward pass).
Valid names are the model's split points: the modules that run one after another along its main
path (stem, every MBConv block ``blocks.<stage>.<index>``, the first block of a stage as
``blocks.<stage>``, head). Unknown names are rejected with that list, before anything runs.
"""

from types import ModuleType
from typing import Dict, List, Optional

from torch import nn

from ipu_options.specs import IpuSpec

PREFIXES = ("", "model.", "net.")  # a Classifier may wrap the EfficientNet under one of these


class SplitError(ValueError):
    pass


def backbone(model: nn.Module) -> nn.Module:
    """The EfficientNet inside ``model`` (the model itself, or a wrapper's child)."""
    for m in model.modules():
        if hasattr(m, "blocks") and hasattr(m, "stem") and hasattr(m, "head"):
            return m
    raise SplitError("the model has no EfficientNet (stem, blocks, head) to split")


def split_points(model: nn.Module) -> List[str]:
    """Module names along the main path, in execution order."""
    net = backbone(model)
    names = ["stem"]
    for s, stage in enumerate(net.blocks):
        names += [f"blocks.{s}.{i}" for i in range(len(stage))]
    return names + ["head"]


def resolve(model: nn.Module, name: str, field: str) -> nn.Module:
    """The module a split/checkpoint name refers to; ``blocks.3`` means ``blocks.3.0``."""
    net = backbone(model)
    key = name
    for prefix in PREFIXES:
        if prefix and key.startswith(prefix):
            key = key[len(prefix) :]
    parts = key.split(".")
    if len(parts) == 2 and parts[0] == "blocks":
        key = f"{key}.0"
    valid = split_points(model)
    if key not in valid:
        raise SplitError(
            f"{field}: unknown module {name!r}; valid split points are "
            f"{', '.join(valid)} (blocks.<stage> means its first block)"
        )
    return net.get_submodule(key)


def canonical_name(model: nn.Module, name: str, field: str) -> str:
    """The split-point name (``blocks.3.0``) of any name ``resolve`` accepts (``model.blocks.3``)."""
    module = resolve(model, name, field)
    return next(k for k in split_points(model) if backbone(model).get_submodule(k) is module)


def canonical_names(model: nn.Module, names: List[str], field: str) -> List[str]:
    """Each name as its split point, once, in model order."""
    order = split_points(model)
    return sorted({canonical_name(model, n, field) for n in names}, key=order.index)


def check_splits(model: nn.Module, splits: Dict[str, int], recompute: List[str]) -> Dict[str, int]:
    """Names resolved and IPU indices checked: contiguous stages with non-decreasing IPUs,
    starting after the stem's IPU 0. Returns {canonical name: ipu} in model order."""
    order = split_points(model)
    canonical = {}
    for name, ipu in splits.items():
        key = canonical_name(model, name, "ipu.pipeline")
        if not isinstance(ipu, int) or ipu < 0:
            raise SplitError(f"ipu.pipeline.{name}: IPU index {ipu!r} must be an integer >= 0")
        canonical[key] = ipu
    ordered = dict(sorted(canonical.items(), key=lambda kv: order.index(kv[0])))
    ipus = [0] + list(ordered.values())
    if any(b < a for a, b in zip(ipus, ipus[1:])):
        raise SplitError(
            f"ipu.pipeline: IPU indices must not decrease along the model; got "
            f"{ordered}: give later split points equal or higher IPU indices"
        )
    used = sorted(set(ipus))
    if used != list(range(len(used))):
        raise SplitError(f"ipu.pipeline: IPUs {used} leave a gap; number them 0, 1, 2, ... in order")
    for name in recompute:
        resolve(model, name, "ipu.recompute")
    return ordered


def num_ipus(ipu: IpuSpec, splits: Optional[dict] = None) -> int:
    """IPUs per replica: one more than the highest IPU index of the pipeline."""
    pipeline = splits if splits is not None else ipu.pipeline
    if not isinstance(pipeline, dict) or not pipeline:
        return 1
    return max(pipeline.values()) + 1


class _RecomputeHook:
    recomputation_checkpoint = True  # read by the emulator's recompute module

    def __init__(self, poptorch, name: str):
        self.poptorch, self.name = poptorch, name

    def __call__(self, module, inputs, output):
        return self.poptorch.recomputationCheckpoint(output)

    def __repr__(self) -> str:
        return f"recomputationCheckpoint({self.name})"


def annotate(
    model: nn.Module,
    splits: Dict[str, int],
    recompute: List[str],
    poptorch: ModuleType,
    stages_checked: Optional[Dict[str, int]] = None,
) -> Dict[str, int]:
    """Apply the splits (BeginBlock) and checkpoints (recomputationCheckpoint) to ``model``."""
    ordered = stages_checked if stages_checked is not None else check_splits(model, splits, recompute)
    for name, ipu in ordered.items():
        poptorch.BeginBlock(resolve(model, name, "ipu.pipeline"), user_id=name, ipu_id=ipu)
    for name in recompute:
        resolve(model, name, "ipu.recompute").register_forward_hook(_RecomputeHook(poptorch, name))
    return ordered
