"""Fault matrix, part 1: bad input, in this process. Configuration files and values, paths,
checkpoints that are damaged, of another model, not ours or malicious, datasets with every kind of
bad image file (with and without loader workers), and every dotted field a resume could change.

Each case asserts the README's promise for a user error: exit status 2 with a message that names
the problem and the fix, no traceback, and nothing written (no run folder; a resumed run's files
untouched) — or, for what is allowed, a run that goes on.
"""

import dataclasses
import io
import os
import pickle
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from faultkit import full_only, image_folder, losses, records, rng, run_args, snapshot, subset
from PIL import Image

from app.cli import main as cli
from app.config import GLOBAL_BATCH_FIELDS, Config, build_config, dotted_fields, resume_may_change

# the unreadable images here are deliberate: their warnings are expected, not failures to report
pytestmark = [
    pytest.mark.faults,
    pytest.mark.filterwarnings("ignore:skipped an unreadable image:RuntimeWarning"),
]


def run_cli(capsys, args):
    code = cli(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished tiny run (2 steps, a checkpoint at each) to resume, validate and corrupt."""
    tmp = tmp_path_factory.mktemp("trained")
    data, out = image_folder(tmp / "data"), tmp / "runs"
    assert cli(run_args(data, out, "base", "train.val_every=0.25", steps=2)) == 0
    return data, out, out / "base"


# ----------------------------------------------------------------------------- configuration

BAD_FILES = {
    "yaml syntax error": b"model:\n  group_size: [16\noptim: {lr: 0.1}\n",
    "NUL byte": b"model:\n  name: b0\x00\n",
    "bare string": b"just some words\n",
    "a list": b"- model\n- optim\n",
    "not text": bytes(range(128, 256)),
    "bad base": b"base: [digits]\n",
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_config_file_is_a_clear_error(tmp_path, capsys, kind):
    path = tmp_path / "mine.yaml"
    path.write_bytes(BAD_FILES[kind])
    code, _, err = run_cli(capsys, ["train", "--config", str(path), f"log.out_dir={tmp_path / 'runs'}"])
    assert code == 2
    assert str(path) in err
    assert path.read_bytes() == BAD_FILES[kind]  # the user's file is untouched
    assert not (tmp_path / "runs").exists()


BAD_VALUES = {
    "train.seed=-1": "train.seed",
    "train.seed=4294967296": "train.seed",
    "optim.lr=.inf": "optim.lr",
    "optim.lr=.nan": "optim.lr",
    "optim.weight_decay=-.inf": "optim.weight_decay",
    "ipu.available_memory_proportion=[0.5,0.5,0.5]": "ipu.available_memory_proportion",
    "ipu.available_memory_proportion=[]": "ipu.available_memory_proportion",
    "optim.lr=[1,": "optim.lr",
}


@pytest.mark.parametrize("override", list(BAD_VALUES))
def test_a_bad_value_is_refused_before_any_run_folder(tmp_path, capsys, override):
    code, _, err = run_cli(capsys, ["train", override, f"log.out_dir={tmp_path / 'runs'}"])
    assert code == 2
    assert BAD_VALUES[override] in err
    assert not (tmp_path / "runs").exists()


def test_memory_proportions_per_pipeline_stage(tmp_path, capsys):
    """One value per IPU of the pipeline is right; more than its IPUs is refused naming the count."""
    pipeline = "ipu.pipeline={blocks.3: 1}"
    build_config("digits", [pipeline, "ipu.available_memory_proportion=[0.5,0.4]"])
    code, _, err = run_cli(capsys, ["plan", pipeline, "ipu.available_memory_proportion=[0.5,0.4,0.3]"])
    assert code == 2 and "2 IPUs per replica" in err


@pytest.mark.parametrize(
    "argv,says",
    [
        (["train", "--resume", "/nonexistent/run"], "no such path"),
        (["validate", "--checkpoint", "/nonexistent/run"], "no such path"),
        (["finetune", "--checkpoint", "/nonexistent/run"], "no such path"),
    ],
)
def test_a_missing_path_says_so(tmp_path, capsys, argv, says):
    code, _, err = run_cli(capsys, argv + [f"log.out_dir={tmp_path}"])
    assert code == 2 and says in err and argv[2] in err


def test_train_with_checkpoint_is_refused_naming_resume_and_init_from(trained, capsys):
    _, out, run = trained
    before = snapshot(out)
    code, _, err = run_cli(capsys, ["train", "--checkpoint", str(run)])
    assert code == 2
    assert f"--resume {run}" in err and "model.init_from=" in err
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- checkpoints


def malicious_pickle(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buffer = io.BytesIO()
    torch.save({"step": 1, "model": Payload()}, buffer, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    return buffer.getvalue()


def corrupted(kind: str, good: Path, tmp: Path, seed: int) -> bytes:
    """A file in place of a checkpoint: cut short at a random byte, empty, of another model, a
    torch file that is not a checkpoint, or a pickle that runs code when loaded."""
    data = good.read_bytes()
    if kind == "truncated":
        return data[: rng("truncate", seed).randrange(1, len(data) - 1)]
    if kind == "zero bytes":
        return b""
    if kind == "wrong architecture":
        payload = torch.load(good, weights_only=True)
        payload["arch"] = dict(payload["arch"], group_size=1)
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue()
    if kind == "malicious pickle":
        return malicious_pickle(tmp / "pwned")
    objects = {
        "a tensor": torch.zeros(3),
        "a dict": {"weights": [1, 2]},
        "a list": [torch.ones(2)],
        "a state dict": {"layer.weight": torch.ones(2, 2)},
    }
    buffer = io.BytesIO()
    torch.save(objects[kind.split(": ")[1]], buffer)
    return buffer.getvalue()


CORRUPTIONS = [
    "truncated",
    "zero bytes",
    "wrong architecture",
    "malicious pickle",
    "not ours: a tensor",
    "not ours: a dict",
    "not ours: a list",
    "not ours: a state dict",
]
CONSUMERS = ["train --resume", "validate --checkpoint", "finetune --checkpoint", "model.init_from"]
CHECKPOINT_CASES = [(c, u, s) for s, (c, u) in enumerate((c, u) for c in CORRUPTIONS for u in CONSUMERS)]


@pytest.mark.parametrize("kind,consumer,seed", subset(CHECKPOINT_CASES, 6))
def test_a_bad_checkpoint_is_a_clear_error(trained, tmp_path, capsys, kind, consumer, seed):
    """Every kind of bad file for every command that reads one: exit 2 naming the file, no code
    run, no traceback, and the run's own files untouched."""
    data, out, run = trained
    bad_run = tmp_path / "bad"
    (bad_run / "checkpoints").mkdir(parents=True)
    (bad_run / "config.yaml").write_bytes((run / "config.yaml").read_bytes())
    bad = bad_run / "checkpoints" / "step-0000009.pt"
    bad.write_bytes(corrupted(kind, run / "checkpoints" / "step-0000002.pt", tmp_path, seed))
    before = snapshot(bad_run)
    common = [f"data.dataset={data}", f"log.out_dir={tmp_path / 'runs'}"]
    argv = {
        "train --resume": ["train", "--resume", str(bad), *common],
        "validate --checkpoint": ["validate", "--checkpoint", str(bad), *common],
        "finetune --checkpoint": ["finetune", "--checkpoint", str(bad), *common],
        "model.init_from": ["train", "--config", str(run / "config.yaml"), f"model.init_from={bad}", *common],
    }[consumer]
    code, _, err = run_cli(capsys, argv)
    if kind == "not ours: a state dict" and consumer == "model.init_from":
        assert code == 2 and "do not fit this model" in err  # weights, of another network
    else:
        assert code == 2, err
        assert str(bad) in err
    assert not (tmp_path / "pwned").exists()  # the pickle's code never ran
    assert snapshot(bad_run) == before
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# ----------------------------------------------------------------------------- datasets


def bad_image(kind: str, path: Path) -> Path:
    """One image file of ``kind``; returns the path written (its name may differ)."""
    gen = np.random.default_rng(len(kind))
    pixels = gen.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    if kind == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG")
        path.write_bytes(buffer.getvalue()[:200])
    elif kind == "zero bytes":
        path.write_bytes(b"")
    elif kind == "text named .jpg":
        path.write_text("this is not an image\n")
    elif kind == "PNG named .jpg":
        Image.fromarray(pixels).save(path, "PNG")
    elif kind == "CMYK":
        Image.fromarray(pixels).convert("CMYK").save(path, "JPEG")
    elif kind == "grayscale":
        Image.fromarray(pixels[..., 0]).save(path, "JPEG")
    elif kind == "1x1":
        Image.fromarray(pixels[:1, :1]).save(path, "JPEG")
    elif kind == "extreme aspect":
        Image.fromarray(np.repeat(pixels[:1], 4, axis=0).repeat(50, axis=1)[:2]).save(path, "JPEG")
    return path


UNREADABLE = ("truncated", "zero bytes", "text named .jpg")
IMAGE_KINDS = UNREADABLE + ("PNG named .jpg", "CMYK", "grayscale", "1x1", "extreme aspect")
IMAGE_CASES = [(kind, workers) for workers in (2, 0) for kind in IMAGE_KINDS]


@pytest.mark.parametrize("kind,workers", subset(IMAGE_CASES, 2))
def test_a_bad_image_is_skipped_or_read(tmp_path, capsys, kind, workers):
    """One file of ``kind`` in each class of train/ and val/: unreadable ones are replaced and
    counted (raw and EMA passes each count their own), readable odd ones are trained on."""
    data, out = image_folder(tmp_path / "data"), tmp_path / "runs"
    for split in ("train", "val"):
        for c in (0, 1):
            bad_image(kind, data / split / f"class{c}" / "0000-odd.jpg")
    code, _, _ = run_cli(
        capsys,
        run_args(
            data, out, "r", f"data.workers={workers}", "train.val_every=1", "train.micro_batch=5", steps=3
        ),
    )
    assert code == 0
    val = records(out / "r", "val")[-1]
    expected = 2 if kind in UNREADABLE else 0
    assert val["skipped_images"] == val["raw@32/skipped_images"] == val["ema@32/skipped_images"] == expected
    assert len(losses(out / "r")) == 3


@pytest.mark.parametrize("workers", subset([2, 0], 1))
def test_no_readable_image_is_a_clear_error_from_a_worker_too(tmp_path, capsys, workers):
    data, out = tmp_path / "data", tmp_path / "runs"
    for split in ("train", "val"):
        for c in (0, 1):
            (data / split / f"c{c}").mkdir(parents=True)
            for i in range(4):
                bad_image("zero bytes", data / split / f"c{c}" / f"{i}.jpg")
    code, _, err = run_cli(capsys, run_args(data, out, "r", f"data.workers={workers}", steps=1))
    assert code == 2
    assert "could be read" in err and "Original Traceback" not in err


@pytest.mark.parametrize("layout", ["empty class in train", "class only in val"])
def test_class_folders_without_training_images_are_refused(tmp_path, capsys, layout):
    data = image_folder(tmp_path / "data")
    (data / ("train" if layout == "empty class in train" else "val") / "class9").mkdir()
    (data / "val" / "class9").mkdir(exist_ok=True)
    code, _, err = run_cli(capsys, run_args(data, tmp_path / "runs", "r", steps=1))
    assert code == 2 and "class9" in err
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- resume overrides


def field_hints():
    """Every dotted field of the configuration with its type, from the dataclasses."""

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from walk(hint, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", hint

    return dict(walk(Config, ""))


# Text fields take one of a few values: candidates to change them to (the first valid one is used).
TEXT_CHOICES = {
    "device": ["auto"],
    "model.name": ["b1"],
    "model.norm": ["group", "batch"],
    "model.init_source": ["timm"],
    "model.init_from": ["weights.pt"],
    "data.dataset": ["generated"],
    "optim.name": ["rmsprop", "sgd"],
    "schedule.name": ["exponential", "step"],
    "train.precision": ["bf16"],
    "finetune.checkpoint": ["x"],
    "finetune.trainable_from": ["blocks.5"],
    "log.name": ["renamed"],
    "log.out_dir": ["elsewhere"],
    "log.wandb_mode": ["offline"],
    "log.wandb_project": ["other"],
    "ipu.precision": ["32.32"],
    "ipu.partials": ["float"],
    "ipu.reduction": ["sum"],
    "ipu.output_mode": ["final"],
    "ipu.executable_cache": ["cache"],
    "ipu.pipeline": [{"blocks.3": 1}],
    "dist.rdzv_endpoint": ["h:1"],
    "ipu.loss_scaling": ["auto"],
}
# Fields the matrix does not change on a resume, and why.
NOT_CHANGED = {
    "resume": "the resume itself",
    "finetune.source": "set by the finetune command: marks a fine-tuning run, resumed by finetune",
    "dist.dry_run": "prints the launch command and exits: no resume happens",
    "ipu.compile_only": "builds IPU executables and stops: no training step on the CPU",
    "log.wandb": "needs the wandb package (a peer, absent in the SDK environment)",
}


def changed_value(path, hint, current):
    """A valid value for ``path`` other than ``current`` (None: no single change is valid)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    options = [a for a in args if a is not type(None)] if origin is typing.Union else [hint]
    candidates = list(TEXT_CHOICES.get(path, []))
    for option in options:
        base = typing.get_origin(option) or option
        if option is bool:
            candidates.append(not current)
        elif option is int:
            number = current if isinstance(current, int) else 1
            candidates += [number + 1, number * 2, 64]
        elif option is float:
            number = current if isinstance(current, (int, float)) and current else 0.5
            candidates += [number * 0.5, number * 1.5, 0.5]
        elif base in (list, typing.List):
            item = typing.get_args(option)[0]
            if current:
                candidates.append([type(current[0])(v) * 0.9 if item is float else v for v in current])
            candidates.append([64] if item is int else [0.5] if item is float else ["blocks.1"])
    for value in candidates:
        if value == current:
            continue
        override = f"{path}={value!r}" if not isinstance(value, (dict, list, str)) else None
        try:
            build_config("digits", [override or f"{path}={yaml_text(value)}"])
        except Exception:
            continue
        return value
    return None


def yaml_text(value):
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text[:-3].strip() if text.endswith("...") else text


def resume_cases():
    """The fields a resume may not change (and those of the global batch, which only together may
    change), and the ones it may: each family in a fixed random order."""
    cases = [p for p in field_hints() if p not in NOT_CHANGED]
    rng("resume").shuffle(cases)
    refused = [p for p in cases if not resume_may_change(p) or p in GLOBAL_BATCH_FIELDS]
    allowed = [p for p in cases if p not in refused]
    return subset(refused, 4), subset(allowed, 1)


REFUSED, ALLOWED = resume_cases()


def test_the_matrix_covers_every_field():
    """Every dotted field of the saved configuration is a field of the dataclasses, and every
    field is in the resume matrix or left out by name, with a reason."""
    hints = field_hints()
    assert set(dotted_fields(Config().to_dict())) == set(hints)
    assert set(NOT_CHANGED) <= set(hints)


@full_only
def test_the_global_batch_may_be_made_another_way_on_resume(tmp_path, trained, capsys):
    """micro-batch 2 × grad-accum 2 is the same global batch of 4: allowed, and it goes on."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained[2], copy)
    code, _, err = run_cli(
        capsys,
        ["train", "--resume", str(copy), "train.micro_batch=2", "train.grad_accum=2", "train.max_steps=3"],
    )
    assert code == 0, err
    assert [r["step"] for r in records(copy, "train")][-1] == 3


def resume_override(trained, path):
    data, out, run = trained
    saved = dotted_fields(build_config(str(run / "config.yaml")).to_dict())
    value = changed_value(path, field_hints()[path], saved[path])
    return data, out, run, value


@pytest.mark.parametrize("path", REFUSED)
def test_a_resume_that_changes_the_runs_settings_is_refused_before_any_work(trained, capsys, path):
    data, out, run, value = resume_override(trained, path)
    if value is None:
        pytest.skip(f"no single valid change of {path}")
    before = snapshot(run)
    code, out_text, err = run_cli(capsys, ["train", "--resume", str(run), f"{path}={yaml_text(value)}"])
    assert code == 2
    assert path in err
    assert "model.init_from=" in err or "configuration error" in err  # the way out, or invalid alone
    assert "resolved configuration" not in out_text  # before any work
    assert snapshot(run) == before


@pytest.mark.parametrize("path", ALLOWED)
def test_a_resume_may_change_what_the_checkpoint_does_not_hold(tmp_path, trained, capsys, path):
    data, out, run, value = resume_override(trained, path)
    if value is None:
        pytest.skip(f"no single valid change of {path}")
    copy = tmp_path / "run"
    import shutil

    shutil.copytree(run, copy)
    overrides = [f"{path}={yaml_text(value)}"]
    if path != "train.max_steps":
        overrides.append("train.max_steps=3")  # one more step
    code, _, err = run_cli(capsys, ["train", "--resume", str(copy), *overrides])
    assert code == 0, err
    resumed = [r["step"] for r in records(copy, "resume")]
    assert resumed == [2]
    steps = [r["step"] for r in records(copy, "train")]
    assert len(steps) == len(set(steps))  # no step twice


@pytest.mark.parametrize("name", ["rmsprop", "sgd"])
def test_another_optimiser_on_resume_is_refused_naming_the_way_out(trained, capsys, name):
    """The issue's case: an AdamW run resumed with optim.name=... died with a KeyError at its first
    step; now it is refused before any work, with the command of a new run from its weights."""
    _, _, run = trained
    before = snapshot(run)
    code, _, err = run_cli(capsys, ["train", "--resume", str(run), f"optim.name={name}"])
    assert code == 2
    assert f"optim.name: run 'adamw', now '{name}'" in err
    assert f"optim.name={name} model.init_from={run / 'checkpoints' / 'step-0000002.pt'}" in err
    assert snapshot(run) == before
