"""The one typed configuration of the application.

A run's configuration is built in three layers, each overriding the last:
  1. the dataclass defaults below,
  2. a preset (``app/presets/<name>.yaml``, a name of the paper's grid such as ``b2-g16-lnpn-half``,
     or any YAML file path),
  3. dotted overrides from the command line: ``model.group_size=16 optim.lr=0.1``.
Values of overrides are parsed as YAML (``true``, ``1e-3``, ``[224, 256]``). The result is
type-checked and validated as a whole before any data is read or any model is built.
"""

import dataclasses
import datetime
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from app.data.datasets import BUILTIN, IMAGE_EXTENSIONS, is_a
from app.presets import deep_update, grid_names, grid_preset
from app.run_folder import python_command
from backends.errors import ConfigError  # noqa: F401  (defined below the device layer, which raises it too)
from backends.specs import BatchPlan
from ipu_options.config import IPUConfig
from model.blocks import GRAPHS
from model.efficientnet import MODEL_NAMES, variant_key
from model.norms import NORM_GROUPINGS, NORM_KINDS
from model.padding import PADDINGS

PRESET_DIR = Path(__file__).parent / "presets"
DEVICES = ("auto", "cpu", "cuda", "ipu", "ipu-model")


class UsageError(ConfigError):
    """A command line or configuration file that cannot be used, with a message of its own."""

    def __init__(self, field_name: str, message: str):
        self.field_name = field_name
        ValueError.__init__(self, message)


@dataclass
class ModelConfig:
    name: str = "b0"
    group_size: int = 1
    expand_ratio: int = 6
    norm: str = "batch"
    proxy_norm: bool = False
    norm_groups: int = 4
    norm_eps: float = 1e-3
    dropout: Optional[float] = None  # None: the variant's own (0.2 for B0 … 0.5 for B7)
    drop_path: float = 0.2
    # same: TensorFlow's SAME, as the official code (timm's tf_efficientnet_* too); symmetric: k//2
    # on every side, as timm's efficientnet_* and torchvision (to reproduce their outputs)
    padding: str = "same"
    # official: squeeze-excite and head under proxy norm as the official code; v1: this
    # project's first graph (with padding=symmetric: what checkpoints without a record computed)
    graph: str = "official"
    # strided: group g of a group norm holds channels g, g+G, g+2G, … (the official code's,
    # Graphcore's TF group_norm default); contiguous: torch's nn.GroupNorm (what checkpoints
    # without a record computed). Layer and batch norm are the same function either way.
    norm_grouping: str = "strided"
    init_from: Optional[str] = None  # a local timm/torchvision/our checkpoint to start from
    init_source: str = "ours"  # ours | timm | torchvision


@dataclass
class DataConfig:
    dataset: str = "digits"  # digits | synthetic | generated | a folder with train/ and val/
    resolution: int = 224  # training resolution
    val_resolutions: List[int] = field(default_factory=list)  # empty: the training resolution
    # the data's own test size for the reduced-resolution recipe (make paper, study resolution);
    # None: the model's native one (224 for B0 …); app/resolution.py recipe_native
    native_resolution: Optional[int] = None
    workers: int = 2
    prefetch: int = 2  # batches each worker process keeps in flight (torch's prefetch_factor)
    async_loader: bool = True  # ipu/ipu-model training: poptorch.DataLoader, AsyncRebatched mode
    random_crop_scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: bool = True
    augment: bool = True  # false: training images get the validation preprocessing (fine-tuning)
    reduced_decode: bool = True  # decode JPEGs at 1/2-1/8 where the crop still has the pixels
    mixup: float = 0.0  # per-sample Beta(α, α) mixup, the α; 0 = off (app/data/mixing.py)
    cutmix_lambda: float = 1.0  # CutMix v1's λ₀ (one λ per batch); 1 = off
    synthetic_images: int = 1024  # images per epoch for synthetic / generated data


@dataclass
class OptimConfig:
    name: str = "rmsprop"  # sgd | rmsprop | adamw
    lr: float = 0.016  # at ``lr_reference_batch``; scaled with the global batch by ``lr_scaling``
    lr_reference_batch: int = 256
    # auto: linear for sgd/rmsprop (the paper's rates are per image), sqrt for adamw (app/optim.py)
    lr_scaling: str = "auto"  # auto | linear | sqrt | none
    lr_diverges_at: Optional[float] = None  # a preset's measured limit: a peak rate >= it is warned of
    momentum: float = 0.9
    nesterov: bool = False  # sgd only
    alpha: float = 0.9  # RMSprop squared-gradient decay
    eps: float = 1e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-5


@dataclass
class ScheduleConfig:
    name: str = "exponential"  # exponential | cosine | step
    warmup_epochs: float = 5.0
    decay_rate: float = 0.97  # exponential / step: factor per decay_epochs
    decay_epochs: float = 2.4
    min_lr_ratio: float = 0.0  # cosine floor


@dataclass
class TrainConfig:
    epochs: float = 350.0
    max_steps: Optional[int] = None  # stop after this many weight updates (quick runs)
    micro_batch: int = 32  # images per replica per forward pass
    grad_accum: int = 1
    replicas: int = 1  # data-parallel copies (IPU replicas, or DDP processes)
    label_smoothing: float = 0.1
    ema_decay: float = 0.0  # per weight update; 0 = no EMA
    ema_every: int = 1  # average every N updates (each average copies IPU weights to the host)
    # The paper's averaging instead: V ← d·V + (1 − d)·θ over end-of-epoch weights (TF1 weight_avg.py,
    # weight_avg_exp 0.97); 0 = off. Used where the EMA would be (validation, fine-tuning).
    weight_avg_exp: float = 0.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CPU/CUDA autocast); the IPU's is ipu.precision
    channels_last: bool = False
    seed: int = 0
    log_every: int = 10  # steps
    val_every: float = 1.0  # epochs
    keep_checkpoints: int = 3
    # A checkpoint besides validation's every N steps, and at least every M minutes: after a
    # kill -9 the newest checkpoint is at most that much work behind (None: off).
    checkpoint_every: Optional[int] = None
    checkpoint_minutes: Optional[float] = 15.0
    cpu_threads: Optional[int] = None  # torch intra-op threads on the CPU; None: torch's default


@dataclass
class FinetuneConfig:
    checkpoint: Optional[str] = None
    resolution: Optional[int] = None  # None: the model's native resolution
    epochs: float = 2.0
    # The rate for ``lr_reference_batch`` images, scaled linearly with the fine-tuning's global
    # batch: the README's --base-learning-rate=-11 is 2^-11 PER IMAGE (TF1 LR_Schedules/cosine.py:
    # initial_lr = 2^exponent × global_batch_size), 0.25 at the documented global batch of 512.
    lr: float = 2.0**-11
    lr_reference_batch: int = 1
    trainable_from: str = "blocks.6"  # freeze every module before this one
    # Set by the finetune command in its run's configuration: the checkpoint fine-tuned. It marks
    # a fine-tuning run, which `train --resume` / `finetune --resume` resume with the freezing.
    source: Optional[str] = None


@dataclass
class DistConfig:
    instances: int = 1  # PopRun instances (IPU pods)
    nnodes: int = 1  # torchrun nodes
    rdzv_endpoint: Optional[str] = None
    launcher_args: List[str] = field(default_factory=list)  # passed through to poprun / torchrun
    dry_run: bool = False


@dataclass
class LogConfig:
    out_dir: str = "runs"
    name: Optional[str] = None  # run folder name; None: <model>-<variant>-<time>
    wandb: bool = False
    wandb_mode: str = "offline"  # offline (never a network call) | online
    wandb_project: str = "efficientnet-ipu"


@dataclass
class StudyConfig:
    """``python -m experiments study <name>`` (experiments/study.py): the repeats and where the results go."""

    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    out_dir: str = "benchmarks/results"  # rows (.jsonl, .csv), report (.md) and plot (.png)
    report_only: bool = False  # regenerate the report and plot from the existing rows, run nothing
    variants: List[str] = field(default_factory=list)  # only these labels ("BN mb2", "G4 e5"); empty: all


@dataclass
class Config:
    device: str = "auto"
    resume: Optional[str] = None  # a run folder or checkpoint to continue
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ipu: IPUConfig = field(default_factory=IPUConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    study: StudyConfig = field(default_factory=StudyConfig)

    @property
    def global_batch(self) -> int:
        """Images of one weight update across the job (``BatchPlan.global_batch``)."""
        t = self.train
        return BatchPlan(t.micro_batch, t.grad_accum, replicas=t.replicas).global_batch

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        validate(self)
        return self


# ----------------------------------------------------------------------------- building


def _as_float(value: Any) -> Optional[float]:
    """A number written as a string (``1e-3``: YAML 1.1 reads exponents without a dot as text)
    as a finite float, else None."""
    if not isinstance(value, str):
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _as_text(value: Any, text: Optional[str]) -> Optional[str]:
    """A scalar YAML did not read as a string, for a text field: what was typed on the command line
    (``log.name=2024-06-01`` is a date to YAML, ``log.name=007`` a number), else the value written
    out (numbers and dates of a YAML file). None where it is no scalar (lists, mappings)."""
    if value is None or isinstance(value, (list, dict)):
        return None
    if text is not None:
        return text
    if isinstance(value, (int, float, datetime.date)) and not isinstance(value, bool):
        return str(value)
    return None


def _check_type(path: str, value: Any, hint: Any, text: Optional[str] = None) -> Any:
    """Return ``value`` as type ``hint`` (ints widen to floats, numeric strings are read as floats,
    scalars become text for text fields) or raise ConfigError. ``text``: the value as typed."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        for option in args:
            try:
                return _check_type(path, value, option, text)
            except ConfigError:
                continue
        raise ConfigError(path, value, " or ".join(getattr(a, "__name__", str(a)) for a in args))
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(path, value, "null")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            value = [value]  # a single value where a list is expected: a list of one
        return [_check_type(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(path, value, "a mapping")
        return {
            _check_type(path, k, args[0]): _check_type(f"{path}.{k}", v, args[1]) for k, v in value.items()
        }
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(path, value, "a finite number")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and _as_float(value) is not None:
        return _as_float(value)
    if hint is str and not isinstance(value, str) and _as_text(value, text) is not None:
        return _as_text(value, text)
    if hint is Any or (
        isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        return value
    raise ConfigError(path, value, getattr(hint, "__name__", str(hint)))


def _merge(
    obj: Any, updates: Dict[str, Any], prefix: str = "", texts: Optional[Dict[str, str]] = None
) -> None:
    """Set ``updates`` on the dataclass ``obj``, type-checked; ``texts``: dotted path → the value
    as typed on the command line."""
    texts = texts or {}
    hints = typing.get_type_hints(type(obj))
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in hints:
            valid = ", ".join(f.name for f in dataclasses.fields(obj))
            where = prefix.rstrip(".") or "the top level"
            raise ConfigError(path, value, f"a known field; {where} has: {valid}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(path, value, f"a mapping of {key} fields")
            _merge(current, value, f"{path}.", texts)
        else:
            setattr(obj, key, _check_type(path, value, hints[key], texts.get(path)))


def parse_overrides(overrides: List[str]) -> Dict[str, Any]:
    """['model.group_size=16', 'optim.lr=0.1'] → {'model': {'group_size': 16}, 'optim': {'lr': 0.1}}."""
    tree: Dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(item, item, "an override of the form section.field=value")
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        try:
            node[leaf] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            raise UsageError(
                key,
                f"{item}: the value is not valid YAML ({_yaml_problem(error)}); "
                "quote it, e.g. 'log.name=\"a:b\"'",
            ) from None
    return tree


def _yaml_problem(error: Exception) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def read_yaml_file(path: Path) -> Dict[str, Any]:
    """A YAML configuration file as a mapping (empty file: {}), or a UsageError naming the file,
    the place and the problem: not text, a syntax error, or no mapping at its top level."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(
            "--config",
            f"{path} is not a text file (byte {error.start} is not UTF-8): give a YAML configuration file",
        ) from None
    except OSError as error:
        raise UsageError("--config", f"cannot read {path}: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UsageError(
            "--config",
            f"{path} is not valid YAML: {_yaml_problem(error)}; fix that "
            "line (a configuration is a mapping, e.g. `optim: {lr: 0.1}`)",
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            "--config",
            f"{path} holds a {type(data).__name__} ({str(data)[:40]!r}), not a "
            "mapping of sections: write it as e.g. `optim: {lr: 0.1}`",
        )
    return data


def override_texts(overrides: List[str]) -> Dict[str, str]:
    """{'log.name': '2024-06-01'}: each override's value as typed (text fields keep it as is)."""
    texts = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if sep and raw.strip():
            texts[key.strip()] = raw.strip()
    return texts


def preset_names() -> List[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_")) + grid_names()


def load_preset(name: str) -> Dict[str, Any]:
    """A preset as a nested dict: a YAML file path, a file in app/presets, or a grid name."""

    path = Path(name)
    if not path.suffix:
        path = PRESET_DIR / f"{name}.yaml"
    if path.is_file():
        data = read_yaml_file(path)
        base = data.pop("base", None)  # a preset may extend another
        if base is not None and not isinstance(base, str):
            raise UsageError("--config", f"{path}: base={base!r} must name one preset or YAML file")
        return deep_update(load_preset(base), data) if base else data
    grid = grid_preset(name)
    if grid is not None:
        return grid
    raise ConfigError("config", name, f"a YAML file or one of the presets: {', '.join(preset_names())}")


def build_config(preset: Optional[str] = None, overrides: Optional[List[str]] = None) -> Config:
    """Defaults ← preset ← overrides, then validated."""
    cfg = Config()
    if preset:
        _merge(cfg, load_preset(preset))
    if overrides:
        _merge(cfg, parse_overrides(overrides), texts=override_texts(overrides))
    return cfg.validate()


def changes_from_preset(cfg: Config, preset: str) -> str:
    """``cfg``'s fields that differ from ``preset`` (defaults ← preset) as dotted overrides, the
    resolved configuration in one line ("nothing" when it is the preset itself)."""
    base = Config()
    _merge(base, load_preset(preset))
    before, after = dotted_fields(base.to_dict()), dotted_fields(cfg.to_dict())
    changed = [f"{k}={_as_override(v)}" for k, v in after.items() if before.get(k) != v]
    return " ".join(changed) if changed else "nothing"


def config_from_dict(data: Dict[str, Any]) -> Config:
    """Rebuild a Config saved with ``to_dict`` (a run folder's config.yaml)."""
    cfg = Config()
    _merge(cfg, data)
    return cfg.validate()


# ----------------------------------------------------------------------------- validation


def validate_scale_out(cfg: Config) -> None:
    """train.replicas is the whole job's replica count; processes/instances must divide it."""
    t, d = cfg.train, cfg.dist
    on_ipu = cfg.device in ("ipu", "ipu-model")
    _require(
        on_ipu or d.instances == 1,
        "dist.instances",
        d.instances,
        "1 on cpu/cuda (PopRun instances are for IPU pods; several GPU machines: dist.nnodes)",
    )
    _require(
        not on_ipu or d.nnodes == 1,
        "dist.nnodes",
        d.nnodes,
        "1 on IPUs (several POD hosts: dist.instances with poprun's --host in dist.launcher_args)",
    )
    _require(
        t.replicas % d.instances == 0,
        "train.replicas",
        t.replicas,
        f"a multiple of dist.instances={d.instances} (each instance drives the same number)",
    )
    _require(
        t.replicas % d.nnodes == 0,
        "train.replicas",
        t.replicas,
        f"a multiple of dist.nnodes={d.nnodes} (torchrun starts replicas/nnodes processes per node)",
    )
    _require(
        d.nnodes == 1 or bool(d.rdzv_endpoint),
        "dist.rdzv_endpoint",
        d.rdzv_endpoint,
        "host:port of the first node when dist.nnodes > 1 (every node must give the same)",
    )
    _require(
        d.instances == 1 or cfg.device != "ipu-model",
        "dist.instances",
        d.instances,
        "1 with device=ipu-model (the IPU Model emulator has no replication; use device=ipu)",
    )


def _require(ok: bool, path: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(path, value, allowed)


def is_folder_name(name: str) -> bool:
    """One path component: no separators, not the current or parent folder, no NUL."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def check_dataset(cfg: Config) -> None:
    """``data.dataset`` is a built-in or a folder with train/ and val/ (the commands that read data
    call this before any work; ``plan`` does not need the data)."""
    name = cfg.data.dataset
    if name in BUILTIN:
        return
    root = Path(name).expanduser()
    missing = [sub for sub in ("train", "val") if not (root / sub).is_dir()]
    if not root.is_dir() or missing:
        what = "no such folder" if not root.is_dir() else f"no {' or '.join(s + '/' for s in missing)}"
        raise ConfigError(
            "data.dataset",
            name,
            f"one of {', '.join(BUILTIN)} or an ImageNet-style folder with train/<class>/ "
            f"and val/<class>/ ({what}): give the folder's path",
        )
    check_class_folders(root)


def check_class_folders(root: Path) -> None:
    """Every class of ``root/train`` has an image (an empty one would be a class no image teaches,
    still counted in the classifier), and ``val/`` has no class ``train/`` lacks."""

    def classes(split: str) -> Dict[str, bool]:  # class → holds an image file
        found = {}
        for entry in sorted(os.scandir(root / split), key=lambda e: e.name):
            if is_a(entry, "dir"):
                with os.scandir(entry.path) as files:  # stops at the first image (ImageNet: fast)
                    found[entry.name] = any(
                        f.name.lower().endswith(IMAGE_EXTENSIONS) and is_a(f, "file") for f in files
                    )
        return found

    train, val = classes("train"), classes("val")
    empty = [c for c, has_images in train.items() if not has_images]
    if empty:
        raise UsageError(
            "data.dataset",
            f"data.dataset={str(root)!r}: train/ class folder(s) "
            f"{', '.join(empty[:5])} hold no images ({', '.join(IMAGE_EXTENSIONS)}): add "
            "their images or remove the folders (every folder of train/ is a class)",
        )
    only_val = [c for c in val if c not in train]
    if only_val:
        raise UsageError(
            "data.dataset",
            f"data.dataset={str(root)!r}: val/ has class folder(s) "
            f"{', '.join(only_val[:5])} that train/ lacks: no image teaches them; move "
            "them into train/ too, or out of val/",
        )


def _validate_model(m) -> None:
    """``cfg.model``: the architecture and where its first weights come from."""
    try:
        variant_key(m.name)
    except ValueError:
        raise ConfigError("model.name", m.name, f"one of {', '.join(MODEL_NAMES)}") from None
    _require(m.group_size >= 1, "model.group_size", m.group_size, "an integer >= 1 (1 = depthwise)")
    _require(m.expand_ratio >= 1, "model.expand_ratio", m.expand_ratio, "an integer >= 1")
    _require(m.norm in NORM_KINDS, "model.norm", m.norm, f"one of {', '.join(NORM_KINDS)}")
    _require(
        m.norm_groups in (1, 2, 4, 8),
        "model.norm_groups",
        m.norm_groups,
        "1, 2, 4 or 8 (a divisor of every layer width)",
    )
    _require(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "a number > 0")
    _require(m.dropout is None or 0 <= m.dropout < 1, "model.dropout", m.dropout, "in [0, 1) or null")
    _require(0 <= m.drop_path < 1, "model.drop_path", m.drop_path, "in [0, 1)")
    _require(
        m.padding in PADDINGS,
        "model.padding",
        m.padding,
        "same (TensorFlow's, the official code's) or symmetric (timm's efficientnet_*, torchvision)",
    )
    _require(
        m.graph in GRAPHS,
        "model.graph",
        m.graph,
        "official, or v1 for checkpoints written before the official graph",
    )
    _require(
        m.norm_grouping in NORM_GROUPINGS,
        "model.norm_grouping",
        m.norm_grouping,
        "strided (the official code's group norm) or contiguous (torch's, for checkpoints written before it)",
    )
    _require(
        m.init_source in ("ours", "timm", "torchvision"),
        "model.init_source",
        m.init_source,
        "ours, timm or torchvision",
    )


def _validate_data(d) -> None:
    """``cfg.data``: resolutions, loading and augmentation."""
    _require(d.resolution >= 32, "data.resolution", d.resolution, "an integer >= 32")
    _require(
        all(r >= 32 for r in d.val_resolutions), "data.val_resolutions", d.val_resolutions, "integers >= 32"
    )
    _require(
        d.native_resolution is None or d.native_resolution >= 32,
        "data.native_resolution",
        d.native_resolution,
        "null or an integer >= 32",
    )
    _require(d.workers >= 0, "data.workers", d.workers, "an integer >= 0")
    _require(d.prefetch >= 1, "data.prefetch", d.prefetch, "an integer >= 1")
    lo, hi = (d.random_crop_scale + [0, 0])[:2]
    _require(
        len(d.random_crop_scale) == 2 and 0 < lo <= hi <= 1,
        "data.random_crop_scale",
        d.random_crop_scale,
        "[min, max] with 0 < min <= max <= 1",
    )
    _require(d.mixup >= 0, "data.mixup", d.mixup, "a number >= 0 (Beta(α, α); 0 = off)")
    # 1.55·λ₀ − 0.96 is the probability of no cut: λ₀ below 0.62 always cuts
    _require(
        0 < d.cutmix_lambda <= 1,
        "data.cutmix_lambda",
        d.cutmix_lambda,
        "in (0, 1]: CutMix v1's λ₀ (the paper's 0.95 B1 … 0.8 B5), 1 = off",
    )
    _require(d.synthetic_images >= 1, "data.synthetic_images", d.synthetic_images, "an integer >= 1")


def _validate_optim(o) -> None:
    """``cfg.optim``: the optimiser and its hyper-parameters."""
    _require(o.name in ("sgd", "rmsprop", "adamw"), "optim.name", o.name, "sgd, rmsprop or adamw")
    _require(o.lr > 0, "optim.lr", o.lr, "a number > 0")
    _require(o.lr_reference_batch >= 1, "optim.lr_reference_batch", o.lr_reference_batch, "an integer >= 1")
    _require(
        o.lr_scaling in ("auto", "linear", "sqrt", "none"),
        "optim.lr_scaling",
        o.lr_scaling,
        "auto (linear for sgd/rmsprop, sqrt for adamw), linear, sqrt or none",
    )
    _require(
        o.lr_diverges_at is None or o.lr_diverges_at > 0,
        "optim.lr_diverges_at",
        o.lr_diverges_at,
        "null or a number > 0",
    )
    _require(0 <= o.momentum < 1, "optim.momentum", o.momentum, "in [0, 1)")
    _require(
        not o.nesterov or (o.name == "sgd" and o.momentum > 0),
        "optim.nesterov",
        o.nesterov,
        "false, or true only with optim.name=sgd and optim.momentum > 0",
    )
    _require(0 < o.alpha < 1, "optim.alpha", o.alpha, "in (0, 1)")
    _require(o.eps > 0, "optim.eps", o.eps, "a number > 0")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0")
    _require(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        "optim.betas",
        o.betas,
        "[beta1, beta2], two numbers in [0, 1) (AdamW's averaging factors)",
    )


def _validate_schedule(s: ScheduleConfig) -> None:
    """``cfg.schedule``: the learning-rate schedule's own fields."""
    _require(
        s.name in ("exponential", "cosine", "step"), "schedule.name", s.name, "exponential, cosine or step"
    )
    _require(s.warmup_epochs >= 0, "schedule.warmup_epochs", s.warmup_epochs, "a number >= 0")
    _require(0 < s.decay_rate <= 1, "schedule.decay_rate", s.decay_rate, "in (0, 1]")
    _require(s.decay_epochs > 0, "schedule.decay_epochs", s.decay_epochs, "a number > 0")
    _require(
        0 <= s.min_lr_ratio <= 1,
        "schedule.min_lr_ratio",
        s.min_lr_ratio,
        "in [0, 1] (the cosine floor as a fraction of the peak rate)",
    )


def _validate_train(cfg: Config) -> None:
    """``cfg.train``: its own fields, then the micro-batch against batch norm's statistics."""
    t = cfg.train
    _require(t.epochs > 0, "train.epochs", t.epochs, "a number > 0")
    _require(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, "null or >= 1")
    _require(
        t.cpu_threads is None or t.cpu_threads >= 1,
        "train.cpu_threads",
        t.cpu_threads,
        "null (torch's default) or an integer >= 1",
    )
    for name in ("micro_batch", "grad_accum", "replicas", "log_every", "keep_checkpoints"):
        _require(getattr(t, name) >= 1, f"train.{name}", getattr(t, name), "an integer >= 1")
    _require(0 <= t.label_smoothing < 1, "train.label_smoothing", t.label_smoothing, "in [0, 1)")
    _require(0 <= t.ema_decay < 1, "train.ema_decay", t.ema_decay, "in [0, 1) (0 = off)")
    _require(t.ema_every >= 1, "train.ema_every", t.ema_every, "an integer >= 1")
    # numpy's seeds are below 2**32, and each process seeds with train.seed + its rank
    _require(0 <= t.seed < 2**31, "train.seed", t.seed, "an integer in [0, 2**31)")
    _require(0 <= t.weight_avg_exp < 1, "train.weight_avg_exp", t.weight_avg_exp, "in [0, 1) (0 = off)")
    _require(
        t.weight_avg_exp == 0 or t.ema_decay == 0,
        "train.weight_avg_exp",
        t.weight_avg_exp,
        f"0 while train.ema_decay={t.ema_decay:g}: one weight average at a time (set the other to 0)",
    )
    _require(t.precision in ("fp32", "bf16", "fp16"), "train.precision", t.precision, "fp32, bf16 or fp16")
    _require(t.val_every > 0, "train.val_every", t.val_every, "a number > 0")
    # Batch norm in training needs more than one value per channel: one image whose last maps are
    # 1×1 (five stride-2 stages) has one, and torch fails mid-run, after the run folder exists.
    last_map = -(-cfg.data.resolution // 32)
    _require(
        cfg.model.norm != "batch" or t.micro_batch * last_map**2 > 1,
        "train.micro_batch",
        t.micro_batch,
        f"at least 2 with model.norm=batch at data.resolution={cfg.data.resolution} "
        "(its last feature maps are 1×1: batch statistics of one value); or model.norm=group / "
        "layer, which normalise each image on its own",
    )


def _validate_checkpoints_and_warmup(t: TrainConfig, s: ScheduleConfig) -> None:
    """How often a run saves, and a warm-up that fits in the run."""
    _require(
        t.checkpoint_every is None or t.checkpoint_every >= 1,
        "train.checkpoint_every",
        t.checkpoint_every,
        "null (off) or an integer >= 1 (steps)",
    )
    _require(
        t.checkpoint_minutes is None or t.checkpoint_minutes > 0,
        "train.checkpoint_minutes",
        t.checkpoint_minutes,
        "null (off) or a number > 0 (minutes)",
    )
    # warm-up longer than the run: the rate would never reach its peak nor the schedule start
    _require(
        s.warmup_epochs <= t.epochs,
        "schedule.warmup_epochs",
        s.warmup_epochs,
        f"at most train.epochs={t.epochs:g}: lower schedule.warmup_epochs or raise train.epochs",
    )


def _validate_finetune(f: FinetuneConfig) -> None:
    """``cfg.finetune``: the fine-tuning phase."""
    _require(f.epochs > 0, "finetune.epochs", f.epochs, "a number > 0")
    _require(f.lr > 0, "finetune.lr", f.lr, "a number > 0")
    _require(
        f.lr_reference_batch >= 1,
        "finetune.lr_reference_batch",
        f.lr_reference_batch,
        "an integer >= 1 (finetune.lr is the rate for this many images)",
    )
    _require(
        f.resolution is None or f.resolution >= 32,
        "finetune.resolution",
        f.resolution,
        "null or an integer >= 32",
    )


def _validate_dist_and_log(cfg: Config) -> None:
    """``cfg.dist`` (how the replicas are spread) and ``cfg.log`` (where a run logs)."""
    _require(
        cfg.dist.instances >= 1 and cfg.dist.nnodes >= 1,
        "dist.instances/nnodes",
        (cfg.dist.instances, cfg.dist.nnodes),
        "integers >= 1",
    )
    validate_scale_out(cfg)
    _require(
        cfg.log.wandb_mode in ("offline", "online"), "log.wandb_mode", cfg.log.wandb_mode, "offline or online"
    )
    _require(
        cfg.log.name is None or is_folder_name(cfg.log.name),
        "log.name",
        cfg.log.name,
        "a plain folder name (no / or \\, not . or ..): the run folder is log.out_dir/<log.name>",
    )


def validate(cfg: Config) -> None:
    """Every check that can be made without data or a model. Raises ConfigError on the first."""
    _require(cfg.device in DEVICES, "device", cfg.device, f"one of {', '.join(DEVICES)}")
    _validate_model(cfg.model)
    _validate_data(cfg.data)
    _validate_optim(cfg.optim)
    _validate_schedule(cfg.schedule)
    _validate_train(cfg)
    _validate_checkpoints_and_warmup(cfg.train, cfg.schedule)
    _validate_finetune(cfg.finetune)
    _validate_dist_and_log(cfg)
    _require(
        len(cfg.study.seeds) >= 1 and len(set(cfg.study.seeds)) == len(cfg.study.seeds),
        "study.seeds",
        cfg.study.seeds,
        "a list of distinct integers, at least one",
    )
    cfg.ipu.validate()
    validate_ipu_lists(cfg)


def validate_ipu_lists(cfg: Config) -> None:
    """Per-IPU lists against the IPUs a replica uses, known here when ``ipu.pipeline`` is given
    (no pipeline: one IPU; "auto": the planner decides, and the backend checks after it)."""
    pipeline = cfg.ipu.pipeline
    if isinstance(pipeline, str):
        return
    ipus = max(pipeline.values()) + 1 if pipeline else 1
    amp = cfg.ipu.available_memory_proportion
    _require(
        len(amp) in (1, ipus),
        "ipu.available_memory_proportion",
        amp,
        f"one value for all IPUs or one per IPU: this configuration uses {ipus} IPU"
        f"{'s' if ipus > 1 else ''} per replica (ipu.pipeline)",
    )


# ----------------------------------------------------------------------------- resuming

# What `train --resume RUN field=value` may change. A resume continues the run's optimiser, data
# order and weights, so only settings that none of those keep are open: how long and how the
# rate schedule goes (the rate of every step is computed from the step), how often it logs,
# validates and keeps checkpoints, where and how the same steps run. Everything else is the
# run's own: a different value would be silently overwritten by the checkpoint (optimiser
# hyper-parameters live in its state), break it (another optimiser), or make a different
# experiment under the old run's name. Entries ending in "." open a whole section.
RESUME_MAY_CHANGE = (
    "device",
    "resume",
    "data.workers",
    "data.val_resolutions",
    "optim.lr",
    "optim.lr_reference_batch",
    "optim.lr_scaling",
    "optim.lr_diverges_at",
    "schedule.",
    "train.epochs",
    "train.max_steps",
    "train.log_every",
    "train.val_every",
    "train.keep_checkpoints",
    "train.checkpoint_every",
    "train.checkpoint_minutes",
    "train.cpu_threads",
    "train.channels_last",
    # how the global batch is made (it must stay the same: steps per epoch, data order)
    "train.micro_batch",
    "train.grad_accum",
    "train.replicas",
    "finetune.epochs",
    "ipu.device_iterations",
    "ipu.pipeline",
    "ipu.recompute",
    "ipu.available_memory_proportion",
    "ipu.optimizer_state_offchip",
    "ipu.replicated_tensor_sharding",
    "ipu.executable_cache",
    "ipu.output_mode",
    "ipu.plan_ipus",
    "ipu.plan_margin",
    "dist.",
    "log.",
)
GLOBAL_BATCH_FIELDS = ("train.micro_batch", "train.grad_accum", "train.replicas")


def resume_may_change(path: str) -> bool:
    return any(
        path == entry or (entry.endswith(".") and path.startswith(entry)) for entry in RESUME_MAY_CHANGE
    )


def dotted_fields(data: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"optim.lr": 0.1, ...}: a configuration dict's leaves by dotted path."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and not (prefix == "ipu." and key == "pipeline"):
            flat.update(dotted_fields(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_changes(
    saved: Dict[str, Any],
    cfg: Config,
    run_dir: Any,
    weights: Any,
    config_file: Optional[Dict[str, Any]] = None,
) -> None:
    """Refuse, before any work, a resume whose configuration differs from the run's ``saved`` one
    (its config.yaml, or the checkpoint's) in a field a resume may not change, naming the field and
    the way out: a new run from the checkpoint's weights. ``config_file``: the run's config.yaml
    as it is now, when ``saved`` is the checkpoint's (a change that comes from an edit of it, not
    from the command line, is named as one)."""
    try:
        before = config_from_dict(saved)
    except ConfigError:
        before = None  # written by another version: compare what both spell the same way
    old = dotted_fields(before.to_dict() if before is not None else saved)
    new = dotted_fields(cfg.to_dict())
    changed = [p for p in new if p in old and old[p] != new[p]]
    refused = [p for p in changed if not resume_may_change(p)]
    if before is not None and before.global_batch != cfg.global_batch:
        refused += [p for p in changed if p in GLOBAL_BATCH_FIELDS]
    if not refused:
        return
    shown = "; ".join(f"{p}: run {old[p]!r}, now {new[p]!r}" for p in refused)
    edited = dotted_fields(config_file) if config_file is not None else {}
    if refused and all(p in edited and edited[p] == new[p] for p in refused):
        restore = "; ".join(f"{p}: {_as_override(old[p])}" for p in refused)
        raise UsageError(
            refused[0],
            (
                f"{Path(str(run_dir)) / 'config.yaml'} was edited after the run's checkpoints were written "
                f"({'; '.join(f'{p}: checkpoint {old[p]!r}, config.yaml {new[p]!r}' for p in refused)}); "
                f"a resume continues the checkpoint's run and cannot change that. Put the file back "
                f"({restore}) and resume again; or start a new "
                f"run with the edited settings from the checkpoint's weights: "
                f"{python_command()} -m app train --config "
                f"{Path(str(run_dir)) / 'config.yaml'} model.init_from={weights}"
            ),
        )
    settings = " ".join(f"{p}={_as_override(new[p])}" for p in refused if p != "model.init_from")
    why = (
        "the global batch decides the steps per epoch and the order of the data"
        if all(p in GLOBAL_BATCH_FIELDS for p in refused)
        else "the checkpoint holds the run's optimiser state, weights and data position for its own settings"
    )
    raise UsageError(
        refused[0],
        (
            f"--resume {run_dir} cannot change {shown} ({why}; a resume may change only "
            f"{', '.join(e + '*' if e.endswith('.') else e for e in RESUME_MAY_CHANGE[2:])}). Resume without "
            f"{'that override' if len(refused) == 1 else 'those overrides'}, or start a new run from the "
            f"checkpoint's weights: {python_command()} -m app train --config "
            f"{Path(str(run_dir)) / 'config.yaml'} "
            f"{settings} model.init_from={weights}".replace("  ", " ")
        ),
    )


def _as_override(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return text[:-4].strip() if text.endswith("...") else text
