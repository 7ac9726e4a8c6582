"""The run configuration turned into the specs its components take: each gets its own, never
the whole configuration. Every batch size of a run comes from ``batch_plan``."""
from app.config import Config
from app.data import DataSpec
from backends.specs import BatchPlan, DeviceSpec
from ipu_options.options import local_replicas

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
    return BatchPlan(t.micro_batch, t.grad_accum, cfg.ipu.device_iterations, t.replicas, local_replicas(cfg))


def device_spec(cfg: Config) -> DeviceSpec:
    t = cfg.train
    return DeviceSpec(cfg.device, t.precision, t.channels_last, t.cpu_threads)


def data_spec(cfg: Config) -> DataSpec:
    """The loaders' settings; training data of an IPU run goes through poptorch.DataLoader unless
    ``data.async_loader`` is off."""
    d = cfg.data
    return DataSpec(workers=d.workers, prefetch=d.prefetch, mixup=d.mixup, cutmix_lambda=d.cutmix_lambda,
                    poptorch_loader=cfg.device in IPU_DEVICES and d.async_loader)
