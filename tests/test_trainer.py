"""The Trainer's frame: one teardown whatever happens, the loop's state in one place, and run
kinds that keep to their own checkpoints (the loop itself knows no kind but its own)."""

import re

import pytest

import app.train
from app.config import build_config
from app.errors import AppError
from app.run_folder import resume_command
from app.train import LoopState, RunHook, Trainer, run_training
from backends.native import NativeBackend

QUICK = [
    "device=cpu",
    "data.resolution=32",
    "data.workers=0",
    "train.micro_batch=8",
    "train.log_every=1",
    "train.ema_decay=0",
    "train.val_every=100",
]


def config(tmp_path, *overrides):
    return build_config("digits", [*QUICK, f"log.out_dir={tmp_path}", *overrides])


class Closing:
    """Records which of the run's resources were released."""

    def __init__(self, monkeypatch):
        self.closed = []
        for owner, name in ((NativeBackend, "backend"), (app.train.Tracker, "tracker")):
            monkeypatch.setattr(owner, "close", self._recorder(name, owner.close))
        real_init = app.train.init_distributed

        def init(cfg):
            ctx = real_init(cfg)
            ctx.close = lambda: self.closed.append("process group")
            return ctx

        monkeypatch.setattr(app.train, "init_distributed", init)

    def _recorder(self, name, close):
        def recording(obj, *args, **kwargs):
            self.closed.append(name)
            return close(obj, *args, **kwargs)

        return recording


def test_teardown_runs_when_a_step_raises_something_unexpected(tmp_path, monkeypatch):
    closing = Closing(monkeypatch)

    def broken_step(self, images, targets):
        raise RuntimeError("device lost")

    monkeypatch.setattr(NativeBackend, "train_step", broken_step)
    with pytest.raises(RuntimeError, match="device lost"):
        run_training(config(tmp_path, "train.max_steps=2"))
    assert sorted(closing.closed) == ["backend", "process group", "tracker"]


def test_teardown_runs_when_set_up_fails_before_the_loop(tmp_path, monkeypatch):
    closing = Closing(monkeypatch)
    with pytest.raises(AppError, match="fewer than one batch of 4096"):
        run_training(config(tmp_path, "train.micro_batch=4096"))
    assert sorted(closing.closed) == ["backend", "process group"]  # no tracker was made yet


def test_the_loop_state_says_where_the_run_is(tmp_path):
    trainer = Trainer(config(tmp_path, "train.max_steps=3", "train.val_every=0.05"))
    result = trainer.run()
    s = trainer.state
    assert isinstance(s, LoopState) and result.exit_code == 0
    assert s.step == result.last_step == 3 and s.first_step == 0 and result.steps == 3
    assert trainer.checkpointer.last_saved == 3 and 0 <= s.best <= 100 and s.epoch_rng is not None
    assert s.trained_images == result.images == 3 * 8


def test_a_checkpoint_of_another_kind_of_run_is_not_resumed_as_this_one(tmp_path):
    seen = []
    other = RunHook("other", lambda setup: seen.append(setup.host_batch))
    first = run_training(config(tmp_path, "train.max_steps=1", "log.name=other-run"), other)
    assert first.exit_code == 0 and seen == [8]
    with pytest.raises(
        AppError,
        match=f"a checkpoint of a other run, not of a train run: resume it "
        f"with {re.escape(resume_command(first.run_dir, 'other'))}",
    ):
        run_training(config(tmp_path, f"resume={first.run_dir}", "train.max_steps=2"))
    resumed = run_training(config(tmp_path, f"resume={first.run_dir}", "train.max_steps=2"), other)
    assert resumed.exit_code == 0 and resumed.last_step == 2 and seen == [8, 8]
