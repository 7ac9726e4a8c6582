"""Fault matrix, part 3: every write the application makes, and every way a command ends.

Generated from a fixed seed (tests/faultkit.py): each write site of the run-folder writer
(app/run_folder.py) × {a full disk part-way through the file, a read-only file system, the folder
moved away}; each long-running command × each stop signal × a random moment; a torn last line of
metrics.jsonl; a run's config.yaml edited by hand before --resume; symbolic link loops in the data
folder. The promises are the same as parts 1 and 2: the documented exit status, no traceback for a
user error, a message naming the file, the cause and the way on, nothing the user wrote changed,
no partial file left, every checkpoint left loads, and a resumed run's losses equal the
uninterrupted run's, step for step.
"""

import errno
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import yaml
from faultkit import (
    image_folder,
    losses,
    newest_checkpoint_loads,
    no_traceback,
    rng,
    run_app,
    run_args,
    same_losses,
    snapshot,
    subset,
)

pytestmark = pytest.mark.faults
STEPS = 6
SHORT = 3  # under an epoch (4 steps): a run that short is not judged on whether it learnt
SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"]
FT = ["finetune.resolution=64", "finetune.epochs=1", "train.max_steps=4", "train.log_every=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The data; an uninterrupted 6-step run; a 3-step run of the same settings (to tear, edit and
    resume); an uninterrupted fine-tuning of the 6-step run (made when first needed)."""
    tmp = tmp_path_factory.mktemp("writes")
    data = image_folder(tmp / "data")
    made = {}

    def get(name):
        if name not in made:
            if name == "ref":
                args = run_args(data, tmp / "refs", "ref", steps=STEPS)
            elif name == "short":
                args = run_args(data, tmp / "refs", "short", steps=SHORT)
            else:
                args = [
                    "finetune",
                    "--checkpoint",
                    str(get("ref")),
                    "--device",
                    "cpu",
                    "data.workers=0",
                    f"log.out_dir={tmp / 'refs'}",
                    "log.name=ft",
                    *FT,
                ]
            job = run_app(args, tmp)
            assert job.returncode == 0, job.stderr[-3000:]
            made[name] = tmp / "refs" / ("ft" if name == "ft" else name)
        return made[name]

    return data, get


def partials(folder: Path):
    """Temporary files of the run-folder writer left anywhere under ``folder``."""
    return sorted(str(p) for pattern in (".*tmp-*", ".write-probe-*") for p in folder.rglob(pattern))


def whole_log(run: Path) -> None:
    """Every line of metrics.jsonl is a complete JSON record."""
    path = run / "metrics.jsonl"
    if path.is_file():
        text = path.read_text()
        assert text == "" or text.endswith("\n"), text[-200:]
        for line in text.splitlines():
            json.loads(line)


# ----------------------------------------------------------------------------- write sites

CAUSE = {"ENOSPC": "the disk is full", "EROFS": "read-only", "vanish": "the folder is gone"}
# (site, command, file-name pattern, the n-th write of it): the n-th is drawn where a file is written
# more than once in a run (metrics records, step checkpoints)
SITES = [
    ("runs/ at start", "train", ".write-probe-*", 1),
    ("config.yaml", "train", "config.yaml", 1),
    ("metrics.jsonl", "train", "metrics.jsonl", rng("metrics").randint(2, 8)),
    ("step checkpoint", "train", "step-*.pt", rng("step").randint(1, 2)),
    ("best.pt", "train", "best.pt", 1),
    ("finetune.md", "finetune", "finetune.md", 1),
    ("validate's sweep", "validate", "*", 1),
    ("study rows", "study", "*.jsonl.partial", 2),
]


def write_cases():
    cases = [(site, how) for site in SITES for how in CAUSE]
    rng("writes").shuffle(cases)
    return cases


def command_args(command, world, out: Path, name: str):
    data, get = world
    if command == "train":
        return run_args(data, out, name, steps=STEPS)
    if command == "finetune":
        return [
            "finetune",
            "--checkpoint",
            str(get("ref")),
            "--device",
            "cpu",
            "data.workers=0",
            f"log.out_dir={out}",
            f"log.name={name}",
            *FT,
        ]
    if command == "validate":
        run = out / name
        shutil.copytree(get("ref"), run)
        return [
            "validate",
            "--checkpoint",
            str(run),
            "--device",
            "cpu",
            "data.workers=0",
            "--resolutions",
            "32,64",
        ]
    return [
        "study",
        "groups",
        "--config",
        "digits",
        "--device",
        "cpu",
        f"data.dataset={data}",
        "data.resolution=32",
        "data.workers=0",
        "train.micro_batch=4",
        "train.max_steps=2",
        "study.seeds=[0]",
        "study.variants=[G16 e4]",
        f"study.out_dir={out / name}",
        f"log.out_dir={out / name / 'runs'}",
    ]


@pytest.mark.parametrize(
    "site,how", subset(write_cases(), 1), ids=lambda v: v[0] if isinstance(v, tuple) else v
)
def test_a_failed_write_is_a_clear_error_and_loses_nothing(world, tmp_path, site, how):
    """Exit 2, no traceback, the message names the file, the cause, what is whole and (for a
    training run) the resume command; no partial file; checkpoints load; the log is whole. A
    training run resumed once the cause is gone repeats the uninterrupted run's losses."""
    label, command, pattern, nth = site
    out = tmp_path / "out"
    job = run_app(command_args(command, world, out, "r"), tmp_path, write=f"{pattern}:{how}:{nth}")
    assert job.returncode == 2, (job.returncode, job.stderr[-3000:])
    no_traceback(job)
    assert "could not write" in job.stderr and CAUSE[how] in job.stderr, job.stderr[-2000:]
    assert partials(tmp_path) == []
    if command == "validate":  # refused before the sweep, not after it
        assert "validation of" not in job.stdout
    moved = out / "r-moved"
    if command != "train" or label in ("runs/ at start", "config.yaml"):
        if label == "config.yaml" and how != "vanish":
            assert not (out / "r").exists()  # no run folder without its config.yaml
        return
    assert (
        "Still whole:" in job.stderr
        and "Then continue with: " in job.stderr
        and "python -m app train --resume" in job.stderr
    )
    if how == "vanish":
        assert "nothing was lost on disk" in job.stderr and not (out / "r").exists()
        moved.rename(out / "r")  # the user puts the folder back
    run = out / "r"
    whole_log(run)
    after = newest_checkpoint_loads(run)
    if after is None:  # it failed before the first checkpoint: nothing to resume, and it says so
        assert "no checkpoint yet" in job.stderr
        return
    if how == "EROFS":  # it leaves the run as a full disk does: resumed in those cases
        return
    resumed = run_app(["train", "--resume", str(run)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole_log(run)
    same_losses(losses(run), losses(world[1]("ref")), after)


def test_runs_being_a_file_is_refused_before_any_work(world, tmp_path):
    data, _ = world
    (tmp_path / "runs").write_text("not a folder")
    job = run_app(run_args(data, tmp_path / "runs", "r"), tmp_path)
    assert job.returncode == 2 and "is a file, not a folder" in job.stderr, job.stderr[-2000:]
    no_traceback(job)
    assert "run folder:" not in job.stdout and (tmp_path / "runs").read_text() == "not a folder"


# ----------------------------------------------------------------------------- signals


def signal_cases():
    """Each command × each stop signal, but train × SIGINT / SIGTERM: those are the family "signals,
    one process" of tests/test_faults_process.py."""
    cases = []
    for command in ("train", "finetune", "validate", "study"):
        for sig in SIGNALS if command != "train" else ["SIGHUP", "SIGQUIT"]:
            moment = rng("signal", command, sig).randint(1, 2 if command == "study" else 3)
            cases.append((command, sig, moment))
    rng("signals").shuffle(cases)
    return cases


@pytest.mark.parametrize("command,sig,moment", subset(signal_cases(), 1))
def test_every_stop_signal_ends_every_command_the_same_way(world, tmp_path, command, sig, moment):
    """Exit 128 + the signal, no traceback; a training or fine-tuning run saved at the step and
    printed the command that resumes it, which repeats the uninterrupted run's losses; a sweep
    wrote no half report."""
    out = tmp_path / "out"
    args = command_args(command, world, out, "r")
    fault = {"at_eval": moment} if command == "validate" else {"at_step": moment}
    job = run_app(args, tmp_path, action=sig, **fault)
    number = int(getattr(signal, sig))
    assert job.returncode == 128 + number, (job.returncode, job.stderr[-3000:])
    no_traceback(job)
    assert partials(tmp_path) == []
    if command == "validate":
        assert not list((out / "r").glob("resolution-sweep*"))
        return
    assert f"stopped by {sig} at step {moment}/" in job.stderr, job.stderr[-3000:]
    if command == "study":
        return
    kind = "finetune" if command == "finetune" else "train"
    run = out / "r"
    assert "Resume with:\n  " in job.stderr and f"python -m app {kind} --resume {run}" in job.stderr
    assert newest_checkpoint_loads(run) == moment
    resumed = run_app([kind, "--resume", str(run)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = world[1]("ref" if command == "train" else "ft")
    same_losses(losses(run), losses(reference), moment)


# ----------------------------------------------------------------------------- fine-tuning


def test_kill_9_during_finetuning_leaves_a_checkpoint_at_the_interval(world, tmp_path):
    """train.checkpoint_every bounds the work a kill -9 loses, fine-tuning included; the resumed
    fine-tuning repeats the uninterrupted one's losses and writes its report once."""
    out = tmp_path / "out"
    args = command_args("finetune", world, out, "r") + ["train.checkpoint_every=1"]
    job = run_app(args, tmp_path, at_step=3, action="kill")
    assert job.returncode == -9
    run = out / "r"
    assert newest_checkpoint_loads(run) == 2
    resumed = run_app(["finetune", "--resume", str(run)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    same_losses(losses(run), losses(world[1]("ft")), 2)
    assert "| + fine-tuning (4 steps) |" in (run / "finetune.md").read_text()


def test_resuming_a_finished_finetuning_keeps_its_report(world, tmp_path):
    run = tmp_path / "ft"
    shutil.copytree(world[1]("ft"), run)
    before = snapshot(run)
    job = run_app(["finetune", "--resume", str(run)], tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "had finished already" in job.stdout
    assert snapshot(run) == before, "a finished fine-tuning run was changed"


def test_a_val_every_given_to_finetune_is_honoured(world, tmp_path):
    out = tmp_path / "out"
    job = run_app(command_args("finetune", world, out, "r") + ["train.val_every=0.5"], tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    steps = [
        json.loads(line)["step"]
        for line in (out / "r" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "val"
    ]
    assert len(steps) > 1 and steps[-1] == 4, steps


# ----------------------------------------------------------------------------- a torn last line


def torn_cases():
    return [rng("torn", i).randint(1, 120) for i in range(2)]


@pytest.mark.parametrize("cut", subset(torn_cases(), 1))
def test_a_torn_last_line_is_removed_on_resume_and_every_record_kept(world, tmp_path, cut):
    run = tmp_path / "short"
    shutil.copytree(world[1]("short"), run)
    log = run / "metrics.jsonl"
    complete = log.read_bytes()
    record = json.dumps({"time": 0.0, "kind": "train", "step": 4, "epoch": 1.0, "loss": 0.5, "lr": 1e-3})
    log.write_bytes(complete + record.encode()[:cut])  # a kill mid-write
    job = run_app(["train", "--resume", str(run), f"train.max_steps={STEPS}"], tmp_path)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "removed a torn last line" in job.stdout
    assert log.read_bytes().startswith(complete)
    whole_log(run)
    same_losses(losses(run), losses(world[1]("ref")), SHORT)


# ----------------------------------------------------------------------------- an edited config.yaml

EDITS = [
    ("model", "name", "b1"),
    ("model", "group_size", 1),
    ("optim", "name", "sgd"),
    ("data", "resolution", 64),
]


def edit_cases():
    cases = list(EDITS)
    rng("edits").shuffle(cases)
    return cases


@pytest.mark.parametrize("section,key,value", subset(edit_cases(), 1))
def test_an_edited_config_yaml_is_named_on_resume(world, tmp_path, section, key, value):
    """Exit 2 without a traceback, naming the edit and the way back (not an override the user
    never gave); nothing in the run folder changes."""
    run = tmp_path / "short"
    shutil.copytree(world[1]("short"), run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config[section][key] = value
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = snapshot(run)
    job = run_app(["train", "--resume", str(run)], tmp_path)
    assert job.returncode == 2, (job.returncode, job.stderr[-3000:])
    no_traceback(job)
    assert "config.yaml was edited" in job.stderr and f"{section}.{key}" in job.stderr, job.stderr[-2000:]
    assert "without that override" not in job.stderr
    assert snapshot(run) == before


# ----------------------------------------------------------------------------- symbolic link loops

LOOPS = [(split, what) for split in ("train", "val") for what in ("image", "class folder")]


@pytest.mark.parametrize("split,what", subset(LOOPS, 1))
def test_a_symbolic_link_loop_in_the_data_is_named(tmp_path, split, what):
    data = image_folder(tmp_path / "data")
    folder = data / split / "class0"
    link = folder / "loop.png" if what == "image" else data / split / "loop"
    os.symlink(link.name, link)  # points at itself
    with pytest.raises(OSError) as raised:
        link.stat()
    assert raised.value.errno == errno.ELOOP
    out = tmp_path / "runs"
    job = run_app(run_args(data, out, "r"), tmp_path)
    assert job.returncode == 2, (job.returncode, job.stderr[-3000:])
    no_traceback(job)
    assert str(link) in job.stderr and "symbolic link" in job.stderr
    assert not (out / "r").exists()


def test_batch_norm_on_one_value_is_refused_before_any_run_folder(world, tmp_path):
    data, _ = world
    out = tmp_path / "runs"
    job = run_app(
        run_args(data, out, "r", "train.micro_batch=1", "model.norm=batch", "model.proxy_norm=false"),
        tmp_path,
    )
    assert job.returncode == 2 and "train.micro_batch=1" in job.stderr, job.stderr[-2000:]
    no_traceback(job)
    assert not out.exists() or not any(out.iterdir())
