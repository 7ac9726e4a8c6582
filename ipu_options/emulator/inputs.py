"""How a call's arguments are bound to forward's parameters, and the refusal of inputs that differ
from the ones an executable was compiled for.

PopTorch 3.4 (sdk/poptorch/3.4.0) parses every call (python/_poplar_executor.py:1238) with its
ArgsParser (python/_args_parser.py:210-298): arguments are taken in forward's parameter order,
positional ones (``*c`` gives ``*c[0]``, ``*c[1]``, ...) then, once a ``*args`` parameter has
been filled, named ones (later parameters and ``**kwargs``' entries); a parameter without value
or default is refused before compiling. Once compiled, every call's inputs must have the
compiled structure (python/_args_parser.py:58-140, checked at _poplar_executor.py:1264): the
same number of positional arguments, the same names, types, tensor dtypes and shapes, and the
same value for every non-tensor (it is a constant of the graph) — or ``poptorch.Error`` says
which."""

import inspect
from typing import Any, Callable, Dict, List, NamedTuple, Tuple

import torch

from .custom_args import flatten_tensors
from .errors import Error

RECOMPILE = (
    "\nThis error occurred because the inputs passed at runtime don't match the inputs "
    "used to compile the model.\nTo recompile the model for the new inputs create a new "
    "inferenceModel / trainingModel wrapper or call destroy() on the curent one and try "
    "again."
)
_STAR, _STARSTAR = inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD


class ParsedInputs(NamedTuple):
    """A call as PopTorch's ArgsParser.Args holds it: [(name, value)] and {name: value}."""

    positional: List[Tuple[str, Any]]
    named: Dict[str, Any]


def _parameters(forward: Callable) -> List[inspect.Parameter]:
    try:
        return list(inspect.signature(forward).parameters.values())
    except ValueError:  # no signature (a builtin): *args, **kwargs (_args_parser.py:180-189)
        return [inspect.Parameter("args", _STAR), inspect.Parameter("kwargs", _STARSTAR)]


class ArgsParser:
    """forward's parameters, read once when the model is wrapped (python/_poplar_executor.py:208,
    before the model is instrumented), and every call bound to them."""

    def __init__(self, forward: Callable):
        self.params = _parameters(forward)
        self.names = [p.name for p in self.params]

    def _check_names(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        """Without variadic parameters, only forward's own names (python/_args_parser.py:218-229)."""
        if any(p.kind in (_STAR, _STARSTAR) for p in self.params):
            return
        names = self.names
        assert len(args) + len(kwargs) <= len(names), (
            f"Too many arguments provided: expected {names} ({len(names)}) but got {len(args) + len(kwargs)}"
        )
        for k in kwargs:
            assert k in names, f"{k} is not a valid parameter.Allowed values are {names}"

    def __call__(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> ParsedInputs:
        """``args``/``kwargs`` bound as python/_args_parser.py:231-298 binds them; a missing
        mandatory parameter is refused."""
        self._check_names(args, kwargs)
        parsed = ParsedInputs([], {})
        after_star = False  # everything after a filled *args parameter is named (lines 249, 275, 285)
        for i, p in enumerate(self.params):
            if p.kind is _STARSTAR:
                parsed.named.update((k, v) for k, v in kwargs.items() if k not in self.names[:i])
            elif p.kind is _STAR or i < len(args):
                if p.kind is _STAR:
                    after_star = True
                    parsed.positional.extend((f"*{p.name}[{j}]", a) for j, a in enumerate(args[i:]))
                    args = ()
                else:
                    parsed.positional.append((p.name, args[i]))
                assert p.name not in kwargs, f"Parameter {p.name} was passed more than once"
            else:
                value = self._value(p, kwargs)
                if after_star:
                    parsed.named[p.name] = value
                else:
                    parsed.positional.append((p.name, value))
        return parsed

    @staticmethod
    def _value(p: inspect.Parameter, kwargs: Dict[str, Any]) -> Any:
        if p.name in kwargs:
            return kwargs[p.name]
        if p.default is inspect.Parameter.empty:
            raise Error(f"Mandatory parameter {p.name} missing")  # python/_args_parser.py:280-282
        return p.default


class _Tensor(NamedTuple):
    dtype: torch.dtype
    shape: torch.Size


class _Spec(NamedTuple):
    """What is kept of a compiled input: its type and, by kind, its items, tensor or value."""

    kind: str  # "tuple", "dict", "tensor", "flat" (its tensors only) or "value"
    type: type
    content: Any


def _spec(value: Any) -> _Spec:
    """python/_args_parser.py:70-135's view of a value: tuples and dicts item by item, a tensor
    by dtype and shape, anything else holding tensors (lists, registered types) by those."""
    if isinstance(value, tuple):
        return _Spec("tuple", type(value), [_spec(v) for v in value])
    if isinstance(value, dict):
        return _Spec("dict", type(value), {k: _spec(v) for k, v in value.items()})
    if isinstance(value, torch.Tensor):
        return _Spec("tensor", type(value), _Tensor(value.dtype, value.shape))
    tensors = flatten_tensors(value)
    if tensors:
        return _Spec("flat", type(value), _spec(tuple(tensors)))
    return _Spec("value", type(value), value)


class CompiledInputs:
    def __init__(self, parsed: ParsedInputs):
        self.positional = [(name, _spec(v)) for name, v in parsed.positional]
        self.named = _spec(dict(parsed.named))

    def validate(self, parsed: ParsedInputs) -> None:
        if len(parsed.positional) != len(self.positional):
            raise Error(
                f"Number of positional arguments mismatch: expected {len(self.positional)} "
                f"arguments but got {len(parsed.positional)}.{RECOMPILE}"
            )
        for (name, compiled), (_, given) in zip(self.positional, parsed.positional):
            _validate(name, compiled, given)
        _validate("named arguments", self.named, dict(parsed.named), named=True)


def _validate_keys(name: str, expected: set, provided: set) -> None:
    if expected == provided:
        return
    details = []
    if provided - expected:
        details.append("Unexpected arguments: " + ", ".join(sorted(provided - expected)))
    if expected - provided:
        details.append("Missing arguments: " + ", ".join(sorted(expected - provided)))
    raise Error(f"Keys mismatch for {name}: {'. '.join(details)}.{RECOMPILE}")


def _validate(name: str, compiled: _Spec, given: Any, named: bool = False) -> None:
    """python/_args_parser.py:70-135; ``named``: the keyword arguments, whose entries are
    named by their key alone."""
    if compiled.type is not type(given):
        raise Error(f"Type mismatch for {name}: expected {compiled.type} but got {type(given)}.{RECOMPILE}")
    if compiled.kind == "tuple":
        if len(compiled.content) != len(given):
            raise Error(
                f"Length mismatch for {name}: expected {len(compiled.content)} elements but got "
                f"{len(given)}.{RECOMPILE}"
            )
        for i, item in enumerate(compiled.content):
            _validate(f"{name}[{i}]", item, given[i])
    elif compiled.kind == "dict":
        _validate_keys(name, set(compiled.content), set(given))
        for key, item in compiled.content.items():
            _validate(key if named else f"{name}[{key}]", item, given[key])
    elif compiled.kind == "tensor":
        _validate_tensor(name, compiled.content, given)
    elif compiled.kind == "flat":
        _validate(name, compiled.content, tuple(flatten_tensors(given)))
    elif compiled.content != given:
        raise Error(f"Value mismatch for {name}: expected {compiled.content} but got {given}.{RECOMPILE}")


def _validate_tensor(name: str, compiled: _Tensor, given: torch.Tensor) -> None:
    if compiled.dtype != given.dtype:
        raise Error(
            f"Data type mismatch for {name}: expected {compiled.dtype} but got {given.dtype}.{RECOMPILE}"
        )
    if compiled.shape != given.shape:
        raise Error(f"Shape mismatch for {name}: expected {compiled.shape} but got {given.shape}.{RECOMPILE}")
