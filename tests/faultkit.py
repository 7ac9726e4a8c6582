"""What the fault matrix (tests/test_faults*.py) is made of: a tiny image folder and run, a fault
hook that every Python process of a run loads (sitecustomize), runs in child processes, and the
checks of the README's promises.

The hook reads FAULT_* environment variables:
  FAULT_AT_STEP=N, FAULT_ACTION=kill|SIGINT|SIGTERM|SIGINT2|launcher-SIGINT|launcher-SIGTERM|
      launcher-kill|startup-SIGINT|startup-SIGTERM|sleep, FAULT_RANK=r (default: every rank):
      at the N-th training loss of a training process (step N without gradient accumulation),
      ``kill`` is kill -9 of itself, SIGINT/SIGTERM/SIGHUP/SIGQUIT a signal to itself, SIGINT2 two Ctrl-C in a
      row, ``launcher-*`` that signal to the `python -m app train` command that started the job,
      ``startup-*`` the signal while the optimiser is built (after the run folder exists, before any
      step), ``sleep`` a pause at every step from N on (to hold a run open).
  FAULT_AT_EVENT=N, FAULT_EVENT_ACTION=kill|enospc: at the N-th event of the checkpoint writes
      (every write call into a checkpoint file, its fsync, its rename: kill -9 right before a
      write or fsync, right after a rename); ``enospc`` makes that write fail like a full disk.
  FAULT_COUNT_FILE=path: the number of such events, written at exit (to choose N from).
  FAULT_AT_EVAL=N, FAULT_ACTION=SIG...: that signal at the N-th evaluation pass (validate, sweeps).
  FAULT_WRITE=pattern:how:N: the N-th write through the run-folder writer (app/run_folder.py) of a
      file whose name matches the glob ``pattern`` fails: how=ENOSPC (the disk fills up part-way
      through the file), EROFS (the file system refuses it), vanish (its folder is moved away: while
      a document is being written, before a line is appended).
  FAULT_PID_DIR=folder: each process writes its pid there (to wait for every one to end).
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MATRIX_SEED = 15  # the matrix is random but the same on every run: cases are reproducible by name
FULL = os.environ.get("FAULTS_FULL", "") not in ("", "0")  # make test-faults: the whole matrix

HOOK = r"""
import os, signal, sys, time
_env = os.environ
if _env.get("FAULT_PID_DIR"):
    open(os.path.join(_env["FAULT_PID_DIR"], str(os.getpid())), "w").close()
_rank_ok = _env.get("FAULT_RANK") in (None, _env.get("RANK", "0"))

def _act(action):
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"):
        os.kill(os.getpid(), getattr(signal, action))
        time.sleep(0.2)  # delivered before the step goes on
    elif action == "SIGINT2":
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
    elif action.startswith("launcher-"):
        sig = signal.SIGKILL if action == "launcher-kill" else getattr(signal, action.split("-")[1])
        os.kill(int(_env["APP_LAUNCHER_PID"]), sig)
        time.sleep(0.5)

if _env.get("FAULT_AT_STEP") and _rank_ok:
    import torch
    import app.objective as _objective
    _at, _action = int(_env["FAULT_AT_STEP"]), _env["FAULT_ACTION"]
    if _action.startswith("startup-"):
        import app.optim as _optim, app.train as _train
        _build = _optim.build_optimizer
        def _startup(*a, **k):
            os.kill(os.getpid(), getattr(signal, _action.split("-")[1]))
            time.sleep(0.5)
            return _build(*a, **k)
        _train.build_optimizer = _startup
    else:
        _loss, _calls = _objective.smoothed_cross_entropy, [0]
        def _counted(logits, targets, smoothing=0.0):
            if torch.is_grad_enabled():
                _calls[0] += 1
                if _action == "sleep" and _calls[0] >= _at:
                    time.sleep(1.0)
                elif _calls[0] == _at:
                    _act(_action)
            return _loss(logits, targets, smoothing)
        _objective.smoothed_cross_entropy = _counted

if _env.get("FAULT_AT_EVAL"):
    import app.evaluate as _evaluate
    _eval, _evals = _evaluate.evaluate, [0]
    def _counted_eval(*a, **k):
        _evals[0] += 1
        if _evals[0] == int(_env["FAULT_AT_EVAL"]):
            _act(_env["FAULT_ACTION"])
        return _eval(*a, **k)
    _evaluate.evaluate = _counted_eval

if _env.get("FAULT_WRITE"):
    import errno, fnmatch, os.path
    import app.run_folder as _rf
    _pattern, _how, _nth = _env["FAULT_WRITE"].split(":")
    _writes = [0]

    def _due(path):
        if not fnmatch.fnmatch(os.path.basename(str(path)), _pattern):
            return False
        _writes[0] += 1
        return _writes[0] == int(_nth)

    def _error(path):
        code = getattr(errno, _how)
        return OSError(code, os.strerror(code), str(path))

    _replace_doc, _append = _rf.RunFolder._replace, _rf.RunFolder.append_line
    def _faulty_replace(self, path, content):
        if _due(path):
            if _how == "vanish":  # the folder is moved away while the file is being written
                def content(f, _content=content, _folder=self.path):
                    os.rename(_folder, str(_folder) + "-moved")
                    if callable(_content):
                        return _content(f)
                    return f.write(_content.encode() if isinstance(_content, str) else _content)
                return _replace_doc(self, path, content)
            if _how == "ENOSPC":  # the disk fills up part-way through the file
                def content(f, _error=_error(path)):
                    f.write(b"x")
                    raise _error
            else:  # a read-only file system refuses the file itself
                with self.guard(path):
                    raise _error(path)
        return _replace_doc(self, path, content)
    def _faulty_append(self, name, line):
        if _due(name):
            if _how == "vanish":  # the folder is moved away before the line is appended
                os.rename(self.path, str(self.path) + "-moved")
            else:
                with self.guard(self.path / name):
                    raise _error(self.path / name)
        return _append(self, name, line)
    _rf.RunFolder._replace, _rf.RunFolder.append_line = _faulty_replace, _faulty_append

if (_env.get("FAULT_AT_EVENT") or _env.get("FAULT_COUNT_FILE")) and _env.get("RANK", "0") == "0":
    import errno, atexit, torch
    _events, _limit = [0], int(_env.get("FAULT_AT_EVENT") or 0)
    _what = _env.get("FAULT_EVENT_ACTION", "kill")

    def _event(before):
        _events[0] += 1
        if _events[0] != _limit:
            return
        if _what == "enospc" and before:
            raise OSError(errno.ENOSPC, "No space left on device")
        if _what == "kill":
            os.kill(os.getpid(), signal.SIGKILL)

    class _Writer:
        def __init__(self, f):
            self._f = f
        def write(self, data):
            _event(True)
            return self._f.write(data)
        def __getattr__(self, name):
            return getattr(self._f, name)

    _save, _fsync, _replace = torch.save, os.fsync, os.replace
    def _counting_save(obj, f, *a, **k):
        return _save(obj, _Writer(f) if hasattr(f, "write") else f, *a, **k)
    def _checkpoint_file(path):
        return f"{os.sep}checkpoints{os.sep}" in str(path)  # not config.yaml, reports, probes
    def _counting_fsync(fd):
        link = f"/proc/self/fd/{fd}"  # a checkpoint file's (a folder's fsync may fail harmlessly)
        if not os.path.isdir(link) and _checkpoint_file(os.readlink(link)):
            _event(True)
        return _fsync(fd)
    def _counting_replace(src, dst, *a, **k):
        mine = ".tmp-" in str(src) and _checkpoint_file(src)  # a checkpoint's rename
        if mine and _what == "enospc":
            _event(True)
        result = _replace(src, dst, *a, **k)
        if mine and _what != "enospc":
            _event(False)  # kill -9 right after the rename
        return result
    torch.save, os.fsync, os.replace = _counting_save, _counting_fsync, _counting_replace
    if _env.get("FAULT_COUNT_FILE"):
        atexit.register(lambda: _events[0] and open(_env["FAULT_COUNT_FILE"], "w").write(str(_events[0])))
"""


def rng(*names) -> random.Random:
    """A generator for one family of cases, the same on every run."""
    return random.Random(f"{MATRIX_SEED}:" + ":".join(map(str, names)))


def subset(cases: List, fast: int) -> List:
    """The whole generated family for `make test-faults`, its first ``fast`` cases otherwise."""
    return cases if FULL else cases[:fast]


# A case only `make test-faults` runs (`make test` keeps a few of each family: README, Reliability).
full_only = pytest.mark.skipif(not FULL, reason="the whole fault matrix: make test-faults")


# ----------------------------------------------------------------------------- data and runs


def image_folder(root: Path, per_class: int = 8, val_per_class: int = 2, classes: int = 2) -> Path:
    """A deterministic PNG folder: train/class<k>/ and val/class<k>/."""
    gen = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = gen.integers(0, 120, (36, 36, 3), dtype=np.uint8)
                pixels[..., c % 3] += 120
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def run_args(data: Path, out: Path, name: str, *overrides: str, steps: int = 6) -> List[str]:
    """A tiny run: B0 G16 e1 LayerNorm + Proxy Norm at 32 px, AdamW, dropout and drop path on (so
    a process's random state matters), EMA on (so validation has a second pass), 4 steps per
    epoch of 4 images, a checkpoint every 2 steps."""
    return [
        "train",
        "--config",
        "digits",
        "--device",
        "cpu",
        f"data.dataset={data}",
        "data.resolution=32",
        "data.workers=0",
        "model.expand_ratio=1",
        "model.dropout=0.2",
        "model.drop_path=0.2",
        "train.micro_batch=4",
        "train.ema_decay=0.9",
        "train.log_every=1",
        "train.val_every=0.5",
        f"train.max_steps={steps}",
        "train.epochs=3",
        "train.keep_checkpoints=2",
        "schedule.warmup_epochs=0.5",
        f"log.out_dir={out}",
        f"log.name={name}",
        *overrides,
    ]


TWO = ["train.micro_batch=2", "train.replicas=2", "dist.rdzv_endpoint=127.0.0.1:0"]


def child_env(tmp: Path, **fault: str) -> Dict[str, str]:
    """The environment of a run's processes: loopback Gloo, one thread, the fault hook."""
    hook = tmp / "fault-hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in list(env):
        if name.startswith(("FAULT_", "TORCHELASTIC_", "APP_")):
            env.pop(name)
    env["PYTHONPATH"] = os.pathsep.join([str(hook), str(ROOT)])
    env.update({f"FAULT_{k.upper()}": str(v) for k, v in fault.items()})
    return env


EXPERIMENTS = ("paper", "study")  # the commands of python -m experiments


def run_app(args: List[str], tmp: Path, timeout: float = 240, **fault: str) -> subprocess.CompletedProcess:
    """``python -m app ARGS`` (``python -m experiments`` for its commands) in a child process
    (nice'd: the machine is shared), with a fault."""
    module = "experiments" if args and args[0] in EXPERIMENTS else "app"
    return subprocess.run(
        ["nice", sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=child_env(tmp, **fault),
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=ctrl_c_as_at_a_terminal,
    )


def ctrl_c_as_at_a_terminal() -> None:
    """A shell script's background job (`make test-faults &`) starts with SIGINT ignored, and its
    children inherit that: the run gets SIGINT as it would at a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def count_write_events(args: List[str], tmp: Path) -> int:
    """The checkpoint-write events of an uninterrupted run (to choose a fault point from)."""
    counter = tmp / "events.txt"
    job = run_app(args, tmp, count_file=str(counter))
    assert job.returncode == 0, job.stderr[-3000:]
    return int(counter.read_text())


# ----------------------------------------------------------------------------- the README's promises


def records(run_dir: Path, kind: str) -> List[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def losses(run_dir: Path) -> Dict[int, float]:
    """step → training loss; a step recorded twice (by a run and its resume) keeps the last."""
    return {r["step"]: r["loss"] for r in records(run_dir, "train")}


def no_traceback(job: subprocess.CompletedProcess) -> None:
    """A user-facing outcome: no Python traceback on the console (ours or torchrun's)."""
    for stream in (job.stdout, job.stderr):
        assert "Traceback (most recent call last)" not in stream, stream[-4000:]
        assert "ChildFailedError" not in stream, stream[-4000:]


def newest_checkpoint_loads(run_dir: Path) -> Optional[int]:
    """Every step checkpoint left loads as one of ours (a crash leaves none half-written); returns
    the newest step (None: none yet)."""
    from app.checkpoint import load_checkpoint, step_checkpoints

    steps = [load_checkpoint(p)["step"] for p in step_checkpoints(run_dir / "checkpoints")]
    return steps[-1] if steps else None


def partial_files(run_dir: Path) -> List[str]:
    folder = run_dir / "checkpoints"
    return sorted(p.name for p in folder.glob(".*.tmp-*")) if folder.is_dir() else []


def stopped_at(stderr: str, signame: str) -> int:
    match = re.search(rf"stopped by {signame} at step (\d+)/", stderr)
    assert match, stderr[-4000:]
    return int(match.group(1))


def same_losses(resumed: Dict[int, float], reference: Dict[int, float], after: int) -> None:
    """The resumed run's losses equal the uninterrupted run's from the step after ``after`` on."""
    later = sorted(s for s in reference if s > after)
    assert later, "nothing left to compare"
    assert [resumed.get(s) for s in later] == [reference[s] for s in later], (after, resumed, reference)


def final_weights_equal(a: Path, b: Path) -> None:
    import torch

    from app.checkpoint import find_checkpoint, load_checkpoint

    wa, wb = (load_checkpoint(find_checkpoint(r))["model"] for r in (a, b))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def wait_for(condition, timeout: float = 60.0, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return False


def all_ended(pid_dir: Path, timeout: float = 90.0) -> bool:
    """Every process that wrote its pid into ``pid_dir`` has ended."""
    from app.checkpoint import pid_alive

    return wait_for(lambda: not any(pid_alive(int(p.name)) for p in pid_dir.iterdir()), timeout)


def snapshot(folder: Path) -> Dict[str, tuple]:
    """Every file under ``folder`` with its size and modification time (what a refusal must not touch)."""
    # the run folder's lock file (app/checkpoint.py) is the kernel's lock, not data: left out
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }
