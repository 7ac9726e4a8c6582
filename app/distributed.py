"""Data-parallel training over several processes, on the engine each kind of hardware already uses.

``train.replicas`` is the number of data-parallel model copies of the whole job on every device kind:

* CPUs and GPUs: one process per replica, started by ``torchrun`` (PyTorch's own launcher), with
  ``DistributedDataParallel`` over NCCL (GPUs) or Gloo (CPUs). ``python -m app train`` re-runs its
  own command line under ``torchrun --nproc_per_node=replicas/nnodes`` when it is not already under
  torchrun; ``dist.nnodes`` / ``dist.rdzv_endpoint`` spread it over several machines.
* IPUs: replicas are compiled into one PopTorch graph per process (``replicationFactor``); with
  ``dist.instances > 1`` the job runs under ``poprun`` with PopDist and Horovod
  (``ipu_options/poprun.py``).

The training loop sees only a ``DistContext`` (backends/process.py, below the application and the
backends): who this process is (``rank``/``world_size``: processes or PopRun instances),
``is_main`` (only it writes checkpoints, metrics and progress) and the few collective operations
it needs. ``shard_sampler`` below splits each epoch's images between processes without overlap.
This module decides the context and registers it (``set_current``); backends average their
metrics with ``backends.process.all_reduce_mean``, so every process reports the same job-wide
figures. With one process every collective is the identity and nothing touches ``torch.distributed``.
"""

import argparse
import ctypes
import gc
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as tdist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Sampler

from app.checkpoint import pid_alive
from app.config import Config
from app.data.loader import epoch_order
from app.errors import STOP_SIGNALS
from app.optim import describe_peak_lr
from app.run_folder import python_command
from app.specs import IPU_DEVICES, ipu_spec
from backends.errors import DistributedError
from backends.process import (  # the part of the process context a backend sees
    DistContext,
    all_reduce_mean,  # noqa: F401  (the application's callers take it from here too)
    current,
    launcher_args,
    proc_stat,
    set_current,
    under_poprun,
    under_torchrun,
)
from ipu_options.poprun import init_popdist, poprun_command

# Set by `python -m app train` for the torchrun job it starts: a folder where each process leaves
# its exit status (see settle_job_status).
JOB_STATUS_ENV = "APP_JOB_STATUS_DIR"
LAUNCHER_PID_ENV = "APP_LAUNCHER_PID"  # that command's process, which the job's processes watch
# outcomes all processes agree on: a non-finite loss (3), a run that did not learn (4), a signal
ORDERLY_STATUSES = (3, 4) + tuple(128 + s for s in STOP_SIGNALS)


# ----------------------------------------------------------------------------- data split


class ShardSampler(Sampler):
    """The indices of one process's share of an epoch.

    Training (``shuffle=True``): the epoch's permutation is the one a single process would use
    (``epoch_order(size, seed, epoch)``), cut into the job's global batches; process r takes the
    r-th slice of ``batch_size`` images (its host batch) of each. So one step of all processes
    together trains on exactly the images of the same step of a one-process run with the same
    global batch, in the same micro-batches when that run accumulates gradients over them; no
    image is seen twice in an epoch, every process has the same number of batches, and only the
    images a one-process run would drop (the last incomplete global batch) are left out.
    Validation (``shuffle=False``): every image exactly once, round-robin (shares differ by <= 1).
    """

    def __init__(
        self, size: int, *, rank: int, world_size: int, seed: int, shuffle: bool, batch_size: int = 1
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is invalid for world_size={world_size}")
        self.size, self.rank, self.world_size, self.batch_size = size, rank, world_size, batch_size
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.shuffle:
            return self.size // (self.batch_size * self.world_size) * self.batch_size
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.rank, self.size, self.world_size))
        order = epoch_order(self.size, self.seed, self.epoch)
        b, global_batch = self.batch_size, self.batch_size * self.world_size
        starts = range(self.rank * b, len(self) * self.world_size, global_batch)
        return iter([i for start in starts for i in order[start : start + b]])


# ----------------------------------------------------------------------------- contexts


def shard_sampler(
    ctx: DistContext, dataset: Dataset, *, train: bool, seed: int, batch_size: int = 1
) -> Optional[ShardSampler]:
    """This process's share of ``dataset``, taken ``batch_size`` (its host batch) at a time
    when training (None with one process: the loader's own order)."""
    if ctx.world_size == 1:
        return None
    return ShardSampler(
        len(dataset),
        rank=ctx.rank,
        world_size=ctx.world_size,
        seed=seed,
        shuffle=train,
        batch_size=batch_size,
    )


class TorchrunContext(DistContext):
    """A worker started by torchrun: torch.distributed with NCCL on GPUs, Gloo on CPUs."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device):
        super().__init__(rank, world_size, local_rank, "torchrun")
        self.device = device  # where NCCL needs the tensors of collectives (the CPU for Gloo)

    def _reduce(self, tensor: Tensor, average: bool) -> Tensor:
        value = tensor.detach().to(self.device, torch.float64, copy=True)  # counts stay exact
        tdist.all_reduce(value, op=tdist.ReduceOp.SUM)
        if average:
            value /= self.world_size
        return value.to(tensor.device, tensor.dtype if tensor.is_floating_point() else torch.float64)

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        return self._reduce(tensor, average=True)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return self._reduce(tensor, average=False)

    def broadcast_parameters(self, module: nn.Module) -> None:
        pass  # DistributedDataParallel broadcasts rank 0's parameters and buffers when it wraps

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        ids = (
            [device.index if device.index is not None else self.local_rank] if device.type == "cuda" else None
        )
        return DistributedDataParallel(module, device_ids=ids)

    def barrier(self) -> None:
        tdist.barrier()

    def close(self) -> None:
        if not tdist.is_initialized():
            return
        # torch 2.0's Gloo can hang tearing a group down while another process of the job has
        # already exited and closed its connections. So: all arrive, every object holding the
        # group (DistributedDataParallel) is freed, the group goes, and nobody exits before every
        # process has torn its group down. The count lives in the group's store, which process 0
        # serves: it leaves last.
        store = getattr(tdist.distributed_c10d, "_get_default_store", lambda: None)()
        tdist.barrier()
        gc.collect()
        tdist.destroy_process_group()
        if store is not None:
            store.add("app/closed", 1)
            _wait_for_count(store, "app/closed", self.world_size)
            if self.rank == 0:  # serves the store: stays until the others have used it for the last time
                _wait_for_count(store, "app/left", self.world_size - 1)
            else:
                store.add("app/left", 1)


def _wait_for_count(store, key: str, total: int, timeout_s: float = 60.0) -> None:
    """Wait (a minute at most) until the counter ``key`` of the job's store reaches ``total``."""
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < total and time.monotonic() < deadline:
        time.sleep(0.01)


def gather_rng_states(ctx: DistContext, own: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]:
    """Every process's random states (each seeds with train.seed + rank and draws its own
    dropout and drop-path masks), on process 0 in rank order, None elsewhere. Every process
    must call it at the same point."""
    if ctx.world_size == 1:
        return [own]
    if ctx.engine != "torchrun":
        return None  # PopRun instances: each resumes with instance 0's states (docs/training.md: Resume)
    gathered: List[Any] = [None] * ctx.world_size
    tdist.all_gather_object(gathered, own)
    return gathered if ctx.is_main else None


def own_rng_states(payload: Dict[str, Any], ctx: DistContext) -> Dict[str, Any]:
    """A checkpoint as this process resumes it: with its own random states (those process 0 saved
    for every rank) in place of process 0's. A job resumed on another number of processes keeps
    process 0's states on every process (and cannot repeat the same masks anyway)."""
    by_rank = payload.get("rng_by_rank")
    if ctx.world_size == 1 or not by_rank or len(by_rank) != ctx.world_size:
        if ctx.world_size > 1 and ctx.is_main:
            print(
                f"note: the checkpoint holds the random states of {len(by_rank or [None])} process(es), "
                f"this job has {ctx.world_size}: dropout and drop-path masks will not repeat the "
                "original run's",
                file=sys.stderr,
            )
        return payload
    mine = by_rank[ctx.rank]
    return {**payload, "rng": mine["rng"], "epoch_rng": mine["epoch_rng"]}


def reduce_results(results: Dict[str, Dict[str, float]]) -> Dict[str, Dict[str, float]]:
    """Validation results of each process's share of the images → those of all the images.
    ``results``: {name: {"images": n, metric: mean over the n images, ..., count: number}}."""
    ctx = current()
    if ctx.world_size == 1:
        return results
    combined = {}
    for name, result in results.items():
        keys = [k for k in result if k != "images" and k not in COUNTS]
        counts = [k for k in result if k in COUNTS]
        n = float(result["images"])
        sums = torch.tensor(
            [n] + [float(result[k]) * n for k in keys] + [float(result[k]) for k in counts],
            dtype=torch.float64,
        )
        sums = ctx.all_reduce_sum(sums)
        total = float(sums[0])
        combined[name] = {
            **{k: float(v) / total for k, v in zip(keys, sums[1:])},
            "images": int(total),
            **{k: int(v) for k, v in zip(counts, sums[1 + len(keys) :])},
        }
    return combined


COUNTS = ("skipped_images",)  # entries of validation results that add up over processes


def _wants_cuda(cfg) -> bool:
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def init_distributed(cfg: Config) -> DistContext:
    """This process's context: joins the PopRun or torchrun job it was started in (the launcher's
    environment says which), else the single-process context. Checks that the job has as many
    replicas as ``train.replicas``."""
    if under_poprun():
        ctx = init_popdist(cfg.train.replicas, cfg.train.seed)
        cfg.train.seed = ctx.seed  # instance 0's: every instance starts from the same weights
        return set_current(ctx)
    if not under_torchrun():
        return set_current(DistContext())
    world_size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size != cfg.train.replicas:
        raise DistributedError(
            f"torchrun started {world_size} processes but train.replicas={cfg.train.replicas}; the "
            f"global batch and learning rate depend on it: set train.replicas={world_size} (REPLICAS="
            f"{world_size}), or let `{python_command()} -m app train train.replicas=N` start torchrun itself"
        )
    if _wants_cuda(cfg):
        if torch.cuda.device_count() <= local_rank:
            raise DistributedError(
                f"process {local_rank} on this machine needs GPU {local_rank}, but only "
                f"{torch.cuda.device_count()} are visible: start at most that many processes per "
                "machine (train.replicas / dist.nnodes)"
            )
        torch.cuda.set_device(local_rank)  # device=cuda then means this process's own GPU
        backend, device = "nccl", torch.device("cuda", local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
    watch_parent()
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)  # rank, size and address from torchrun's env
    ctx = set_current(TorchrunContext(rank, world_size, local_rank, device))
    if rank != 0:
        # logs from rank 0 only: other ranks keep stderr (warnings, errors) but print no progress
        sys.stdout = open(os.devnull, "w")  # lives as long as the process
    return ctx


# ----------------------------------------------------------------------------- launching


def app_command_line(args: argparse.Namespace) -> List[str]:
    """The ``python -m app`` arguments that reproduce this command (for the launched processes)."""
    argv = [args.command]
    for flag in ("config", "device", "resume", "checkpoint"):
        value = getattr(args, flag, None)
        if value:
            argv += [f"--{flag}", str(value)]
    return argv + [o for o in args.overrides if not o.startswith("dist.dry_run=")]


def torchrun_executable() -> List[str]:
    """torchrun, run by this interpreter: ``python -m torch.distributed.run`` is the program behind
    the ``torchrun`` script, without depending on the script's #! line (a moved environment)."""
    return [sys.executable, "-m", "torch.distributed.run"]


def torchrun_command(cfg: Config, app_argv: List[str]) -> List[str]:
    d = cfg.dist
    per_node = cfg.train.replicas // d.nnodes
    command = torchrun_executable() + [f"--nproc_per_node={per_node}", f"--nnodes={d.nnodes}"]
    if d.rdzv_endpoint:
        command += ["--rdzv_backend=c10d", f"--rdzv_endpoint={d.rdzv_endpoint}"]
    else:
        command += ["--standalone"]  # one machine: a free local port, no address to agree on
    return command + launcher_args(cfg.dist.launcher_args) + ["-m", "app"] + list(app_argv)


def launch_command(cfg: Config, app_argv: List[str]) -> Optional[List[str]]:
    """The launcher command that runs this job on all its processes, or None when this process
    should train itself (one process, or already started by the launcher)."""
    if under_poprun() or under_torchrun():  # started by a launcher already
        return None
    if cfg.device in IPU_DEVICES:
        if cfg.dist.instances == 1:
            return None
        return poprun_command(
            ipu_spec(cfg),
            cfg.train.replicas,
            cfg.dist.instances,
            cfg.dist.launcher_args,
            cfg.log.out_dir,
            app_argv,
        )
    if cfg.train.replicas == 1 and cfg.dist.nnodes == 1:
        return None
    return torchrun_command(cfg, app_argv)


def launch(cfg: Config, args: Optional[argparse.Namespace]) -> Optional[int]:
    """Start the job under its launcher when it needs one: returns the launcher's exit status (0
    after only printing it with ``dist.dry_run``), or None when this process should train itself.
    The launcher ends every process when one fails and prints that process's error."""
    if args is None:  # called from Python without a command line: nothing to re-run
        if launch_command(cfg, ["train"]) is not None:
            raise DistributedError(
                "a job over several processes is started from the command line: "
                f"{python_command()} -m app train train.replicas=N ..."
            )
        return None
    command = launch_command(cfg, app_command_line(args))
    if cfg.dist.dry_run:
        shown = shlex.join(command) if command else "nothing: this job runs in this one process"
        print(f"launch command: {shown}", flush=True)
        return 0
    if command is None:
        return None
    per_node = cfg.train.replicas // cfg.dist.nnodes
    if cfg.device not in IPU_DEVICES and _wants_cuda(cfg) and per_node > torch.cuda.device_count():
        raise DistributedError(
            f"{per_node} processes per machine need {per_node} GPUs, this one has "
            f"{torch.cuda.device_count()}: lower train.replicas (REPLICAS) or raise dist.nnodes"
        )
    print(f"launching: {shlex.join(command)}", flush=True)
    return run_job(command)


def run_job(command: List[str]) -> int:
    """Run the launcher ``command`` as this command's job and return the job's exit status.

    The job runs in a session of its own, so a terminal's Ctrl-C reaches this process only, and a
    scheduler's SIGTERM to it too: this process passes every stop signal on to the job's training
    processes (not to torchrun, which would answer by killing them), waits for their orderly
    stop (the step, the checkpoint, the resume command) and exits with its status, 130 / 143.
    Should this process itself be killed (kill -9), the training processes notice (they watch it:
    ``watch_parent``) and stop the same orderly way, and torchrun ends with them."""
    with tempfile.TemporaryDirectory(prefix="app-job-") as status_dir:
        env = dict(os.environ, **{JOB_STATUS_ENV: status_dir, LAUNCHER_PID_ENV: str(os.getpid())})
        # torchrun's own default, given here so that it does not print a banner about choosing it
        # (each process then sets its threads from train.cpu_threads)
        if "torch.distributed.run" in command:
            env.setdefault("OMP_NUM_THREADS", "1")
        process = subprocess.Popen(command, env=env, start_new_session=True)
        received: List[int] = []

        def forward(signum: int, frame: Optional[FrameType]) -> None:
            received.append(signum)
            workers = child_processes(process.pid)
            try:
                if workers:
                    for pid in workers:
                        os.kill(pid, signum)
                else:  # still starting its processes: torchrun itself stops
                    os.killpg(process.pid, signum)
            except ProcessLookupError:
                pass

        previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
        try:
            code = process.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        statuses = job_statuses(Path(status_dir))
    if statuses:
        failed = [c for c in statuses if c != 0]
        return max(failed) if failed else 0 if code == 0 else code
    if received and code != 0:
        print(
            f"{signal.Signals(received[0]).name}: the job stopped while starting its processes, "
            "before any step",
            file=sys.stderr,
        )
        return 128 + received[0]
    return code


def _set_parent_death_signal(signum: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(poll_s: float = 0.5, grace_s: float = 120.0) -> None:
    """A training process of a torchrun job stops in order (SIGTERM to itself: the step, the
    checkpoint) when the job loses its head: torchrun dies (PR_SET_PDEATHSIG, Linux), or the
    ``python -m app train`` command that started torchrun does (watched by a thread), so a killed
    command never leaves its job training on alone and unseen. A process that has not stopped
    ``grace_s`` later (its main thread blocked in a collective whose peer is gone) exits 143."""
    parent = os.getppid()
    if _set_parent_death_signal(signal.SIGTERM) and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun died before the signal was armed
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if not launcher.isdigit() or _WATCHING:
        return
    _WATCHING.append(int(launcher))

    def watch() -> None:
        while pid_alive(int(launcher)):
            time.sleep(poll_s)
        print(
            f"the command that started this job (process {launcher}) has ended: stopping the job",
            file=sys.stderr,
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        print(
            f"no orderly stop within {grace_s:.0f} s (waiting on another process?): exiting", file=sys.stderr
        )
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


_WATCHING: List[int] = []


def child_processes(pid: int) -> List[int]:
    """The processes whose parent is ``pid`` (Linux: from /proc; elsewhere none are found)."""
    children = []
    for entry in Path("/proc").glob("[0-9]*") if Path("/proc").is_dir() else []:
        fields = proc_stat(entry.name)
        if fields and len(fields) > 1 and fields[1] == str(pid):
            children.append(int(entry.name))
    return children


def job_statuses(folder: Path) -> List[int]:
    codes = []
    for path in sorted(folder.glob("status-*")):
        try:
            codes.append(int(path.read_text().strip()))
        except ValueError:
            continue
    return codes


def settle_job_status(code: int, orderly: bool) -> int:
    """The exit status of this process. In a job started by ``run_job``: the status is left for
    the launching command, and an orderly outcome that every process reached together (stopped
    by a signal after saving, a non-finite loss) exits 0, so torchrun does not report a failed
    job with its own traceback. Anything else exits with its status and torchrun ends the job."""
    folder = os.environ.get(JOB_STATUS_ENV)
    if not folder or not under_torchrun() or not Path(folder).is_dir():
        return code
    rank = os.environ.get("RANK", "0")
    try:
        (Path(folder) / f"status-{rank}").write_text(f"{code}\n")
    except OSError:
        return code
    return 0 if orderly and code in ORDERLY_STATUSES else code


# ----------------------------------------------------------------------------- reporting


def scale_summary(cfg: Config, ctx: DistContext) -> str:
    """One line, the same on every device kind: the global batch and how it is made, the learning
    rate scaling and its rule, and over which images batch statistics are computed."""
    t = cfg.train
    processes = ctx.world_size
    per_process = t.replicas // processes
    layout = (
        f"{processes} {'instances' if ctx.engine == 'poprun' else 'processes'} × "
        f"{per_process} replica{'s' if per_process > 1 else ''}"
        if processes > 1
        else f"{t.replicas} replica{'s' if t.replicas > 1 else ''} in 1 process"
    )
    if cfg.model.norm == "batch":
        stats = f"batch norm over each replica's micro-batch of {t.micro_batch} (not synchronised)"
    else:
        stats = f"none ({cfg.model.norm} norm normalises each image on its own)"
    return (
        f"scale: global batch {cfg.global_batch} = micro-batch {t.micro_batch} × grad-accum "
        f"{t.grad_accum} × {t.replicas} replicas ({layout}, {ctx.engine}) | {describe_peak_lr(cfg)} | "
        f"batch statistics: {stats}"
    )
