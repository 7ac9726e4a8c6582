"""The run's specs (app/specs.py): every batch size from one BatchPlan, for either device kind."""

import pytest

from app.config import build_config
from app.specs import batch_plan, data_spec, device_spec, ipu_spec, model_spec, optim_spec

SIZES = ["train.micro_batch=4", "train.grad_accum=3", "train.replicas=4", "ipu.device_iterations=5"]


def test_a_cpu_process_is_one_replica_running_one_update_per_call():
    cfg = build_config("digits", SIZES + ["device=cpu"])
    plan = batch_plan(cfg)
    assert (plan.device_iterations, plan.local_replicas) == (1, 1)  # ipu.device_iterations: IPU only
    assert plan.host_batch == 4 * 3 and plan.global_batch == 4 * 3 * 4 == cfg.global_batch
    assert plan.eval_batch() == 4


def test_an_ipu_process_drives_its_share_of_the_replicas():
    cfg = build_config("digits", SIZES + ["device=ipu", "dist.instances=2"])
    plan = batch_plan(cfg)  # outside a PopRun job: replicas / instances
    assert (plan.device_iterations, plan.local_replicas, plan.micro_batches_per_call) == (5, 2, 15)
    assert plan.host_batch == 4 * 3 * 5 * 2
    assert plan.global_batch == 4 * 3 * 4 == cfg.global_batch  # per weight update, not per call
    assert plan.eval_batch(iterations=6) == 4 * 6 * 2


@pytest.mark.parametrize("device, through_poptorch", [("cpu", False), ("ipu-model", True)])
def test_data_and_device_specs_carry_only_their_own_settings(device, through_poptorch):
    cfg = build_config(
        "digits", [f"device={device}", "data.workers=3", "data.mixup=0.2", "train.precision=bf16"]
    )
    data = data_spec(cfg)
    assert (data.workers, data.mixup, data.poptorch_loader) == (3, 0.2, through_poptorch)
    assert device_spec(cfg).precision == "bf16" and device_spec(cfg).kind == device


def test_ipu_optimiser_and_model_specs_carry_what_the_ipu_layer_reads():
    cfg = build_config(
        "digits",
        [
            "device=ipu-model",
            "ipu.pipeline={blocks.4: 1}",
            "ipu.recompute=[blocks.2]",
            "ipu.precision=16.32",
            "ipu.available_memory_proportion=[0.3,0.4]",
            "train.seed=7",
            "optim.name=sgd",
            "optim.momentum=0",
            "data.resolution=40",
        ],
    )
    ipu = ipu_spec(cfg)
    assert ipu.pipeline == {"blocks.4": 1} and ipu.recompute == ("blocks.2",)
    assert ipu.precision == "16.32" and ipu.available_memory_proportion == (0.3, 0.4)
    assert ipu.seed == 7  # ipu.seed unset: the run's
    assert ipu_spec(build_config("digits", ["train.seed=7", "ipu.seed=3"])).seed == 3
    with pytest.raises(AttributeError):
        ipu.precision = "32.32"  # frozen: a component cannot change what another reads
    assert (optim_spec(cfg).name, optim_spec(cfg).momentum) == ("sgd", 0.0)
    model = model_spec(cfg)
    assert model.resolution == 40 and model.label.startswith(f"efficientnet-{cfg.model.name} ")
