"""Our EfficientNet beside Graphcore's official TensorFlow 1 code, on the same weights and input.

    python -m benchmarks.official_tf --examples-gitdir DIR [--preset b0-g16-lnpn] [--resolution 64]
        [--batch 2] [--out benchmarks/results/official-tf]

The report holds one section per preset: a run replaces its preset's rows and keeps the others'.

DIR is a git directory (bare or ``.git``) of graphcore/examples holding ``--commit`` (09b7c67).
The official ``vision/cnns/tensorflow1/training/Models/`` files (efficientnet.py and what it
imports from that folder) are read from it at run time into a temporary folder and imported from
there, never copied into this repository. TensorFlow is not a dependency of the project: run this
with a separate Python that has it, e.g.

    python3.11 -m venv /work/scratch/tf-venv
    /work/scratch/tf-venv/bin/pip install torch==2.13.0 tensorflow-cpu tf-keras numpy scipy six \\
        -r requirements.txt

(``tf-keras``: TensorFlow 2.16 and newer ship Keras 3, which has no ``tf.compat.v1.layers``; the
official code calls ``tf.layers.dense`` and ``tf.layers.Dropout``, so ``TF_USE_LEGACY_KERAS=1``
and tf-keras bring them back.) The official code runs unchanged under ``tf.compat.v1``; only its
IPU-only imports (``tensorflow.python.ipu``) are replaced by stand-ins written here from their
documented semantics (``_ipu_stand_ins``).

The official graph is built once, its variables are loaded from our model (an explicit name table,
``official_names``: every parameter on either side must be mapped, or the run stops), and each row
compares one of our graphs with it: the logits, and the gradient of the mean cross-entropy with
respect to every parameter. Relative difference = max |ours − official| / max |official| (per
parameter for the gradients, the worst parameter reported).
"""

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import string
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.config import Config, build_config
from app.objective import build_network
from model.blocks import ConvNormAct
from model.proxy_norm import PROXY_EPS, ProxyNormAct

from . import RESULTS_DIR
from .environment import describe, load_average
from .report import _environment, _table

OFFICIAL_COMMIT = "09b7c67"
OFFICIAL_FOLDER = "vision/cnns/tensorflow1/training/Models"
# efficientnet.py and the files of its folder that it imports (efficientnet.py:17, 25, 26).
OFFICIAL_FILES = ("efficientnet.py", "model_base.py", "batch_norm.py", "proxy_norm.py")
PACKAGE = "official_models"  # the temporary package the files are imported as
DEFAULT_PRESET = "b0-g16-lnpn"
# Each row: (label, overrides on top of the preset). The first is our default graph.
ROWS = (
    ("ours (defaults)", ()),
    ("model.padding=symmetric", ("model.padding=symmetric",)),
    ("model.graph=v1", ("model.graph=v1",)),
)
# A group-norm preset's row more: torch's contiguous channel groups instead of the official's
GROUP_NORM_ROWS = (("model.norm_grouping=contiguous", ("model.norm_grouping=contiguous",)),)
NUM_CLASSES = 1000  # the official ImageNet head (model_base.py:46-47)


NO_TENSORFLOW = (
    "run this with a separate Python that has it (this module's docstring: pydoc benchmarks.official_tf)"
)


class OfficialCodeMissing(Exception):
    """The git directory or the official files in it cannot be read (exit status 2)."""


# ----------------------------------------------------------------------------- extraction


def _git(gitdir: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "--git-dir", gitdir, *args], capture_output=True, timeout=60)


def resolve_commit(gitdir: Optional[str], commit: str = OFFICIAL_COMMIT) -> str:
    """The full hash of ``commit`` in ``gitdir``; OfficialCodeMissing when either is missing."""
    if not gitdir:
        raise OfficialCodeMissing(
            "--examples-gitdir is required: a git directory of graphcore/examples "
            f"(e.g. /work/.mirror/graphcore+examples/repo) holding commit {commit}"
        )
    if not os.path.isdir(gitdir):
        raise OfficialCodeMissing(f"--examples-gitdir {gitdir}: no such directory")
    found = _git(gitdir, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    if found.returncode != 0:
        raise OfficialCodeMissing(
            f"{gitdir} is not a git directory holding commit {commit} "
            f"(git: {found.stderr.decode(errors='replace').strip() or 'unknown commit'})"
        )
    return found.stdout.decode().strip()


def extract_official(gitdir: Optional[str], commit: str, dest: Path) -> Path:
    """Writes the official model files of ``commit`` into ``dest``/official_models/ (a package
    with an empty ``__init__.py`` of ours) and returns that folder."""
    full = resolve_commit(gitdir, commit)
    package = dest / PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    for name in OFFICIAL_FILES:
        shown = _git(gitdir, "show", f"{full}:{OFFICIAL_FOLDER}/{name}")
        if shown.returncode != 0:
            raise OfficialCodeMissing(f"{gitdir}: {OFFICIAL_FOLDER}/{name} not found at {commit}")
        (package / name).write_bytes(shown.stdout)
    (package / "__init__.py").write_text("")
    return package


# ----------------------------------------------------------------------------- the name table


@dataclass(frozen=True)
class Mapping:
    """One official variable and the parameters of ours it holds.

    kind ``conv``: TF kernel [kh, kw, in/groups, out] = ours [out, in/groups, kh, kw] permuted;
    ``dense``: TF [in, out] = ours [out, in] transposed; ``vector``: the same [C];
    ``proxy``: TF [6, 1, 1, C] whose rows 0, 1, 4, 5 are ``ours`` in that order (β, γ, β̃, γ̃;
    proxy_norm.py:60-61, 77-78, 122-127) and rows 2, 3 the proxy statistics μ̃, 1/σ̃ that the
    official optimiser stores (proxy_norm.py:138, 174-175): computed, not a parameter."""

    official: str
    kind: str
    ours: Tuple[str, ...]


def _conv_norm_act(prefix: str, scope: str, layer: ConvNormAct) -> List[Mapping]:
    # conv2d_basic(name='conv') → <scope>/conv/conv2d/kernel (efficientnet.py:94-111)
    out = [Mapping(f"{scope}/conv/conv2d/kernel", "conv", (f"{prefix}.conv.weight",))]
    if isinstance(layer.act, ProxyNormAct):
        # under proxy norm the norm has no affine of its own (center = scale = False,
        # efficientnet.py:356-362): γ, β are rows of the activation's variable 'proxy'
        # (proxy_norm.py:71; tf.name_scope('act') does not enter variable names)
        names = ("norm.bias", "norm.weight", "act.proxy_bias", "act.proxy_weight")
        return out + [Mapping(f"{scope}/proxy", "proxy", tuple(f"{prefix}.{n}" for n in names))]
    # group_norm's variables: <scope>/GroupNorm/gamma and /beta (the IPU op's default scope)
    out.append(Mapping(f"{scope}/GroupNorm/gamma", "vector", (f"{prefix}.norm.weight",)))
    if isinstance(layer.norm.bias, nn.Parameter):
        out.append(Mapping(f"{scope}/GroupNorm/beta", "vector", (f"{prefix}.norm.bias",)))
    return out


def official_names(model: nn.Module) -> List[Mapping]:
    """The official variable of every parameter of ``model`` (built with group or layer norm).

    Scopes: everything under 'all' (model_base.py:62); the stem is 'block0' (efficientnet.py:
    371-376), stage s (0-based) block i is 'block{s+1}{a, b, ...}' (:416-419) with 'a' the
    expansion, 'b' the spatial conv and its squeeze-excite, 'c' the projection (:209, 221, 250);
    the SE's convs '<blk>/b/<blk>/SE/<blk>/b/1' and '/2' (:221, 231-238); the head 'Top' (:378-
    390) with the classifier 'Top/logits/dense' (:88-89)."""
    if model.norm_spec.kind not in ("group", "layer"):
        raise ValueError(f"norm={model.norm_spec.kind!r}: only group and layer norm are mapped")
    table = _conv_norm_act("stem", "all/block0", model.stem)
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            blk, ours = f"block{s + 1}{string.ascii_lowercase[i]}", f"blocks.{s}.{i}"
            if block.expand is not None:
                table += _conv_norm_act(f"{ours}.expand", f"all/{blk}/a", block.expand)
            table += _conv_norm_act(f"{ours}.spatial", f"all/{blk}/b", block.spatial)
            se = f"all/{blk}/b/{blk}/SE/{blk}/b"
            for k, conv in (("1", "reduce"), ("2", "expand")):
                table.append(Mapping(f"{se}/{k}/conv2d/kernel", "conv", (f"{ours}.se.{conv}.weight",)))
                table.append(Mapping(f"{se}/{k}/conv2d/bias", "vector", (f"{ours}.se.{conv}.bias",)))
            table += _conv_norm_act(f"{ours}.project", f"all/{blk}/c", block.project)
    table += _conv_norm_act("head", "all/Top", model.head)
    table.append(Mapping("all/Top/logits/dense/kernel", "dense", ("classifier.weight",)))
    table.append(Mapping("all/Top/logits/dense/bias", "vector", ("classifier.bias",)))
    return table


def official_shape(entry: Mapping, params: Dict[str, torch.Tensor]) -> Tuple[int, ...]:
    """The shape the official variable must have, from ours."""
    shape = tuple(params[entry.ours[0]].shape)
    if entry.kind == "conv":
        return (shape[2], shape[3], shape[1], shape[0])
    if entry.kind == "dense":
        return (shape[1], shape[0])
    if entry.kind == "proxy":
        return (6, 1, 1, shape[0])
    return shape


def check_table(table: Sequence[Mapping], ours: Dict[str, torch.Tensor], official: Dict[str, tuple]) -> None:
    """Every parameter of ours in exactly one entry, every official variable in exactly one, with
    the shapes the table says; otherwise a ValueError that lists what is unmapped."""
    problems = []
    mapped = [name for entry in table for name in entry.ours]
    problems += [f"ours mapped twice: {n}" for n in sorted({n for n in mapped if mapped.count(n) > 1})]
    problems += [f"ours unmapped: {n}" for n in ours if n not in mapped]
    problems += [f"ours unknown: {n}" for n in mapped if n not in ours]
    names = [entry.official for entry in table]
    problems += [f"official unmapped: {n}" for n in official if n not in names]
    problems += [f"official unknown: {n}" for n in names if n not in official]
    for entry in table:
        if entry.official in official and all(n in ours for n in entry.ours):
            want = official_shape(entry, ours)
            if tuple(official[entry.official]) != want:
                problems.append(
                    f"{entry.official}: shape {tuple(official[entry.official])}, ours give {want}"
                )
    if problems:
        raise ValueError("the name table does not match:\n  " + "\n  ".join(problems))


def to_official(entry: Mapping, params: Dict[str, np.ndarray]) -> np.ndarray:
    """The official variable's value from ours (proxy rows 2-3 left zero: computed later)."""
    first = params[entry.ours[0]]
    if entry.kind == "conv":
        return np.ascontiguousarray(first.transpose(2, 3, 1, 0))
    if entry.kind == "dense":
        return np.ascontiguousarray(first.T)
    if entry.kind == "proxy":
        value = np.zeros((6, 1, 1, first.shape[0]), np.float32)
        for row, name in zip((0, 1, 4, 5), entry.ours):
            value[row, 0, 0] = params[name]
        return value
    return first


def from_official(entry: Mapping, value: np.ndarray) -> Dict[str, np.ndarray]:
    """Our parameters' values (or gradients) from the official variable's."""
    if entry.kind == "conv":
        return {entry.ours[0]: value.transpose(3, 2, 0, 1)}
    if entry.kind == "dense":
        return {entry.ours[0]: value.T}
    if entry.kind == "proxy":
        return {name: value[row, 0, 0] for row, name in zip((0, 1, 4, 5), entry.ours)}
    return {entry.ours[0]: value}


# ----------------------------------------------------------------------------- our side


def our_model(preset: str, overrides: Sequence[str]) -> Tuple[nn.Module, Config]:
    """Our network as the application builds it for ``preset`` with ``overrides``."""
    cfg = build_config(preset, list(overrides))
    return build_network(cfg, NUM_CLASSES), cfg


def perturb(model: nn.Module, seed: int) -> None:
    """Moves every vector parameter (norm γ, β, proxy β̃, γ̃, biases), which start at constants,
    off its initial value, so that a swapped or missing term shows; the conv and classifier
    weights keep their (official) random initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def run_ours(
    model: nn.Module, images: np.ndarray, labels: np.ndarray
) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Logits and the gradient of the mean cross-entropy for every parameter (eval mode: no
    dropout or drop-path, as the official graph built with is_training=False)."""
    model.eval()
    model.zero_grad(set_to_none=True)
    logits = model(torch.from_numpy(images))
    F.cross_entropy(logits, torch.from_numpy(labels)).backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()}
    return logits.detach().numpy(), grads


# ----------------------------------------------------------------------------- the official side


def _import_tensorflow():
    """TensorFlow, imported here only (the project does not depend on it), or None."""
    # Keras 3 (TensorFlow >= 2.16) has no tf.compat.v1.layers, which the official code calls
    # (efficientnet.py:89, 389): the legacy Keras 2 package (tf-keras) provides them.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        return None
    major, minor = (int(v) for v in tf.__version__.split(".")[:2])
    if (major, minor) >= (2, 16) and importlib.util.find_spec("tf_keras") is None:
        print(f"error: TensorFlow {tf.__version__} needs tf-keras for tf.compat.v1.layers", file=sys.stderr)
        raise SystemExit(2)
    tf.compat.v1.disable_eager_execution()  # the official code is TF1: graphs and sessions
    return tf


def _group_norm_stand_in(tf: types.ModuleType) -> Callable:
    """Stands in for Graphcore's ``tensorflow.python.ipu.normalization_ops.group_norm``
    (tensorflow/python/ipu/ops/normalization_ops.py in Graphcore's TensorFlow), from its
    documentation: statistics of each sample over its spatial positions and the channels of a
    group, (x − mean)·1/sqrt(var + ε)·γ + β; variables ``beta`` (zeros) and ``gamma`` (ones) of
    shape [C] under variable scope ``GroupNorm``, constants 0 / 1 when center / scale is off;
    ``strided_channel_grouping=True`` by default: channel k in group k mod G (the official code,
    efficientnet.py:137-139, keeps the default; with one group, its layer norm, it is moot).
    ``training`` selects the IPU's training or inference kernels, which compute the same function
    from the input's own statistics."""
    v1 = tf.compat.v1

    def group_norm(
        inputs: "tf.Tensor",
        groups: int = 2,
        channels_axis: int = -1,
        center: bool = True,
        scale: bool = True,
        epsilon: float = 1.53e-5,
        **kwargs: object,
    ) -> "tf.Tensor":
        unsupported = {k: v for k, v in kwargs.items() if v not in (None, True) or k not in _GN_OPTIONS}
        if channels_axis not in (-1, 3) or unsupported:
            raise NotImplementedError(
                f"the stand-in covers the official code's calls only, not {unsupported}"
            )
        _, height, width, channels = inputs.shape.as_list()
        if groups > channels or channels % groups:
            raise ValueError(f"{channels} channels is not commensurate with {groups} groups")
        with v1.variable_scope(kwargs.get("scope"), "GroupNorm", [inputs], reuse=kwargs.get("reuse")):
            dtype, trainable = inputs.dtype.base_dtype, kwargs.get("trainable", True)
            beta, gamma = tf.zeros([channels], dtype), tf.ones([channels], dtype)
            if center:
                beta = v1.get_variable("beta", [channels], dtype, v1.zeros_initializer(), trainable=trainable)
            if scale:
                gamma = v1.get_variable(
                    "gamma", [channels], dtype, v1.ones_initializer(), trainable=trainable
                )
            if kwargs.get("strided_channel_grouping", True):  # channel k = j·G + g: group k mod G
                shape, axes = [-1, height, width, channels // groups, groups], [1, 2, 3]
            else:  # channel k = g·(C/G) + j: contiguous groups
                shape, axes = [-1, height, width, groups, channels // groups], [1, 2, 4]
            x = tf.reshape(inputs, shape)
            mean, variance = tf.nn.moments(x, axes, keepdims=True)
            x = tf.reshape((x - mean) * tf.math.rsqrt(variance + epsilon), tf.shape(inputs))
            return x * gamma + beta

    return group_norm


# group_norm's other keyword arguments, which the stand-in accepts at their defaults only
_GN_OPTIONS = ("param_initializers", "reuse", "variables_collections", "training", "trainable", "scope")
_GN_OPTIONS += ("strided_channel_grouping",)


def _ipu_stand_ins(tf: types.ModuleType) -> Dict[str, types.ModuleType]:
    """Modules that replace the official code's IPU-only imports (efficientnet.py:22-23, 28:
    ``from tensorflow.python.ipu import normalization_ops, nn_ops`` and ``from tensorflow.python
    import ipu``), written here from the documented semantics of what it calls:

    * ``normalization_ops.group_norm``: ``_group_norm_stand_in``.
    * ``nn_ops``: left without ``swish``, so the official code takes its own fallback
      ``tf.nn.swish`` (efficientnet.py:327-331), x·sigmoid(x), the function the IPU op computes.
    * ``ipu.outlined_function``: compiles a function's body once for every call site (code size
      on the IPU); the function computed is the same, so the stand-in returns it unchanged."""
    normalization_ops = types.ModuleType("tensorflow.python.ipu.normalization_ops")
    normalization_ops.group_norm = _group_norm_stand_in(tf)
    nn_ops = types.ModuleType("tensorflow.python.ipu.nn_ops")
    ipu = types.ModuleType("tensorflow.python.ipu")
    ipu.outlined_function = lambda fn: fn
    ipu.normalization_ops, ipu.nn_ops = normalization_ops, nn_ops
    return {m.__name__: m for m in (ipu, normalization_ops, nn_ops)}


@contextlib.contextmanager
def _tf1_imports(tf: types.ModuleType, package: Path) -> Iterator[None]:
    """While the official files are imported: ``import tensorflow as tf`` gives the TF1 API
    (``tf.compat.v1``, which they were written for), the IPU modules are the stand-ins, and the
    temporary package is on the path. Everything is put back afterwards."""
    stand_ins = _ipu_stand_ins(tf)
    # TF 1.x's tensorflow/python/training/training_ops.py re-exported the generated training ops
    # (``from tensorflow.python.training.gen_training_ops import *``); TF 2 keeps that module as
    # tensorflow/python/ops/gen_training_ops.py. proxy_norm.py:19 and batch_norm.py:17 import it
    # by the old name (for the optimisers' update ops).
    stand_ins["tensorflow.python.training.training_ops"] = importlib.import_module(
        "tensorflow.python.ops.gen_training_ops"
    )
    names = ["tensorflow", *stand_ins] + [n for n in sys.modules if n.split(".")[0] == PACKAGE]
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update(stand_ins)
    sys.modules["tensorflow"] = tf.compat.v1
    sys.path.insert(0, str(package.parent))
    try:
        yield
    finally:
        sys.path.remove(str(package.parent))
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def import_official(tf: types.ModuleType, package: Path) -> types.SimpleNamespace:
    """The official ``efficientnet`` and ``proxy_norm`` modules, imported from ``package``."""
    with _tf1_imports(tf, package):
        return types.SimpleNamespace(
            efficientnet=importlib.import_module(f"{PACKAGE}.efficientnet"),
            proxy_norm=importlib.import_module(f"{PACKAGE}.proxy_norm"),
        )


def official_opts(cfg: Config) -> Dict[str, object]:
    """The official command-line options that build the network ``cfg.model`` describes (the
    defaults of efficientnet.py:464-507 where ours has no counterpart)."""
    m = cfg.model
    return {
        "precision": "32.32",  # float32 compute and weights (model_base.py:33-38)
        "dataset": "imagenet",  # 1000 classes (model_base.py:46-47)
        "model_size": m.name.upper(),
        "width_coefficient": None,
        "depth_coefficient": None,
        "dropout_rate": None,
        "block_survival_prob": 0.8,
        "expand_ratio": m.expand_ratio,
        "no_se": False,
        "depth_divisor": 8,
        "use_relu": False,
        "proxy_norm": m.proxy_norm,
        "proxy_epsilon": 0.03,
        "proxy_recompute": True,
        "top_width": 1280,
        "group_dim": m.group_size,
        # --group-norm with --groups (set_defaults, efficientnet.py:587-593); layer norm is group
        # norm with one group (:129-131)
        "norm_type": "group",
        "groups": 1 if m.norm == "layer" else m.norm_groups,
        "norm_epsilon": m.norm_eps,
    }


class OfficialGraph:
    """The official network in a TF1 graph: logits and the gradient of the mean cross-entropy
    for each variable; for a proxy variable the gradient of its rows 0, 1, 4, 5 as the official
    optimiser completes it through the proxy statistics (``proxy_bw``, proxy_norm.py:143-153,
    weight decay 0 here: it is not part of the loss's gradient)."""

    def __init__(
        self,
        tf: types.ModuleType,
        official: types.SimpleNamespace,
        opts: Dict[str, object],
        batch: int,
        size: int,
    ):
        v1 = tf.compat.v1
        self.tf, self.graph = tf, tf.Graph()
        with self.graph.as_default():
            self.images = v1.placeholder(tf.float32, [batch, size, size, 3])
            self.labels = v1.placeholder(tf.int32, [batch])
            self.logits = official.efficientnet.EfficientNet(opts, is_training=False)(self.images)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=self.labels, logits=self.logits)
            )
            self.variables = {v.name.split(":")[0]: v for v in v1.trainable_variables()}
            grads = dict(zip(self.variables, tf.gradients(loss, list(self.variables.values()))))
            # The optimiser the official train.py builds under proxy norm (train.py:210-227), with
            # the activation train.py gives it (tf.nn.swish when nn_ops has none, :212-217).
            optimiser = official.proxy_norm.make_pn_optimiser(
                v1.train.GradientDescentOptimizer,
                proxy_filter_fn=lambda name: "proxy" in name,
                activation=tf.nn.swish,
                proxy_epsilon=opts["proxy_epsilon"],
                dtype=tf.float32,
                weight_decay=0.0,
            )(1.0)
            # the proxy points as apply_proxy_gradients makes them (proxy_norm.py:163-164)
            rand = tf.reshape(tf.constant(official.proxy_norm.get_rand(), dtype=tf.float32), (1, 1, 1, 1, -1))
            self.statistics = []
            for name, var in self.variables.items():
                if name.endswith("/proxy"):
                    # μ̃, 1/σ̃ from the current parameters: what the optimiser stores in rows 2-3
                    # after each update for the next forward (proxy_norm.py:119-141, 174-175)
                    self.statistics.append(var.assign(optimiser.proxy_fw(var, rand)))
                    grads[name] = optimiser.proxy_bw(var, tf.convert_to_tensor(grads[name]), rand)
            self.grads = grads
            self.feeds = {n: v1.placeholder(tf.float32, v.shape) for n, v in self.variables.items()}
            self.loads = [v.assign(self.feeds[n]) for n, v in self.variables.items()]
            init = v1.global_variables_initializer()
        config = v1.ConfigProto(
            intra_op_parallelism_threads=torch.get_num_threads(), inter_op_parallelism_threads=1
        )
        self.session = v1.Session(graph=self.graph, config=config)
        self.session.run(init)

    def shapes(self) -> Dict[str, tuple]:
        return {n: tuple(v.shape.as_list()) for n, v in self.variables.items()}

    def elements(self) -> Tuple[int, int]:
        """(trainable elements, parameters): the second leaves out the proxy statistics, rows 2-3
        of every proxy variable, which the optimiser computes rather than trains."""
        total = sum(int(np.prod(shape)) for shape in self.shapes().values())
        stats = sum(2 * shape[-1] for n, shape in self.shapes().items() if n.endswith("/proxy"))
        return total, total - stats

    def load(self, values: Dict[str, np.ndarray]) -> None:
        """Sets every variable, then the proxy statistics from the parameters just set."""
        self.session.run(self.loads, {self.feeds[n]: values[n] for n in self.variables})
        self.session.run(self.statistics)

    def run(self, images_nhwc: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        feed = {self.images: images_nhwc, self.labels: labels.astype(np.int32)}
        return self.session.run((self.logits, self.grads), feed)


# ----------------------------------------------------------------------------- comparison


def relative_difference(ours: np.ndarray, official: np.ndarray) -> Tuple[float, float]:
    """(max |ours − official|, that / max |official|)."""
    diff = float(np.max(np.abs(ours.astype(np.float64) - official.astype(np.float64))))
    scale = float(np.max(np.abs(official)))
    return diff, diff / scale if scale > 0 else diff


def compare(
    ours: Tuple[np.ndarray, Dict[str, np.ndarray]], official: Tuple[np.ndarray, Dict[str, np.ndarray]]
) -> Dict[str, object]:
    """Logits and per-parameter gradient differences of one of our graphs from the official."""
    logits_abs, logits_rel = relative_difference(ours[0], official[0])
    grads = {n: relative_difference(g, official[1][n])[1] for n, g in ours[1].items()}
    worst = max(grads, key=grads.get)
    return {
        "logits_max_abs_diff": logits_abs,
        "logits_max_rel_diff": logits_rel,
        "logits_max_abs": float(np.max(np.abs(official[0]))),
        "grad_max_rel_diff": grads[worst],
        "grad_worst_param": worst,
        "grad_params_compared": len(grads),
    }


def official_run(
    tf: types.ModuleType, official: types.SimpleNamespace, args: argparse.Namespace
) -> Tuple[
    nn.Module, "OfficialGraph", Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, Dict[str, np.ndarray]]
]:
    """Builds the reference (our default graph of the preset), the official graph loaded with
    its weights; returns both, the input and the official outputs in our parameters' names."""
    torch.manual_seed(args.seed)
    reference, cfg = our_model(args.preset, ())
    perturb(reference, args.seed)
    ours = dict(reference.named_parameters())
    table = official_names(reference)
    graph = OfficialGraph(tf, official, official_opts(cfg), args.batch, args.resolution)
    check_table(table, ours, graph.shapes())
    values = {n: p.detach().numpy() for n, p in ours.items()}
    graph.load({entry.official: to_official(entry, values) for entry in table})
    rng = np.random.default_rng(args.seed)
    images = rng.standard_normal((args.batch, 3, args.resolution, args.resolution)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, args.batch)
    logits, raw = graph.run(images.transpose(0, 2, 3, 1), labels)
    grads: Dict[str, np.ndarray] = {}
    for entry in table:
        grads.update(from_official(entry, raw[entry.official]))
    return reference, graph, (images, labels), (logits, grads)


def compare_rows(
    tf: types.ModuleType, official: types.SimpleNamespace, args: argparse.Namespace, commit: str
) -> List[Dict[str, object]]:
    reference, graph, (images, labels), expected = official_run(tf, official, args)
    trainable, parameters = graph.elements()
    fixed = {
        "preset": args.preset,
        "resolution": args.resolution,
        "batch": args.batch,
        "seed": args.seed,
        "num_classes": NUM_CLASSES,
        "official_commit": commit,
        "official_trainable_elements": trainable,
        "params_official": parameters,
        "tf": tf.__version__,
        "python": platform.python_version(),
        "status": "ok",
    }
    rows = []
    for label, overrides in ROWS + (GROUP_NORM_ROWS if reference.norm_spec.kind == "group" else ()):
        model, cfg = our_model(args.preset, overrides)
        model.load_state_dict(reference.state_dict())
        row = {"ours": label, "overrides": " ".join(overrides)}
        row.update(padding=cfg.model.padding, graph=cfg.model.graph, norm=cfg.model.norm)
        row.update(norm_grouping=cfg.model.norm_grouping if cfg.model.norm == "group" else "—")
        row.update(norm_eps=cfg.model.norm_eps, proxy_norm=cfg.model.proxy_norm, proxy_eps=PROXY_EPS)
        row["params_ours"] = sum(p.numel() for p in model.parameters())
        row.update(compare(run_ours(model, images, labels), expected))
        row.update(fixed, load_avg=load_average(), **describe("cpu"))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- report


def _sci(value: float) -> str:
    return f"{value:.1e}"


def _setting(row: Dict[str, object]) -> str:
    parts = [
        f"preset `{row['preset']}`, {row['resolution']} px, batch {row['batch']}, seed {row['seed']}",
        f"{row['num_classes']} classes, float32, {row['norm']} norm ε {row['norm_eps']}",
    ]
    if row["proxy_norm"]:
        parts.append(f"proxy ε {row['proxy_eps']}")
    if row["norm"] == "group":
        parts.append("official group norm's channel grouping strided (group_norm's default)")
    return ", ".join(parts)


_INTRO = (
    "Generated by `python -m benchmarks.official_tf`; do not edit. Graphcore's TensorFlow 1 "
    "EfficientNet (graphcore/examples, `vision/cnns/tensorflow1/training/Models/`) runs "
    "unchanged under `tf.compat.v1` on the CPU, its IPU-only ops replaced by stand-ins "
    "(group norm, swish, outlined functions: see `benchmarks/official_tf.py`), with the "
    "weights of our model (every parameter mapped by name, none left over on either side) "
    "and the same input. Each row is one of our graphs against the official one: logits, and "
    "the gradient of the mean cross-entropy for every parameter. Relative difference = "
    "max |ours − official| / max |official| (gradients: per parameter, the worst shown). "
    "Official parameters leave out the proxy statistics (rows 2-3 of each proxy variable, "
    "computed by the official optimiser, not trained). One section per preset, each from its "
    "own run."
)


def _section(rows: List[Dict[str, object]]) -> List[str]:
    """One preset's rows: its command, environment, setting and table."""
    first = rows[0]
    lines = [
        f"## Preset `{first['preset']}`",
        "",
        f"Command: `{first.get('command', 'python -m benchmarks.official_tf')}`",
        "",
        *_environment(rows),
        f"- TensorFlow {first['tf']}, Python {first['python']}; official code: graphcore/examples "
        f"{first['official_commit']}",
        "- setting: " + _setting(first),
        "",
    ]
    header = ["ours", "padding", "graph", "norm grouping", "logits max rel diff", "logits max abs diff"]
    header += ["grad max rel diff", "worst parameter", "params ours", "params official"]
    body = [
        [
            str(r["ours"]),
            str(r["padding"]),
            str(r["graph"]),
            str(r.get("norm_grouping", "—")),
            _sci(r["logits_max_rel_diff"]),
            _sci(r["logits_max_abs_diff"]),
            _sci(r["grad_max_rel_diff"]),
            f"`{r['grad_worst_param']}`",
            f"{r['params_ours']:,}",
            f"{r['params_official']:,}",
        ]
        for r in rows
    ]
    return lines + _table(header, body) + [""]


def markdown(rows: List[Dict[str, object]]) -> str:
    """The report: the rows of every preset, a section each, in the order first written."""
    presets = list(dict.fromkeys(str(r["preset"]) for r in rows))
    lines = ["# Ours beside the official TensorFlow code", "", _INTRO, ""]
    for preset in presets:
        lines += _section([r for r in rows if r["preset"] == preset])
    return "\n".join(lines).rstrip("\n") + "\n"


def merged_rows(rows: List[Dict[str, object]], out: str) -> List[Dict[str, object]]:
    """The report's earlier rows with this run's preset's replaced by ``rows``."""
    presets = {r["preset"] for r in rows}
    kept: List[Dict[str, object]] = []
    if os.path.exists(out + ".jsonl"):
        with open(out + ".jsonl") as f:
            kept = [json.loads(line) for line in f if line.strip()]
    earlier = [r for r in kept if r.get("preset") not in presets]
    order = list(dict.fromkeys([str(r["preset"]) for r in kept] + [str(r["preset"]) for r in rows]))
    return sorted(earlier + rows, key=lambda r: order.index(str(r["preset"])))


def write_report(rows: List[Dict[str, object]], out: str) -> List[str]:
    """Writes ``out``.jsonl and .md holding ``rows`` and the other presets' earlier rows."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    everything = merged_rows(rows, out)
    with open(out + ".jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in everything)
    with open(out + ".md", "w") as f:
        f.write(markdown(everything))
    return [out + ".jsonl", out + ".md"]


# ----------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.official_tf", description=__doc__.split("\n\n")[0])
    p.add_argument("--examples-gitdir", help="git directory of graphcore/examples (bare or .git)")
    p.add_argument("--commit", default=OFFICIAL_COMMIT, help="official commit (default %(default)s)")
    p.add_argument("--preset", default=DEFAULT_PRESET, help="our grid preset (group or layer norm)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch and TensorFlow")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest relative difference of our default")
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "official-tf"), help="report path, no suffix")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(None if argv is None else list(argv))
    try:
        commit = resolve_commit(args.examples_gitdir, args.commit)
    except OfficialCodeMissing as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tf = _import_tensorflow()
    if tf is None:
        print(f"error: TensorFlow is not installed in {sys.executable}; {NO_TENSORFLOW}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="official-tf-") as tmp:
        try:
            package = extract_official(args.examples_gitdir, commit, Path(tmp))
            official = import_official(tf, package)
        except OfficialCodeMissing as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        rows = compare_rows(tf, official, args, commit)
    command = "python -m benchmarks.official_tf " + " ".join(argv if argv is not None else sys.argv[1:])
    for row in rows:
        row["command"] = command.strip()
    for path in write_report(rows, args.out):
        print(f"wrote {path}")
    print("\n".join(markdown(rows).splitlines()[-len(rows) - 2 :]))
    default = rows[0]
    worst = max(default["logits_max_rel_diff"], default["grad_max_rel_diff"])
    if worst > args.tolerance:
        print(
            f"error: our default graph differs from the official by {worst:.1e} > {args.tolerance}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
