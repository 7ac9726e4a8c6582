"""Fault matrix, part 4: ``paper`` and ``study`` resume at the phase they reached.

Generated from a fixed seed (tests/faultkit.py): {paper, study groups, study resolution} × stop
signals × a random training step of the whole command (the fault hook counts the steps of every
run the command makes). The promises: exit 128 + the signal without a traceback; the command that
continues it printed and working as printed; the resumed command skips the finished phases (their
runs are not trained again), continues the interrupted one from its checkpoint with the
uninterrupted run's losses step for step, and ends with the uninterrupted command's results (the
report's accuracy tables, the study's rows, timings and dates aside).
"""

import json
import re
import signal
from pathlib import Path

import pytest
from faultkit import image_folder, losses, no_traceback, rng, run_app, subset

pytestmark = pytest.mark.faults

SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"]
TINY = [
    "--config",
    "digits",
    "--device",
    "cpu",
    "data.workers=0",
    "model.expand_ratio=1",
    "train.micro_batch=4",
    "train.max_steps=2",
    "train.log_every=1",
    "finetune.epochs=1",
    "study.seeds=[0]",
]
# training steps of the whole command: 4 phases of 2 (paper, the resolution study), 2 cells of 2
STEPS = {"paper": 8, "study groups": 4, "study resolution": 8}
TIMING = ("Measured", "images/s", "training time", "Runs:")  # report lines that differ run to run
ROW_TIMING = {
    "date",
    "load_before",
    "load_after",
    "train_seconds",
    "finetune_seconds",
    "total_seconds",
    "images_per_s",
    "command",
}


def command_args(command: str, data: Path, out: Path):
    extra = {
        "paper": ["finetune.resolution=64", "log.name=p"],
        "study groups": ["data.resolution=32", "study.variants=[G1 e6, G16 e4]"],
        "study resolution": ["finetune.resolution=64"],
    }[command]
    return [
        *command.split(),
        *TINY,
        f"data.dataset={data}",
        f"log.out_dir={out / 'runs'}",
        f"study.out_dir={out / 'rows'}",
        *extra,
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The data, and each command run once without a fault (made when first needed)."""
    tmp = tmp_path_factory.mktemp("experiments")
    data = image_folder(tmp / "data")
    made = {}

    def reference(command):
        if command not in made:
            out = tmp / command.replace(" ", "-")
            job = run_app(command_args(command, data, out), tmp)
            assert job.returncode == 0, job.stderr[-3000:]
            made[command] = out
        return made[command]

    return data, reference


def cases():
    out = []
    for command in STEPS:
        for sig in rng("experiments", command).sample(SIGNALS, 2):
            out.append((command, sig, rng("experiments", command, sig).randint(1, STEPS[command] - 1)))
    rng("experiments").shuffle(out)
    out.sort(key=lambda case: case[0] != "study groups")  # `make test`'s case: the shortest command
    return out


def run_losses(out: Path):
    """Every training run under ``out/runs``: its path inside the command's folder → its losses."""
    found = {}
    for log in (out / "runs").rglob("metrics.jsonl"):
        run = log.parent
        found[str(run.relative_to(out / "runs")).split("/", 1)[1]] = losses(run)
    return found


def results(command: str, out: Path):
    """What an uninterrupted command would give again: the report's accuracy tables (paper), the
    rows without timings (studies)."""
    if command == "paper":
        report = (out / "runs" / "p" / "report.md").read_text()
        return [line for line in report.splitlines() if not any(t in line for t in TIMING)]
    rows = next((out / "rows").glob("*.jsonl")).read_text().splitlines()
    return [{k: v for k, v in json.loads(r).items() if k not in ROW_TIMING} for r in rows]


@pytest.mark.parametrize("command,sig,moment", subset(cases(), 1))
def test_a_stopped_paper_or_study_resumes_at_its_phase(world, tmp_path, command, sig, moment):
    data, reference = world
    out = tmp_path / "out"
    job = run_app(command_args(command, data, out), tmp_path, action=sig, at_step=moment)
    assert job.returncode == 128 + int(getattr(signal, sig)), (job.returncode, job.stderr[-3000:])
    no_traceback(job)
    printed = re.search(r"-m experiments (paper|study \w+) --resume (\S+)", job.stderr)
    assert printed and printed.group(1) == command, job.stderr[-3000:]
    before = {log: log.read_bytes() for log in (out / "runs").rglob("metrics.jsonl")}
    resumed = run_app([*printed.group(1).split(), "--resume", printed.group(2)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    no_traceback(resumed)
    changed = [log for log, text in before.items() if log.read_bytes() != text]
    assert len(changed) <= 1, changed  # the interrupted run continued; the finished ones untouched
    assert run_losses(out) == run_losses(reference(command))
    assert results(command, out) == results(command, reference(command))


def kill_cases():
    """One kill -9 per command at a random step; `make test`'s case: the shortest command."""
    out = [(command, rng("experiments", command, "kill").randint(1, STEPS[command] - 1)) for command in STEPS]
    return sorted(out, key=lambda case: case[0] != "study groups")


@pytest.mark.parametrize("command,moment", subset(kill_cases(), 1))
def test_a_killed_paper_or_study_resumes_at_its_phase(world, tmp_path, command, moment):
    """kill -9 saves nothing and prints nothing: ``--resume`` of the command's folder continues
    from the phase's newest checkpoint (or its start) and ends as the uninterrupted command."""
    from experiments.progress import STATE

    data, reference = world
    out = tmp_path / "out"
    job = run_app(command_args(command, data, out), tmp_path, action="kill", at_step=moment)
    assert job.returncode == -signal.SIGKILL, job.stderr[-3000:]
    folder = next(out.rglob(STATE)).parent
    resumed = run_app([*command.split(), "--resume", str(folder)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    no_traceback(resumed)
    assert run_losses(out) == run_losses(reference(command))
    assert results(command, out) == results(command, reference(command))
