"""The backend boundary: what the training loop asks of a device, below both of them.

  contract.py    ``Backend`` (the interface the loop calls) and ``BackendError``
  specs.py       the run's sizes (``BatchPlan``) and the native device's settings (``DeviceSpec``)
  errors.py      the errors a user can fix, shared by the application and the device layer
  process.py     this process in the job (``DistContext``, ``all_reduce_mean``, launcher checks)
  optimizers.py  update rules every device runs the same way (TensorFlow RMSprop, AdamW's ε)
  native.py      ``NativeBackend``: CPU or CUDA in this process

The IPU backend is ``ipu_options.backend.PopTorchBackend``. Nothing here imports the application,
the model or the IPU layer (tests/test_imports.py checks it): the application picks a backend
(``app.backend.create_backend``) and hands it what it needs.
"""

from backends.contract import Backend, BackendError

__all__ = ["Backend", "BackendError"]
