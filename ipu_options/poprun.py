"""IPU pods: PopRun starts the instances, PopDist configures each one, Horovod carries host traffic.

With ``dist.instances > 1`` on ``device=ipu``, ``python -m app train`` re-runs itself under::

    poprun --num-instances=I --num-replicas=R --ipus-per-replica=P
           --executable-cache-path=CACHE [dist.launcher_args] python -m app train ...

Each instance drives R/I replicas, whose gradients PopTorch all-reduces across the whole pod in
the compiled graph. On the host, Horovod broadcasts the initial weights and the seed from instance
0 and averages the metrics; only instance 0 writes checkpoints and logs. PopDist, PopTorch and
Horovod exist only beside the Poplar SDK (requirements-ipu.txt), so they are imported only here,
and only inside a PopRun job.

Hooks for the PopTorch backend:
  * ``ipu_options.options.build_options`` starts from ``popdist_options(ipu)`` under poprun: the
    ``poptorch.Options`` PopDist makes for this instance, whose replication factor is already the
    instance's local replicas (``ipu_options.options.local_replicas`` reads the same count from
    ``popdist.getNumLocalReplicas()``, for the host batch);
  * ``backends.process.all_reduce_mean(tensor)`` — the job-wide mean of a metric (Horovod here),
    which ``train_step`` applies to what it returns;
  * ``backends.process.current()`` — this instance's context (rank, is_main), which the
    application registers (``app.distributed.init_distributed``) and uses to split the data.
"""

import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, List, Optional

import torch
from torch import Tensor, nn

from backends.errors import DistributedError
from backends.process import DistContext, launcher_args
from ipu_options.pipeline import num_ipus
from ipu_options.specs import IpuSpec

DEFAULT_CACHE = "executable-cache"  # under log.out_dir, unless ipu.executable_cache is set


def ipus_per_replica(ipu: IpuSpec) -> int:
    """IPUs of one replica, from ``ipu.pipeline`` (1 without a pipeline)."""
    if ipu.pipeline == "auto":
        raise DistributedError(
            'ipu.pipeline="auto" is resolved only when the model is compiled, but poprun needs the IPUs '
            "per replica before it starts: run `make plan` and set the proposed split explicitly, "
            "e.g. ipu.pipeline='{blocks.4: 1}'"
        )
    return num_ipus(ipu)


def executable_cache(ipu: IpuSpec, out_dir: str) -> str:
    return ipu.executable_cache or str(Path(out_dir) / DEFAULT_CACHE)


def poprun_command(
    ipu: IpuSpec, replicas: int, instances: int, extra_args: List[str], out_dir: str, app_argv: List[str]
) -> List[str]:
    """The poprun command that runs ``python -m app <app_argv>`` on ``instances`` instances driving
    ``replicas`` replicas (``extra_args``: dist.launcher_args; the default cache goes under
    ``out_dir``). The instances share one executable cache (compiled once, loaded by the others);
    the app is told the same path so that PopTorch caches there too."""
    cache = executable_cache(ipu, out_dir)
    app_args = list(app_argv)
    if not ipu.executable_cache:
        app_args.append(f"ipu.executable_cache={cache}")
    return [
        "poprun",
        f"--num-instances={instances}",
        f"--num-replicas={replicas}",
        f"--ipus-per-replica={ipus_per_replica(ipu)}",
        f"--executable-cache-path={cache}",
        *launcher_args(extra_args),
        sys.executable,
        "-m",
        "app",
        *app_args,
    ]


class PopDistContext(DistContext):
    """One PopRun instance: rank = instance index, world = instances; Horovod for host collectives."""

    def __init__(self, rank: int, world_size: int, local_replicas: int, hvd: ModuleType, seed: int):
        super().__init__(rank, world_size, rank, "poprun")
        self.local_replicas = local_replicas
        self.hvd = hvd
        self.seed = seed  # instance 0's, the job's

    def _reduce(self, tensor: Tensor, op) -> Tensor:
        value = self.hvd.allreduce(tensor.detach().double().cpu(), op=op)  # counts stay exact
        return value.to(tensor.device, tensor.dtype if tensor.is_floating_point() else torch.float64)

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        return self._reduce(tensor, self.hvd.Average)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return self._reduce(tensor, self.hvd.Sum)

    def broadcast_parameters(self, module: nn.Module) -> None:
        self.hvd.broadcast_parameters(module.state_dict(), root_rank=0)

    def barrier(self) -> None:
        self.hvd.allreduce(torch.zeros(1), op=self.hvd.Sum, name="barrier")


def _import_sdk_modules():
    try:
        import horovod.torch as hvd
        import popdist
        import popdist.poptorch  # noqa: F401  (the Options factory lives there)
    except ImportError as error:
        raise DistributedError(
            f"this process runs under poprun but cannot import {error.name}: install the Poplar SDK's "
            "PopTorch and PopDist wheels and Horovod beside them (see requirements-ipu.txt)"
        ) from None
    return popdist, hvd


def init_popdist(replicas: int, seed: int) -> PopDistContext:
    """Join the PopRun job: PopDist and Horovod initialised, the seed taken from instance 0 (the
    context's ``seed``), the job's replica count checked against ``replicas`` (train.replicas)."""
    popdist, hvd = _import_sdk_modules()
    if hasattr(popdist, "init"):
        popdist.init()
    hvd.init()
    total = int(popdist.getNumTotalReplicas())
    if total != replicas:
        raise DistributedError(
            f"poprun runs {total} replicas but train.replicas={replicas}: the global batch and "
            f"learning rate depend on it, so set train.replicas={total} (REPLICAS={total})"
        )
    job_seed = hvd.broadcast(torch.tensor(seed, dtype=torch.int64), root_rank=0, name="seed")
    ctx = PopDistContext(
        int(popdist.getInstanceIndex()),
        int(popdist.getNumInstances()),
        int(popdist.getNumLocalReplicas()),
        hvd,
        int(job_seed),
    )
    if not ctx.is_main:
        sys.stdout = open(os.devnull, "w")  # logs from instance 0 only; errors still reach stderr
    return ctx


def popdist_local_replicas() -> int:
    """This instance's replicas, as PopDist has them (``popdist.getNumLocalReplicas``): what the
    PopDist options replicate over and what the host batch must feed."""
    popdist, _ = _import_sdk_modules()
    return int(popdist.getNumLocalReplicas())


def popdist_options(ipu: IpuSpec, ipus: Optional[int] = None) -> Any:
    """The instance's ``poptorch.Options`` from PopDist (replication = its local replicas).
    ``ipus``: IPUs per replica when the pipeline was resolved elsewhere (default: ipu.pipeline)."""
    popdist, _ = _import_sdk_modules()
    return popdist.poptorch.Options(ipus_per_replica=ipus or ipus_per_replica(ipu))
