"""The lowering check holds a model against PopTorch 3.4's own rules, and the emulator compiles
through it: what PopTorch refuses is refused in PopTorch's words, what it accepts trains."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app.config import build_config
from app.plan import lowering_reports
from app.presets import grid_names
from ipu_options import emulator as poptorch
from ipu_options.emulator import lowering
from ipu_options.emulator.lowering import LoweringError, check_lowering
from model.fast_paths import eager_fast_paths
from model.norms import NormSpec

# The git directory of a graphcore/poptorch clone (as for `make conformance`); unset: skipped.
POPTORCH_GITDIR = os.environ.get("POPTORCH_GITDIR", "")


@pytest.fixture(autouse=True)
def graph_arithmetic():
    with eager_fast_paths(False):
        yield


class Net(nn.Module):
    """conv → norm → SiLU → pool → linear, with the norm given."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm = norm
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.silu(self.norm(self.conv(x))).mean((2, 3)))


class Objective(nn.Module):
    """``loss``: how forward turns logits into what it returns."""

    def __init__(self, net: nn.Module, loss):
        super().__init__()
        self.net, self.loss = net, loss

    def forward(self, x, y):
        logits = self.net(x)
        return self.loss(logits, y)


def data(n=4):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def train_once(model, x, y, lr=0.1):
    opts = poptorch.Options()
    step = poptorch.trainingModel(model, opts, torch.optim.SGD(model.parameters(), lr=lr))
    return step(x, y)


# ---------------------------------------------------------------- the grid
@pytest.mark.parametrize("preset", grid_names())
def test_every_grid_preset_lowers_for_training_and_inference(preset):
    """The classifier the IPU backend compiles, at the preset's resolution and micro-batch, on the
    meta device (no arithmetic): every aten op has a PopTorch 3.4 handler, every norm gets a
    weight and a bias, training has one final loss (the returned one)."""
    reports = lowering_reports(build_config(preset, []))
    for mode, report in reports.items():
        assert report.lowers, (mode, report.problems)
        assert report.kinds["convolution"] > 0
    train = reports["training"]
    assert train.loss_leaf == 1 and train.kinds[lowering.IDENTITY_LOSS] == 1
    norms = train.kinds["native_group_norm"]
    assert norms > 0 and norms == reports["inference"].kinds["native_group_norm"]


def test_scale_only_projection_norms_get_a_zero_bias_in_every_lnpn_graph():
    """Item 1 of issue 11: B0 G16 LN+PN had 16 projection norms with a weight and no bias, which
    PopTorch's NormalizationOps.cpp:53 stops on. Every norm call now passes both."""
    seen = []
    original = lowering._Recorder._check_affine

    def spy(self, func, kind, args, kwargs):
        names = [a.name for a in func._schema.arguments]
        values = dict(zip(names, args), **kwargs)
        seen.append((values["weight"] is not None, values["bias"] is not None))
        return original(self, func, kind, args, kwargs)

    lowering._Recorder._check_affine = spy
    try:
        reports = lowering_reports(build_config("b0-g16-lnpn", []))
    finally:
        lowering._Recorder._check_affine = original
    assert reports["training"].lowers
    assert len(seen) == 2 * 49 and all(w and b for w, b in seen)  # 49 norms, two graphs


# ---------------------------------------------------------------- refusals, in PopTorch's words
def scale_only_norm_without_bias():
    norm = nn.GroupNorm(1, 8)
    norm.register_parameter("bias", None)  # how projection norms were built before the fix
    return norm


def test_norm_with_weight_and_no_bias_is_refused_as_poptorch_does():
    x, y = data()
    model = Objective(Net(scale_only_norm_without_bias()), lambda z, t: (z, F.cross_entropy(z, t)))
    with pytest.raises(LoweringError, match=r"isNone\(\*weight\) != isNone\(\*bias\)") as caught:
        train_once(model, x, y)
    assert "NormalizationOps.cpp:53" in str(caught.value)
    # the same norm with a fixed zero bias, as NormSpec builds it, lowers and trains
    model = Objective(Net(NormSpec("layer").make(8, shift=False)), lambda z, t: (z, F.cross_entropy(z, t)))
    train_once(model, x, y)


def test_inference_of_a_weight_only_norm_is_refused_too():
    with pytest.raises(LoweringError, match=r"isNone\(\*weight\) != isNone\(\*bias\)"):
        poptorch.inferenceModel(Net(scale_only_norm_without_bias()))(data()[0])


def test_two_independent_losses_are_refused_and_identity_loss_combines_them():
    x, y = data()

    def two(z, t):
        return z, F.cross_entropy(z, t) + F.nll_loss(F.log_softmax(z, -1), t)

    with pytest.raises(
        LoweringError,
        match="Multiple independent losses found in graph. Graph must "
        "have one final loss. Wrap final graph loss in "
        r"poptorch.identity_loss.",
    ):
        train_once(Objective(Net(nn.GroupNorm(1, 8)), two), x, y)

    def combined(z, t):
        return z, poptorch.identity_loss(two(z, t)[1], reduction="none")

    out = train_once(Objective(Net(nn.GroupNorm(1, 8)), combined), x, y)
    assert out[1].dim() == 0


def test_no_loss_is_refused_as_poptorch_does():
    x, y = data()
    plain = Objective(Net(nn.GroupNorm(1, 8)), lambda z, t: (z, (z.softmax(-1) - 0.25).square().mean()))
    with pytest.raises(LoweringError, match="Couldn't find a loss in graph!"):
        train_once(plain, x, y)
    # inference has no loss rule (RemoveSurplusIdentityLosses runs for training only)
    report, _ = check_lowering(Net(nn.GroupNorm(1, 8)), (x,), training=False)
    assert report.lowers


def test_an_op_without_a_handler_is_refused_with_poptorch_text():
    class Erfinv(nn.Module):
        def forward(self, x):
            return torch.erfinv(x.tanh())  # aten::erfinv has no PopTorch 3.4 handler

    with pytest.raises(LoweringError, match=r"Unsupported ops found in compiled model: \[aten::erfinv\]"):
        poptorch.inferenceModel(Erfinv())(torch.rand(4, 3))


def test_item_and_reassigned_buffers_are_refused():
    class Item(nn.Module):
        def forward(self, x):
            return x * float(x.abs().max())

    with pytest.raises(LoweringError, match="aten::item is only supported in eager mode"):
        check_lowering(Item(), (torch.rand(2, 3),), training=False)

    class Reassign(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("count", torch.zeros(()))

        def forward(self, x):
            self.count = self.count + 1
            return x * self.count

    report, _ = check_lowering(Reassign(), (torch.rand(2, 3),), training=False)
    assert report.problems == [
        "Buffer count is reassigned within the model when calling the forward "
        "method. This is not supported. Consider using self.count.copy_(src) "
        "to copy data from a source tensor, where src is the name of the "
        "source tensor."
    ]


def test_buffer_updates_with_replicas_are_refused_in_inference_too():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x):
            self.seen.add_(1)
            return x * 2

    opts = poptorch.Options().replicationFactor(2)
    with pytest.raises(RuntimeError, match=r"broadcastBuffers\(False\)"):
        poptorch.inferenceModel(Counting(), opts)(torch.rand(4, 3))
    poptorch.inferenceModel(Counting(), poptorch.Options().replicationFactor(2).broadcastBuffers(False))(
        torch.rand(4, 3)
    )


# ---------------------------------------------------------------- what PopTorch accepts trains
def reference_step(net, x, y, lr):
    F.cross_entropy(net(x), y).backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= lr * p.grad


@pytest.mark.parametrize("marking", ["built-in", "identity_loss"])
def test_emulator_trains_on_a_built_in_loss_returned_beside_the_logits(marking):
    """Item 2 of issue 11: PopTorch takes F.cross_entropy's nll_loss as the model's loss
    (LossOps.cpp makes it an identity loss); the emulator used to refuse it unmarked."""

    def built_in(z, t):
        return z, F.cross_entropy(z, t)

    def marked(z, t):
        return z, poptorch.identity_loss(F.cross_entropy(z, t), reduction="mean")

    x, y = data()
    torch.manual_seed(0)
    net = Net(nn.GroupNorm(1, 8))
    reference = Net(nn.GroupNorm(1, 8))
    reference.load_state_dict(net.state_dict())
    model = Objective(net, built_in if marking == "built-in" else marked)
    step = poptorch.trainingModel(model, poptorch.Options(), torch.optim.SGD(model.parameters(), lr=0.1))
    logits, loss = step(x, y)
    # the identity loss marks a loss computed from nll_loss's: two losses, one of them final
    assert step.lowering.loss_leaf == 1 and step.lowering.losses == (1 if marking == "built-in" else 2)
    reference_step(reference, x, y, 0.1)
    assert logits.shape == (4, 4) and torch.isfinite(loss)
    for p, q in zip(net.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_loss_must_be_returned_for_the_emulator_to_train_on_it():
    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Net(nn.GroupNorm(1, 8))

        def forward(self, x, y):
            logits = self.net(x)
            F.cross_entropy(logits, y)
            return logits

    with pytest.raises(RuntimeError, match="not among its outputs"):
        train_once(Hidden(), *data())


# ---------------------------------------------------------------- the facts and their source
def test_facts_name_their_source_and_hold_the_rules_used():
    facts = json.loads(lowering.FACTS_FILE.read_text())
    assert facts["tag"] == "sdk/poptorch/3.4.0" and len(facts["commit"]) == 40
    assert facts["handlers"]["native_group_norm"].startswith(
        "poptorch/source/popart_canonicalization/NormalizationOps.cpp:"
    )
    assert {"nll_loss_forward", "cross_entropy_loss", "mse_loss"} <= set(facts["loss_handlers"])
    assert {"native_group_norm", "native_batch_norm", "native_layer_norm"} <= set(
        facts["affine_pair_handlers"]
    )
    assert facts["ipu_key_ops"]["dropout"]["function"] == "fallback"
    assert lowering.node_kind("add_.Tensor") == "add" and lowering.node_kind("copy_") == "copy_"
    assert lowering.node_kind("zero_") == "zeros_like"


@pytest.mark.skipif(
    not POPTORCH_GITDIR or not Path(POPTORCH_GITDIR).is_dir(),
    reason="set POPTORCH_GITDIR to the git directory of a graphcore/poptorch clone",
)
def test_facts_regenerate_identically_from_poptorch_sources(tmp_path):
    from ipu_options.emulator.poptorch_sources import extract

    try:
        fresh = extract(POPTORCH_GITDIR, "sdk/poptorch/3.4.0")
    except subprocess.CalledProcessError:
        pytest.skip("the clone lacks tag sdk/poptorch/3.4.0")
    assert fresh == json.loads(lowering.FACTS_FILE.read_text())
