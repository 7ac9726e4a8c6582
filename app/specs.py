"""The run configuration turned into the specs its components take: each gets its own, never
the whole configuration. Every batch size of a run comes from ``batch_plan``."""

import dataclasses

from app.config import Config
from app.data import DataSpec
from backends.specs import BatchPlan, DeviceSpec, ModelSpec, OptimSpec
from ipu_options.options import local_replicas
from ipu_options.specs import IpuSpec

IPU_DEVICES = ("ipu", "ipu-model")


def batch_plan(cfg: Config) -> BatchPlan:
    """The run's sizes on its device: an IPU process drives its share of the replicas for
    ``ipu.device_iterations`` updates per call; a CPU/GPU process is one replica, one update."""
    if cfg.device in IPU_DEVICES:
        return ipu_batch_plan(cfg)
    t = cfg.train
    return BatchPlan(t.micro_batch, t.grad_accum, replicas=t.replicas)


def ipu_batch_plan(cfg: Config) -> BatchPlan:
    """The sizes of ``cfg`` on IPUs (whatever ``device`` says: ``plan`` and the options' tests)."""
    t = cfg.train
    return BatchPlan(
        t.micro_batch,
        t.grad_accum,
        cfg.ipu.device_iterations,
        t.replicas,
        local_replicas(t.replicas, cfg.dist.instances),
    )


def device_spec(cfg: Config) -> DeviceSpec:
    t = cfg.train
    return DeviceSpec(cfg.device, t.precision, t.channels_last, t.cpu_threads)


def data_spec(cfg: Config) -> DataSpec:
    """The loaders' settings; training data of an IPU run goes through poptorch.DataLoader unless
    ``data.async_loader`` is off."""
    d = cfg.data
    return DataSpec(
        workers=d.workers,
        prefetch=d.prefetch,
        mixup=d.mixup,
        cutmix_lambda=d.cutmix_lambda,
        poptorch_loader=cfg.device in IPU_DEVICES and d.async_loader,
    )


def ipu_spec(cfg: Config) -> IpuSpec:
    """The ``ipu`` section's fields of the same names, lists as tuples, the precision as written
    on a command line (YAML reads 16.16 as a number), the device seed resolved (``ipu.seed``,
    else the run's), and the network's group-norm channel grouping (``model.norm_grouping``)."""
    i = cfg.ipu
    same = {f.name: getattr(i, f.name) for f in dataclasses.fields(IpuSpec) if hasattr(i, f.name)}
    return IpuSpec(
        **{
            **same,
            "pipeline": dict(i.pipeline) if isinstance(i.pipeline, dict) else i.pipeline,
            "recompute": tuple(i.recompute),
            "precision": str(i.precision),
            "available_memory_proportion": tuple(i.available_memory_proportion),
            "seed": i.seed if i.seed is not None else cfg.train.seed,
            "norm_grouping": cfg.model.norm_grouping,  # the network's: PopART groups as it does
        }
    )


def optim_spec(cfg: Config) -> OptimSpec:
    o = cfg.optim
    return OptimSpec(o.name, o.momentum, o.nesterov, o.alpha, o.eps, tuple(o.betas))


def model_spec(cfg: Config) -> ModelSpec:
    """The network's label in the device layer's reports, and its input side."""
    m = cfg.model
    norm = f"{m.norm}{'+proxy' if m.proxy_norm else ''}"
    label = f"efficientnet-{m.name} G{m.group_size} e{m.expand_ratio} {norm}"
    return ModelSpec(label, cfg.data.resolution)
