"""Custom argument parsers: how a user's own batch type is taken apart into tensors and rebuilt.

PopTorch 3.4 (sdk/poptorch/3.4.0): ``ICustomArgParser`` (python/__init__.py:800-834) says which
tensors an object holds, in a fixed order, and how to rebuild it from tensors in that order;
``registerCustomArgParser`` (python/__init__.py:837-853) maps a type to its parser (None removes
it). The DataLoader rebatches such objects tensor by tensor (python/_dataloader.py:321-334,457-459)
and the model's inputs are flattened through them (python/_utils.py:92-135)."""

import abc
from typing import Any, Dict, Iterable, Iterator, List, Optional, Type

import torch

from .errors import Error


class ICustomArgParser(abc.ABC):
    """Takes an object of a registered type apart into tensors and rebuilds it from tensors."""

    @abc.abstractmethod
    def yieldTensors(self, struct: Any) -> Iterator[torch.Tensor]:  # noqa: N802  (PopTorch's name)
        """Every tensor ``struct`` holds, in a deterministic order."""

    @abc.abstractmethod
    def reconstruct(self, original_structure: Any, tensor_iterator: Iterator[torch.Tensor]) -> Any:
        """A new object like ``original_structure`` whose tensors come from ``tensor_iterator``,
        taken in ``yieldTensors``'s order."""


_PARSERS: Dict[type, ICustomArgParser] = {}


def registerCustomArgParser(arg_data_type: Type, arg_parser: Optional[ICustomArgParser]) -> None:  # noqa: N802
    """Use ``arg_parser`` for ``arg_data_type`` (replacing any earlier one); None removes it."""
    if arg_parser is None:
        _PARSERS.pop(arg_data_type, None)
        return
    if not isinstance(arg_parser, ICustomArgParser):
        raise Error("arg_parser must inherit from ICustomArgParser")
    _PARSERS[arg_data_type] = arg_parser


def custom_parser(value: Any) -> Optional[ICustomArgParser]:
    """The parser for ``value``: its exact type's first, else a registered base class's
    (python/_utils.py:75-91)."""
    parser = _PARSERS.get(type(value))
    if parser is not None:
        return parser
    for registered, parser in _PARSERS.items():
        if isinstance(value, registered):
            return parser
    return None


def empty_template(value: Any, parser: ICustomArgParser) -> Any:
    """``value`` rebuilt around empty tensors: the shape of later batches without holding this
    one's data (python/_dataloader.py:331-333)."""
    return parser.reconstruct(value, iter([type(t)() for t in parser.yieldTensors(value)]))


def flatten_tensors(value: Any) -> List[torch.Tensor]:
    """Every tensor in ``value``, in PopTorch's order (python/_utils.py:94-111): a registered
    type through its parser, dicts by key order, lists and tuples in order; other values hold none."""
    parser = custom_parser(value)
    if parser is not None:
        return list(parser.yieldTensors(value))
    if isinstance(value, dict):
        return [t for k in value.keys() for t in flatten_tensors(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in flatten_tensors(item)]
    return [value] if isinstance(value, torch.Tensor) else []


def rebuild(structure: Any, tensors: Iterable[torch.Tensor]) -> Any:
    """A copy of ``structure`` whose tensors are ``tensors`` in ``flatten_tensors``'s order, every
    container of its own type (python/_utils.py:120-139); other values are kept as they are."""
    return _rebuild(structure, iter(tensors))


def _rebuild(x: Any, it: Iterator[torch.Tensor]) -> Any:
    parser = custom_parser(x)
    if parser is not None:
        return parser.reconstruct(x, it)
    if isinstance(x, dict):
        return type(x)({k: _rebuild(x[k], it) for k in x.keys()})
    if isinstance(x, (tuple, list)):
        items = [_rebuild(item, it) for item in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)  # namedtuple: fields
    return next(it) if isinstance(x, torch.Tensor) else x
