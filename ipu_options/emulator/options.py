"""``poptorch.Options`` as the emulator needs it: the same setters (each returns self) and the
values the emulated executor reads back. Settings that only matter to the Poplar compiler
(memory proportions, tensor locations, PopART flags, caching) are recorded, not acted on."""

import copy
import json
import os
from typing import Any, Dict, List, Optional

import torch

from . import enums
from .enums import (
    AutoStage,
    ConnectionType,
    MeanReductionStrategy,
    OutputMode,
    ReductionType,
    SyncPattern,
)

FROZEN = "Can't modify frozen Options"  # python/_options_impl.py:121-125 (sdk/poptorch/3.4.0)


def _enum_member(text: str) -> Any:
    """ "ConnectionType.OnDemand" → that poptorch enum member; any other string unchanged
    (python/options.py:1215-1224)."""
    enum_name, _, member = text.partition(".")
    return getattr(getattr(enums, enum_name, None), member, text)


class _Recorded:
    """Every setter call is kept in ``calls`` (name, args) so tests and the planner can read them.
    Frozen once a model or DataLoader uses the options: every setter then refuses, in PopTorch's
    words (python/_options_impl.py:105-125)."""

    def __init__(self):
        self.calls = []
        self._is_frozen = False

    def _record(self, name: str, *args: Any) -> None:
        if self._is_frozen:
            raise AttributeError(FROZEN)
        self.calls.append((name, args))

    def __deepcopy__(self, memo: dict) -> "_Recorded":
        """Copies are unfrozen (python/_options_impl.py:127-135)."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for key, value in vars(self).items():
            setattr(copied, key, copy.deepcopy(value, memo))
        copied._is_frozen = False
        return copied

    def _values(self) -> Dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "calls"}

    def __repr__(self) -> str:
        # python/_options_impl.py:181-189: the values, not the object's address
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in self._values().items()) + ")"


class _TrainingOptions(_Recorded):
    def __init__(self):
        super().__init__()
        self.gradient_accumulation = 1
        self.accumulation_and_replication_reduction_type = ReductionType.Mean
        self.automatic_loss_scaling = False
        # Post unless set, or unless the optimiser's accum_type is float16 (then Running):
        # python/options.py:207-214 and _optimizer_attributes.py:130-152 (sdk/poptorch/3.4.0)
        self.mean_reduction_strategy = MeanReductionStrategy.Post

    def gradientAccumulation(self, gradient_accumulation: int) -> "_TrainingOptions":
        if int(gradient_accumulation) < 1:
            raise ValueError(f"gradientAccumulation({gradient_accumulation}): must be >= 1")
        self._record("gradientAccumulation", gradient_accumulation)
        self.gradient_accumulation = int(gradient_accumulation)
        return self

    def accumulationAndReplicationReductionType(self, reduction_type: ReductionType) -> "_TrainingOptions":
        if reduction_type not in (ReductionType.Mean, ReductionType.Sum):
            raise ValueError("accumulationAndReplicationReductionType: ReductionType.Mean or .Sum")
        self._record("accumulationAndReplicationReductionType", reduction_type)
        self.accumulation_and_replication_reduction_type = reduction_type
        return self

    def setMeanAccumulationAndReplicationReductionStrategy(
        self, mean_reduction_strategy: MeanReductionStrategy
    ) -> "_TrainingOptions":
        self._record("setMeanAccumulationAndReplicationReductionStrategy", mean_reduction_strategy)
        self.mean_reduction_strategy = MeanReductionStrategy(mean_reduction_strategy)
        return self

    @property
    def meanAccumulationAndReplicationReductionStrategy(self) -> MeanReductionStrategy:
        return self.mean_reduction_strategy

    def setAutomaticLossScaling(self, enabled: bool) -> "_TrainingOptions":
        self._record("setAutomaticLossScaling", enabled)
        self.automatic_loss_scaling = bool(enabled)
        return self


class _PrecisionOptions(_Recorded):
    def __init__(self):
        super().__init__()
        self.partials_type = torch.float
        self.stochastic_rounding = False
        self.fp_exceptions = False

    def setPartialsType(self, dtype: torch.dtype) -> "_PrecisionOptions":
        if dtype not in (torch.float, torch.float32, torch.half, torch.float16):
            raise ValueError("parameter to setPartialsType should be either torch.float or torch.half")
        self._record("setPartialsType", dtype)
        self.partials_type = dtype
        return self

    def enableStochasticRounding(self, enabled: bool) -> "_PrecisionOptions":
        self._record("enableStochasticRounding", enabled)
        self.stochastic_rounding = bool(enabled)
        return self

    def enableFloatingPointExceptions(self, enabled: bool) -> "_PrecisionOptions":
        self._record("enableFloatingPointExceptions", enabled)
        self.fp_exceptions = bool(enabled)
        return self


class TensorLocationSettings(_Recorded):
    """Where one kind of tensor lives, as PopTorch keeps it (python/options.py:515-587): a dict of
    the settings made, booleans stored as ints; useOnChipStorage(None) removes onChip."""

    def __init__(self):
        super().__init__()
        self.settings: Dict[str, int] = {}

    def _put(self, name: str, value: int, kind: type) -> "TensorLocationSettings":
        assert isinstance(value, kind)  # options.py:527, 535, 551, 561, 572, 585
        self._record(name, value)
        self.settings[name] = int(value)
        return self

    def toDict(self) -> Dict[str, int]:
        return dict(self.settings)

    def minElementsForOffChip(self, min_elements: int) -> "TensorLocationSettings":
        return self._put("minElementsForOffChip", min_elements, int)

    def minElementsForReplicatedTensorSharding(self, min_elements: int) -> "TensorLocationSettings":
        return self._put("minElementsForReplicatedTensorSharding", min_elements, int)

    def useOnChipStorage(self, use: Optional[bool] = True) -> "TensorLocationSettings":
        if use is None:  # options.py:548-549: back to undefined
            self._record("useOnChipStorage", use)
            self.settings.pop("onChip", None)
            return self
        return self._put("onChip", use, bool)

    def useReplicatedTensorSharding(self, use: bool = True) -> "TensorLocationSettings":
        return self._put("useReplicatedTensorSharding", use, bool)

    def useIOTilesToLoad(self, use: bool = True) -> "TensorLocationSettings":
        return self._put("useIOTilesToLoad", use, bool)

    def useIOTilesToStore(self, use: bool = True) -> "TensorLocationSettings":
        return self._put("useIOTilesToStore", use, bool)


class _TensorLocationOptions(_Recorded):
    """Each kind's settings as a dict under ``location_<kind>`` once set (python/options.py:
    627-669); reading one never set is an AttributeError, as in PopTorch's OptionsDict."""

    _KINDS = ("activation", "weight", "optimizer", "accumulator")

    def _set(self, kind: str, location: TensorLocationSettings) -> "_TensorLocationOptions":
        assert isinstance(location, TensorLocationSettings)  # options.py:633, 643, 653, 666
        self._record(f"set{kind.capitalize()}Location", location)
        setattr(self, f"location_{kind}", location.toDict())
        return self

    def setActivationLocation(self, location: TensorLocationSettings) -> "_TensorLocationOptions":
        return self._set("activation", location)

    def setWeightLocation(self, location: TensorLocationSettings) -> "_TensorLocationOptions":
        return self._set("weight", location)

    def setOptimizerLocation(self, location: TensorLocationSettings) -> "_TensorLocationOptions":
        return self._set("optimizer", location)

    def setAccumulatorLocation(self, location: TensorLocationSettings) -> "_TensorLocationOptions":
        return self._set("accumulator", location)

    def numIOTiles(self, num_tiles: int) -> "_TensorLocationOptions":
        # python/options.py:616-623: assertions, PopTorch's message
        message = "numIOTiles must be an even number between 32 and 192."
        assert isinstance(num_tiles, int), message
        assert 32 <= num_tiles <= 192 and num_tiles % 2 == 0, message
        self._record("numIOTiles", num_tiles)
        return self


class _PopartOptions(_Recorded):
    def __init__(self):
        super().__init__()
        # python/options.py:395-399: two PopART options every Options starts with
        self.options: Dict[str, Any] = {
            "instrumentWithHardwareCycleCounter": False,
            "rearrangeAnchorsOnHost": False,
        }

    def set(self, key: str, value: Any) -> "_PopartOptions":
        self._record("set", key, value)
        self.options[key] = value
        return self

    def setEngineOptions(self, engine_options: Dict[str, str]) -> "_PopartOptions":
        return self.set("engineOptions", dict(engine_options))

    def setPatterns(self, patterns: Dict[str, bool], level: int = 2) -> "_PopartOptions":
        """PopART's pattern overrides, kept as two options (python/options.py:428-441)."""
        assert isinstance(level, int)
        assert isinstance(patterns, dict)
        return self.set("patterns_level", level).set("patterns", patterns)


class _DistributedOptions(_Recorded):
    """``Options().Distributed`` (python/options.py:449-512): this process's id and the number of
    processes the DataLoader splits the dataset over. Read from OpenMPI's variables at creation."""

    def __init__(self):
        super().__init__()
        self.num_distributed_processes = 1
        self.distributed_process_id = 0
        self.setEnvVarNames("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")  # options.py:466

    def disable(self) -> "_DistributedOptions":
        """One process, whatever the environment said (options.py:468-473)."""
        return self.configureProcessId(0, 1)

    def setEnvVarNames(self, var_num_processes: str, var_process_id: str) -> "_DistributedOptions":
        """Id and count from these environment variables, 0 and 1 when unset (options.py:475-490)."""
        return self.configureProcessId(
            int(os.environ.get(var_process_id, "0")), int(os.environ.get(var_num_processes, "1"))
        )

    def configureProcessId(self, process_id: int, num_processes: int) -> "_DistributedOptions":
        self._record("configureProcessId", process_id, num_processes)
        self.distributed_process_id = process_id
        self.num_distributed_processes = num_processes
        return self

    @property
    def processId(self) -> int:
        return self.distributed_process_id

    @property
    def numProcesses(self) -> int:
        return self.num_distributed_processes


class PipelinedExecution:
    def __init__(self, *args: Any):
        self.args = args  # blocks / stages, or an AutoStage; the emulator stages by ipu_id
        self.auto_stage = args[0] if args and isinstance(args[0], AutoStage) else AutoStage.SameAsIpu

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(a) for a in self.args)})"


class ShardedExecution(PipelinedExecution):
    pass


class Options(_Recorded):
    def __init__(self):
        super().__init__()
        self._training = _TrainingOptions()
        self._precision = _PrecisionOptions()
        self._tensor_locations = _TensorLocationOptions()
        self._popart = _PopartOptions()
        self._distributed = _DistributedOptions()
        self.replication_factor = 1
        self.device_iterations = 1
        self.output_mode = OutputMode.Default
        self.output_return_period = 1
        self.random_seed: Optional[int] = None
        self.available_memory_proportion: Dict[int, float] = {}
        self.execution_strategy: Any = PipelinedExecution(AutoStage.SameAsIpu)
        self.executable_cache: Optional[str] = None
        self.ipu_model = False
        self.offline_ipu_version: Optional[int] = None
        self.broadcast_buffers = True
        # python/options.py:1179-1192: PopTorch's other defaults (stored, reported, copied)
        self.log_dir = "."
        self.max_repeat_logs = 4
        self.auto_round_num_ipus = False
        self.anchored_tensors: Dict[str, list] = {}
        self.connection_type = ConnectionType.Always
        self.sync_pattern = SyncPattern.Full
        self.from_json(os.environ.get("POPTORCH_DEFAULT_OPTIONS", "{}"))  # options.py:1198

    def from_json(self, string: str) -> "Options":
        """Call the setters a JSON object names (python/options.py:1200-1238): keys are dotted
        paths from the Options ("Precision.enableFloatingPointExceptions"), a list value is
        the arguments, a string "Enum.Member" names a poptorch enum member."""
        for path, value in json.loads(string).items():
            target: Any = self
            for attribute in path.split("."):
                target = getattr(target, attribute)
            if isinstance(value, str) and "." in value:
                value = _enum_member(value)
            if isinstance(value, list):
                target(*value)
            else:
                target(value)
        return self

    def _freeze(self) -> None:
        for part in (
            self,
            self._training,
            self._precision,
            self._tensor_locations,
            self._popart,
            self._distributed,
        ):
            part._is_frozen = True

    def clone(self) -> "Options":
        """An unfrozen deep copy (python/options.py:1895-1898)."""
        return copy.deepcopy(self)

    def defaultOutputMode(self) -> bool:
        """True while outputMode was never set (python/options.py)."""
        return self.output_mode == OutputMode.Default

    def __repr__(self) -> str:
        parts = [super().__repr__()[len("Options(") : -1]]
        parts += [
            f"{name}={part!r}"
            for name, part in (
                ("Training", self._training),
                ("Precision", self._precision),
                ("TensorLocations", self._tensor_locations),
                ("_Popart", self._popart),
                ("Distributed", self._distributed),
            )
        ]
        return "Options(" + ", ".join(parts) + ")"

    # sub-objects, as properties like PopTorch's
    @property
    def Training(self) -> _TrainingOptions:
        return self._training

    @property
    def Precision(self) -> _PrecisionOptions:
        return self._precision

    @property
    def TensorLocations(self) -> _TensorLocationOptions:
        return self._tensor_locations

    @property
    def Distributed(self) -> _DistributedOptions:
        return self._distributed

    @property
    def _Popart(self) -> _PopartOptions:
        return self._popart

    def replicationFactor(self, replication_factor: int) -> "Options":
        if int(replication_factor) < 1:
            raise ValueError(f"replicationFactor({replication_factor}): must be >= 1")
        self._record("replicationFactor", replication_factor)
        self.replication_factor = int(replication_factor)
        return self

    def deviceIterations(self, device_iterations: int) -> "Options":
        if int(device_iterations) < 1:
            raise ValueError(f"deviceIterations({device_iterations}): must be >= 1")
        self._record("deviceIterations", device_iterations)
        self.device_iterations = int(device_iterations)
        return self

    def outputMode(self, output_mode: OutputMode, output_return_period: Optional[int] = None) -> "Options":
        if not isinstance(output_mode, OutputMode):
            raise TypeError("outputMode expects a poptorch.OutputMode")
        if output_mode == OutputMode.EveryN and not (output_return_period and output_return_period > 0):
            raise ValueError("EveryN anchor must have output_return_period set to valid positive integer")
        self._record("outputMode", output_mode, output_return_period)
        self.output_mode = output_mode
        self.output_return_period = output_return_period or 1
        return self

    def randomSeed(self, random_seed: int) -> "Options":
        if not isinstance(random_seed, int):
            raise TypeError("randomSeed expects an int")
        self._record("randomSeed", random_seed)
        torch.manual_seed(random_seed)  # PopTorch seeds the host's generator here, not at compile
        self.random_seed = int(random_seed)
        return self

    def broadcastBuffers(self, broadcast_buffers: bool = True) -> "Options":
        self._record("broadcastBuffers", broadcast_buffers)
        self.broadcast_buffers = bool(broadcast_buffers)
        return self

    def setAvailableMemoryProportion(self, available_memory_proportion: Dict[str, float]) -> "Options":
        for key in available_memory_proportion:
            if not key.startswith("IPU"):
                raise ValueError(f'available memory proportions are {{"IPU0": 0.5}}; invalid key {key!r}')
        self._record("setAvailableMemoryProportion", dict(available_memory_proportion))
        self.available_memory_proportion = {
            int(k[3:]): float(v) for k, v in available_memory_proportion.items()
        }
        return self

    def setExecutionStrategy(self, strategy: PipelinedExecution) -> "Options":
        if not isinstance(strategy, PipelinedExecution):
            raise TypeError("setExecutionStrategy expects poptorch.PipelinedExecution or ShardedExecution")
        self._record("setExecutionStrategy", strategy)
        self.execution_strategy = strategy
        return self

    def enableExecutableCaching(self, path: str) -> "Options":
        self._record("enableExecutableCaching", path)
        self.executable_cache = path
        return self

    def useIpuModel(self, use_model: bool) -> "Options":
        self._record("useIpuModel", use_model)
        self.ipu_model = bool(use_model)
        return self

    def useOfflineIpuTarget(self, ipu_version: int = 2) -> "Options":
        self.connectionType(ConnectionType.Never)  # python/options.py:1665
        self._record("useOfflineIpuTarget", ipu_version)
        self.offline_ipu_version = int(ipu_version)
        return self

    def enableSyntheticData(self, enabled: bool) -> "Options":
        # python/options.py:1763-1779: PopART's syntheticDataMode, 2 (RandomNormal) or 0 (Off)
        self._Popart.set("syntheticDataMode", 2 if enabled else 0)
        return self

    def connectionType(self, connection_type: ConnectionType) -> "Options":
        assert isinstance(connection_type, ConnectionType)  # python/options.py:1584-1603
        self._record("connectionType", connection_type)
        self.connection_type = connection_type
        return self

    def syncPattern(self, sync_pattern: SyncPattern) -> "Options":
        assert isinstance(sync_pattern, SyncPattern)  # python/options.py:1605-1631
        self._record("syncPattern", sync_pattern)
        self.sync_pattern = sync_pattern
        return self

    def autoRoundNumIPUs(self, auto_round_num_ipus: bool = True) -> "Options":
        self._record("autoRoundNumIPUs", auto_round_num_ipus)  # python/options.py:1381-1394
        self.auto_round_num_ipus = auto_round_num_ipus
        return self

    def maxRepeatLogs(self, max_lines: Optional[int]) -> "Options":
        # python/options.py:1528-1539: None shows every line, stored as 2**64 - 1
        self._record("maxRepeatLogs", max_lines)
        self.max_repeat_logs = (1 << 64) - 1 if max_lines is None else max_lines
        return self

    def anchorTensor(
        self,
        short_name: str,
        long_name: str,
        output_mode: Optional[OutputMode] = None,
        output_return_period: Optional[int] = 1,
    ) -> None:
        """Read the PopART tensor ``long_name`` back after each run, by ``short_name``
        (python/options.py:1669-1690: [long_name, mode unset, mode, period]; the period is 1
        unless the mode is EveryN). Returns None, as PopTorch's does."""
        self._record("anchorTensor", short_name, long_name, output_mode, output_return_period)
        if output_mode != OutputMode.EveryN:
            output_return_period = 1
        self.anchored_tensors[short_name] = [
            long_name,
            output_mode is None,
            output_mode,
            output_return_period,
        ]

    def updatableNamedBuffers(self, buffers: List[str]) -> "Options":
        """Buffers copyNamedBuffersToDevice may rewrite: a PopART option (options.py:1863-1869)."""
        self._Popart.set("updatableNamedBuffers", buffers)
        return self

    def logCycleCount(self, log_cycle_count: bool) -> "Options":
        # python/options.py:1781-1795 (3.4.0): a PopART option; the compile refuses it off hardware
        self._Popart.set("instrumentWithHardwareCycleCounter", log_cycle_count)
        return self

    def logDir(self, log_dir: str) -> "Options":
        self._record("logDir", log_dir)
        self.log_dir = log_dir  # python/options.py:1518-1526
        return self

    def modelName(self, name: str) -> "Options":
        self._record("modelName", name)
        return self
