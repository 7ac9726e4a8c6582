"""What a user types and reads: the learning-rate rule per optimiser, a run that did not learn,
commands printed for the user that run as printed, `make` targets, the one-line configuration."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import build_parser, own_job
from app.cli import main as cli
from app.config import build_config, changes_from_preset
from app.finetune import finetune_config, finetune_lr
from app.optim import describe_peak_lr, divergence_warning, lr_scaling_rule, peak_lr
from app.plan import job_line
from app.resolution import recipe_native
from app.run_folder import python_command, resume_command, resume_hint
from app.train import DIVERGED, LoopState, Trainer, run_training, steps_per_epoch_text
from backends.process import TORCHRUN_ENV, DistContext

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- learning-rate rule


@pytest.mark.parametrize(
    "preset, overrides, rule",
    [
        ("b0-g16-lnpn", [], "linear"),  # RMSprop: the paper's rate per image
        ("digits", ["optim.name=sgd", "optim.lr_scaling=auto"], "linear"),
        ("digits", ["optim.lr_scaling=auto"], "sqrt"),  # AdamW's own rule
        ("digits", [], "none"),  # the digits preset's measured choice
        ("digits", ["optim.lr_scaling=linear"], "linear"),
    ],
)
def test_the_scaling_rule_suits_the_optimiser(preset, overrides, rule):
    assert lr_scaling_rule(build_config(preset, overrides)) == rule


def test_peak_rate_by_rule_and_the_scale_line_names_the_rule():
    assert build_config("digits", ["train.replicas=4"]).global_batch == 128
    base = ["train.replicas=4", "optim.lr=0.002", "optim.lr_reference_batch=32"]
    rates = {
        rule: peak_lr(build_config("digits", [*base, f"optim.lr_scaling={rule}"]))
        for rule in ("linear", "sqrt", "none")
    }
    assert rates == pytest.approx({"linear": 0.008, "sqrt": 0.004, "none": 0.002})
    line = describe_peak_lr(
        build_config("digits", ["train.replicas=4", "optim.lr_scaling=sqrt", "optim.lr_reference_batch=32"])
    )
    assert "× √(128/32)" in line and "square-root" in line
    paper = describe_peak_lr(build_config("b0-g16-lnpn"))
    assert "× 768/256 = 0.04688" in paper and "rate per image" in paper


def test_the_digits_preset_at_four_replicas_is_not_a_rate_known_to_diverge():
    """The headline command's configuration (make train MODEL=b2 G=16 REPLICAS=4): its peak rate
    stays below the preset's measured divergence; the old linear rule's 0.008 does not."""
    headline = build_config("digits", ["model.name=b2", "model.group_size=16", "train.replicas=4"])
    assert divergence_warning(headline) is None
    linear = build_config("digits", ["model.name=b2", "train.replicas=4", "optim.lr_scaling=linear"])
    warning = divergence_warning(linear)
    assert warning is not None and "optim.lr=" in warning and "optim.lr_scaling=" in warning


# ----------------------------------------------------------------------------- did not learn


class _Records:
    def __init__(self):
        self.written = []

    def write(self, record):
        self.written.append(record)


def _finished(losses, top1, steps=20, steps_per_epoch=10):
    trainer = Trainer(build_config("digits"))
    trainer.dist, trainer.tracker = DistContext(), _Records()
    trainer.state = LoopState(step=steps, losses=list(losses), results={"raw@32": {"top1": top1}})
    trainer.steps_per_epoch, trainer.num_classes, trainer.base_lr = steps_per_epoch, 10, 0.008
    return trainer


def test_a_run_at_chance_with_a_growing_loss_is_flagged(capsys):
    trainer = _finished([2.3, 2.4, 3.5, 4.8, 5.9, 6.0, 5.9, 6.1], top1=9.72)
    assert trainer.diverged()
    err = capsys.readouterr().err
    assert "did not learn" in err and "9.72%" in err and "optim.lr=" in err
    assert f"Exit status {DIVERGED}" in err
    assert trainer.tracker.written[-1]["kind"] == "error"


@pytest.mark.parametrize(
    "losses, top1, steps",
    [
        ([2.3, 2.0, 1.5, 1.0, 0.8, 0.7, 0.6, 0.5], 9.0, 20),  # at chance, but the loss fell: not this
        ([2.3, 2.4, 3.5, 4.8, 5.9, 6.0, 5.9, 6.1], 60.0, 20),  # the loss grew, but it learned
        ([2.3, 2.4, 3.5, 4.8, 5.9, 6.0, 5.9, 6.1], 9.0, 5),  # less than an epoch: too short to tell
        ([2.3, 2.4, 3.5, 4.8, 5.9, 6.1], 9.0, 20),  # one loss a quarter: too few to tell
    ],
)
def test_runs_that_learned_or_were_too_short_are_not_flagged(capsys, losses, top1, steps):
    assert not _finished(losses, top1, steps=steps).diverged()
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- steps per epoch


def test_steps_per_epoch_count_weight_updates_of_the_global_batch():
    cfg = build_config("digits", ["train.replicas=4"])
    assert steps_per_epoch_text(cfg, 11, 1) == "11 steps/epoch of the global batch 128"
    assert steps_per_epoch_text(cfg, 3, 4).startswith("12 steps/epoch of the global batch 128 (3 host")


# ----------------------------------------------------------------------------- printed commands


def test_the_printed_resume_command_runs_from_the_project_folder(monkeypatch, tmp_path):
    """The interpreter it names exists (the project's .venv/bin/python when run from it), and the
    rest parses as the resume of that run folder."""
    monkeypatch.chdir(ROOT)
    run = "runs/b0-g16-layer-pn-digits-1"
    words = shlex.split(resume_command(run))
    assert os.access(ROOT / words[0], os.X_OK) or os.access(words[0], os.X_OK)
    assert words[0] == python_command()
    assert words[1:3] == ["-m", "app"]
    args = build_parser().parse_intermixed_args(words[3:])
    assert (args.command, args.resume) == ("train", run)
    hint = resume_hint(run)
    assert f"make train RESUME={run}" in hint


def test_the_printed_resume_command_resumes(tmp_path, monkeypatch):
    """A run that ended at step 2: the resume command, run as printed, takes it to step 4."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "runs"
    args = [
        "train",
        "data.workers=0",
        "train.micro_batch=8",
        "train.max_steps=2",
        "train.val_every=100",
        f"log.out_dir={out}",
        "log.name=r",
        "model.name=b0",
    ]
    assert (
        subprocess.run(
            [sys.executable, "-m", "app", *args], cwd=ROOT, capture_output=True, timeout=300
        ).returncode
        == 0
    )
    words = shlex.split(resume_command(out / "r")) + ["train.max_steps=4"]
    done = subprocess.run(words, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout and "step      4/4" in done.stdout


def _make_n(*words):
    return subprocess.run(["make", "-n", *words], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout


@pytest.mark.skipif(
    not any((Path(p) / "make").exists() for p in os.environ.get("PATH", "").split(":")), reason="no make"
)
def test_make_variables_resume_plan_and_bench():
    resume = _make_n("train", "RESUME=runs/r", "MODEL=b2")
    assert "--resume runs/r" in resume and "--config" not in resume  # the run's own configuration
    assert "--config digits" in _make_n("train")
    assert "--config" not in _make_n("plan", "MODEL=b2", "G=16")  # the model's own job
    assert "--config digits" in _make_n("plan", "CONFIG=digits")
    assert "--results" not in _make_n("bench") and "--results" in _make_n("bench-report")
    shown = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert all(word in shown for word in ("train", "plan", "bench-report", "RESUME=", "REPLICAS=", ".venv"))


# ----------------------------------------------------------------------------- plan


def test_plan_without_config_plans_the_models_own_imagenet_job():
    preset, overrides = own_job(["model.name=b2", "model.group_size=16"])
    assert preset == "b2-g16-lnpn" and "data.dataset=imagenet" in overrides
    cfg = build_config(preset, overrides)
    line = job_line(cfg, preset, chosen=True)
    assert line.startswith("plan: B2 G16") and "ImageNet (1000 classes) at 260 px" in line
    assert "micro-batch 32" in line and "CONFIG=" in line
    assert own_job(["model.norm=group", "model.group_size=1", "data.dataset=digits"]) == (
        "b0-g1-gn",
        ["model.norm=group", "model.group_size=1", "data.dataset=digits"],
    )


# ----------------------------------------------------------------------------- one configuration line


def test_the_resolved_configuration_is_one_line_of_differences(capsys, monkeypatch):
    assert changes_from_preset(build_config("digits"), "digits") == "nothing"
    assert cli(["train", "--dry-run", "model.name=b2", "train.replicas=4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = [line for line in out if line.startswith("# resolved configuration")]
    assert len(header) == 1 and "digits with" in header[0]
    assert "model.name=b2" in header[0] and "train.replicas=4" in header[0] and "group_size" not in header[0]
    assert len(out) <= 3  # the line, the launch command
    monkeypatch.setenv(TORCHRUN_ENV, "x")  # a process torchrun started: the launcher printed it
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert cli(["train", "--dry-run", "--device", "cpu"]) == 0
    assert "resolved configuration" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- the headline at CI size


def test_the_recipe_native_size_and_the_digits_finetune_default():
    digits = build_config("digits")
    assert digits.finetune.resolution == digits.data.resolution == 32  # make finetune after make train
    assert recipe_native(digits, finetune_resolution_given=False) == 96  # make paper's N
    assert recipe_native(build_config("digits", ["finetune.resolution=64"]), True) == 64
    assert recipe_native(build_config("b2-g16-lnpn"), False) == 260


def test_four_replicas_worth_of_global_batch_learns(tmp_path):
    """The headline command's scaling path (global batch 128 = 4 × 32, the preset's rate rule) at a
    size CI affords: B0 for 4 epochs (44 updates) in one process, accumulating 4 micro-batches of 32
    (the same global batch, rate and schedule as train.replicas=4). The linear rule's 0.008 ended
    such runs at chance; this one must learn and exit 0."""
    cfg = build_config(
        "digits",
        [
            "device=cpu",
            "train.grad_accum=4",
            "train.epochs=4",
            "train.val_every=4",
            f"log.out_dir={tmp_path}",
            "log.name=r",
        ],
    )
    assert cfg.global_batch == 128
    result = run_training(cfg)
    assert result.exit_code == 0
    top1 = max(r["top1"] for r in result.results.values())
    assert top1 > 60.0, result.results


def test_fine_tuning_scales_its_sgd_rate_per_image_whatever_the_training_rule():
    cfg = build_config("digits")  # AdamW, not scaled with the batch (optim.lr_scaling=none)
    ft = finetune_config(cfg, {}, Path("runs/r/checkpoints/best.pt"), 32)
    assert lr_scaling_rule(ft) == "linear" and ft.optim.lr_diverges_at is None
    assert peak_lr(ft) == pytest.approx(finetune_lr(cfg)) == pytest.approx(2**-8 * 32)
