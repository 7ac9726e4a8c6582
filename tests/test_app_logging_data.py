"""Logging (offline Weights & Biases) and training on a folder of real JPEG files."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cli import main as cli
from app.config import build_config
from app.tracking import Tracker

QUICK = ["--device", "cpu", "data.resolution=32", "data.workers=0", "train.ema_decay=0", "train.log_every=1"]


def test_offline_wandb_writes_a_local_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))  # our dir= must win
    assert (
        cli(
            [
                "train",
                *QUICK,
                "train.micro_batch=8",
                "train.max_steps=2",
                "log.wandb=true",
                f"log.out_dir={tmp_path}",
                "log.name=w",
            ]
        )
        == 0
    )
    offline = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


def write_image_folder(root: Path, classes=("cat", "dog"), per_class=6, val_per_class=2) -> Path:
    """Real JPEGs of two easily told apart colours, plus one corrupt file in train/."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            corrupt = split == "train" and c == 0  # this class gets one broken file instead
            for i in range(n - corrupt):
                pixels = rng.integers(0, 60, (40, 48, 3), dtype=np.uint8)
                pixels[..., c] += 180
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    (root / "train" / classes[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_image_folder_with_a_corrupt_file_trains_and_counts_the_skip(tmp_path, capsys):
    data = write_image_folder(tmp_path / "images")
    # 12 train files (one corrupt), batch 4: one epoch of 3 steps reads every file.
    # the corrupt file is deliberate: its warning is expected, not a failure to report
    with pytest.warns(RuntimeWarning, match="skipped an unreadable image .*broken.jpg"):
        code = cli(
            [
                "train",
                *QUICK,
                f"data.dataset={data}",
                "train.micro_batch=4",
                "train.epochs=1",
                "schedule.warmup_epochs=1",
                f"log.out_dir={tmp_path / 'runs'}",
                "log.name=f",
            ]
        )
    out = capsys.readouterr().out
    assert code == 0
    run = tmp_path / "runs" / "f"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert len(steps) == 3 and steps[-1]["skipped_images"] >= 1
    assert "unreadable images skipped" in out
    val = [r for r in records if r["kind"] == "val"]
    assert val and val[-1]["raw@32/images"] == 4


def test_runs_on_without_the_wandb_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    tracker = Tracker(tmp_path, build_config("digits", ["log.wandb=true"]), total_steps=1)
    tracker.start_window()
    tracker.count(4, 0.5)
    tracker.log_step(1, 0.1, 1e-3)
    assert tracker.wandb is None and "wandb package is not installed" in capsys.readouterr().err
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 0.5
