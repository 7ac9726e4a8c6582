"""The lowering check: would PopTorch 3.4 lower this forward pass, and what is its loss?

PopTorch 3.4 traces a model with PyTorch's dispatcher: every aten op that reaches the IPU dispatch
key becomes a JIT node (``dispatch_tracer/dispatchers/JitDispatch.cpp``), in-place kinds are
replaced by out-of-place ones (``InplaceOps.cpp``, ``outplaceKind``), each node is rewritten by the
canonicalisation handler registered for its kind, and any aten node left over stops compilation
(``LowerToPopartFactories.cpp:66-99``). ``check_lowering`` runs the forward once on the host under
a ``TorchDispatchMode`` that sees the ops PopTorch's IPU key would see:

* ops PopTorch registers on the IPU key (``ipu_key_ops``) are seen as themselves — those PyTorch
  would decompose first (CompositeImplicitAutograd) are caught for the duration of the check by a
  scoped ``torch.library`` kernel, as PopTorch's registration catches them;
* other ops with a CompositeExplicitAutograd kernel are decomposed, as PyTorch does for a backend
  without its own kernel, and their parts are seen instead;
* everything else is seen as itself.

Each op seen is held against the facts in ``poptorch_ops.json``, extracted from PopTorch's
sources at ``sdk/poptorch/3.4.0`` by ``poptorch_sources.py``. Refusals use PopTorch's own words:

* an aten kind with no handler: ``ErrorOnUnsupportedAten.cpp:30``;
* a norm given a weight without a bias or the reverse: ``NormalizationOps.cpp:53``
  (``maybeInitializeAffineParamConstants``, an ``ERROR_ON`` whose text is its condition);
* ``Tensor.item()`` in the graph: ``dispatch_tracer/RegisterAtenOverloads.cpp:508`` (raised at once,
  as PopTorch's kernel does);
* training: no loss, or more than one independent loss: ``RemoveSurplusIdentityLosses.cpp:103-107``
  — a loss is the output of ``poptorch.identity_loss`` or of a handler that creates a
  ``popart::identityloss`` (``LossOps.cpp`` and the generated handlers); it is independent unless
  a later loss is computed from it;
* a buffer or parameter reassigned (or removed) by the forward: ``python/_impl.py:432-451``
  (batch-norm modules excepted, ``BUFFERS_CAN_CHANGE``).

The op list is exact for the torch PopTorch 3.4 ships with (2.0.1); later torch versions may
decompose some ops differently. The check says nothing about memory, tile mapping, PopART's own
passes, or ops that run on the host because their tensors are CPU tensors.
"""

import contextlib
import functools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import torch
from torch import Tensor, nn
from torch._C import DispatchKey
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .errors import RuntimeRefusal

FACTS_FILE = Path(__file__).with_name("poptorch_ops.json")

# PopTorch 3.4's words.
UNSUPPORTED_OPS = (
    "Unsupported ops found in compiled model: [{}]. Not all operations are "
    "supported yet by Graphcore's PyTorch compiler. If you believe any of these "
    "should be, please report this message to support@graphcore.ai."
)
AFFINE_PAIR = "isNone(*weight) != isNone(*bias)"
NO_LOSS = "Couldn't find a loss in graph!"
MANY_LOSSES = (
    "Multiple independent losses found in graph. Graph must have one final loss. "
    "Wrap final graph loss in poptorch.identity_loss."
)
ITEM = (
    "aten::item is only supported in eager mode, but was intercepted in a static graph. "
    "This means an IPU to CPU copy was triggered before the end of the graph, for example by "
    "calling tensor.item(). Please ensure that any such copies are removed."
)
REASSIGNED = (
    "{kind} {name} is reassigned within the model when calling the forward method. "
    "This is not supported. Consider using self.{name}.copy_(src) to copy data from a "
    "source tensor, where src is the name of the source tensor."
)
REMOVED = "{kind} {name} is removed from the model when calling the forward method."
IDENTITY_LOSS = "poptorch::identity_loss"


class LoweringError(RuntimeRefusal):
    """PopTorch would stop compiling this model (the message is PopTorch's, then ours)."""


@functools.lru_cache(maxsize=None)
def facts() -> Dict[str, Any]:
    data = json.loads(FACTS_FILE.read_text())
    data["loss_set"] = frozenset(data["loss_handlers"])
    data["affine_set"] = frozenset(data["affine_pair_handlers"])
    data["only_inplace_set"] = frozenset(data["only_inplace"]["ops"])
    return data


def node_kind(schema_name: str) -> str:
    """The aten kind PopTorch canonicalises for an op ``name.overload`` (InplaceOps.cpp:124-141:
    in-place kinds become their out-of-place twin)."""
    f = facts()
    kind = schema_name.split(".")[0]
    if kind in f["only_inplace_set"]:
        return kind
    if kind in f["outplace"]["ops"]:
        return f["outplace"]["ops"][kind]
    return kind[:-1] if kind.endswith("_") and not kind.endswith("__") else kind


@dataclass
class Lowering:
    """What the check saw. ``kinds``: aten kinds PopTorch would canonicalise, with counts;
    ``problems``: PopTorch's refusals (empty when it would lower); ``loss_leaf``: in training,
    the index of the final loss among ``tree_flatten(output)`` leaves (None if not returned)."""

    training: bool
    kinds: Counter = field(default_factory=Counter)
    problems: List[str] = field(default_factory=list)
    losses: int = 0
    loss_leaf: Optional[int] = None
    torch_version: str = torch.__version__

    @property
    def lowers(self) -> bool:
        return not self.problems

    def raise_if_refused(self) -> None:
        if self.problems:
            raise LoweringError("\n".join(self.problems))


def _aten(schema_name: str):
    packet, _, overload = schema_name.partition(".")
    op = getattr(torch.ops.aten, packet, None)
    return None if op is None else getattr(op, overload or "default", None)


def _has_kernel(qualified: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key)


@functools.lru_cache(maxsize=None)
def _composite_explicit(qualified: str) -> bool:
    """PyTorch runs this op's composite kernel on a backend without a kernel of its own. (The
    CompositeExplicitAutogradNonFunctional kernels of structured ops only call the op's out=
    variant, whose node kind is the op's own: they are not decomposed here.)"""
    return _has_kernel(qualified, "CompositeExplicitAutograd")


def _on_host_zeros(op, args, kwargs):
    """A decomposition that needs values (torch 2.0's one_hot) on meta tensors: run it on host
    zeros of the same shapes and return meta tensors of the result's shapes."""

    def host(t: Any) -> Any:
        return torch.zeros(t.shape, dtype=t.dtype) if isinstance(t, Tensor) and t.is_meta else t

    out = op._op_dk(DispatchKey.CompositeImplicitAutograd, *tree_map(host, args), **tree_map(host, kwargs))
    return tree_map(lambda t: t.to("meta") if isinstance(t, Tensor) else t, out)


@functools.lru_cache(maxsize=None)
def _implicit_ipu_ops() -> Tuple[str, ...]:
    """IPU-key registrations that PyTorch would decompose before the dispatch mode sees them."""
    return tuple(
        name
        for name in facts()["ipu_key_ops"]
        if _aten(name) is not None
        and _has_kernel(f"aten::{name}", "CompositeImplicitAutograd")
        and not _has_kernel(f"aten::{name}", "Autograd")
    )


def _whole(op, schema_name: str):
    """A kernel for an op PopTorch catches whole: it computes the op's usual decomposition, out
    of the check's sight, and shows the check the op itself."""

    def kernel(*args: Any, **kwargs: Any) -> Any:
        if schema_name == "item" and _active and not _hidden[0]:
            raise LoweringError(ITEM)  # PopTorch's item() kernel stops right there
        with hidden():
            try:
                out = op._op_dk(DispatchKey.CompositeImplicitAutograd, *args, **kwargs)
            except RuntimeError:
                if not any(isinstance(t, Tensor) and t.is_meta for t in tree_flatten((args, kwargs))[0]):
                    raise
                out = _on_host_zeros(op, args, kwargs)
        if _active:
            _active[-1].see(op, schema_name, args, kwargs, out)
        return out

    return kernel


_AUTOGRAD_KEYS = ("AutogradCPU", "AutogradCUDA", "AutogradMeta")


@contextlib.contextmanager
def _as_poptorch_registers() -> Iterator[None]:
    """For the ``with`` block, the ops PopTorch registers on its IPU key and PyTorch would
    decompose first (CompositeImplicitAutograd) reach the check whole: a kernel on the autograd
    keys, which PyTorch prefers to the decomposition (autograd still records the decomposition's
    parts). Only the check's forward runs inside; the registrations go when it ends. (Under
    ``torch.inference_mode`` autograd is skipped and such ops are seen decomposed.)"""
    library = torch.library.Library("aten", "IMPL")
    try:
        for name in _implicit_ipu_ops():
            for key in _AUTOGRAD_KEYS:  # the Autograd alias key does not reach them
                library.impl(name, _whole(_aten(name), name), key)
        yield
    finally:
        destroy = getattr(library, "_destroy", None)
        if destroy is not None:
            destroy()
        del library  # torch 2.0: the registrations go with the object


def _tensors(args, kwargs) -> Iterator[Tensor]:
    """The tensors among an op's arguments (aten ops take tensors, or lists/tuples of them)."""
    for x in list(args) + list(kwargs.values()):
        if isinstance(x, Tensor):
            yield x
        elif isinstance(x, (list, tuple)):
            yield from (t for t in x if isinstance(t, Tensor))


class _Recorder(TorchDispatchMode):
    """Sees the forward's aten ops as PopTorch's IPU key would, and follows which tensors are
    computed from which losses (RemoveSurplusIdentityLosses.cpp walks the same use-def chains)."""

    def __init__(self, training: bool):
        super().__init__()
        self.report = Lowering(training)
        self.unsupported: Counter = Counter()
        self.norms: List[str] = []
        self.loss_tensors: List[Tensor] = []
        self.used: Set[int] = set()
        self._loss_of: Dict[int, int] = {}
        self._deps: Dict[int, Tuple[Tensor, frozenset]] = {}  # only tensors computed from a loss

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        qualified = func.name()
        namespace, _, schema_name = qualified.partition("::")
        if namespace != "aten":
            return func(*args, **kwargs)
        if schema_name not in facts()["ipu_key_ops"] and _composite_explicit(qualified):
            with self:  # its parts reach PopTorch instead
                return func._op_dk(DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
        out = func(*args, **kwargs)
        self.see(func, schema_name, args, kwargs, out)
        return out

    def see(
        self,
        func: torch._ops.OpOverload,
        schema_name: str,
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        out: Any,
    ) -> None:
        """One op as PopTorch's IPU key receives it."""
        f = facts()
        kind = node_kind(schema_name)
        registration = f["ipu_key_ops"].get(schema_name)
        function = registration["function"] if registration else "fallback"
        if _hidden[0]:
            function = "hidden"
        elif function == "fallback":  # a JIT node for a canonicalisation handler
            if kind in f["handlers"]:
                self.report.kinds[kind] += 1
            else:
                self.unsupported[f"aten::{kind}"] += 1
        # else: the dispatcher implements it itself (copy_, detach, empty, …): no node
        if kind in f["affine_set"] and function != "hidden":
            self._check_affine(func, kind, args, kwargs)
        deps = self._sources(args, kwargs)
        if kind in f["loss_set"] and function == "fallback":
            outputs = list(_tensors((out,), {}))
            if outputs:
                self.note_loss(outputs[0], deps)
        elif deps:
            for t in _tensors((out,), {}):
                self._deps[t._cdata] = (t, deps)

    def _check_affine(self, func, kind: str, args, kwargs) -> None:
        names = [a.name for a in func._schema.arguments]
        values = dict(zip(names, args))
        values.update(kwargs)
        weight, bias = values.get("weight"), values.get("bias")
        if (weight is None) != (bias is None):
            present = "weight" if bias is None else "bias"
            shape = tuple(values["input"].shape) if isinstance(values.get("input"), Tensor) else ()
            self.norms.append(
                f"aten::{kind} on {shape} with a {present} and no "
                f"{'bias' if present == 'weight' else 'weight'}"
            )

    def _sources(self, args, kwargs) -> frozenset:
        if not self._deps:  # before the first loss (most of a forward): nothing to follow
            return frozenset()
        found: Set[int] = set()
        for t in _tensors(args, kwargs):
            key = t._cdata
            if key in self._loss_of:
                found.add(self._loss_of[key])
            if key in self._deps:
                found |= self._deps[key][1]
        return frozenset(found)

    def note_loss(self, loss: Tensor, sources: frozenset) -> None:
        """``loss`` is a loss computed from the losses in ``sources`` (which are then not final)."""
        self.used |= sources
        self._loss_of[loss._cdata] = len(self.loss_tensors)
        self._deps[loss._cdata] = (loss, sources)
        self.loss_tensors.append(loss)

    def finish(self, output: Any) -> Lowering:
        report = self.report
        if self.unsupported:
            report.problems.append(UNSUPPORTED_OPS.format(", ".join(sorted(self.unsupported))))
        if self.norms:
            report.problems.append(
                f"{AFFINE_PAIR}\n(PopTorch 3.4 NormalizationOps.cpp:53 stops on a norm given a "
                f"weight without a bias or a bias without a weight: {len(self.norms)} such calls, "
                f"first {self.norms[0]}. Pass both (a fixed zero bias keeps a scale-only norm) "
                f"or neither.)"
            )
        report.losses = len(self.loss_tensors)
        if report.training:
            independent = [i for i in range(len(self.loss_tensors)) if i not in self.used]
            if not self.loss_tensors:
                report.problems.append(NO_LOSS)
            elif len(independent) != 1:
                report.problems.append(f"{MANY_LOSSES} ({len(independent)} independent losses)")
            else:
                final = self.loss_tensors[independent[0]]._cdata
                leaves = tree_flatten(output)[0]
                report.loss_leaf = next(
                    (i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t._cdata == final), None
                )
                if report.loss_leaf is None:
                    # The loss as returned after ops on it: the emulator's fp16 casts, or a
                    # reduction's last step (KLDiv "batchmean" divides kl_div's sum by the batch):
                    # PopTorch trains on it all the same.
                    report.loss_leaf = next(
                        (
                            i
                            for i, t in enumerate(leaves)
                            if isinstance(t, Tensor)
                            and independent[0] in self._deps.get(t._cdata, (None, frozenset()))[1]
                        ),
                        None,
                    )
        return report


_active: List[_Recorder] = []
_hidden = [0]


@contextlib.contextmanager
def hidden() -> Iterator[None]:
    """Ops of the emulator's own (fp16 emulation casts) that PopTorch would not see: within a
    check, they carry loss dependencies but are neither counted nor held against the rules."""
    _hidden[0] += 1
    try:
        yield
    finally:
        _hidden[0] -= 1


def note_identity_loss(x: Tensor, loss: Tensor) -> None:
    """Called by the emulated ``poptorch.identity_loss``: inside a check, ``loss`` is a loss
    (PoptorchHandlers.gen.cpp:173 registers the handler for poptorch::identity_loss)."""
    if _active:
        recorder = _active[-1]
        recorder.report.kinds[IDENTITY_LOSS] += 1
        sources = recorder._sources((x,), {})
        recorder.note_loss(loss, sources)


def _addresses(model: nn.Module):
    """python/_impl.py:407-429: buffers (except batch norms') and parameters by name."""
    buffers = {}
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        for name, b in module.named_buffers(prefix=prefix, recurse=False):
            buffers[name] = _address(b)
    return buffers, {name: _address(p) for name, p in model.named_parameters()}


def _address(t: Tensor) -> Tuple[int, int]:
    return id(t), (0 if t.device.type == "meta" else t.data_ptr())


def _reassignments(before, after) -> List[str]:
    problems = []
    for kind, old, new in zip(("Buffer", "Parameter"), before, after):
        for name, address in old.items():
            if name not in new:
                problems.append(REMOVED.format(kind=kind, name=name))
            elif new[name] != address:
                problems.append(REASSIGNED.format(kind=kind, name=name))
    return problems


def check_lowering(
    model: nn.Module, args: tuple = (), kwargs: Optional[dict] = None, training: Optional[bool] = None
) -> Tuple[Lowering, Any]:
    """Run ``model(*args, **kwargs)`` once as PopTorch would trace it; returns (report, output).
    ``training`` (default: ``model.training``) asks for the loss rules of a trainingModel. The
    caller chooses the grad mode (PopTorch traces in the caller's) and restores any state the
    forward changes (buffers, RNG); the model's eager-only fast paths should be off."""
    kwargs = kwargs or {}
    training = model.training if training is None else training
    before = _addresses(model)
    recorder = _Recorder(training)
    _active.append(recorder)
    try:
        with _as_poptorch_registers(), recorder:
            output = model(*args, **kwargs)
    finally:
        _active.remove(recorder)
    report = recorder.finish(output)
    report.problems.extend(_reassignments(before, _addresses(model)))
    return report, output
