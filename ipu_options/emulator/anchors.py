"""Tensors read back after a run (``Options.anchorTensor`` / ``getAnchoredTensor``) and buffers
written to the device by name (``updatableNamedBuffers`` / ``copyNamedBuffersToDevice``).

PopTorch hands each anchor's PopART name to the compiler as one more output of the graph
(python/_poplar_executor.py:935-942; poptorch/source/LowerToPopart.cpp:526-538). That output is
added with PopTorch's default mode ``N``, i.e. the model's own output mode
(popart_compiler/source/Compiler.cpp:388-402): the mode given to ``anchorTensor`` is only logged.
Its batching is that of any output (poptorch/source/PoplarExecutable.cpp:108-120 with
Compiler.cpp:1310-1336): All returns every micro-batch, EveryN every N-th step, Final and Sum one
per replica, concatenated along the first dimension (scalars become 1-D when there are several).

The emulator knows three kinds of PopART tensor: ``Gradient___<parameter>`` (each micro-batch's
gradient of the loss, times the loss scale, before accumulation), ``UpdatedVar___<parameter>``
(the weight after the step's update) and ``finalLossScale`` (the loss scale a step used, under
automatic loss scaling: popart willow/src/transforms/automaticlossscaling.cpp:975-983). Any other
name is refused with PopART's words for a name not in its IR (willow/src/ir.cpp:2490-2512).
"""

from typing import Any, Callable, Dict, List

import torch
from torch import nn

from .enums import OutputMode
from .errors import RuntimeRefusal, ValueRefusal

GRADIENT = "Gradient___"  # popart willow/include/popart/tensornames.hpp: reservedGradientPrefix
UPDATED = "UpdatedVar___"  # reservedUpdatedVarPrefix
FINAL_LOSS_SCALE = "finalLossScale"  # automaticlossscaling.cpp:983
KNOWN = "Gradient___<parameter>, UpdatedVar___<parameter>, finalLossScale"

# Not PopTorch's rule but the emulator's: it has each step's value of a tensor updated once per
# step, not one per micro-batch as All / EveryN / Sum would return under gradient accumulation.
ONCE_PER_STEP = (
    "anchorTensor (emulated): `{}' is updated once per weight update; with gradientAccumulation "
    "> 1 the emulator returns it in OutputMode.Final only"
)


def _not_in_ir(name: str, parameters: Dict[str, nn.Parameter]) -> RuntimeRefusal:
    """PopART's refusal of an anchor it has no tensor for (willow/src/ir.cpp:2490-2512)."""
    message = f"Anchor tensor `{name}' not in Ir Tensors. "
    stem = name[len(GRADIENT) :] if name.startswith(GRADIENT) else None
    if stem is not None and stem in parameters:
        message += (
            f"\nInterestingly, `{stem}' IS in tensors.\nNote that not all tensors can have their "
            "gradients anchored:\nif an activation tensor does not lead to the loss,\nits "
            "gradient is zero and never computed."
        )
    return RuntimeRefusal(message + f"(emulator: the tensors it can anchor are {KNOWN})")


def _trained(name: str, prefix: str, trainable: Dict[str, nn.Parameter]) -> bool:
    return name.startswith(prefix) and name[len(prefix) :] in trainable


def check_anchors(
    options: Any, model: nn.Module, trainable: List[nn.Parameter], training: bool, scaling: bool
) -> None:
    """At compilation: every anchored name must be a tensor of the graph (PopART checks it when
    it prepares its IR, ir.cpp:2490); ``scaling``: automatic loss scaling is on."""
    parameters = dict(model.named_parameters())
    names = {id(p): n for n, p in parameters.items()}
    trained = {names[id(p)]: p for p in trainable if id(p) in names} if training else {}
    once = options.Training.gradient_accumulation > 1 and options.output_mode != OutputMode.Final
    for long_name, *_ in options.anchored_tensors.values():
        stepwise = _trained(long_name, UPDATED, trained) or (long_name == FINAL_LOSS_SCALE and scaling)
        if not (stepwise or _trained(long_name, GRADIENT, trained)):
            raise _not_in_ir(long_name, parameters)
        if stepwise and once:
            raise ValueRefusal(ONCE_PER_STEP.format(long_name))


class AnchorValues:
    """Each anchored name's value at every (device iteration, micro-batch, replica), gathered
    after the run like the model's outputs."""

    def __init__(self, options: Any, names: Dict[nn.Parameter, str], di: int, ga: int, reps: int):
        self._anchors = {short: value[0] for short, value in options.anchored_tensors.items()}
        self._names = names
        self._ga = ga
        self.values: Dict[str, List[List[List[Any]]]] = {
            long: [[[None] * reps for _ in range(ga)] for _ in range(di)] for long in self._anchors.values()
        }

    def gradients(self, d: int, g: int, r: int, params: List[nn.Parameter]) -> None:
        """After a micro-batch's backward pass: the gradients, as PopART's Gradient___ tensors."""
        for p in params:
            long = GRADIENT + self._names.get(p, "")
            if long in self.values:
                if p.grad is None:  # no gradient reaches it: PopART never computes one
                    raise _not_in_ir(long, {self._names[p]: p})
                self.values[long][d][g][r] = p.grad.detach().clone()

    def step(self, d: int, reps: int, params: List[nn.Parameter], scale: float, dtype: torch.dtype) -> None:
        """After a step's update: the updated weights and the loss scale the step used."""
        found = {UPDATED + self._names.get(p, ""): p for p in params}
        found[FINAL_LOSS_SCALE] = torch.tensor(scale, dtype=dtype)
        for long, value in found.items():
            if long in self.values:
                for r in range(reps):
                    self.values[long][d][self._ga - 1][r] = value.detach().clone()

    def gathered(self, gather: Callable[[Any], Any]) -> Dict[str, torch.Tensor]:
        """Short name → value, each long name's values gathered by ``gather`` (the outputs')."""
        return {short: gather(self.values[long]) for short, long in self._anchors.items()}


# ---------------------------------------------------------------- updatable named buffers
NO_EXECUTABLE = "Model has not been compiled or has been destroyed."  # _poplar_executor.py:30
NO_UPDATABLE = "No named buffers marked as updatable via updatableNamedBuffers option"  # line 607-610


def check_named_buffers(options: Any, model: nn.Module) -> None:
    """At compilation PopART fails early on a name that is not a tensor of the graph
    (popart willow/src/popx/irlowering.cpp:3063-3072, with ir.cpp:4070-4071's message)."""
    known = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    for name in options._Popart.options.get("updatableNamedBuffers", []):
        if name not in known:
            raise RuntimeRefusal(
                "Invalid named buffer in updatableNamedBuffers!\n"
                f"No Ir::Tensor with TensorId '{name}' in Ir::getTensor(..) "
            )


def named_buffers_to_write(options: Any, model: nn.Module, compiled: bool) -> Dict[str, torch.Tensor]:
    """The host buffers copyNamedBuffersToDevice writes (python/_poplar_executor.py:600-629):
    refused before compilation and without the option; a name that is not a buffer (a
    parameter) is a KeyError, as PopTorch's dictionary look-up is (line 621-624)."""
    if not compiled:
        raise RuntimeRefusal(NO_EXECUTABLE)
    if "updatableNamedBuffers" not in options._Popart.options:
        raise RuntimeRefusal(NO_UPDATABLE)
    buffers = dict(model.named_buffers())
    return {name: buffers[name] for name in options._Popart.options["updatableNamedBuffers"]}
