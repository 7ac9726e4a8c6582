"""The command line and the device boundary: errors before work, messages that say what to change."""

import os
import signal

import pytest
import torch

from app.backend import create_backend
from app.cli import main as cli
from app.config import build_config
from app.objective import Classifier, smoothed_cross_entropy
from app.specs import batch_plan, device_spec
from app.train import StopSignal
from backends.contract import BackendError
from backends.native import NativeBackend


@pytest.mark.parametrize(
    "override, named, allowed",
    [
        ("optim.lr=-1", "optim.lr=-1", "a number > 0"),
        ("model.norm=instance", "model.norm='instance'", "one of batch, group, layer"),
        ("train.precision=fp8", "train.precision='fp8'", "fp32, bf16 or fp16"),
        ("data.resolution=16", "data.resolution=16", "an integer >= 32"),
        ("train.micro_btach=4", "train.micro_btach", "has: epochs, max_steps, micro_batch"),
        ("optim.betas=[0.9]", "optim.betas=[0.9]", "two numbers in [0, 1)"),
        ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5]", "two numbers in [0, 1)"),
        ("schedule.min_lr_ratio=1.5", "schedule.min_lr_ratio=1.5", "in [0, 1]"),
        ("schedule.warmup_epochs=9", "schedule.warmup_epochs=9.0", "at most train.epochs=6"),
        ("log.name=a/b", "log.name='a/b'", "a plain folder name"),
        ("log.name=..", "log.name='..'", "a plain folder name"),
        ("data.dataset=/nonexistent/imagenet", "data.dataset='/nonexistent/imagenet'", "(no such folder)"),
    ],
)
def test_config_errors_exit_2_naming_field_and_range(tmp_path, capsys, override, named, allowed):
    assert cli(["train", override, f"log.out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert named in err and allowed in err
    assert not any(tmp_path.iterdir())  # nothing was started: no run folder


def test_unknown_preset_lists_presets(capsys):
    assert cli(["train", "--config", "b9-g3"]) == 2
    assert "digits" in capsys.readouterr().err


def test_fp16_on_cpu_says_what_to_change(tmp_path, capsys):
    assert cli(["train", "--device", "cpu", "train.precision=fp16", f"log.out_dir={tmp_path}"]) == 2
    assert "train.precision=bf16 or fp32" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_absent_says_what_to_change():
    with pytest.raises(BackendError, match="use --device cpu"):
        create_backend(build_config("digits", ["device=cuda"]))


def test_replicas_without_launcher_says_what_to_change(monkeypatch):
    # replicas > 1 on cpu/cuda are torchrun processes, started from the command line (app.distributed)
    from app.distributed import DistributedError, launch

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with pytest.raises(DistributedError, match="python -m app train train.replicas=N"):
        launch(build_config("digits", ["device=cpu", "train.replicas=4"]), None)


def test_soft_targets_match_hard_targets_and_smoothing():
    logits = torch.randn(6, 5)
    hard = torch.tensor([0, 1, 2, 3, 4, 0])
    soft = torch.nn.functional.one_hot(hard, 5).float()
    smoothed = smoothed_cross_entropy(logits, hard, 0.1)
    assert torch.allclose(smoothed, smoothed_cross_entropy(logits, soft, 0.1))
    # the paper's runs' smoothing (TF1 train.py): 0.9 on the label, 0.1/4 on each of the 4 others
    by_hand = soft * 0.9 + (1 - soft) * 0.1 / 4
    expected = -(by_hand * torch.log_softmax(logits, -1)).sum(-1).mean()
    assert torch.allclose(smoothed, expected)


def test_loss_hook_sees_the_loss():
    seen = []
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    clf = Classifier(net, loss_hook=lambda loss: seen.append(loss) or loss * 2)
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    _, loss = clf(images, torch.tensor([0, 2]))
    assert len(seen) == 1 and torch.allclose(loss, seen[0] * 2)


def test_gradient_accumulation_matches_one_big_batch():
    """grad_accum=2 × micro 4 gives the update of one batch of 8 (batch-independent layers)."""
    cfg = build_config("digits", ["device=cpu", "optim.name=sgd", "train.label_smoothing=0"])
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    targets = torch.arange(8) % 3
    weights = []
    for accum in (1, 2):
        cfg.train.grad_accum, cfg.train.micro_batch = accum, 8 // accum
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3))
        backend = NativeBackend(device_spec(cfg), batch_plan(cfg))
        backend.prepare(Classifier(net), torch.optim.SGD(net.parameters(), lr=0.1))
        assert backend.host_batch_size() == 8
        backend.train_step(images, targets)
        weights.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


def test_sigterm_asks_the_loop_to_stop_after_the_step():
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert stop.signum is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # recorded, the process goes on
    assert signal.getsignal(signal.SIGTERM) is previous  # handlers restored


def test_bf16_channels_last_step_on_cpu_updates_the_weights():
    cfg = build_config(
        "digits",
        [
            "device=cpu",
            "train.precision=bf16",
            "train.channels_last=true",
            "train.micro_batch=4",
            "train.grad_accum=2",
        ],
    )
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 36, 3))
    backend = NativeBackend(device_spec(cfg), batch_plan(cfg))
    backend.prepare(Classifier(net, channels_last=True), torch.optim.SGD(net.parameters(), lr=0.1))
    before = net[0].weight.detach().clone()
    out = backend.train_step(torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8), torch.arange(8) % 3)
    assert torch.isfinite(out["loss"]) and not torch.equal(before, net[0].weight)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert backend.evaluate(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)).dtype == torch.float32


def test_exponent_floats_and_date_like_names_are_read_as_written(tmp_path):
    """YAML 1.1 reads 1e-3 as text and 2024-06-01 as a date: a float field takes the number, a text
    field what was typed."""
    cfg = build_config(
        "digits", ["optim.lr=1e-3", "ipu.loss_scaling=1e3", "log.name=2024-06-01", "log.name=007"]
    )
    assert cfg.optim.lr == 0.001 and cfg.ipu.loss_scaling == 1000.0
    assert cfg.log.name == "007"
    assert build_config("digits", ["log.name=2024-06-01"]).log.name == "2024-06-01"
    assert build_config("digits", ["log.name=null"]).log.name is None
    data = {"log": {"name": __import__("datetime").date(2024, 6, 1)}, "optim": {"lr": "2e-3"}}
    from app.config import config_from_dict

    cfg = config_from_dict(data)  # a YAML file's values (config.yaml, presets)
    assert cfg.log.name == "2024-06-01" and cfg.optim.lr == 0.002


def test_dataset_folder_without_val_is_a_config_error(tmp_path, capsys):
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    out = tmp_path / "runs"
    assert cli(["train", "--device", "cpu", f"data.dataset={tmp_path / 'data'}", f"log.out_dir={out}"]) == 2
    assert "no val/" in capsys.readouterr().err and not out.exists()


def test_batch_larger_than_the_dataset_exits_2_before_a_run_folder(tmp_path, capsys):
    out = tmp_path / "runs"
    assert cli(["train", "--device", "cpu", "train.micro_batch=5000", f"log.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "fewer than one batch of 5000" in err and "lower train.micro_batch" in err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_nonfinite_gradients_skip_the_update_and_say_so():
    """A finite loss whose backward overflows: fp32/bf16 skip the step like the fp16 scaler does."""
    cfg = build_config("digits", ["device=cpu", "optim.name=sgd"])
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    backend = NativeBackend(device_spec(cfg), batch_plan(cfg))
    backend.prepare(Classifier(net), torch.optim.SGD(net.parameters(), lr=0.1))
    images, targets = torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8), torch.tensor([0, 1, 2, 0])
    before = net[1].weight.detach().clone()
    hook = net[1].weight.register_hook(lambda grad: grad * float("inf"))
    out = backend.train_step(images, targets)
    assert torch.isfinite(out["loss"]) and bool(out["nonfinite_grads"])
    assert torch.equal(before, net[1].weight)  # not applied
    hook.remove()
    out = backend.train_step(images, targets)
    assert "nonfinite_grads" not in out and not torch.equal(before, net[1].weight)


def test_ema_validation_classifier_lives_where_the_ema_weights_do():
    """validate_all scores the EMA copy through the backend, which wraps it in a Classifier on its
    own device: the normalisation buffers follow the weights (a GPU run would otherwise mix CUDA
    weights and CPU buffers), and the EMA's logits are the EMA weights', not the trained ones'."""
    import app.evaluate
    from app.optim import EMA

    cfg = build_config("digits", ["device=cpu"])
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    backend = NativeBackend(device_spec(cfg), batch_plan(cfg))
    backend.prepare(Classifier(net), torch.optim.SGD(net.parameters(), lr=0.1))
    ema = EMA(net, 0.9)
    with torch.no_grad():
        ema.module[1].weight.add_(1.0)  # the EMA differs from the trained weights
    seen = []
    original = backend.evaluate

    def record(images):
        model = backend._scoring or backend.inference_copy or backend.classifier
        logits = original(images)
        seen.append(({t.device.type for t in [*model.buffers(), *model.parameters()]}, logits))
        return logits

    backend.evaluate = record
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    results = app.evaluate.validate_all(backend, ema, {32: [(images, torch.tensor([0, 1]))]}, cfg)
    assert set(results) == {"raw@32", "ema@32"}
    assert [devices for devices, _ in seen] == [{"cpu"}, {"cpu"}]
    with torch.no_grad():
        torch.testing.assert_close(seen[0][1], Classifier(net)(images))
        torch.testing.assert_close(seen[1][1], Classifier(ema.module)(images))
