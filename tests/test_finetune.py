"""Fine-tuning: freezing (frozen parameters and statistics bit-identical after training), batch-norm
recalibration (only running statistics change, to the exact batch statistics), and a tiny
end-to-end finetune."""

import contextlib
import io

import pytest
import torch
import torch.nn.functional as F

from app.finetune import batch_norm_layers, freeze_before, recalibrate_batch_norm, trainable_parameters
from model import build_model


def _b0(norm="batch", **kw):
    return build_model("b0", group_size=16, expand_ratio=4, norm=norm, num_classes=10, **kw)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_freeze_before_last_stage_keeps_frozen_layers_bit_identical():
    model = _b0(drop_path=0.2)
    frozen = freeze_before(model, "blocks.6")
    assert frozen and all(n.startswith(("stem.", "blocks.")) for n in frozen)
    assert not any(n.startswith("blocks.6.") for n in frozen)
    trainable = trainable_parameters(model)
    assert trainable and all(n.startswith(("blocks.6.", "head.", "classifier.")) for n in trainable)
    assert len(frozen) + len(trainable) == len(list(model.parameters()))

    before = _snapshot(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        model.train()  # what the training loop does every step
        x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    # frozen: every parameter and every batch-norm statistic untouched (the layers stayed in eval)
    frozen_keys = [k for k in before if k.startswith(("stem.", "blocks.")) and not k.startswith("blocks.6.")]
    assert all(torch.equal(before[k], after[k]) for k in frozen_keys)
    assert model.stem.training is False and model.blocks[0].training is False
    assert model.blocks[6].training and model.head.training
    # trainable: changed
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert not torch.equal(before["blocks.6.0.project.conv.weight"], after["blocks.6.0.project.conv.weight"])
    assert not torch.equal(before["head.norm.running_mean"], after["head.norm.running_mean"])


def test_freeze_before_other_layers_and_bad_names():
    model = _b0(norm="layer", proxy_norm=True)
    assert freeze_before(model, "stem") == []
    model = _b0(norm="layer", proxy_norm=True)
    freeze_before(model, "classifier")
    assert trainable_parameters(model) == ["classifier.weight", "classifier.bias"]
    model = _b0(norm="layer", proxy_norm=True)
    freeze_before(model, "blocks.5.2")  # inside a stage: blocks 5.0 and 5.1 frozen, 5.2 on trainable
    names = trainable_parameters(model)
    assert names[0].startswith("blocks.5.2.") and not any(n.startswith("blocks.5.1.") for n in names)
    with pytest.raises(ValueError, match="trainable_from='blocks.9'.*blocks.<stage>"):
        freeze_before(_b0(), "blocks.9")


def test_batch_norm_recalibration_changes_only_running_statistics():
    model = _b0(dropout=0.5, drop_path=0.2)
    model.train()
    before = _snapshot(model)
    momenta = [m.momentum for m in batch_norm_layers(model)]
    batches = [(torch.randint(0, 256, (4, 3, 48, 48)).float(), torch.zeros(4)) for _ in range(3)]

    # the stem norm's input, to check the statistics are the exact average of the batch statistics
    stem_inputs = []
    hook = model.stem.conv.register_forward_hook(lambda m, i, o: stem_inputs.append(o.detach()))
    used = recalibrate_batch_norm(model, batches)
    hook.remove()

    assert used == 3
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    assert changed and all(k.endswith(statistics) for k in changed)
    assert all(p.grad is None for p in model.parameters())
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert [m.momentum for m in batch_norm_layers(model)] == momenta
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in stem_inputs]).mean(0)
    variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in stem_inputs]).mean(0)
    torch.testing.assert_close(model.stem.norm.running_mean, means, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.stem.norm.running_var, variances, rtol=1e-4, atol=1e-4)


def test_recalibration_is_a_no_op_without_batch_norm():
    model = _b0(norm="layer", proxy_norm=True)
    before = _snapshot(model)
    assert recalibrate_batch_norm(model, [torch.zeros(2, 3, 32, 32)]) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_recalibration_reaches_frozen_layers_and_keeps_them_frozen():
    model = _b0()
    freeze_before(model, "blocks.6")
    before = model.stem.norm.running_mean.clone()
    recalibrate_batch_norm(model, [torch.randn(2, 3, 32, 32) * 50])
    assert not torch.equal(before, model.stem.norm.running_mean)
    model.train()
    assert not model.stem.training  # still locked in eval after recalibration


def test_training_images_with_validation_preprocessing():
    """data.augment=false (what fine-tuning sets): training images are resized and centre-cropped
    exactly as for validation, the same whatever the augmentation seed."""
    from app.config import build_config
    from app.data import build_dataset
    from app.data.transforms import val_transform

    plain = build_dataset(build_config("digits", ["data.augment=false"]), "train", 40)
    a, b = plain.sample(3, seed=1)[0], plain.sample(3, seed=2)[0]
    assert torch.equal(a, b) and torch.equal(a, val_transform(plain.image(3), 40))
    augmented = build_dataset(build_config("digits"), "train", 40)
    assert not torch.equal(augmented.sample(3, seed=1)[0], augmented.sample(3, seed=2)[0])


# ----------------------------------------------------------------------------- end to end

QUICK = [
    "--device",
    "cpu",
    "data.workers=0",
    "train.micro_batch=8",
    "train.log_every=1",
    "model.norm=batch",
    "model.proxy_norm=false",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits B0 with batch norm trained 2 steps at 32, validated at 32 and 40: (runs folder,
    run folder, console output)."""
    from app.cli import main as cli

    out = tmp_path_factory.mktemp("runs")
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        code = cli(
            [
                "train",
                "--config",
                "digits",
                *QUICK,
                "data.resolution=32",
                "data.val_resolutions=[32,40]",
                "train.max_steps=2",
                "train.val_every=100",
                "log.name=src",
                f"log.out_dir={out}",
            ]
        )
    assert code == 0, console.getvalue()[-2000:]
    return out, out / "src", console.getvalue()


def test_training_warns_for_validation_sizes_that_break_the_rule(trained):
    _, _, console = trained
    assert "warning: validation resolution 40 does not keep the training resolution 32's residue" in console
    assert "validation resolution 32 does not keep" not in console


def test_tiny_finetune_end_to_end(trained, monkeypatch, capsys):
    import app.finetune
    from app.checkpoint import find_checkpoint, load_checkpoint
    from app.cli import main as cli

    monkeypatch.setattr(app.finetune, "RECALIBRATION_IMAGES", 16)  # 2 batches are enough here
    out, source, _ = trained
    code = cli(
        [
            "finetune",
            "--checkpoint",
            str(source),
            *QUICK,
            "finetune.resolution=64",
            "train.max_steps=2",
            f"log.out_dir={out}",
        ]
    )
    console = capsys.readouterr().out
    assert code == 0, console[-2000:]
    run = out / "src-finetune-64"
    assert (run / "finetune.md").is_file()
    assert "warning: fine-tuning resolution" not in console  # 64 ≡ 32 (mod 32)
    for row in ("| checkpoint as trained |", "| + batch-norm recalibration |", "| + fine-tuning (2 steps) |"):
        assert row in console
    assert "batch-norm statistics recalibrated at 64 on 2 batches" in console

    start = load_checkpoint(find_checkpoint(source, prefer_best=True))["ema"]["module"]  # EMA preferred
    tuned = load_checkpoint(find_checkpoint(run))
    assert tuned["config"]["data"]["resolution"] == 64 and tuned["config"]["data"]["augment"] is False
    assert tuned["config"]["data"]["mixup"] == 0 and tuned["ema"] is None
    frozen = freeze_before(_b0(), tuned["config"]["finetune"]["trainable_from"])
    assert frozen and all(torch.equal(start[n], tuned["model"][n]) for n in frozen)
    assert not torch.equal(start["classifier.weight"], tuned["model"]["classifier.weight"])
    # recalibrated at 64: the frozen stem's running statistics are no longer the trained ones
    assert not torch.equal(start["stem.norm.running_mean"], tuned["model"]["stem.norm.running_mean"])


def test_finetune_rejects_an_unknown_layer_before_any_work(trained, capsys):
    from app.cli import main as cli

    out, source, _ = trained
    before = sorted(p.name for p in out.iterdir())
    code = cli(
        [
            "finetune",
            "--checkpoint",
            str(source),
            *QUICK,
            "finetune.trainable_from=blocks.9",
            f"log.out_dir={out}",
        ]
    )
    assert code == 2
    assert "finetune.trainable_from='blocks.9' is not a layer of b0" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before  # no run folder made


def test_validate_sweep_writes_table_and_plot_and_warns(trained, capsys):
    from app.cli import main as cli

    _, source, _ = trained
    code = cli(["validate", "--checkpoint", str(source), *QUICK, "--resolutions", "32,48"])
    console = capsys.readouterr().out
    assert code == 0, console[-2000:]
    table = (source / "resolution-sweep.md").read_text()
    assert "| 32 | 0 | ✓ |" in table and "| 48 | 16 |  |" in table
    assert (source / "resolution-sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "warning: validation resolution 48 does not keep" in console
    assert "warning: validation resolution 32" not in console


def test_paper_recipe_end_to_end_writes_one_report(tmp_path, monkeypatch, capsys):
    """`make paper` in miniature: native 64 vs half 32 + fine-tuning at 64, a 3-point sweep."""
    import experiments.paper
    from experiments.cli import main as cli

    monkeypatch.setattr(experiments.paper, "SWEEP_POINTS", 3)
    code = cli(
        [
            "paper",
            "--config",
            "digits",
            "--device",
            "cpu",
            "data.dataset=synthetic",
            "data.synthetic_images=16",
            "train.micro_batch=8",
            "train.max_steps=1",
            "finetune.resolution=64",
            "log.name=paper",
            f"log.out_dir={tmp_path}",
        ]
    )
    console = capsys.readouterr().out
    assert code == 0, console[-3000:]
    folder = tmp_path / "paper"
    assert {p.name for p in folder.iterdir()} >= {
        "native",
        "half",
        "native-finetune",
        "half-finetune",
        "report.md",
        "sweep.png",
    }
    report = (folder / "report.md").read_text()
    assert "Native resolution 64, half 32" in report
    assert "| top-1 at 64 (%) |" in report and "| training images/s |" in report
    assert "native + fine-tune" in report and "## Fine-tuning the native model" in report
    assert "| 56 | 24 |  |" in report and "| 64 | 0 | ✓ |" in report and "| 72 | 8 |  |" in report
    half_cfg = (folder / "half" / "config.yaml").read_text()
    assert "resolution: 32" in half_cfg
    assert "warning:" not in console  # 32, 64: every size of the recipe keeps the residue


def test_finetune_runs_its_own_schedule_not_the_source_runs_max_steps(trained):
    """The source run stopped at train.max_steps=2; fine-tuning has its own length (finetune.epochs)
    unless this command line sets train.max_steps."""
    import argparse

    from app.checkpoint import find_checkpoint, load_checkpoint
    from app.command_line import given_on_command_line
    from app.config import build_config
    from app.finetune import finetune_config

    _, source, _ = trained
    cfg = build_config(str(source / "config.yaml"))
    path = find_checkpoint(source, prefer_best=True)
    payload = load_checkpoint(path)
    assert cfg.train.max_steps == 2
    ft = finetune_config(cfg, payload, path, 64)
    assert ft.train.max_steps is None and ft.train.epochs == cfg.finetune.epochs
    assert ft.finetune.source == str(path)  # marks the run as a fine-tuning run
    assert finetune_config(cfg, payload, path, 64, keep_max_steps=True).train.max_steps == 2
    args = argparse.Namespace(overrides=["finetune.resolution=64", "train.max_steps=5"])
    assert given_on_command_line(args, "train.max_steps")
    assert not given_on_command_line(args, "train.epochs")


def _train_losses(run):
    import json

    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_interrupted_finetune_resumes_with_its_layers_frozen(trained, monkeypatch, capsys):
    """Ctrl-C during fine-tuning prints a resume command that works; `train --resume` of the run
    freezes the same layers (its optimiser state fits), repeats the uninterrupted losses and writes
    the whole report; `finetune --resume` continues it further."""
    import app.finetune
    from app.checkpoint import find_checkpoint, load_checkpoint
    from app.cli import main as cli
    from tests.test_app_train import interrupt_at

    monkeypatch.setattr(app.finetune, "RECALIBRATION_IMAGES", 16)
    out, source, _ = trained
    args = [
        "finetune",
        "--checkpoint",
        str(source),
        *QUICK,
        "finetune.resolution=64",
        "train.max_steps=3",
        "model.drop_path=0.2",
        f"log.out_dir={out}",
    ]
    assert cli(args + ["log.name=ft-full"]) == 0
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        assert cli(args + ["log.name=ft-cut"]) == 130
    run = out / "ft-cut"
    assert f"python -m app finetune --resume {run}" in capsys.readouterr().err
    assert not (run / "finetune.md").exists()

    assert cli(["train", "--resume", str(run)]) == 0
    console = capsys.readouterr().out
    assert _train_losses(run) == _train_losses(out / "ft-full") and len(_train_losses(run)) == 3
    report = (run / "finetune.md").read_text()
    for row in ("| checkpoint as trained |", "| + batch-norm recalibration |", "| + fine-tuning (3 steps) |"):
        assert row in report and row in console
    uninterrupted = (out / "ft-full" / "finetune.md").read_text()
    assert report.replace("ft-cut", "") == uninterrupted.replace("ft-full", "")
    start = load_checkpoint(find_checkpoint(source, prefer_best=True))["ema"]["module"]
    tuned = load_checkpoint(find_checkpoint(run))
    layer = tuned["config"]["finetune"]["trainable_from"]
    assert tuned["finetune"]["trainable_from"] == layer and tuned["finetune"]["resolution"] == 64
    frozen = freeze_before(_b0(), layer)
    assert frozen and all(torch.equal(start[n], tuned["model"][n]) for n in frozen)

    assert cli(["finetune", "--resume", str(run), "train.max_steps=4"]) == 0
    assert load_checkpoint(find_checkpoint(run))["step"] == 4
    # the finished report is kept; the longer fine-tuning's report goes beside it
    assert "+ fine-tuning (3 steps)" in (run / "finetune.md").read_text()
    assert "+ fine-tuning (4 steps)" in (run / "finetune-1.md").read_text()
