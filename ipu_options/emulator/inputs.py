"""The inputs an executable was compiled for, and the refusal of different ones later.

python/_args_parser.py:58-140 (sdk/poptorch/3.4.0): once compiled, every call's inputs must have
the compiled structure — the same number of positional arguments, the same keyword names, the
same types, tensors of the same dtype, and the same value for every non-tensor (it is a constant
of the graph) — or PopTorch raises ``poptorch.Error`` saying which. Tensor shapes are not checked
here: the emulator runs any shape (docs/emulator-conformance.md lists it)."""

import inspect
from typing import Any, Callable, Dict, Tuple

import torch

from .custom_args import custom_parser
from .errors import Error

RECOMPILE = (
    "\nThis error occurred because the inputs passed at runtime don't match the inputs "
    "used to compile the model.\nTo recompile the model for the new inputs create a new "
    "inferenceModel / trainingModel wrapper or call destroy() on the curent one and try "
    "again."
)


def _signature(value: Any) -> Any:
    """What is compared later: a tensor's dtype, a container's items, anything else itself."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype)
    parser = custom_parser(value)
    if parser is not None:  # compared by its tensors (python/_args_parser.py:53-56, _utils.py:98-99)
        return "container", type(value), tuple(_signature(t) for t in parser.yieldTensors(value))
    # subclasses too: an OrderedDict-based type needs no parser of its own (tests/inputs_test.py:
    # 326-328, sdk/poptorch/3.4.0)
    if isinstance(value, (tuple, list)):
        return "container", type(value), tuple(_signature(v) for v in value)
    if isinstance(value, dict):
        return "container", type(value), {k: _signature(v) for k, v in value.items()}
    return value


def _by_name(forward: Callable, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
    """The call bound to ``forward``'s parameters, defaults filled in (PopTorch's ArgsParser,
    python/_args_parser.py:150-230): (), {name: value}; unbound when it does not bind."""
    try:
        bound = inspect.signature(forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return args, kwargs
    bound.apply_defaults()
    return (), dict(bound.arguments)


class CompiledInputs:
    def __init__(self, forward: Callable, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
        self.forward = forward
        args, kwargs = _by_name(forward, args, kwargs)
        self.args = [_signature(a) for a in args]
        self.kwargs = {k: _signature(v) for k, v in kwargs.items()}

    def validate(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        args, kwargs = _by_name(self.forward, args, kwargs)
        if len(args) != len(self.args):
            raise Error(
                f"Number of positional arguments mismatch: expected {len(self.args)} "
                f"arguments but got {len(args)}.{RECOMPILE}"
            )
        for i, (compiled, given) in enumerate(zip(self.args, args)):
            _validate(f"args[{i}]", compiled, given)
        _validate_keys("named arguments", set(self.kwargs), set(kwargs))
        for key, compiled in self.kwargs.items():
            _validate(key, compiled, kwargs[key])


def _validate_keys(name: str, expected: set, provided: set) -> None:
    if expected == provided:
        return
    details = []
    if provided - expected:
        details.append("Unexpected arguments: " + ", ".join(sorted(provided - expected)))
    if expected - provided:
        details.append("Missing arguments: " + ", ".join(sorted(expected - provided)))
    raise Error(f"Keys mismatch for {name}: {'. '.join(details)}.{RECOMPILE}")


def _validate(name: str, compiled: Any, given: Any) -> None:
    if isinstance(compiled, tuple) and compiled[:1] == ("tensor",):
        if not isinstance(given, torch.Tensor):
            raise Error(
                f"Type mismatch for {name}: expected {torch.Tensor} but got {type(given)}.{RECOMPILE}"
            )
        if given.dtype != compiled[1]:
            raise Error(
                f"Data type mismatch for {name}: expected {compiled[1]} but got {given.dtype}.{RECOMPILE}"
            )
        return
    if isinstance(compiled, tuple) and compiled[:1] == ("container",):
        _, kind, items = compiled
        if type(given) is not kind:
            raise Error(f"Type mismatch for {name}: expected {kind} but got {type(given)}.{RECOMPILE}")
        if isinstance(items, dict):
            _validate_keys(name, set(items), set(given))
            for key, item in items.items():
                _validate(f"{name}[{key}]", item, given[key])
            return
        parser = custom_parser(given)
        given = tuple(parser.yieldTensors(given)) if parser is not None else given
        if len(items) != len(given):
            raise Error(
                f"Length mismatch for {name}: expected {len(items)} elements but got {len(given)}.{RECOMPILE}"
            )
        for i, item in enumerate(items):
            _validate(f"{name}[{i}]", item, given[i])
        return
    if isinstance(given, torch.Tensor) or type(given) is not type(compiled):
        raise Error(f"Type mismatch for {name}: expected {type(compiled)} but got {type(given)}.{RECOMPILE}")
    if given != compiled:
        raise Error(f"Value mismatch for {name}: expected {compiled} but got {given}.{RECOMPILE}")
