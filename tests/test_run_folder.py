"""The run-folder writer (app/run_folder.py) and the Checkpointer (app/checkpointer.py), in process."""

import errno
import json

import pytest
import torch

from app.checkpointer import Checkpointer, CheckpointSpec
from app.errors import AppError
from app.run_folder import RunFolder, RunFolderError, check_output_root, resume_command


def failing(code):
    def write(f):
        f.write(b"half")
        raise OSError(code, "injected")

    return write


def test_a_failed_document_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    folder = RunFolder(tmp_path, resume=resume_command(tmp_path))
    folder.write_document("config.yaml", "old: 1\n")
    with pytest.raises(RunFolderError) as raised:
        folder.write_document("config.yaml", failing(errno.ENOSPC))
    assert (tmp_path / "config.yaml").read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    text = str(raised.value)
    assert str(tmp_path / "config.yaml") in text and "the disk is full (ENOSPC)" in text
    assert f"python -m app train --resume {tmp_path}" in text


@pytest.mark.parametrize(
    "code,says",
    [
        (errno.EROFS, "read-only"),
        (errno.EIO, "I/O error"),
        (errno.ELOOP, "symbolic link"),
        (errno.EDQUOT, "quota"),
    ],
)
def test_every_cause_is_named_with_its_fix(tmp_path, code, says):
    with pytest.raises(RunFolderError, match=says):
        RunFolder(tmp_path).write_document("x.md", failing(code))
    assert isinstance(RunFolderError(tmp_path, OSError(code, "x")), AppError)  # exit 2


def test_a_folder_moved_away_is_not_made_again(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    folder = RunFolder(run, whole=lambda: "the newest checkpoint")
    run.rename(tmp_path / "moved")
    for write in (
        lambda: folder.write_document("checkpoints/step-0000001.pt", b"x"),
        lambda: folder.append_line("metrics.jsonl", "{}"),
    ):
        with pytest.raises(RunFolderError, match="the folder is gone.*Still whole: the newest checkpoint"):
            write()
    assert not run.exists()


def test_a_failed_append_is_cut_back_and_a_torn_line_repaired(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path)
    folder.append_line("metrics.jsonl", json.dumps({"step": 1}))
    log = tmp_path / "metrics.jsonl"
    whole = log.read_bytes()
    log.write_bytes(whole + b'{"step": 2, "lo')  # a kill mid-write
    assert folder.repair_log("metrics.jsonl") == len(b'{"step": 2, "lo')
    assert log.read_bytes() == whole and folder.repair_log("metrics.jsonl") == 0

    class Full:  # a file whose write fills the disk part-way
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def tell(self):
            return self.f.tell()

        def write(self, data):
            self.f.write(data[:5])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def truncate(self, size):
            return self.f.truncate(size)

    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda path, mode="r", *a, **k: (
            Full(real_open(path, mode, *a, **k))
            if str(path) == str(log) and mode == "ab"
            else real_open(path, mode, *a, **k)
        ),
    )
    with pytest.raises(RunFolderError, match="disk is full"):
        folder.append_line("metrics.jsonl", json.dumps({"step": 2}))
    monkeypatch.undo()
    assert log.read_bytes() == whole


def test_a_report_is_never_overwritten(tmp_path, capsys):
    folder = RunFolder(tmp_path)
    first = folder.write_report("finetune.md", "first")
    second = folder.write_report("finetune.md", "second")
    assert (first.name, second.name) == ("finetune.md", "finetune-1.md")
    assert first.read_text() == "first" and second.read_text() == "second"
    assert "exists and is kept" in capsys.readouterr().out


def test_the_output_root_is_checked_before_any_work(tmp_path):
    (tmp_path / "runs").write_text("a file")
    with pytest.raises(AppError, match="is a file, not a folder"):
        check_output_root(tmp_path / "runs")
    check_output_root(tmp_path / "new" / "runs")
    assert list((tmp_path / "new" / "runs").iterdir()) == []  # made, and the probe removed


class Part:
    def __init__(self, value):
        self.value = torch.tensor([value])

    def state_dict(self):
        return {"value": self.value.clone()}

    def load_state_dict(self, state):
        self.value = state["value"].clone()


def test_the_checkpointer_saves_keeps_and_restores(tmp_path):
    spec = CheckpointSpec(keep=2, every_steps=3, every_minutes=None)
    saver = Checkpointer(spec, "train", is_main=True)
    saver.attach(RunFolder(tmp_path))
    assert [s for s in range(1, 10) if saver.due(s)] == [3, 6, 9]
    parts = {"model": Part(1.0), "ema": None, "optimizer": Part(2.0), "backend": Part(3.0)}
    for step in (3, 6, 9):
        payload = saver.payload(
            step,
            4,
            parts,
            {"ema_step": step, "best_top1": 50.0, "epoch_rng": None},
            {"metrics": {}, "config": {"train": {}}},
        )
        saver.save(payload)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-0000006.pt", "step-0000009.pt"]
    assert saver.last_saved == 9 and payload["epoch"] == 2 and payload["step_in_epoch"] == 1

    resumer = Checkpointer(spec, "train", is_main=True)
    resumed = resumer.open_resume(str(tmp_path), lambda p: p, lambda saved, run, path: None)
    resumer.attach(RunFolder(tmp_path))
    fresh = {"optimizer": Part(0.0), "backend": Part(0.0), "ema": None}
    counters = resumer.restore(fresh)
    assert resumed["step"] == counters["step"] == 9 and counters["best_top1"] == 50.0
    assert fresh["optimizer"].value.item() == 2.0 and fresh["backend"].value.item() == 3.0
    with pytest.raises(AppError, match="a checkpoint of a train run, not of a finetune run"):
        Checkpointer(spec, "finetune", is_main=False).open_resume(str(tmp_path), lambda p: p, lambda *a: None)


def test_the_time_interval_asks_for_a_checkpoint_once_it_has_passed(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("app.checkpointer.time.monotonic", lambda: clock[0])
    saver = Checkpointer(CheckpointSpec(keep=1, every_steps=None, every_minutes=2.0), "train", is_main=True)
    clock[0] += 119.0
    assert not saver.due(7)
    clock[0] += 1.0
    assert saver.due(8)
    saver.saved(8)  # the interval starts again at each checkpoint, validation's included
    assert not saver.due(9) and saver.last_saved == 8
