"""Every evaluation of an IPU run goes through an inference executable on the (emulated) IPU: the
in-loop validation of the raw and the EMA weights, ``validate`` and its resolution sweep, and
fine-tuning's measurements before training and after batch-norm recalibration. Each test shows
where it ran (the emulated executables' call counts) and that a plain CPU run of the same weights
gives the same top-1."""

import contextlib
import io
import json
import math
import re

import pytest
import torch
from torch import nn

from app.cli import main as cli
from app.objective import Classifier
from backends.batch_norm_stats import BatchNormProbe
from ipu_options import emulator as emulator

# fp32 on the device (CPU-identical numbers); group norm learns in a few steps (batch norm's
# running statistics would still be near their start), batch norm for the recalibration
COMMON = [
    "data.workers=0",
    "train.micro_batch=8",
    "train.log_every=1",
    "model.proxy_norm=false",
    "data.resolution=32",
    "ipu.precision=32.32",
    "train.cpu_threads=1",
]
GROUP_NORM, BATCH_NORM = ["model.norm=group"], ["model.norm=batch"]
VAL_IMAGES = 360  # digits' validation split


@contextlib.contextmanager
def recorded_inference():
    """The inference executables made while inside, each with its emulator call count (runs)."""
    made = []
    original = emulator.inferenceModel

    def recording(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(emulator, "inferenceModel", recording)
        yield made


def runs_of(executables, kind=Classifier):
    return sum(e.runs for e in executables if isinstance(e.model, kind))


def run_cli(args):
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        code = cli(args)
    assert code == 0, console.getvalue()[-3000:]
    return console.getvalue()


def top1s(console):
    return {k: float(v) for k, v in re.findall(r"(\w+@\d+): top-1\s+([0-9.]+)%", console)}


def losses(console):
    return {k: float(v) for k, v in re.findall(r"(\w+@\d+): top-1 .* loss ([0-9.]+)", console)}


def train(out, norm, steps):
    with recorded_inference() as made:
        console = run_cli(
            [
                "train",
                "--device",
                "ipu-model",
                *COMMON,
                *norm,
                f"train.max_steps={steps}",
                "schedule.warmup_epochs=0",
                "optim.lr=0.004",
                "train.val_every=100",
                "train.ema_decay=0.5",
                f"log.name={norm[0][11:]}",
                f"log.out_dir={out}",
            ]
        )
    return out, out / norm[0][11:], console, made


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train(tmp_path_factory.mktemp("runs"), GROUP_NORM, 12)


def test_in_loop_validation_of_raw_and_ema_weights_runs_on_the_inference_executable(trained):
    out, run, _, made = trained
    # one validation (the last step): raw and EMA, each over every batch of 8 validation images
    assert runs_of(made) == 2 * math.ceil(VAL_IMAGES / 8)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["kind"] == "val"][-1]
    console = run_cli(["validate", "--device", "cpu", "--checkpoint", str(run), *COMMON, *GROUP_NORM])
    cpu, cpu_loss = top1s(console), losses(console)
    for kind in ("raw", "ema"):
        assert val[f"{kind}@32/top1"] == pytest.approx(cpu[f"{kind}@32"], abs=0.3)
        assert val[f"{kind}@32/loss"] == pytest.approx(cpu_loss[f"{kind}@32"], abs=2e-4)
    assert val["raw@32/loss"] != pytest.approx(val["ema@32/loss"], abs=1e-3)  # two different models


def test_validate_and_its_resolution_sweep_run_on_the_inference_executables(trained):
    _, run, _, _ = trained
    args = ["--checkpoint", str(run), *COMMON, *GROUP_NORM, "--resolutions", "32,64"]
    with recorded_inference() as made:
        emulated = run_cli(["validate", "--device", "ipu-model", *args])
    cpu = run_cli(["validate", "--device", "cpu", *args])
    assert set(top1s(emulated)) == set(top1s(cpu)) == {"raw@32", "raw@64", "ema@32", "ema@64"}
    for key, value in top1s(cpu).items():
        assert top1s(emulated)[key] == pytest.approx(value, abs=0.3), key
        assert losses(emulated)[key] == pytest.approx(losses(cpu)[key], abs=2e-4), key
    # a compiled executable has fixed input shapes: one per resolution, both weights through each
    assert len(made) == 2 and all(e.runs == 2 * math.ceil(VAL_IMAGES / 8) for e in made)
    assert runs_of(made) == 2 * 2 * math.ceil(VAL_IMAGES / 8)


def test_finetune_measurements_run_on_the_inference_executables(tmp_path, monkeypatch):
    import app.finetune

    out, run, _, _ = train(tmp_path, BATCH_NORM, 2)
    monkeypatch.setattr(app.finetune, "RECALIBRATION_IMAGES", 16)  # two batches of 8
    args = [
        "--checkpoint",
        str(run),
        *COMMON,
        *BATCH_NORM,
        "finetune.resolution=64",
        "train.max_steps=1",
        "train.ema_decay=0",
        f"log.out_dir={out}",
    ]
    with recorded_inference() as made:
        emulated = run_cli(["finetune", "--device", "ipu-model", *args, "log.name=ft-ipu"])
    cpu = run_cli(["finetune", "--device", "cpu", *args, "log.name=ft-cpu"])
    assert runs_of(made, BatchNormProbe) == 2  # the recalibration's two batches, on the device
    # before, recalibrated, and the fine-tuning run's own validation at the end
    assert runs_of(made) == 3 * math.ceil(VAL_IMAGES / 8)
    measured = (
        r"before fine-tuning, at 64: top-1 ([0-9.]+)%|"
        r"recalibrated at 64 on 2 batches: top-1 ([0-9.]+)%"
    )

    def figures(console):
        return [float(a or b) for a, b in re.findall(measured, console)]

    assert len(figures(emulated)) == 2
    assert figures(emulated) == pytest.approx(figures(cpu), abs=0.3)


def test_inference_executable_keeps_its_weights_until_they_are_copied_to_it():
    # PopTorch uploads an inference model's weights on attach and then only on copyWeightsToDevice
    # (python/_poplar_executor.py:414-417, 577-598): a host edit in between is not seen.
    net = nn.Linear(2, 1, bias=False)
    nn.init.ones_(net.weight)
    infer = emulator.inferenceModel(net, emulator.Options())
    x = torch.ones(1, 2)
    assert float(infer(x)) == 2.0
    with torch.no_grad():
        net.weight.fill_(3.0)
    assert float(infer(x)) == 2.0
    infer.copyWeightsToDevice()
    assert float(infer(x)) == 6.0


def test_backend_scores_the_weights_it_is_given(capsys):
    from app.backend import create_backend
    from app.config import build_config

    cfg = build_config("digits", ["device=ipu-model", *COMMON])
    backend = create_backend(cfg)
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    nets = [nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)) for _ in range(2)]
    for net in nets:
        with backend.evaluating(Classifier(net)):
            logits = backend.evaluate(images)
        with torch.no_grad():
            expected = Classifier(net)(images)
        torch.testing.assert_close(logits, expected)  # not the previous network's
    assert len(backend.inference_models) == 1  # one executable, the weights copied to it
