"""Group norm's channel grouping: one definition, torch's, on every device.

Poplibs groups the channels of a group norm either contiguously (torch's definition) or, under
PopART's ``groupNormStridedChannelGrouping``, with a stride: group g holds channels g, g+G, g+2G,
… (graphcore/poplibs include/popnn/GroupNorm.hpp, the option's documentation). PopTorch passes the
option through unchanged (popart_compiler/source/SessionOptions.cpp:408, sdk/poptorch/3.4.0) and
its own test expects a different function once it is set (tests/norms_test.py:244-266). The
project sets it false, so a checkpoint computes the same function on an IPU, the emulator and a
CPU/GPU; the emulator computes the strided grouping when a user sets it."""

import copy

import pytest
import torch
from torch import nn

from app.config import build_config
from app.specs import ipu_batch_plan, ipu_spec
from ipu_options import emulator as poptorch
from ipu_options.options import build_options
from model import build_model
from model.fast_paths import eager_fast_paths

STRIDED = "groupNormStridedChannelGrouping"


def strided_reference(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """Group norm written out channel set by channel set: group g = {g, g+G, g+2G, ...}."""
    groups, out = norm.num_groups, torch.empty_like(x)
    for g in range(groups):
        idx = list(range(g, x.shape[1], groups))
        part = x[:, idx]
        dims = tuple(range(1, x.dim()))
        mean = part.mean(dim=dims, keepdim=True)
        var = part.var(dim=dims, unbiased=False, keepdim=True)
        shape = (1, len(idx)) + (1,) * (x.dim() - 2)
        out[:, idx] = (part - mean) / torch.sqrt(var + norm.eps) * norm.weight[idx].view(shape) + norm.bias[
            idx
        ].view(shape)
    return out


def random_group_norm(groups: int, channels: int) -> nn.GroupNorm:
    norm = nn.GroupNorm(groups, channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


def run_emulated(module: nn.Module, x: torch.Tensor, strided=None) -> torch.Tensor:
    opts = poptorch.Options()
    if strided is not None:
        opts._Popart.set(STRIDED, strided)
    with torch.no_grad():
        return poptorch.inferenceModel(module, opts)(x)


@pytest.mark.parametrize("shape", [(3, 12), (3, 12, 5), (2, 12, 4, 3)])
def test_strided_option_groups_channels_with_a_stride(shape):
    torch.manual_seed(0)
    norm, x = random_group_norm(4, 12), torch.randn(shape)
    with torch.no_grad():
        expected, contiguous = strided_reference(x, norm), norm(x)
    got = run_emulated(norm, x, strided=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, contiguous, atol=1e-2)  # another function than torch's


@pytest.mark.parametrize("strided", [None, False])
def test_default_and_false_are_torchs_contiguous_groups(strided):
    torch.manual_seed(1)
    norm, x = random_group_norm(4, 12), torch.randn(3, 12, 6)
    with torch.no_grad():
        expected = norm(x)
    torch.testing.assert_close(run_emulated(norm, x, strided), expected)


@pytest.mark.parametrize("groups", [1, 12])
def test_layer_and_instance_grouping_are_the_same_function_either_way(groups):
    # poplibs: the option has no effect on layer norm (one group) nor instance norm (one channel)
    torch.manual_seed(2)
    norm, x = random_group_norm(groups, 12), torch.randn(3, 12, 6)
    with torch.no_grad():
        expected = norm(x)
    torch.testing.assert_close(run_emulated(norm, x, strided=True), expected, rtol=1e-5, atol=1e-5)


def test_strided_grouping_trains_through_the_emulator():
    torch.manual_seed(3)
    norm, x = random_group_norm(4, 8), torch.randn(4, 8, 5)

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = norm

        def forward(self, x):
            out = self.norm(x)
            return out, poptorch.identity_loss((out * torch.arange(8.0).view(1, 8, 1)).sum(), "sum")

    model = WithLoss()
    opts = poptorch.Options()
    opts._Popart.set(STRIDED, True)
    step = poptorch.trainingModel(model, opts, torch.optim.SGD(model.parameters(), lr=0.1))
    before = copy.deepcopy(norm)
    out, _ = step(x)
    with torch.no_grad():
        torch.testing.assert_close(out, strided_reference(x, before), rtol=1e-5, atol=1e-5)
    assert not torch.equal(norm.weight.detach(), before.weight.detach())


@pytest.mark.parametrize(
    "norm,proxy", [("batch", False), ("group", False), ("group", True), ("layer", False), ("layer", True)]
)
def test_a_checkpoint_computes_the_same_function_on_the_ipu_path_and_the_cpu(norm, proxy):
    """The project's options (build_options) on the emulator give the CPU model's outputs."""
    torch.manual_seed(4)
    cfg = build_config("digits", [f"model.norm={norm}", f"model.proxy_norm={str(proxy).lower()}"])
    opts = build_options(ipu_spec(cfg), poptorch, ipu_batch_plan(cfg), training=False)
    assert opts._Popart.options[STRIDED] is False
    net = build_model(
        "b0",
        group_size=16,
        expand_ratio=4,
        norm=norm,
        proxy_norm=proxy,
        num_classes=5,
        dropout=0.0,
        drop_path=0.0,
    )
    with torch.no_grad():  # a checkpoint with non-trivial affine parameters and statistics
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(
                    torch.rand_like(t) * 0.5 + 0.75
                    if "var" in name or "weight" in name
                    else torch.randn_like(t) * 0.1
                )
    cpu = copy.deepcopy(net).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), eager_fast_paths(False):
        expected = cpu(x)
    got = poptorch.inferenceModel(net.eval(), opts)(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
