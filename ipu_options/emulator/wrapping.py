"""The user model of a trainingModel, instrumented as PopTorch 3.4 does it.

python/_poplar_executor.py:243-372 (sdk/poptorch/3.4.0): the model's class becomes a subclass
``Poptorch<Name>`` that holds only a weak reference to its executor, copies the device's weights
back to the host when the host model is used (``_parameters``, ``_buffers``, ``forward``, a
parameter attribute) and offers ``copyWeightsToHostIfNeeded`` and ``destroy``. Pickling and
copying give the plain model (python/_impl.py registers the wrapper types with copyreg to unwrap
them), so ``torch.save(model)`` loads without PopTorch.
"""

import copyreg
import weakref
from typing import Any, Optional

import torch

_SYNCED_ON = ("_buffers", "_parameters", "forward")


def _plain_state(model: torch.nn.Module) -> dict:
    return dict(object.__getattribute__(model, "__dict__"))


def instrument(model: torch.nn.Module, executor: Any) -> None:
    """Swap ``model``'s class for PopTorch's wrapper class bound (weakly) to ``executor``."""
    parent = weakref.ref(executor)
    base = type(model)

    class PoptorchModel(base):  # type: ignore[misc, valid-type]
        _poptorch_base = base

        def copyWeightsToHostIfNeeded(self) -> bool:
            p = parent()
            return p.copyWeightsToHostIfNeeded() if p is not None else False

        def destroy(self) -> None:
            p = parent()
            if p is not None:
                p.destroy()

        def __getattribute__(self, name: str):
            if name in _SYNCED_ON:
                p = parent()
                if p is not None:
                    p.copyWeightsToHostIfNeeded()
            return object.__getattribute__(self, name)

        def __reduce_ex__(self, protocol):
            # copyreg unwrapping (python/_impl.py): saved and copied models are plain models,
            # loadable where neither PopTorch nor the emulator is installed
            self.copyWeightsToHostIfNeeded()
            return copyreg._reconstructor, (base, object, None), _plain_state(self)

    PoptorchModel.__name__ = PoptorchModel.__qualname__ = "Poptorch" + base.__name__
    PoptorchModel._poptorch_executor = staticmethod(parent)
    model.__class__ = PoptorchModel


def is_wrapped(model: torch.nn.Module) -> bool:
    return "_poptorch_base" in type(model).__dict__


def executor_of(model: torch.nn.Module) -> Optional[Any]:
    """The trainingModel executor that wrapped ``model`` (None if none or destroyed)."""
    if not is_wrapped(model):
        return None
    return type(model).__dict__["_poptorch_executor"].__func__()


def unwrap(model: torch.nn.Module) -> None:
    if is_wrapped(model):
        model.__class__ = type(model).__dict__["_poptorch_base"]
