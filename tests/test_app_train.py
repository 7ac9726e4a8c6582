"""The training application end to end: CLI, run folder, metrics, checkpoints, resume, NaN, signals."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import app.objective
import app.train
from app.checkpoint import find_checkpoint, load_checkpoint, step_checkpoints
from app.cli import main as cli
from app.specs import batch_plan, device_spec
from backends.native import NativeBackend
from tests.test_app_logging_data import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
# Small and quick: B0 at 32 px, tiny batches, no worker processes, no EMA lag worth waiting for.
QUICK = ["data.resolution=32", "data.workers=0", "train.micro_batch=8", "train.log_every=1"]


def read_metrics(run_dir: Path, kind: str = "train"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def only_run(out_dir: Path) -> Path:
    runs = [p for p in out_dir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_digits_end_to_end_through_python_m_app(tmp_path):
    out = tmp_path / "runs"
    cmd = [
        sys.executable,
        "-m",
        "app",
        "train",
        "--config",
        "digits",
        "--device",
        "cpu",
        *QUICK,
        "train.max_steps=3",
        "train.val_every=0.02",
        f"log.out_dir={out}",
        "train.keep_checkpoints=1",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = only_run(out)
    # the resolved configuration, as its differences from the preset, in one line
    header = [line for line in proc.stdout.splitlines() if line.startswith("# resolved configuration")]
    assert len(header) == 1 and "digits with device=cpu" in header[0] and "train.micro_batch=8" in header[0]
    assert f"run folder: {run}" in proc.stdout.splitlines()[-1]
    assert "final validation: raw@32 top-1" in proc.stdout
    saved = (run / "config.yaml").read_text()
    assert "proxy_norm: true" in saved and "max_steps: 3" in saved
    steps = read_metrics(run)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["lr"] > 0 and r["images_per_s"] > 0 for r in steps)
    val = read_metrics(run, "val")
    assert val and 0 <= val[-1]["raw@32/top1"] <= 100 and "ema@32/top1" in val[-1]
    ckpts = step_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == ["step-0000003.pt"]  # keep_checkpoints=1 pruned step 2
    assert (run / "checkpoints" / "best.pt").is_file()
    payload = load_checkpoint(ckpts[-1])
    assert payload["step"] == 3 and payload["arch"]["group_size"] == 16
    assert set(payload) >= {"model", "ema", "optimizer", "rng", "epoch_rng", "config", "step_in_epoch"}


def test_run_folder_is_never_reused(tmp_path, capsys):
    args = [
        "train",
        "--device",
        "cpu",
        *QUICK,
        "train.max_steps=1",
        "train.ema_decay=0",
        f"log.out_dir={tmp_path}",
        "log.name=same",
    ]
    assert cli(args) == 0
    (tmp_path / "same" / "notes.txt").write_text("mine")
    assert cli(args) == 0
    assert (tmp_path / "same" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "same-1" / "metrics.jsonl").is_file()
    assert len(read_metrics(tmp_path / "same")) == 1  # the first run's metrics untouched


def interrupt_at(monkeypatch, step: int, signum=signal.SIGINT):
    """Deliver ``signum`` to this process during the forward pass of training step ``step``."""
    calls = {"n": 0}
    original = app.objective.smoothed_cross_entropy

    def loss(logits, targets, smoothing=0.0):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == step:
                os.kill(os.getpid(), signum)
        return original(logits, targets, smoothing)

    monkeypatch.setattr(app.objective, "smoothed_cross_entropy", loss)


def test_resume_after_interrupt_repeats_losses_step_for_step(tmp_path, monkeypatch, capsys):
    # digits at micro-batch 8: steps 1–6 lie mid-epoch, so data position and RNG must both resume.
    args = [
        "train",
        "--device",
        "cpu",
        *QUICK,
        "train.max_steps=6",
        "train.val_every=100",
        "model.drop_path=0.2",
        "model.dropout=0.3",
    ]
    assert cli(args + [f"log.out_dir={tmp_path / 'full'}"]) == 0
    full = [r["loss"] for r in read_metrics(only_run(tmp_path / "full"))]

    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        code = cli(args + [f"log.out_dir={tmp_path / 'cut'}"])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGINT
    run = only_run(tmp_path / "cut")
    assert f"python -m app train --resume {run}" in err
    assert load_checkpoint(find_checkpoint(run))["step"] == 3
    assert cli(["train", "--resume", str(run)]) == 0
    resumed = [r["loss"] for r in read_metrics(run)]
    assert len(full) == 6 and resumed == full  # steps 1-3 before, 4-6 after the interruption


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    poison_losses(monkeypatch, lambda n: n >= 4)
    # val_every=0.01 epochs = every 2 steps of 8 images (digits: about 1440 training images)
    code = cli(
        [
            "train",
            "--device",
            "cpu",
            *QUICK,
            "train.max_steps=8",
            "train.val_every=0.01",
            f"log.out_dir={tmp_path}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 3
    assert "loss is nan at step 4" in err
    run = only_run(tmp_path)
    ckpts = step_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == ["step-0000002.pt"]
    payload = load_checkpoint(ckpts[-1])
    assert all(torch.isfinite(t).all() for t in payload["model"].values() if t.is_floating_point())
    assert read_metrics(run, "error")[0]["step"] == 4


def test_resume_across_an_epoch_boundary_with_worker_processes(tmp_path, monkeypatch, capsys):
    """JPEG folder of 12 images, batch 4: 3 steps per epoch; interrupted at step 2, resumed through
    the epoch boundary, with augmentation decoded in a worker process."""
    data = write_image_folder(tmp_path / "images")
    args = [
        "train",
        "--device",
        "cpu",
        f"data.dataset={data}",
        "data.resolution=32",
        "data.workers=1",
        "train.micro_batch=4",
        "train.epochs=2",
        "train.log_every=1",
        "train.val_every=100",
        "model.drop_path=0.2",
    ]
    full, resumed = full_and_resumed_losses(args, tmp_path, monkeypatch, at_step=2)
    assert len(full) == 6 and resumed == full


def test_a_checkpoint_carries_the_runs_losses_for_the_learning_check(tmp_path, monkeypatch):
    """A resumed run judges whether it learned (exit status 4) on the whole run's losses, as the
    run uninterrupted would: each checkpoint carries the losses so far, and a resume starts from
    them."""
    data = write_image_folder(tmp_path / "images")
    args = ["train", "--device", "cpu", f"data.dataset={data}", "data.resolution=32", "data.workers=0"]
    args += ["train.micro_batch=4", "train.epochs=2", "train.log_every=1", f"log.out_dir={tmp_path / 'r'}"]
    with monkeypatch.context() as m:
        interrupt_at(m, 4)
        assert cli(args) == 128 + signal.SIGINT
    run = only_run(tmp_path / "r")
    held = load_checkpoint(find_checkpoint(run))
    assert held["losses"] == [r["loss"] for r in read_metrics(run)][: held["step"]] and held["step"] == 4
    seen = {}
    original = app.train.Trainer.diverged

    def spy(self):
        seen["losses"] = list(self.state.losses)
        return original(self)

    monkeypatch.setattr(app.train.Trainer, "diverged", spy)
    assert cli(["train", "--resume", str(run)]) == 0
    assert seen["losses"] == [r["loss"] for r in read_metrics(run)] and len(seen["losses"]) == 6


def full_and_resumed_losses(args, tmp_path, monkeypatch, at_step: int):
    """The losses of ``args`` run through, and of the same run interrupted (SIGINT) during step
    ``at_step`` and then resumed from its folder."""
    assert cli(args + [f"log.out_dir={tmp_path / 'full'}"]) == 0
    full = [r["loss"] for r in read_metrics(only_run(tmp_path / "full"))]
    with monkeypatch.context() as m:
        interrupt_at(m, at_step)
        assert cli(args + [f"log.out_dir={tmp_path / 'cut'}"]) == 128 + signal.SIGINT
    run = only_run(tmp_path / "cut")
    assert cli(["train", "--resume", str(run)]) == 0
    return full, [r["loss"] for r in read_metrics(run)]


def poison_losses(monkeypatch, bad_calls):
    """Training losses become NaN on the given forward passes (1-based)."""
    original, calls = app.objective.smoothed_cross_entropy, {"n": 0}

    def poisoned(logits, targets, smoothing=0.0):
        loss = original(logits, targets, smoothing)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if bad_calls(calls["n"]):
                return loss * float("nan")
        return loss

    monkeypatch.setattr(app.objective, "smoothed_cross_entropy", poisoned)


@pytest.mark.skipif(
    not hasattr(torch, "amp") or not hasattr(torch.amp, "GradScaler"),
    reason="needs torch.amp.GradScaler('cpu') (torch >= 2.3)",
)
def test_fp16_loss_scaler_skips_transient_nans_then_stops(tmp_path, monkeypatch, capsys):
    """fp16 semantics on the CPU: a loss scaler that skips updates with non-finite gradients."""

    def backend_with_cpu_scaler(cfg):
        # NativeBackend keeps fp16 for CUDA
        backend = NativeBackend(dataclasses.replace(device_spec(cfg), precision="fp32"), batch_plan(cfg))
        backend.scaler = torch.amp.GradScaler("cpu")
        return backend

    monkeypatch.setattr(app.train, "create_backend", backend_with_cpu_scaler)
    args = [
        "train",
        "--device",
        "cpu",
        *QUICK,
        "train.precision=fp16",
        "train.ema_decay=0",
        "train.max_steps=6",
        "train.val_every=100",
    ]
    with monkeypatch.context() as m:
        poison_losses(m, lambda n: n in (3, 4))  # two bad steps: skipped, the run goes on
        assert cli(args + [f"log.out_dir={tmp_path / 'transient'}"]) == 0
    assert capsys.readouterr().err.count("the fp16 loss scaler skipped this update") == 2
    run = only_run(tmp_path / "transient")
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    final = load_checkpoint(find_checkpoint(run))["model"]
    assert all(torch.isfinite(t).all() for t in final.values() if t.is_floating_point())

    with monkeypatch.context() as m:
        poison_losses(m, lambda n: n >= 2)  # diverged for good: stops after 5 skipped updates
        assert cli(args + [f"log.out_dir={tmp_path / 'diverged'}"]) == 3
    assert "loss is nan at step 6" in capsys.readouterr().err


def test_resume_from_a_validation_checkpoint_with_worker_processes(tmp_path, monkeypatch, capsys):
    """Resumed at an epoch end where a validation wrote the checkpoint, with a worker process:
    the resumed process creates its (persistent) loader iterator at a point where the
    uninterrupted one only reused it, so a base seed drawn from the global RNG would shift the
    drop-path masks of every later step. The loader draws from its own generator instead."""
    data = write_image_folder(tmp_path / "images")
    args = [
        "train",
        "--device",
        "cpu",
        f"data.dataset={data}",
        "data.resolution=32",
        "data.workers=1",
        "train.micro_batch=4",
        "train.epochs=3",
        "train.log_every=1",
        "train.val_every=1",
        "model.drop_path=0.2",
        "model.dropout=0.3",
        "train.ema_decay=0",
    ]
    assert cli(args + [f"log.out_dir={tmp_path / 'full'}"]) == 0
    full = [r["loss"] for r in read_metrics(only_run(tmp_path / "full"))]
    with monkeypatch.context() as m:
        interrupt_at(m, 3)  # step 3 ends epoch 0: validated and checkpointed there
        assert cli(args + [f"log.out_dir={tmp_path / 'cut'}"]) == 128 + signal.SIGINT
    run = only_run(tmp_path / "cut")
    assert load_checkpoint(find_checkpoint(run))["step"] == 3
    assert cli(["train", "--resume", str(run)]) == 0
    assert len(read_metrics(run, "val")) == 3  # validated after the resume too
    assert len(full) == 9 and [r["loss"] for r in read_metrics(run)] == full


def all_finite(state) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_an_update_that_blows_up_the_weights_is_never_checkpointed(tmp_path, capsys):
    """SGD at lr 1e6: finite losses until the gradients overflow; a validation and checkpoint at
    every step. The update with non-finite gradients is not applied and no saved file holds NaN."""
    code = cli(
        [
            "train",
            "--device",
            "cpu",
            "data.resolution=32",
            "data.workers=0",
            "optim.name=sgd",
            "optim.lr=1000000.0",
            "schedule.warmup_epochs=0",
            "train.max_steps=10",
            "train.val_every=0.0227",
            "train.ema_decay=0",
            f"log.out_dir={tmp_path}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 3
    run = only_run(tmp_path)
    ckpts = step_checkpoints(run / "checkpoints")
    assert ckpts and all(all_finite(load_checkpoint(p)["model"]) for p in ckpts)
    assert all_finite(load_checkpoint(run / "checkpoints" / "best.pt")["model"])
    last = load_checkpoint(ckpts[-1])["step"]
    failed = read_metrics(run, "error")[0]["step"]
    assert failed == last + 1  # stopped at the first bad update; everything before it was saved
    assert f"the checkpoint of step {last}" in err and f"--resume {run}" in err
    assert "train.precision=fp32" not in err  # the run is fp32 already


def test_nonfinite_weights_are_refused_by_the_checkpoint(tmp_path, monkeypatch, capsys):
    """Weights that turn non-finite after an update with a finite loss: the checkpoint of that step
    is not written, the previous one stays the newest, and the message names it."""
    original = NativeBackend.train_step
    calls = {"n": 0}

    def poisoning_step(self, images, targets):
        out = original(self, images, targets)
        calls["n"] += 1
        if calls["n"] == 4:
            with torch.no_grad():
                next(self.classifier.parameters()).fill_(float("inf"))
        return out

    monkeypatch.setattr(NativeBackend, "train_step", poisoning_step)
    code = cli(
        [
            "train",
            "--device",
            "cpu",
            *QUICK,
            "train.max_steps=8",
            "train.val_every=0.01",
            f"log.out_dir={tmp_path}",
        ]
    )  # validation + checkpoint every 2 steps
    err = capsys.readouterr().err
    assert code == 3
    assert "weights are not finite after step 4" in err and "the checkpoint of step 2" in err
    run = only_run(tmp_path)
    assert [p.name for p in step_checkpoints(run / "checkpoints")] == ["step-0000002.pt"]
    assert load_checkpoint(run / "checkpoints" / "best.pt")["step"] == 2


def test_nan_before_the_first_checkpoint_promises_no_checkpoint(tmp_path, monkeypatch, capsys):
    poison_losses(monkeypatch, lambda n: n >= 2)
    code = cli(
        [
            "train",
            "--device",
            "cpu",
            *QUICK,
            "train.max_steps=6",
            "train.val_every=100",
            f"log.out_dir={tmp_path}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 3 and "loss is nan at step 2" in err
    assert "intact" not in err and "--resume" not in err and "train.precision=fp32" not in err
    assert "before its first checkpoint" in err and "a lower optim.lr" in err
    assert not (only_run(tmp_path) / "checkpoints").exists()


def test_resume_with_ema_every_n_steps_keeps_the_ema_exact(tmp_path, monkeypatch, capsys):
    """EMA every 3 updates, interrupted at step 4: the resumed run's next average must still count
    the 3 updates since step 3, not 2 since the interruption."""
    args = [
        "train",
        "--device",
        "cpu",
        *QUICK,
        "train.max_steps=6",
        "train.val_every=100",
        "train.ema_decay=0.9",
        "train.ema_every=3",
    ]
    assert cli(args + [f"log.out_dir={tmp_path / 'full'}"]) == 0
    full = load_checkpoint(find_checkpoint(only_run(tmp_path / "full")))
    with monkeypatch.context() as m:
        interrupt_at(m, 4)
        assert cli(args + [f"log.out_dir={tmp_path / 'cut'}"]) == 128 + signal.SIGINT
    run = only_run(tmp_path / "cut")
    assert load_checkpoint(find_checkpoint(run))["ema_step"] == 3
    assert cli(["train", "--resume", str(run)]) == 0
    resumed = load_checkpoint(find_checkpoint(run))
    assert resumed["step"] == full["step"] == 6 and resumed["ema"]["updates"] == full["ema"]["updates"]
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    assert all(
        torch.equal(full["ema"]["module"][k], resumed["ema"]["module"][k]) for k in full["ema"]["module"]
    )
