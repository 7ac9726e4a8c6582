"""PopTorch 3.4's training-side rules, held by the emulator and the IPU backend: the optimiser is
read at trainingModel/setOptimizer only (so the device's learning rate is the schedule's from the
first step, fresh or resumed), half accumulators keep a running mean, automatic loss scaling needs
fp16, and the options Graphcore's CNN application sets (stochastic rounding for training only,
deterministic workers, loss scale 128 with fp16)."""

import json
import sys
import types

import pytest
import torch
from torch import nn

from app.cli import main as cli
from app.config import ConfigError, build_config
from app.objective import Classifier
from app.specs import ipu_batch_plan, ipu_spec, optim_spec
from ipu_options import emulator as emulator
from ipu_options.optimizer import build_ipu_optimizer, loss_scaling
from ipu_options.options import build_options, local_replicas

QUICK = ["data.resolution=32", "data.workers=0", "train.log_every=1", "train.ema_decay=0"]


def _linear_executor(lr=0.1, **optim_kwargs):
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    opt = emulator.optim.SGD(model.parameters(), lr=lr, **optim_kwargs)
    return model, opt


class _SumLoss(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return emulator.identity_loss(self.inner(x).sum(), reduction="sum")


def test_param_group_edits_reach_the_device_only_through_set_optimizer():
    model, opt = _linear_executor(lr=0.1)
    trainer = emulator.trainingModel(_SumLoss(model), emulator.Options(), optimizer=opt)
    x = torch.ones(1, 2)
    opt.param_groups[0]["lr"] = 0.5  # after trainingModel, without setOptimizer: ignored
    trainer(x)
    assert trainer.applied_lr == [(0.1,)]
    torch.testing.assert_close(model.weight.detach(), torch.full((1, 2), -0.1))
    trainer.setOptimizer(opt)
    trainer(x)
    assert trainer.applied_lr[-1] == (0.5,)
    torch.testing.assert_close(model.weight.detach(), torch.full((1, 2), -0.6))
    assert opt.param_groups[0]["lr"] == 0.5  # the host's own value stays as the user set it


def test_set_optimizer_before_compilation_sets_the_first_update():
    model, opt = _linear_executor(lr=0.1)
    trainer = emulator.trainingModel(_SumLoss(model), emulator.Options(), optimizer=opt)
    opt.param_groups[0]["lr"] = 0.25
    trainer.setOptimizer(opt)  # not compiled yet: PopTorch compiles with this dict
    trainer(torch.ones(1, 2))
    assert trainer.applied_lr == [(0.25,)]


def test_half_accumulator_keeps_the_running_mean_of_the_micro_batches():
    # PopTorch switches to MeanReductionStrategy.Running for accum_type=float16: the accumulator
    # holds the mean, so four gradients of 30000 stay finite where their fp16 sum (120000) is inf.
    model, opt = _linear_executor(lr=1e-4, accum_type=torch.float16)
    opts = emulator.Options()
    opts.Training.gradientAccumulation(4)
    trainer = emulator.trainingModel(_SumLoss(model), opts, optimizer=opt)
    # on the executor's copy of the options (python/_poplar_executor.py:152-154)
    assert (
        trainer.options.Training.meanAccumulationAndReplicationReductionStrategy
        == emulator.MeanReductionStrategy.Running
    )
    trainer(torch.full((4, 2), 30000.0))
    torch.testing.assert_close(model.weight.detach(), torch.full((1, 2), -3.0))


def test_post_reduction_sum_of_half_accumulators_would_overflow():
    # the same step with fp32 accumulators under Post: the reference the running mean must equal
    model, opt = _linear_executor(lr=1e-4)
    opts = emulator.Options()
    opts.Training.gradientAccumulation(4)
    trainer = emulator.trainingModel(_SumLoss(model), opts, optimizer=opt)
    post = emulator.MeanReductionStrategy.Post
    assert trainer.options.Training.meanAccumulationAndReplicationReductionStrategy == post
    trainer(torch.full((4, 2), 30000.0))
    torch.testing.assert_close(model.weight.detach(), torch.full((1, 2), -3.0))
    half_model, half_opt = _linear_executor(lr=1e-4, accum_type=torch.float16)
    with pytest.raises(ValueError, match="already compiled"):
        trainer.setOptimizer(half_opt)  # would need Running, but compiled with Post


def _train_records(run):
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["kind"] == "train"]


@pytest.fixture
def trainers(monkeypatch):
    made = []
    original = emulator.trainingModel

    def recording(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(emulator, "trainingModel", recording)
    return made


def test_device_learning_rate_is_the_schedule_from_the_first_step_fresh_and_resumed(tmp_path, trainers):
    out = tmp_path / "runs"
    common = [
        "--device",
        "ipu-model",
        *QUICK,
        "train.micro_batch=4",
        "ipu.precision=32.32",
        "schedule.warmup_epochs=0.5",
        f"log.out_dir={out}",
        "log.name=run",
    ]
    assert cli(["train", *common, "train.max_steps=3"]) == 0
    fresh = _train_records(out / "run")
    scheduled = [r["lr"] for r in fresh]
    assert len(set(scheduled)) == 3  # warm-up: every step has its own rate
    assert [lrs[0] for lrs in trainers[0].applied_lr] == pytest.approx(scheduled)
    assert cli(["train", "--resume", str(out / "run"), *common, "train.max_steps=5"]) == 0
    resumed = _train_records(out / "run")[3:]
    assert [r["step"] for r in resumed] == [4, 5]
    assert [lrs[0] for lrs in trainers[1].applied_lr] == pytest.approx([r["lr"] for r in resumed])


def test_training_returns_only_the_loss(capsys):
    from app.backend import create_backend

    cfg = build_config(
        "digits",
        [
            "device=ipu-model",
            *QUICK,
            "train.replicas=2",
            "ipu.device_iterations=2",
            "train.micro_batch=2",
            "train.grad_accum=2",
            "ipu.precision=32.32",
        ],
    )
    backend = create_backend(cfg)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    backend.prepare(Classifier(net), torch.optim.SGD(net.parameters(), lr=0.1))
    images = torch.randint(0, 256, (backend.host_batch_size(), 3, 8, 8), dtype=torch.uint8)
    targets = torch.arange(images.shape[0]) % 10
    out = backend.train_model(images, targets)
    assert isinstance(out, torch.Tensor) and out.shape == (2,)  # one summed loss per replica
    metrics = backend.train_step(images, targets)
    assert set(metrics) == {"loss"} and metrics["loss"].dim() == 0


def _record_options(overrides, training):
    cfg = build_config("digits", overrides)
    return build_options(ipu_spec(cfg), emulator, ipu_batch_plan(cfg), training=training)


def test_stochastic_rounding_is_a_training_option_only():
    assert _record_options([], training=True).Precision.stochastic_rounding is True
    inference = _record_options([], training=False)
    assert "enableStochasticRounding" not in [c[0] for c in inference.Precision.calls]
    assert inference.Precision.stochastic_rounding is False  # PopTorch's default


@pytest.mark.parametrize("training", [True, False])
def test_deterministic_workers_are_portable(training):
    opts = _record_options(["train.replicas=2"], training=training)
    assert opts._Popart.options["engineOptions"] == {"target.deterministicWorkers": "portable"}


@pytest.mark.parametrize("precision,expected", [("16.16", 128.0), ("16.32", 128.0), ("32.32", 1.0)])
def test_default_static_loss_scale_follows_graphcores_efficientnet_configs(precision, expected):
    cfg = build_config("digits", [f"ipu.precision={precision}"])
    assert cfg.ipu.loss_scaling is None and loss_scaling(ipu_spec(cfg)) == expected
    net = nn.Linear(2, 2)
    opt = build_ipu_optimizer(
        emulator, [{"params": list(net.parameters())}], ipu_spec(cfg), optim_spec(cfg), 0.1
    )
    assert opt.loss_scaling == expected
    assert loss_scaling(ipu_spec(build_config("digits", ["ipu.loss_scaling=4"]))) == 4.0


def test_automatic_loss_scaling_with_fp32_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"No tracked gradient tensors of type fp16 were found"):
        build_config("digits", ["ipu.loss_scaling=auto", "ipu.precision=32.32"])
    out = tmp_path / "runs"
    assert (
        cli(
            [
                "train",
                "--device",
                "ipu-model",
                "ipu.loss_scaling=auto",
                "ipu.precision=32.32",
                f"log.out_dir={out}",
            ]
        )
        == 2
    )
    assert "ipu.loss_scaling" in capsys.readouterr().err and not out.exists()
    assert build_config("digits", ["ipu.loss_scaling=auto", "ipu.precision=16.16"]).ipu.loss_scaling == "auto"


def test_offline_ipu_version_names_poptorchs_targets():
    with pytest.raises(ConfigError, match=r"21 \(Mk2 with FP8 support\)"):
        build_config("digits", ["ipu.compile_only=true", "ipu.offline_ipu_version=3"])


def test_hand_started_poprun_takes_the_local_replicas_from_popdist(monkeypatch):
    popdist = types.ModuleType("popdist")
    popdist.getNumLocalReplicas = lambda: 3
    popdist.poptorch = types.ModuleType("popdist.poptorch")
    for name, module in (
        ("popdist", popdist),
        ("popdist.poptorch", popdist.poptorch),
        ("horovod", types.ModuleType("horovod")),
        ("horovod.torch", types.ModuleType("horovod.torch")),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("POPDIST_NUM_TOTAL_REPLICAS", "12")
    # poprun started by hand: dist.instances left at 1, so the config alone would say 12
    cfg = build_config("digits", ["device=ipu", "train.replicas=12"])
    assert cfg.dist.instances == 1 and local_replicas(cfg.train.replicas, cfg.dist.instances) == 3
