"""Time blocked on the loader per logged window (app/tracking.py): the console line and
metrics.jsonl say how much of the window training waited for data."""

import json

import app.tracking
from app.cli import main as cli
from app.config import build_config
from app.tracking import Tracker


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_wait_is_the_time_batches_take_to_arrive(tmp_path, monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(app.tracking.time, "perf_counter", clock)

    def slow_loader():
        for i in range(3):
            clock.now += 2.0  # the batch takes 2 s to arrive
            yield i

    tracker = Tracker(tmp_path, build_config(None, []), total_steps=3)
    tracker.start_window()
    for _ in tracker.timed(slow_loader()):
        clock.now += 1.0  # the step itself
        tracker.count(8, 0.5)
    tracker.log_step(3, 1.0, 0.1)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["data_wait_s"] == 6.0 and abs(record["data_wait_fraction"] - 6.0 / 9.0) < 1e-4
    assert "data wait 66.7%" in capsys.readouterr().out
    tracker.start_window()  # a new window starts from zero
    assert list(tracker.timed(iter([1, 2]))) == [1, 2]
    tracker.count(8, 0.5)
    clock.now += 1.0
    tracker.log_step(4, 1.0, 0.1)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["data_wait_s"] == 0.0 and record["data_wait_fraction"] == 0.0


def test_training_reports_the_loader_wait(tmp_path, capsys):
    assert (
        cli(
            [
                "train",
                "--device",
                "cpu",
                "data.resolution=32",
                "data.workers=0",
                "train.micro_batch=8",
                "train.max_steps=2",
                "train.log_every=1",
                "train.ema_decay=0",
                f"log.out_dir={tmp_path}",
                "log.name=w",
            ]
        )
        == 0
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all("% | ETA" in line and "data wait" in line for line in lines)
    records = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert len(steps) == 2 and all(0 <= r["data_wait_fraction"] <= 1 for r in steps)
    # workers=0: the second batch is decoded on the main process while the loop waits for it (the
    # first is fetched before the window opens, app/train.py epoch_batches)
    assert steps[1]["data_wait_s"] > 0 and steps[1]["data_wait_fraction"] > 0
