"""The IPU backend in the training application: refusals before any work, an emulated pipelined
and replicated digits run that learns, and its checkpoint in a plain CPU run."""

import json
import re

import pytest

from app.cli import main as cli
from app.config import build_config
from app.objective import network_builder
from app.specs import batch_plan, device_spec, ipu_spec, model_spec, optim_spec
from backends.contract import BackendError
from ipu_options.backend import PopTorchBackend

QUICK = ["data.resolution=32", "data.workers=0", "train.log_every=1", "train.ema_decay=0"]


def backend(*overrides, device="ipu-model"):
    cfg = build_config("digits", [f"device={device}", *QUICK, *overrides])
    return PopTorchBackend(
        device_spec(cfg),
        ipu_spec(cfg),
        batch_plan(cfg),
        optim_spec(cfg),
        model_spec(cfg),
        network_builder(cfg),
    )


def test_device_ipu_refuses_without_poptorch():
    with pytest.raises(BackendError, match=r"device=ipu needs PopTorch .*--device ipu-model"):
        backend(device="ipu")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["ipu.pipeline={blocks.9.0: 1}", "train.grad_accum=3"],
            r"unknown module 'blocks.9.0'; valid split points are stem, blocks.0.0, ",
        ),
        (
            ["ipu.pipeline={blocks.3: 1}", "train.grad_accum=2"],
            r"train.grad_accum=2. PopTorch: \"You must set gradientAccumulation .*\" "
            r"Set train.grad_accum >= 3",
        ),
        (["ipu.pipeline={blocks.5: 1, blocks.3: 2}", "train.grad_accum=5"], r"must not decrease"),
        (["ipu.recompute=[blocks.2.7]"], r"ipu.recompute: unknown module 'blocks.2.7'"),
        (
            ["train.micro_batch=100000", "data.resolution=224"],
            r"does not fit: IPU0 .* MB > 630 MB.*lower train.micro_batch",
        ),
    ],
)
def test_invalid_ipu_configurations_fail_before_compilation(overrides, message, capsys):
    with pytest.raises(BackendError, match=message):
        backend(*overrides)
    assert "IPU backend:" not in capsys.readouterr().out  # refused before it was set up


def test_emulated_backend_says_so(capsys):
    b = backend("train.replicas=2", "train.micro_batch=4", "ipu.device_iterations=2")
    assert b.emulated and "emulator" in capsys.readouterr().out
    assert b.host_batch_size() == 4 * 1 * 2 * 2


def _metrics(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_pipelined_replicated_digits_training_learns_and_loads_on_cpu(tmp_path, capsys):
    out = tmp_path / "runs"
    args = [
        "train",
        "--device",
        "ipu-model",
        *QUICK,
        "train.replicas=2",
        "train.grad_accum=3",
        "train.micro_batch=4",
        "ipu.pipeline={blocks.3: 1}",
        "ipu.precision=32.32",
        "schedule.warmup_epochs=0",
        "optim.lr=0.0015",
        "train.label_smoothing=0",
        "train.max_steps=20",
        f"log.out_dir={out}",
        "log.name=ipu",
    ]
    assert cli(args) == 0
    text = capsys.readouterr().out
    assert "PopTorch emulator" in text and "(emulated)" in text
    losses = [r["loss"] for r in _metrics(out / "ipu", "train")]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    emulated_top1 = _metrics(out / "ipu", "val")[-1]["raw@32/top1"]
    assert cli(["validate", "--device", "cpu", "--checkpoint", str(out / "ipu"), *QUICK]) == 0
    cpu = capsys.readouterr().out
    top1 = float(re.search(r"raw@32: top-1\s+([0-9.]+)%", cpu).group(1))
    assert abs(top1 - emulated_top1) < 0.5  # the same weights give the same answers on the CPU


def test_make_train_b2_g16_four_replicas_on_ipu_model(tmp_path, capsys):
    # what `make train MODEL=b2 G=16 REPLICAS=4 DEVICE=ipu-model` runs, with a small batch and one step
    args = [
        "train",
        "--device",
        "ipu-model",
        "model.name=b2",
        "model.group_size=16",
        "train.replicas=4",
        *QUICK,
        "train.micro_batch=2",
        "train.max_steps=1",
        f"log.out_dir={tmp_path}",
    ]
    assert cli(args) == 0
    text = capsys.readouterr().out
    assert "4 replica(s)" in text and "emulated" in text


def test_emulated_resume_continues_from_the_checkpoint_weights_and_optimiser_state(tmp_path, capsys):
    # Weights reach the device copy before it is built, and the optimiser's momentum comes back in
    # PopTorch's own format: the resumed losses are those of the uninterrupted run.
    out = tmp_path / "runs"
    common = [
        "--device",
        "ipu-model",
        *QUICK,
        "train.micro_batch=4",
        "ipu.device_iterations=2",
        "ipu.precision=32.32",
        "schedule.warmup_epochs=0",
        f"log.out_dir={out}",
    ]
    assert cli(["train", *common, "train.max_steps=6", "log.name=whole"]) == 0
    assert cli(["train", *common, "train.max_steps=3", "log.name=part"]) == 0
    assert cli(["train", "--resume", str(out / "part"), *common, "train.max_steps=6"]) == 0
    capsys.readouterr()
    whole = [r["loss"] for r in _metrics(out / "whole", "train")]
    resumed = [r["loss"] for r in _metrics(out / "part", "train")]
    assert len(whole) == len(resumed) == 6
    assert resumed[3:] == pytest.approx(whole[3:], rel=1e-5, abs=1e-6)


def test_compile_only_builds_both_executables_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "runs"
    args = [
        "train",
        "--device",
        "ipu-model",
        *QUICK,
        "train.micro_batch=4",
        "ipu.compile_only=true",
        f"log.out_dir={out}",
        "log.name=offline",
    ]
    assert cli(args) == 0
    assert "compiled the training and inference executables" in capsys.readouterr().out
    checkpoints = out / "offline" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
