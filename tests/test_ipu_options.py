"""Conformance of the options builder: every configuration field reaches the right PopTorch call
with the right value. The stand-in below is written from the SDK 3.4 signatures
(graphcore/poptorch, branch sdk-release-3.4, python/options.py and enums.py): same method names,
parameter names and accepted types; it records each call with its bound arguments."""

import enum
import inspect
from typing import Dict, Optional

import pytest
import torch

from app.config import ConfigError, build_config
from app.specs import ipu_batch_plan, ipu_spec
from ipu_options import emulator
from ipu_options.options import build_options

CALLS = []


def recorded(fn):
    """Bind the arguments to the SDK signature (a wrong name or count fails), record, return self."""
    sig = inspect.signature(fn)

    def wrapper(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        fn(self, *args, **kwargs)  # type checks inside
        values = dict(bound.arguments)
        values.pop("self")
        CALLS.append((f"{self._path}.{fn.__name__}", values))
        return self

    return wrapper


class SdkEnum:  # enums.py values of SDK 3.4
    class ReductionType(enum.IntEnum):
        Sum = 0
        Mean = 1
        NoReduction = 2

    class OutputMode(enum.IntEnum):
        Final = 0
        EveryN = 1
        All = 2
        Sum = 3
        Default = 4

    class AutoStage(enum.IntEnum):
        SameAsIpu = 0
        AutoIncrement = 1


class _Training:
    _path = "opts.Training"

    @recorded
    def gradientAccumulation(self, gradient_accumulation: int):
        assert isinstance(gradient_accumulation, int)

    @recorded
    def accumulationAndReplicationReductionType(self, reduction_type):
        assert reduction_type in (SdkEnum.ReductionType.Sum, SdkEnum.ReductionType.Mean)

    @recorded
    def setAutomaticLossScaling(self, enabled: bool):
        assert isinstance(enabled, bool)


class _Precision:
    _path = "opts.Precision"

    @recorded
    def setPartialsType(self, dtype: torch.dtype):
        assert dtype in (torch.float, torch.half)

    @recorded
    def enableStochasticRounding(self, enabled: bool):
        assert isinstance(enabled, bool)


class TensorLocationSettings:
    _path = "TensorLocationSettings"

    @recorded
    def useOnChipStorage(self, use: bool = True):
        assert isinstance(use, bool)

    @recorded
    def useReplicatedTensorSharding(self, use: bool = True):
        assert isinstance(use, bool)


class _TensorLocations:
    _path = "opts.TensorLocations"

    @recorded
    def setOptimizerLocation(self, location):
        assert isinstance(location, TensorLocationSettings)


class _Popart:
    _path = "opts._Popart"

    @recorded
    def set(self, key: str, value):
        assert isinstance(key, str)


class PipelinedExecution:
    def __init__(self, *args):
        self.args = args


class Options:
    _path = "opts"

    def __init__(self):
        self.Training, self.Precision = _Training(), _Precision()
        self.TensorLocations, self._Popart = _TensorLocations(), _Popart()

    @recorded
    def replicationFactor(self, replication_factor: int):
        assert isinstance(replication_factor, int)

    @recorded
    def deviceIterations(self, device_iterations: int):
        assert isinstance(device_iterations, int)

    @recorded
    def randomSeed(self, random_seed: int):
        assert isinstance(random_seed, int)

    @recorded
    def outputMode(self, output_mode, output_return_period: Optional[int] = None):
        assert isinstance(output_mode, SdkEnum.OutputMode)

    @recorded
    def setAvailableMemoryProportion(self, available_memory_proportion: Dict[str, float]):
        assert all(k.startswith("IPU") and 0 < v <= 1 for k, v in available_memory_proportion.items())

    @recorded
    def setExecutionStrategy(self, strategy):
        assert isinstance(strategy, PipelinedExecution)

    @recorded
    def enableExecutableCaching(self, path: str):
        assert isinstance(path, str)

    @recorded
    def useIpuModel(self, use_model: bool):
        assert isinstance(use_model, bool)

    @recorded
    def useOfflineIpuTarget(self, ipu_version: int = 2):
        assert isinstance(ipu_version, int)

    @recorded
    def broadcastBuffers(self, broadcast_buffers: bool = True):
        assert isinstance(broadcast_buffers, bool)


class StandIn:
    Options = Options
    TensorLocationSettings = TensorLocationSettings
    PipelinedExecution = PipelinedExecution
    ReductionType = SdkEnum.ReductionType
    OutputMode = SdkEnum.OutputMode
    AutoStage = SdkEnum.AutoStage


def record(overrides, **kwargs):
    CALLS.clear()
    cfg = build_config("digits", overrides)
    build_options(ipu_spec(cfg), StandIn, ipu_batch_plan(cfg), **kwargs)
    return list(CALLS)


def value_of(calls, name, arg=None):
    found = [c for c in calls if c[0] == name]
    assert found, f"{name} was not called; calls: {[c[0] for c in calls]}"
    return found[-1][1] if arg is None else found[-1][1][arg]


def popart(calls):
    return {c[1]["key"]: c[1]["value"] for c in calls if c[0] == "opts._Popart.set"}


def test_defaults_map_to_sdk_calls():
    calls = record(["train.replicas=4", "train.grad_accum=6", "train.seed=7"])
    assert value_of(calls, "opts.replicationFactor", "replication_factor") == 4
    assert value_of(calls, "opts.Training.gradientAccumulation", "gradient_accumulation") == 6
    assert value_of(calls, "opts.randomSeed", "random_seed") == 7
    assert value_of(calls, "opts.deviceIterations", "device_iterations") == 1
    assert (
        value_of(calls, "opts.Training.accumulationAndReplicationReductionType", "reduction_type")
        == SdkEnum.ReductionType.Mean
    )
    # training returns the loss only, summed per replica (no per-micro-batch stream)
    assert value_of(calls, "opts.outputMode", "output_mode") == SdkEnum.OutputMode.Sum
    assert value_of(calls, "opts.setAvailableMemoryProportion", "available_memory_proportion") == {
        "IPU0": 0.6
    }
    assert value_of(calls, "opts.Precision.setPartialsType", "dtype") == torch.half
    assert value_of(calls, "opts.Precision.enableStochasticRounding", "enabled") is True
    names = {c[0] for c in calls}
    for absent in (
        "opts.setExecutionStrategy",
        "opts.Training.setAutomaticLossScaling",
        "opts.TensorLocations.setOptimizerLocation",
        "opts.enableExecutableCaching",
        "opts.useOfflineIpuTarget",
        "opts.useIpuModel",
    ):
        assert absent not in names
    # PopART groups a group norm's channels as the model does: strided by default (model/norms.py)
    assert popart(calls)["groupNormStridedChannelGrouping"] is True
    contiguous = record(["model.norm_grouping=contiguous"])
    assert popart(contiguous)["groupNormStridedChannelGrouping"] is False


@pytest.mark.parametrize(
    "override,call,arg,expected",
    [
        ("ipu.device_iterations=5", "opts.deviceIterations", "device_iterations", 5),
        ("ipu.seed=123", "opts.randomSeed", "random_seed", 123),
        (
            "ipu.reduction=sum",
            "opts.Training.accumulationAndReplicationReductionType",
            "reduction_type",
            SdkEnum.ReductionType.Sum,
        ),
        ("ipu.output_mode=final", "opts.outputMode", "output_mode", SdkEnum.OutputMode.Final),
        ("ipu.output_mode=all", "opts.outputMode", "output_mode", SdkEnum.OutputMode.All),
        ("ipu.partials=float", "opts.Precision.setPartialsType", "dtype", torch.float),
        ("ipu.stochastic_rounding=false", "opts.Precision.enableStochasticRounding", "enabled", False),
        ("ipu.loss_scaling=auto", "opts.Training.setAutomaticLossScaling", "enabled", True),
        ("ipu.executable_cache=/tmp/exe", "opts.enableExecutableCaching", "path", "/tmp/exe"),
        ("ipu.compile_only=true", "opts.useOfflineIpuTarget", "ipu_version", 2),
        ("ipu.compile_only=true ipu.offline_ipu_version=21", "opts.useOfflineIpuTarget", "ipu_version", 21),
        ("train.replicas=2", "opts.broadcastBuffers", "broadcast_buffers", False),
        (
            "ipu.available_memory_proportion=[0.3]",
            "opts.setAvailableMemoryProportion",
            "available_memory_proportion",
            {"IPU0": 0.3},
        ),
    ],
)
def test_each_field_reaches_its_call(override, call, arg, expected):
    assert value_of(record(override.split()), call, arg) == expected


def test_output_mode_applies_to_training_and_inference_returns_every_output():
    # the evaluation loop scores every image: a summed or final-only output would drop logits
    training = record(["ipu.output_mode=sum"])
    assert value_of(training, "opts.outputMode", "output_mode") == SdkEnum.OutputMode.Sum
    inference = record(["ipu.output_mode=sum"], training=False)
    assert value_of(inference, "opts.outputMode", "output_mode") == SdkEnum.OutputMode.All
    assert "opts.broadcastBuffers" not in {c[0] for c in record([])}  # one replica: nothing to broadcast


def test_pipeline_memory_and_recomputation():
    calls = record(
        [
            "train.grad_accum=8",
            "ipu.pipeline={blocks.3: 1, blocks.5: 2}",
            "ipu.available_memory_proportion=[0.2, 0.3, 0.4]",
        ]
    )
    assert value_of(calls, "opts.setAvailableMemoryProportion", "available_memory_proportion") == {
        "IPU0": 0.2,
        "IPU1": 0.3,
        "IPU2": 0.4,
    }
    strategy = value_of(calls, "opts.setExecutionStrategy", "strategy")
    assert strategy.args == (SdkEnum.AutoStage.SameAsIpu,)
    assert popart(calls)["autoRecomputation"] == 3
    single = record(["ipu.recompute=[blocks.2.0]"])
    assert popart(single)["autoRecomputation"] == 4 and popart(single)["explicitRecomputation"] is True
    with pytest.raises(ValueError, match=r"available_memory_proportion=\[0.2, 0.3\] is invalid.*uses 3 IPUs"):
        record(
            [
                "train.grad_accum=8",
                "ipu.pipeline={blocks.3: 1, blocks.5: 2}",
                "ipu.available_memory_proportion=[0.2, 0.3]",
            ]
        )


def test_optimizer_state_location_and_ipu_model():
    calls = record(
        ["ipu.optimizer_state_offchip=true", "ipu.replicated_tensor_sharding=true"], use_ipu_model=True
    )
    assert value_of(calls, "TensorLocationSettings.useOnChipStorage", "use") is False
    assert value_of(calls, "TensorLocationSettings.useReplicatedTensorSharding", "use") is True
    assert isinstance(
        value_of(calls, "opts.TensorLocations.setOptimizerLocation", "location"), TensorLocationSettings
    )
    assert value_of(calls, "opts.useIpuModel", "use_model") is True


def test_inference_options_have_no_training_calls():
    calls = record([], training=False)
    assert not any(c[0].startswith("opts.Training") for c in calls)


def test_emulator_accepts_the_same_calls():
    cfg = build_config(
        "digits",
        [
            "train.replicas=2",
            "train.grad_accum=3",
            "ipu.loss_scaling=auto",
            "ipu.optimizer_state_offchip=true",
        ],
    )
    opts = build_options(ipu_spec(cfg), emulator, ipu_batch_plan(cfg))
    assert (opts.replication_factor, opts.Training.gradient_accumulation) == (2, 3)
    assert opts.Training.automatic_loss_scaling and opts.Precision.stochastic_rounding


@pytest.mark.parametrize(
    "override",
    [
        "ipu.reduction=max",
        "ipu.output_mode=every",
        "ipu.pipeline={stem: -1}",
        "ipu.offline_ipu_version=3",
        "ipu.offline_ipu_version=2",
    ],
)
def test_invalid_fields_are_config_errors(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        build_config("digits", [override])
