"""Scale-out without the training loop: the data split, the launch commands, PopDist/Horovod calls.

PopRun, PopDist and Horovod cannot be installed here (SDK-only / torch < 2.1), so they are
replaced by recording stand-ins that behave like one instance of a PopRun job.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.config import ConfigError, build_config
from app.data import build_dataset, build_loader
from app.distributed import (
    DistContext,
    ShardSampler,
    app_command_line,
    init_distributed,
    launch,
    launch_command,
    scale_summary,
    shard_sampler,
)
from app.specs import batch_plan, data_spec, device_spec, ipu_batch_plan, ipu_spec


def config(*overrides):
    return build_config("digits", list(overrides))


# ----------------------------------------------------------------------------- data split


@pytest.mark.parametrize("size,world,batch", [(20, 2, 1), (23, 3, 2), (7, 4, 1), (40, 2, 8)])
def test_shards_are_disjoint_equal_and_cover_the_epoch(size, world, batch):
    shards = [
        list(ShardSampler(size, rank=r, world_size=world, seed=5, shuffle=True, batch_size=batch))
        for r in range(world)
    ]
    seen = [i for shard in shards for i in shard]
    assert len(seen) == len(set(seen))  # no image twice
    per_rank = size // (world * batch) * batch
    assert {len(s) for s in shards} == {per_rank}  # same number of batches on every rank
    assert len(set(range(size)) - set(seen)) == size % (world * batch)  # only an incomplete global batch
    val = [list(ShardSampler(size, rank=r, world_size=world, seed=5, shuffle=False)) for r in range(world)]
    assert sorted(i for shard in val for i in shard) == list(range(size))  # validation: all, once


def test_shard_order_is_deterministic_from_seed_and_epoch():
    def order(seed, epoch):
        sampler = ShardSampler(40, rank=1, world_size=2, seed=seed, shuffle=True)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(3, 0) == order(3, 0)
    assert order(3, 0) != order(3, 1)
    assert order(3, 0) != order(4, 0)


def test_ranks_batches_together_are_the_one_process_batches():
    """Each image of an epoch is seen exactly once across ranks, and step k of the two ranks
    trains on exactly the images (and augmentation seeds) of step k of one process."""
    cfg = config("data.dataset=generated", "data.synthetic_images=48", "data.workers=0")
    dataset = build_dataset(cfg, "train", 32)
    single = build_loader(dataset, 8, train=True, spec=data_spec(cfg), seed=7)
    ranks = [
        build_loader(
            dataset,
            4,
            train=True,
            spec=data_spec(cfg),
            seed=7,
            sampler=shard_sampler(
                DistContext(rank=r, world_size=2), dataset, train=True, seed=7, batch_size=4
            ),
        )
        for r in range(2)
    ]
    for epoch in (0, 1):
        for loader in (single, *ranks):
            loader.set_epoch(epoch)
        whole = list(single.batches)
        parts = [list(loader.batches) for loader in ranks]
        assert len(parts[0]) == len(parts[1]) == len(whole) == 6
        for k, batch in enumerate(whole):
            assert parts[0][k] + parts[1][k] == batch  # the same images, seeds and micro-batches
        epoch_indices = [i for part in parts for batch in part for i, _ in batch]
        assert sorted(epoch_indices) == list(range(48))


def test_one_process_has_no_sampler():
    cfg = config("data.dataset=generated", "data.synthetic_images=8")
    assert shard_sampler(DistContext(), build_dataset(cfg, "train", 32), train=True, seed=0) is None


# ----------------------------------------------------------------------------- torchrun launch


def cli_args(*overrides):
    """What app.cli's parser makes of ``train --config digits --device cpu <overrides>``."""
    return argparse.Namespace(
        command="train",
        config="digits",
        device="cpu",
        resume=None,
        checkpoint=None,
        overrides=list(overrides),
    )


def test_torchrun_command_one_machine(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    args = cli_args("train.replicas=4", "dist.dry_run=true", "train.micro_batch=8")
    cfg = config("device=cpu", "train.replicas=4", "train.micro_batch=8")
    command = launch_command(cfg, app_command_line(args))
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]  # torchrun of this Python
    assert "--nproc_per_node=4" in command and "--nnodes=1" in command and "--standalone" in command
    tail = command[command.index("-m", 3) :]
    # the same command line again, minus the dry run
    assert tail == [
        "-m",
        "app",
        "train",
        "--config",
        "digits",
        "--device",
        "cpu",
        "train.replicas=4",
        "train.micro_batch=8",
    ]


def test_torchrun_command_several_machines(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    cfg = config(
        "device=cuda",
        "train.replicas=16",
        "dist.nnodes=2",
        "dist.rdzv_endpoint=node0:29500",
        "dist.launcher_args=[--max_restarts=0]",
    )
    command = launch_command(cfg, ["train"])
    assert "--nproc_per_node=8" in command and "--nnodes=2" in command
    assert "--rdzv_backend=c10d" in command and "--rdzv_endpoint=node0:29500" in command
    assert "--standalone" not in command
    assert command.index("--max_restarts=0") < command.index("app")  # launcher args go to torchrun


def test_no_launch_for_one_replica_or_inside_torchrun(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert launch_command(config("device=cpu"), ["train"]) is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    assert launch_command(config("device=cpu", "train.replicas=2"), ["train"]) is None


def test_dry_run_prints_and_starts_nothing(monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)

    def no_process(*a, **k):
        raise AssertionError("a dry run must not start anything")

    monkeypatch.setattr("subprocess.Popen", no_process)
    args = cli_args("train.replicas=2", "dist.dry_run=true")
    assert launch(config("device=cpu", "train.replicas=2", "dist.dry_run=true"), args) == 0
    printed = capsys.readouterr().out
    assert "launch command: " in printed and "--nproc_per_node=2" in printed
    assert shlex.split(printed.split("launch command: ", 1)[1])[-1] == "train.replicas=2"


def test_more_processes_than_gpus_is_refused_before_launching(monkeypatch):
    from app.distributed import DistributedError

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr("subprocess.Popen", lambda *a, **k: pytest.fail("nothing may start"))
    with pytest.raises(DistributedError, match="8 processes per machine need 8 GPUs, this one has 4"):
        launch(config("device=cuda", "train.replicas=8"), cli_args("train.replicas=8"))


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["train.replicas=3", "dist.nnodes=2", "dist.rdzv_endpoint=h:1"], "train.replicas"),
        (["train.replicas=4", "dist.nnodes=2"], "dist.rdzv_endpoint"),
        (["device=cpu", "train.replicas=4", "dist.instances=2"], "dist.instances"),
        (["device=ipu", "train.replicas=6", "dist.instances=4"], "train.replicas"),
    ],
)
def test_bad_scale_out_settings_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as error:
        config(*overrides)
    assert error.value.field_name == field


def test_scale_summary_is_one_line_with_batch_lr_and_statistics():
    cfg = config(
        "train.micro_batch=16",
        "train.grad_accum=2",
        "train.replicas=4",
        "model.norm=batch",
        "model.proxy_norm=false",
        "optim.lr_scaling=auto",
    )
    line = scale_summary(cfg, DistContext(rank=0, world_size=4, engine="torchrun"))
    assert "\n" not in line
    assert "global batch 128 = micro-batch 16 × grad-accum 2 × 4 replicas" in line
    assert "4 processes × 1 replica" in line and "batch norm over each replica's micro-batch of 16" in line
    assert f"× √(128/{cfg.optim.lr_reference_batch}) = " in line and "square-root scaling" in line
    assert "none (layer norm" in scale_summary(config(), DistContext())


# ----------------------------------------------------------------------------- PopRun / PopDist


def ipu_config(*overrides):
    return config(
        "device=ipu", "train.replicas=16", "dist.instances=4", "ipu.pipeline={blocks.4: 1}", *overrides
    )


def test_poprun_command():
    from ipu_options.poprun import poprun_command

    cfg = ipu_config("log.out_dir=/runs", "dist.launcher_args=--host h1,h2 --vipu-partition=p16")
    command = poprun_command(
        ipu_spec(cfg),
        cfg.train.replicas,
        cfg.dist.instances,
        cfg.dist.launcher_args,
        cfg.log.out_dir,
        ["train", "--config", "digits", "train.replicas=16"],
    )
    assert command[:5] == [
        "poprun",
        "--num-instances=4",
        "--num-replicas=16",
        "--ipus-per-replica=2",
        "--executable-cache-path=/runs/executable-cache",
    ]
    assert command[5:8] == ["--host", "h1,h2", "--vipu-partition=p16"]  # passed through as given
    assert command[8:10] == [sys.executable, "-m"]
    assert command[10:] == [
        "app",
        "train",
        "--config",
        "digits",
        "train.replicas=16",
        "ipu.executable_cache=/runs/executable-cache",
    ]
    # one IPU per replica without a pipeline; a user's cache path is used as is
    plain = poprun_command(
        ipu_spec(config("device=ipu", "ipu.executable_cache=/c")), 8, 2, [], "runs", ["train"]
    )
    assert "--ipus-per-replica=1" in plain and "--executable-cache-path=/c" in plain
    assert not any(a.startswith("ipu.executable_cache") for a in plain)


def test_poprun_needs_an_explicit_pipeline():
    from ipu_options.poprun import poprun_command

    with pytest.raises(Exception, match="make plan"):
        poprun_command(ipu_spec(config("device=ipu", "ipu.pipeline=auto")), 4, 2, [], "runs", ["train"])


def test_launch_builds_poprun_only_outside_poprun(monkeypatch):
    monkeypatch.delenv("POPDIST_NUM_TOTAL_REPLICAS", raising=False)
    assert launch_command(ipu_config(), ["train"])[0] == "poprun"
    assert launch_command(config("device=ipu", "train.replicas=4"), ["train"]) is None  # one instance
    monkeypatch.setenv("POPDIST_NUM_TOTAL_REPLICAS", "16")
    assert launch_command(ipu_config(), ["train"]) is None


class Recorder:
    """Records every call made on the stand-in modules, in order."""

    def __init__(self):
        self.calls = []

    def record(self, call, *args, **kwargs):
        self.calls.append((call, args, kwargs))

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def popdist_job(monkeypatch):
    """Stand-in ``popdist``, ``popdist.poptorch`` and ``horovod.torch`` for instance ``index`` of a
    PopRun job with 4 instances × 4 replicas (set ``job.instance`` before init)."""
    rec = Recorder()
    job = types.SimpleNamespace(rec=rec, instance=1, instances=4, total=16)

    popdist = types.ModuleType("popdist")
    popdist.init = lambda: rec.record("popdist.init")
    popdist.isPopdistEnvSet = lambda: True
    popdist.getNumTotalReplicas = lambda: job.total
    popdist.getNumInstances = lambda: job.instances
    popdist.getInstanceIndex = lambda: job.instance
    popdist.getNumLocalReplicas = lambda: job.total // job.instances
    popdist_poptorch = types.ModuleType("popdist.poptorch")

    def options(ipus_per_replica):
        # as PopDist does: PopTorch options already replicated over this instance's replicas
        from ipu_options import emulator

        rec.record("popdist.poptorch.Options", ipus_per_replica=ipus_per_replica)
        opts = emulator.Options().replicationFactor(job.total // job.instances)
        opts.made_by = "popdist"
        return opts

    popdist_poptorch.Options = options
    popdist.poptorch = popdist_poptorch

    horovod = types.ModuleType("horovod")
    hvd = types.ModuleType("horovod.torch")
    hvd.Average, hvd.Sum = "Average", "Sum"
    hvd.init = lambda: rec.record("hvd.init")

    def broadcast(tensor, root_rank, name=None):
        rec.record("hvd.broadcast", tensor.clone(), root_rank=root_rank, name=name)
        return tensor.clone()

    def allreduce(tensor, op=None, name=None):
        rec.record("hvd.allreduce", tensor.clone(), op=op)
        # as if every instance held the same value: the mean is the value, the sum one per instance
        return tensor.clone() if op == "Average" else tensor * job.instances

    def broadcast_parameters(params, root_rank):
        rec.record("hvd.broadcast_parameters", sorted(params), root_rank=root_rank)

    hvd.broadcast, hvd.allreduce, hvd.broadcast_parameters = broadcast, allreduce, broadcast_parameters
    horovod.torch = hvd
    for name, module in (
        ("popdist", popdist),
        ("popdist.poptorch", popdist_poptorch),
        ("horovod", horovod),
        ("horovod.torch", hvd),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("POPDIST_NUM_TOTAL_REPLICAS", "16")
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # restored after the test (non-main is silenced)
    return job


def test_popdist_instance_initialises_and_reduces_through_horovod(popdist_job):
    from ipu_options.options import build_options, local_replicas

    cfg = ipu_config("train.seed=11")
    ctx = init_distributed(cfg)
    rec = popdist_job.rec
    assert rec.names()[:3] == ["popdist.init", "hvd.init", "hvd.broadcast"]
    seed_call = rec.calls[2]
    assert int(seed_call[1][0]) == 11 and seed_call[2]["root_rank"] == 0  # the seed from instance 0
    assert (ctx.engine, ctx.rank, ctx.world_size, ctx.is_main) == ("poprun", 1, 4, False)
    assert local_replicas(cfg.train.replicas, cfg.dist.instances) == 4

    model = torch.nn.Linear(2, 3)
    ctx.broadcast_parameters(model)
    assert rec.calls[-1] == ("hvd.broadcast_parameters", (["bias", "weight"],), {"root_rank": 0})

    from app.distributed import all_reduce_mean  # the backends' entry point

    assert float(all_reduce_mean(torch.tensor(3.0))) == 3.0
    assert rec.calls[-1][0] == "hvd.allreduce" and rec.calls[-1][2]["op"] == "Average"
    assert float(ctx.all_reduce_sum(torch.tensor(3.0))) == 12.0
    assert rec.calls[-1][2]["op"] == "Sum"

    # the PopTorch options of this instance start from PopDist's, which set the replication
    from ipu_options import emulator

    opts = build_options(ipu_spec(cfg), emulator, ipu_batch_plan(cfg))
    assert opts.made_by == "popdist" and opts.replication_factor == 4
    assert [c[0] for c in opts.calls].count("replicationFactor") == 1  # PopDist's call only
    assert ("popdist.poptorch.Options", (), {"ipus_per_replica": 2}) in rec.calls
    assert shard_sampler(ctx, range(40), train=True, seed=0).rank == 1  # instances split the data


def test_popdist_checks_the_replica_count(popdist_job):
    from app.distributed import DistributedError

    popdist_job.total = 8
    with pytest.raises(DistributedError, match="train.replicas=8"):
        init_distributed(ipu_config())


def test_horovod_is_imported_only_on_the_popdist_path(monkeypatch):
    for name in ("horovod", "horovod.torch", "popdist", "popdist.poptorch"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delenv("POPDIST_NUM_TOTAL_REPLICAS", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for cfg in (config("device=cpu"), config("device=ipu", "train.replicas=4")):
        assert init_distributed(cfg).engine == "single"
    assert not {"horovod", "horovod.torch", "popdist"} & set(sys.modules)


# ----------------------------------------------------------------------------- the training loop

ROOT = Path(__file__).resolve().parents[1]


def image_folder(root: Path, per_class: int = 8, val_per_class: int = 2, broken: int = 0) -> Path:
    """A deterministic two-class PNG folder (train/ and val/); ``broken``: that many unreadable
    files in each class of each split, named to sort second (validation index 1: process 1's)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 120, (36, 36, 3), dtype=np.uint8)
                pixels[..., c] += 120
                Image.fromarray(pixels).save(folder / f"{i}.png")
            for i in range(broken):
                (folder / f"0{i}broken.png").write_bytes(b"not a png")
    return root


def quick_run(data: Path, out: Path, name: str, *overrides: str):
    """B0 G16 LayerNorm + Proxy Norm, no dropout (masks would differ between layouts), SGD, 3 steps
    of a global batch of 8 (2 epochs of 16 images: the second epoch's shuffle is split too)."""
    return [
        "train",
        "--config",
        "digits",
        "--device",
        "cpu",
        f"data.dataset={data}",
        "data.resolution=32",
        "data.workers=0",
        "model.norm=layer",
        "model.proxy_norm=true",
        "model.dropout=0",
        "model.drop_path=0",
        "optim.name=sgd",
        "optim.lr=0.0005",
        "optim.lr_reference_batch=8",
        "schedule.warmup_epochs=0",
        "train.ema_decay=0",
        "train.max_steps=3",
        "train.log_every=1",
        f"log.out_dir={out}",
        f"log.name={name}",
        *overrides,
    ]


def train_losses(run_dir: Path):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def final_weights(run_dir: Path):
    from app.checkpoint import find_checkpoint, load_checkpoint

    return load_checkpoint(find_checkpoint(run_dir))["model"]


# Tests that start torchrun run one at a time (the Makefile runs pytest with `--dist loadgroup`):
# two local rendezvous started at once can pick the same free port and join each other's job.
one_torchrun_job_at_a_time = pytest.mark.xdist_group("torchrun")


def loopback_env():
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    env.pop("TORCHELASTIC_RUN_ID", None)
    return env


def env_with_site_hook(tmp_path, source: str):
    """loopback_env whose Python processes first run ``source`` (a sitecustomize module)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(source)
    env = loopback_env()
    env["PYTHONPATH"] = os.pathsep.join([str(hook), str(ROOT)])
    return env


@one_torchrun_job_at_a_time
def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch):
    from app.cli import main as cli

    data, out = image_folder(tmp_path / "data"), tmp_path / "runs"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    # one process: a global batch of 8 as 2 accumulated micro-batches of 4
    assert cli(quick_run(data, out, "one", "train.micro_batch=4", "train.grad_accum=2")) == 0
    # two processes on loopback, a micro-batch of 4 each: the same micro-batches (ShardSampler)
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            *quick_run(
                data, out, "two", "train.micro_batch=4", "train.replicas=2", "dist.rdzv_endpoint=127.0.0.1:0"
            ),
        ],
        cwd=ROOT,
        env=loopback_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "--nproc_per_node=2" in two.stdout and "2 processes × 1 replica" in two.stdout
    assert "global batch 8 = micro-batch 4 × grad-accum 1 × 2 replicas" in two.stdout

    losses = {name: train_losses(out / name) for name in ("one", "two")}
    assert len(losses["two"]) == 3 and losses["one"][0] != losses["one"][2]  # it trained
    assert max(abs(a - b) for a, b in zip(losses["one"], losses["two"])) <= 1e-5
    one, two_w = final_weights(out / "one"), final_weights(out / "two")
    assert one.keys() == two_w.keys()
    assert max((one[k].float() - two_w[k].float()).abs().max().item() for k in one) <= 1e-5
    # only rank 0 wrote: one run folder, no stray one from rank 1
    assert sorted(p.name for p in out.iterdir()) == ["one", "two"]


@one_torchrun_job_at_a_time
def test_a_failed_rank_ends_the_job_and_shows_its_error(tmp_path):
    """Rank 1 fails at its first collective while rank 0 waits in it: torchrun must stop rank 0
    and the job must fail with rank 1's error on the console."""
    env = env_with_site_hook(
        tmp_path,
        (
            "import os\n"
            "if os.environ.get('RANK') == '1':\n"
            "    import torch.distributed as d\n"
            "    def fail(*a, **k):\n"
            "        raise RuntimeError('rank 1 failed on purpose')\n"
            "    d.all_reduce = fail\n"
        ),
    )
    data, out = image_folder(tmp_path / "data"), tmp_path / "runs"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            *quick_run(
                data, out, "fail", "train.micro_batch=4", "train.replicas=2", "dist.rdzv_endpoint=127.0.0.1:0"
            ),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in proc.stderr
    assert not train_losses_exist(out / "fail")


def train_losses_exist(run_dir: Path) -> bool:
    return (run_dir / "metrics.jsonl").is_file() and bool(train_losses(run_dir))


@pytest.mark.parametrize("instance", [0, 1])
def test_only_instance_0_writes_under_popdist(popdist_job, tmp_path, instance):
    """The real loop as instance ``instance`` of a PopRun job (stand-in PopDist/Horovod; the
    native backend stands in for PopTorch): Horovod carries the seed, initial weights and
    metrics; only instance 0 writes a run folder, metrics and checkpoints."""
    from app.cli import main as cli

    popdist_job.instance, popdist_job.instances, popdist_job.total = instance, 2, 2
    data, out = image_folder(tmp_path / "data", per_class=4), tmp_path / "runs"
    assert (
        cli(quick_run(data, out, "pod", "train.micro_batch=2", "train.replicas=2", "train.max_steps=2")) == 0
    )
    names = popdist_job.rec.names()
    assert names[:3] == ["popdist.init", "hvd.init", "hvd.broadcast"]
    assert "hvd.broadcast_parameters" in names
    assert names.count("hvd.allreduce") >= 2  # the loss of each step at least
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    if instance == 0:
        assert {"pod/metrics.jsonl", "pod/config.yaml", "pod/checkpoints"} <= set(written)
    else:
        assert written == []


class TinyClassifier(torch.nn.Module):
    """The Classifier interface (uint8 images, targets → logits, loss) on a linear layer."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(12, 3)

    def forward(self, images, targets=None):
        logits = self.linear(images.float().flatten(1) / 255.0)
        if targets is None:
            return logits
        return logits, torch.nn.functional.cross_entropy(logits, targets)


def test_ddp_gradient_accumulation_equals_plain_accumulation(tmp_path, monkeypatch):
    """The native backend under DistributedDataParallel (a Gloo group of one, in this process):
    gradients of the accumulated micro-batches are synchronised once (no_sync before) and the
    update equals the single-process one."""
    import torch.distributed as tdist

    import app.distributed as distributed
    import backends.process as process
    from backends.native import NativeBackend

    cfg = config("device=cpu", "train.micro_batch=2", "train.grad_accum=3")
    images = torch.randint(0, 256, (6, 3, 2, 2), dtype=torch.uint8)
    targets = torch.tensor([0, 1, 2, 0, 1, 2])

    def one_step():
        torch.manual_seed(0)
        model = TinyClassifier()
        backend = NativeBackend(device_spec(cfg), batch_plan(cfg))
        backend.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        loss = backend.train_step(images, targets)["loss"]
        return backend.trainer, loss, model.linear.weight.detach().clone()

    _, plain_loss, plain_weight = one_step()
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    tdist.init_process_group("gloo", store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        monkeypatch.setattr(process, "_CURRENT", distributed.TorchrunContext(0, 1, 0, torch.device("cpu")))
        trainer, ddp_loss, ddp_weight = one_step()
    finally:
        tdist.destroy_process_group()
    assert isinstance(trainer, torch.nn.parallel.DistributedDataParallel)
    assert torch.equal(ddp_loss, plain_loss)
    assert torch.allclose(ddp_weight, plain_weight, atol=1e-7)
    torch.manual_seed(0)
    assert not torch.allclose(ddp_weight, TinyClassifier().linear.weight)  # it did update


def records(run_dir: Path, kind: str):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def torchrun_job(out_args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "app", *out_args],
        cwd=ROOT,
        env=env or loopback_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


TWO = ["train.micro_batch=4", "train.replicas=2", "dist.rdzv_endpoint=127.0.0.1:0"]


@one_torchrun_job_at_a_time
def test_skipped_images_are_counted_over_the_whole_job(tmp_path, monkeypatch):
    """Unreadable images in training and validation: the job's counts are every process's skips
    together, the same as one process reading the same images counts."""
    from app.cli import main as cli

    data, out = image_folder(tmp_path / "data", broken=1), tmp_path / "runs"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    # 4 steps: in the second epoch's second batch, process 1's share holds a broken image
    assert (
        cli(quick_run(data, out, "one", "train.micro_batch=4", "train.grad_accum=2", "train.max_steps=4"))
        == 0
    )
    two = torchrun_job(quick_run(data, out, "two", *TWO, "train.max_steps=4"))
    assert two.returncode == 0, two.stderr[-3000:]
    one_train = [r["skipped_images"] for r in records(out / "one", "train")]
    two_train = [r["skipped_images"] for r in records(out / "two", "train")]
    assert one_train[-1] > 0 and two_train == one_train
    one_val = [r["skipped_images"] for r in records(out / "one", "val")]
    assert one_val == [2] and [r["skipped_images"] for r in records(out / "two", "val")] == one_val
    assert "2 unreadable images replaced" in two.stdout  # the validation line says so


@one_torchrun_job_at_a_time
def test_ctrl_c_on_one_process_stops_every_process_at_the_same_step(tmp_path):
    """SIGINT reaches only process 1, during step 2: the whole job stops after step 2 together
    (process 0 saves that step's checkpoint) instead of process 0 training on alone."""
    env = env_with_site_hook(
        tmp_path,
        (
            "import os\n"
            "if os.environ.get('RANK') == '1':\n"
            "    import signal\n"
            "    import torch\n"
            "    import app.objective as objective\n"
            "    original, calls = objective.smoothed_cross_entropy, [0]\n"
            "    def loss(logits, targets, smoothing=0.0):\n"
            "        if torch.is_grad_enabled():\n"
            "            calls[0] += 1\n"
            "            if calls[0] == 2:\n"
            "                os.kill(os.getpid(), signal.SIGINT)\n"
            "        return original(logits, targets, smoothing)\n"
            "    objective.smoothed_cross_entropy = loss\n"
        ),
    )
    data, out = image_folder(tmp_path / "data"), tmp_path / "runs"
    job = torchrun_job(
        quick_run(data, out, "stop", *TWO, "train.max_steps=6", "train.val_every=100"), env=env
    )
    assert job.returncode != 0  # an interrupted job
    assert "stopped by SIGINT at step 2/6; checkpoint saved" in job.stderr, job.stderr[-3000:]
    assert "python -m app train --resume" in job.stderr
    assert [r["step"] for r in records(out / "stop", "train")] == [1, 2]
    from app.checkpoint import step_checkpoints

    assert [p.name for p in step_checkpoints(out / "stop" / "checkpoints")] == ["step-0000002.pt"]


@one_torchrun_job_at_a_time
def test_finetune_over_two_processes(tmp_path, monkeypatch):
    """`finetune ... train.replicas=2` starts torchrun like train; the accuracies before and after
    are over all validation images; only process 0 writes, into the fine-tuning run's folder."""
    from app.checkpoint import find_checkpoint, load_checkpoint
    from app.cli import main as cli

    data, out = image_folder(tmp_path / "data"), tmp_path / "runs"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert (
        cli(
            quick_run(
                data,
                out,
                "src",
                "train.micro_batch=8",
                "model.norm=batch",
                "model.proxy_norm=false",
                "train.max_steps=2",
            )
        )
        == 0
    )
    job = torchrun_job(
        [
            "finetune",
            "--checkpoint",
            str(out / "src"),
            "--device",
            "cpu",
            *TWO,
            "finetune.resolution=64",
            "finetune.trainable_from=blocks.6",
            "train.max_steps=2",
            f"log.out_dir={out}",
        ]
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert "--nproc_per_node=2" in job.stdout and "2 processes × 1 replica" in job.stdout
    assert sorted(p.name for p in out.iterdir()) == ["src", "src-finetune-64"]  # no stray report
    run = out / "src-finetune-64"
    assert "| + fine-tuning (2 steps) |" in (run / "finetune.md").read_text()
    recorded = load_checkpoint(find_checkpoint(run))["finetune"]
    assert recorded["before"]["images"] == 4 and recorded["recalibrated"]["images"] == 4  # all of val/
    assert records(run, "val")[-1]["raw@64/images"] == 4


def test_a_process_blocked_after_its_launcher_died_exits_after_the_grace_period(tmp_path):
    """The launcher's death asks for an orderly stop (SIGTERM); a process whose main thread cannot
    take it (blocked in a collective whose peer has gone: seen in a two-process job) must not stay
    behind: it exits 143 once the grace period is over."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    code = (
        "import signal, time\n"
        "from app.distributed import watch_parent\n"
        "signal.signal(signal.SIGTERM, lambda *a: None)  # a stop the blocked main thread never reaches\n"
        "watch_parent(poll_s=0.05, grace_s=0.5)\n"
        "time.sleep(60)\n"
    )
    env = dict(os.environ, APP_LAUNCHER_PID=dead.stdout.strip())
    job = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert job.returncode == 143, job.stderr
    assert "has ended: stopping the job" in job.stderr and "no orderly stop within" in job.stderr
