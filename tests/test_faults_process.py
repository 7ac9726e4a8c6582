"""Fault matrix, part 2: runs that are killed, signalled, interrupted or starved of disk, in one
process and over two torchrun processes, with signals sent to a training process and to the
command the user started (the launcher).

Each case is generated from a fixed seed (the step, the process, the point inside the checkpoint
writes) and asserts the README's promises: the documented exit status, no traceback, the newest
complete checkpoint loads, no partial file outlives a resume, and the resumed run's losses and
final weights equal the uninterrupted run's, step for step.
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultkit import (
    ROOT,
    TWO,
    all_ended,
    child_env,
    count_write_events,
    final_weights_equal,
    full_only,
    image_folder,
    losses,
    newest_checkpoint_loads,
    no_traceback,
    partial_files,
    records,
    rng,
    run_app,
    run_args,
    same_losses,
    stopped_at,
    subset,
    wait_for,
)

pytestmark = pytest.mark.faults
one_torchrun_job_at_a_time = pytest.mark.xdist_group("torchrun")
STEPS = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The data, and an uninterrupted reference run per process count (made when first needed),
    with the number of checkpoint-write events of the one-process run."""
    tmp = tmp_path_factory.mktemp("faults")
    data = image_folder(tmp / "data")
    cache = {}

    def reference(processes: int):
        if processes not in cache:
            name = f"ref{processes}"
            args = run_args(data, tmp / "refs", name, *(TWO if processes == 2 else []), steps=STEPS)
            if processes == 1:
                cache["events"] = count_write_events(args, tmp)
            else:
                job = run_app(args, tmp)
                assert job.returncode == 0, job.stderr[-3000:]
            cache[processes] = tmp / "refs" / name
        return cache[processes]

    return data, reference, cache


def resume_and_compare(world, tmp, run: Path, processes: int, after: int):
    """Resume ``run`` to the end: exit 0, no partial file left, losses and weights as the
    uninterrupted run's."""
    data, reference, _ = world
    job = run_app(["train", "--resume", str(run)], tmp)
    assert job.returncode == 0, job.stderr[-3000:]
    no_traceback(job)
    assert partial_files(run) == []
    ref = reference(processes)
    if after < max(losses(ref)):
        same_losses(losses(run), losses(ref), after)
    else:  # killed after the last step's checkpoint (writing best.pt): the run is whole already
        assert "nothing to do" in job.stdout + job.stderr, job.stderr[-3000:]
    final_weights_equal(run, ref)


# ----------------------------------------------------------------------------- one process

SIGNAL_CASES = list(zip(["SIGTERM", "SIGINT"] * 2, rng("signal").sample(range(1, STEPS), 4)))


@pytest.mark.parametrize("sig,step", subset(SIGNAL_CASES, 1))
def test_a_signal_at_a_random_step_saves_and_resumes_exactly(world, tmp_path, sig, step):
    data, _, _ = world
    out = tmp_path / "runs"
    job = run_app(run_args(data, out, "r", steps=STEPS), tmp_path, at_step=step, action=sig)
    assert job.returncode == 128 + getattr(signal, sig), job.stderr[-3000:]
    no_traceback(job)
    assert stopped_at(job.stderr, sig) == step
    assert "python -m app train --resume" in job.stderr
    assert newest_checkpoint_loads(out / "r") == step
    resume_and_compare(world, tmp_path, out / "r", 1, step)


def write_cases():
    """Kill -9 (or a full disk) at random events of the checkpoint writes: inside a file's
    bytes, at its fsync, right after a rename (step-N.pt renamed, best.pt not yet)."""
    return [(action, i) for i in range(5) for action in ("kill", "enospc")]


@pytest.mark.parametrize("action,case", subset(write_cases(), 2))  # `make test`: a kill and a full disk
def test_a_fault_inside_a_checkpoint_write_loses_nothing(world, tmp_path, action, case):
    data, reference, cache = world
    reference(1)
    event = rng("write", action, case).randint(1, cache["events"])
    out = tmp_path / "runs"
    job = run_app(run_args(data, out, "r", steps=STEPS), tmp_path, at_event=event, event_action=action)
    run = out / "r"
    assert (run / "config.yaml").is_file()
    newest = newest_checkpoint_loads(run)  # every step-*.pt left is whole
    if action == "kill":
        assert job.returncode == -signal.SIGKILL
    else:
        assert job.returncode == 2, job.stderr[-3000:]
        no_traceback(job)
        assert f"could not write {run / 'checkpoints'}" in job.stderr and "the disk is full" in job.stderr
        assert "Still whole: the newest complete checkpoint" in job.stderr or "no checkpoint" in job.stderr
        assert f"--resume {run}" in job.stderr
        assert partial_files(run) == []  # a failed write removes its own partial file
    if newest is None:  # before the first checkpoint: nothing to resume, and it says so
        again = run_app(["train", "--resume", str(run)], tmp_path)
        assert again.returncode == 2 and "no checkpoint" in again.stderr
        no_traceback(again)
        return
    resume_and_compare(world, tmp_path, run, 1, newest)
    best = run / "checkpoints" / "best.pt"
    from app.checkpoint import load_checkpoint, own_top1, step_checkpoints

    held = load_checkpoint(best)
    assert own_top1(held) >= max(own_top1(load_checkpoint(p)) for p in step_checkpoints(best.parent))


@full_only
def test_best_is_repaired_after_a_kill_between_the_two_renames(world, tmp_path):
    """Killed right after step-N.pt's rename when it was the best: resuming makes best.pt it."""
    data, _, _ = world
    out = tmp_path / "runs"
    # the events of the first checkpoint (step 2, always the best so far), then its rename
    args = run_args(data, out, "r", steps=2)
    count = count_write_events(args, tmp_path)  # two files: step-2.pt, best.pt
    kill_at = count // 2  # the last event of the first file: its rename
    job = run_app(
        run_args(data, tmp_path / "killed", "r", steps=2), tmp_path, at_event=kill_at, event_action="kill"
    )
    assert job.returncode == -signal.SIGKILL
    run = tmp_path / "killed" / "r"
    assert newest_checkpoint_loads(run) == 2 and not (run / "checkpoints" / "best.pt").exists()
    assert partial_files(run) == []
    again = run_app(["train", "--resume", str(run)], tmp_path)  # nothing to train: only repairs
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-2000:]
    from app.checkpoint import load_checkpoint

    assert load_checkpoint(run / "checkpoints" / "best.pt")["step"] == 2


@full_only
def test_kill_at_a_random_step_resumes_exactly(world, tmp_path):
    data, _, _ = world
    step = rng("kill-step").randint(3, STEPS)
    out = tmp_path / "runs"
    job = run_app(run_args(data, out, "r", steps=STEPS), tmp_path, at_step=step, action="kill")
    assert job.returncode == -signal.SIGKILL
    newest = newest_checkpoint_loads(out / "r")
    assert newest is not None and newest < step
    resume_and_compare(world, tmp_path, out / "r", 1, newest)


@full_only
def test_stale_partial_files_are_removed_on_resume_only_when_their_writer_is_dead(world, tmp_path):
    data, _, _ = world
    out = tmp_path / "runs"
    job = run_app(run_args(data, out, "r", steps=2), tmp_path)
    assert job.returncode == 0
    folder = out / "r" / "checkpoints"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    (folder / f".step-0000004.pt.tmp-{dead}").write_bytes(b"partial")
    (folder / f".best.pt.tmp-{dead}").write_bytes(b"partial")
    alive = folder / ".step-0000009.pt.tmp-1"  # pid 1 never ends
    alive.write_bytes(b"someone else's")
    again = run_app(["train", "--resume", str(out / "r"), "train.max_steps=3"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "removed 2 partial checkpoint file(s)" in again.stdout
    assert partial_files(out / "r") == [alive.name]


@full_only
def test_a_second_ctrl_c_aborts_cleanly_and_the_newest_checkpoint_resumes(world, tmp_path):
    data, _, _ = world
    out = tmp_path / "runs"
    step = rng("second-ctrl-c").randint(3, STEPS - 1)
    job = run_app(run_args(data, out, "r", steps=STEPS), tmp_path, at_step=step, action="SIGINT2")
    assert job.returncode == 130, job.stderr[-3000:]
    no_traceback(job)
    assert "aborted without saving" in job.stderr and f"--resume {out / 'r'}" in job.stderr
    newest = newest_checkpoint_loads(out / "r")
    assert newest is not None and partial_files(out / "r") == []
    resume_and_compare(world, tmp_path, out / "r", 1, newest)


@full_only
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_start_up_leaves_no_half_made_run_folder(world, tmp_path, sig):
    data, _, _ = world
    out = tmp_path / "runs"
    job = run_app(run_args(data, out, "r", steps=STEPS), tmp_path, at_step=1, action=f"startup-{sig}")
    assert job.returncode == 128 + getattr(signal, sig), job.stderr[-3000:]
    no_traceback(job)
    assert "stopped during start-up" in job.stderr
    assert not (out / "r").exists()


@full_only
def test_two_resumes_of_one_run_cannot_both_proceed(world, tmp_path):
    data, _, _ = world
    out = tmp_path / "runs"
    assert run_app(run_args(data, out, "r", steps=2), tmp_path).returncode == 0
    run = out / "r"
    slow = child_env(tmp_path, at_step=1, action="sleep")  # a second per step: it holds the run
    first = subprocess.Popen(
        ["nice", sys.executable, "-m", "app", "train", "--resume", str(run), "train.max_steps=12"],
        cwd=ROOT,
        env=slow,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_for(lambda: records(run, "resume") != [], timeout=120)
        second = run_app(["train", "--resume", str(run), "train.max_steps=12"], tmp_path)
        assert second.returncode == 2
        no_traceback(second)
        assert "is being trained by process" in second.stderr
        assert first.wait(timeout=240) == 0
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    steps = [r["step"] for r in records(run, "train")]
    assert steps == sorted(set(steps)) and steps[-1] == 12  # no step twice


# ----------------------------------------------------------------------------- two processes


def two_process_cases():
    """(who is signalled, signal, step, rank whose hook acts): a training process, or the launcher
    (signalled from inside the job at that step, as a scheduler would)."""
    cases = []
    for i, (target, sig) in enumerate(
        [("launcher", "SIGTERM"), ("worker", "SIGTERM"), ("worker", "SIGINT"), ("launcher", "SIGINT")]
    ):
        r = rng("two", i)
        cases.append((target, sig, r.randint(1, STEPS - 1), r.randint(0, 1)))
    return cases


@one_torchrun_job_at_a_time
@pytest.mark.parametrize("target,sig,step,rank", subset(two_process_cases(), 1))
def test_two_processes_stop_in_order_and_resume_exactly(world, tmp_path, target, sig, step, rank):
    data, _, _ = world
    out = tmp_path / "runs"
    action = sig if target == "worker" else f"launcher-{sig}"
    job = run_app(
        run_args(data, out, "r", *TWO, steps=STEPS), tmp_path, at_step=step, action=action, rank=rank
    )
    assert job.returncode == 128 + getattr(signal, sig), job.stderr[-3000:]
    no_traceback(job)
    stop = stopped_at(job.stderr, sig)
    assert step <= stop <= step + 1  # a forwarded signal may land after that step's agreement
    assert newest_checkpoint_loads(out / "r") == stop
    resume_and_compare(world, tmp_path, out / "r", 2, stop)


@full_only
@one_torchrun_job_at_a_time
@pytest.mark.parametrize("victim", subset(["launcher", "worker"], 1))
def test_kill_9_in_a_two_process_job(world, tmp_path, victim):
    """kill -9 of the launcher: the job's processes notice, stop in order and say so (never
    orphaned, training on unseen); kill -9 of a training process: torchrun ends the job. Either
    way the newest checkpoint resumes exactly."""
    data, _, _ = world
    out, pids = tmp_path / "runs", tmp_path / "pids"
    pids.mkdir()
    step = rng("kill-two", victim).randint(3, STEPS - 1)
    action = "launcher-kill" if victim == "launcher" else "kill"
    job = run_app(
        run_args(data, out, "r", *TWO, steps=40),
        tmp_path,
        at_step=step,
        action=action,
        rank=rng("kill-two-rank", victim).randint(0, 1),
        pid_dir=str(pids),
    )
    assert all_ended(pids), "a process of the job is still running"
    if victim == "launcher":
        assert job.returncode == -signal.SIGKILL
        assert "has ended: stopping the job" in job.stderr
        stop = stopped_at(job.stderr, "SIGTERM")
        assert newest_checkpoint_loads(out / "r") == stop
    else:
        assert job.returncode != 0
        stop = newest_checkpoint_loads(out / "r")
        assert stop is not None and stop < step
    time.sleep(0.5)
    resume = run_app(["train", "--resume", str(out / "r"), f"train.max_steps={STEPS}"], tmp_path)
    if stop >= STEPS:
        assert resume.returncode == 0
        return
    assert resume.returncode == 0, resume.stderr[-3000:]
    same_losses(losses(out / "r"), losses(world[1](2)), stop)
    final_weights_equal(out / "r", world[1](2))
