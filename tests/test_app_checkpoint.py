"""Checkpoints: atomic writes, pruning, RNG round trip, and architecture mismatches named."""

import random

import numpy as np
import pytest
import torch

import app.checkpoint as ckpt
from app.checkpoint import (
    CheckpointError,
    atomic_save,
    check_architecture,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
    step_checkpoints,
)
from app.cli import main as cli
from app.config import build_config
from app.train import load_initial_weights
from model import build_model


def test_crash_mid_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "step-0000001.pt"
    atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def crashing_save(obj, f):
        f.write(b"\x80\x02half a checkpoint")  # some bytes reach the disk, then the process dies
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 1, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    # A temporary file left by a killed process is never mistaken for a checkpoint.
    (path.parent / ".step-0000009.pt.tmp-4242").write_bytes(b"partial")
    assert find_checkpoint(tmp_path) == path


def test_keeps_last_n_and_best(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, {"step": step}, keep=2, is_best=step == 2)
    kept = [p.name for p in step_checkpoints(tmp_path / "checkpoints")]
    assert kept == ["step-0000004.pt", "step-0000005.pt"]
    assert load_checkpoint(find_checkpoint(tmp_path, prefer_best=True))["step"] == 2
    assert load_checkpoint(find_checkpoint(tmp_path))["step"] == 5


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    state = rng_state()
    atomic_save({"rng": state}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_architecture_mismatch_names_the_fields():
    trained = build_config("digits")
    payload = {"arch": ckpt.arch_of(trained.model, 10)}
    other = build_config("digits", ["model.group_size=1", "model.norm=group", "model.proxy_norm=false"])
    with pytest.raises(CheckpointError) as error:
        check_architecture(payload, other.model, 10, "runs/x")
    message = str(error.value)
    assert "model.group_size: checkpoint 16, this run 1" in message
    assert "model.norm: checkpoint 'layer', this run 'group'" in message
    assert "model.proxy_norm" in message and "model.name" not in message
    check_architecture(payload, trained.model, 10, "runs/x")  # the same architecture passes


def test_foreign_weights_mismatch_names_parameters():
    small = build_model("b0", num_classes=10)
    state = build_model("b0", num_classes=7).state_dict()
    with pytest.raises(CheckpointError, match=r"classifier.weight \(7, 1280\) vs \(10, 1280\)"):
        load_weights(small, state, "peer.pth")


def test_validate_refuses_checkpoint_of_another_architecture(tmp_path, capsys):
    args = [
        "--device",
        "cpu",
        "data.resolution=32",
        "data.workers=0",
        "train.micro_batch=8",
        "train.max_steps=1",
        "train.ema_decay=0",
        f"log.out_dir={tmp_path}",
        "log.name=r",
    ]
    assert cli(["train", *args]) == 0
    capsys.readouterr()
    # From the run folder alone, validate takes the run's own configuration.
    assert cli(["validate", "--checkpoint", str(tmp_path / "r")]) == 0
    assert "raw@32: top-1" in capsys.readouterr().out
    # Forcing another architecture fails before any weights are loaded, naming the difference.
    assert cli(["validate", "--checkpoint", str(tmp_path / "r"), "model.group_size=1"]) == 2
    assert "model.group_size: checkpoint 16, this run 1" in capsys.readouterr().err


def test_init_from_our_checkpoint_prefers_ema_and_keeps_a_new_classifier(tmp_path):
    trained, averaged = build_model("b0", num_classes=10), build_model("b0", num_classes=10)
    atomic_save({"model": trained.state_dict(), "ema": {"module": averaged.state_dict()}}, tmp_path / "c.pt")
    cfg = build_config(
        "digits",
        [
            "model.group_size=1",
            "model.expand_ratio=6",
            "model.norm=batch",
            "model.proxy_norm=false",
            f"model.init_from={tmp_path / 'c.pt'}",
        ],
    )
    fresh = build_model("b0", num_classes=7)
    classifier_before = fresh.classifier.weight.clone()
    load_initial_weights(fresh, cfg)
    assert torch.equal(fresh.stem.conv.weight, averaged.stem.conv.weight)
    assert not torch.equal(fresh.stem.conv.weight, trained.stem.conv.weight)
    assert torch.equal(fresh.classifier.weight, classifier_before)  # 7 classes: not from the file


def test_init_from_another_architecture_names_the_mismatch(tmp_path):
    g1 = build_config("digits", ["model.group_size=1"])
    atomic_save(
        {"model": build_model("b0", num_classes=10).state_dict(), "arch": ckpt.arch_of(g1.model, 10)},
        tmp_path / "g1.pt",
    )
    cfg = build_config("digits", [f"model.init_from={tmp_path / 'g1.pt'}"])
    with pytest.raises(CheckpointError, match="model.group_size: checkpoint 1, this run 16"):
        load_initial_weights(
            build_model("b0", group_size=16, expand_ratio=4, norm="layer", proxy_norm=True, num_classes=10),
            cfg,
        )


QUICK = [
    "--device",
    "cpu",
    "data.resolution=32",
    "data.workers=0",
    "train.micro_batch=8",
    "train.ema_decay=0",
    "train.val_every=0.01",
]  # a validation and a checkpoint every 2 steps


def test_resuming_an_older_checkpoint_is_refused_and_touches_nothing(tmp_path, capsys):
    assert cli(["train", *QUICK, "train.max_steps=4", f"log.out_dir={tmp_path}", "log.name=r"]) == 0
    folder = tmp_path / "r" / "checkpoints"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    metrics = (tmp_path / "r" / "metrics.jsonl").read_text()
    older = folder / "step-0000002.pt"
    assert cli(["train", "--resume", str(older), "train.max_steps=6"]) == 2
    err = capsys.readouterr().err
    assert "is at step 2, but its run has newer checkpoints (step-0000004.pt)" in err
    assert f"model.init_from={older}" in err and f"--resume {tmp_path / 'r'}" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing overwritten
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == metrics


def test_a_resumed_run_replaces_best_only_with_a_better_model(tmp_path):
    """best.pt holds a model better than anything this run reaches (e.g. its newer continuation was
    moved away and this one resumed from an older checkpoint): it must stay."""
    assert cli(["train", *QUICK, "train.max_steps=2", f"log.out_dir={tmp_path}", "log.name=b"]) == 0
    folder = tmp_path / "b" / "checkpoints"
    best = load_checkpoint(folder / "best.pt")
    atomic_save({**best, "best_top1": 100.0, "step": 99}, folder / "best.pt")  # a stand-in better model
    resumed = load_checkpoint(folder / "step-0000002.pt")
    atomic_save({**resumed, "best_top1": -1.0}, folder / "step-0000002.pt")  # it knows no best
    assert cli(["train", "--resume", str(tmp_path / "b"), "train.max_steps=4"]) == 0
    assert [p.name for p in step_checkpoints(folder)][-1] == "step-0000004.pt"
    assert load_checkpoint(folder / "best.pt")["step"] == 99
