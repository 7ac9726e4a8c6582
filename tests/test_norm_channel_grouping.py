"""Group norm's channel grouping: the model's choice, the same function on every device.

The official TF code's group norm (efficientnet.py:137-139, graphcore/examples 09b7c67) keeps
Graphcore's ``group_norm(..., strided_channel_grouping=True)`` default (graphcore/tensorflow,
tensorflow/python/ipu/ops/normalization_ops.py: "group the channels dimension … with a stride
between channels"): group g holds channels g, g+G, g+2G, …, channel k in group k mod G. The model
computes it (``model.norm_grouping=strided``, the default) or torch's contiguous groups.

Poplibs groups the channels of a group norm either contiguously or, under PopART's
``groupNormStridedChannelGrouping``, with that stride (graphcore/poplibs include/popnn/GroupNorm.hpp).
PopTorch passes the option through unchanged (popart_compiler/source/SessionOptions.cpp:408,
sdk/poptorch/3.4.0) and lowers ``aten::group_norm`` to one GroupNormalization without reordering
channels (poptorch/source/popart_canonicalization/NormalizationOps.cpp:211-233). So on the IPU
path the model emits torch's one op and ipu_options sets the option to the model's grouping: the
stride is applied once, by PopART, and a checkpoint computes the same function on an IPU, the
emulator and a CPU/GPU."""

import copy

import pytest
import torch
from torch import nn

from app.config import build_config
from app.specs import ipu_batch_plan, ipu_spec
from ipu_options import emulator as poptorch
from ipu_options.options import build_options, check_norm_grouping
from model import build_model
from model.fast_paths import eager_fast_paths
from model.norms import GroupNorm, NormSpec, backend_groups_channels, strided_group_norm

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


def perturbed_net(norm: str, proxy: bool, grouping: str) -> nn.Module:
    """B0 G16 with non-trivial affine parameters and statistics (a trained checkpoint's)."""
    net = build_model(
        "b0",
        group_size=16,
        expand_ratio=4,
        norm=norm,
        proxy_norm=proxy,
        num_classes=5,
        dropout=0.0,
        drop_path=0.0,
        norm_grouping=grouping,
    )
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                t.copy_(
                    torch.rand_like(t) * 0.5 + 0.75
                    if "var" in name or "weight" in name
                    else torch.randn_like(t) * 0.1
                )
    return net


@pytest.mark.parametrize("grouping", ["strided", "contiguous"])
@pytest.mark.parametrize(
    "norm,proxy", [("batch", False), ("group", False), ("group", True), ("layer", False), ("layer", True)]
)
def test_a_checkpoint_computes_the_same_function_on_the_ipu_path_and_the_cpu(norm, proxy, grouping):
    """The project's options (build_options) on the emulator give the CPU model's outputs, for
    either grouping: PopART's option follows the model's, and the stride is applied once."""
    torch.manual_seed(4)
    cfg = build_config(
        "digits",
        [f"model.norm={norm}", f"model.proxy_norm={str(proxy).lower()}", f"model.norm_grouping={grouping}"],
    )
    opts = build_options(ipu_spec(cfg), poptorch, ipu_batch_plan(cfg), training=False)
    assert opts._Popart.options[STRIDED] is (grouping == "strided")
    net = perturbed_net(norm, proxy, grouping)
    cpu = copy.deepcopy(net).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), eager_fast_paths(False):
        expected = cpu(x)
    got = poptorch.inferenceModel(net.eval(), opts)(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_the_two_groupings_are_different_functions_of_one_checkpoint():
    torch.manual_seed(5)
    strided = perturbed_net("group", False, "strided").eval()
    contiguous = build_model(
        "b0", group_size=16, expand_ratio=4, norm="group", num_classes=5, norm_grouping="contiguous"
    ).eval()
    contiguous.load_state_dict(strided.state_dict())  # the same state dict: only the function differs
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(strided(x), contiguous(x), atol=1e-3)


# --------------------------------------------------------------- the model's strided grouping


@pytest.mark.parametrize("groups,channels", [(2, 8), (4, 8), (4, 12), (8, 16)])
def test_strided_grouping_puts_channel_k_in_group_k_mod_g(groups, channels):
    """From the TF docstring (graphcore/tensorflow normalization_ops.py group_norm,
    strided_channel_grouping: channels grouped "with a stride between channels"; poplibs
    GroupNorm.hpp: group g holds g, g+G, …): changing channel k's input changes the outputs of
    exactly the channels k' ≡ k (mod G), its group."""
    torch.manual_seed(6)
    norm = GroupNorm(groups, channels, grouping="strided")
    x = torch.randn(2, channels, 3, 3)
    for k in range(channels):
        moved = x.clone()
        moved[:, k] = moved[:, k] * 3 + 1
        with torch.no_grad():
            changed = (norm(moved) - norm(x)).abs().amax(dim=(0, 2, 3)) > 1e-4
        assert changed.tolist() == [c % groups == k % groups for c in range(channels)], k


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_strided_kernel_equals_the_written_out_reference_with_gradients(memory_format):
    torch.manual_seed(7)
    ref_norm = random_group_norm(4, 12)
    norm = GroupNorm(4, 12, grouping="strided")
    norm.load_state_dict(ref_norm.state_dict())
    x = torch.randn(3, 12, 5, 4).to(memory_format=memory_format).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    weights = torch.randn(3, 12, 5, 4)
    (norm(x) * weights).sum().backward()
    (strided_reference(x_ref, ref_norm) * weights).sum().backward()
    torch.testing.assert_close(norm(x), strided_reference(x_ref, ref_norm), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.weight.grad, ref_norm.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norm.bias.grad, ref_norm.bias.grad, rtol=1e-4, atol=1e-5)


def test_the_strided_kernel_reads_its_input_through_a_view():
    # the statistics and the scale-and-shift read (N, C/G, G, H, W) views: no reordered copy
    x = torch.randn(2, 8, 3, 3)
    assert x.reshape(2, 2, 4, 3, 3).data_ptr() == x.data_ptr()
    cl = x.to(memory_format=torch.channels_last)
    assert cl.reshape(2, 2, 4, 3, 3).data_ptr() == cl.data_ptr()
    out = strided_group_norm(cl, 4, None, None, 1e-5)
    assert out.shape == cl.shape and out.is_contiguous(memory_format=torch.channels_last)


def test_under_autocast_the_strided_kernel_normalises_in_float32():
    torch.manual_seed(8)
    norm = GroupNorm(4, 8, grouping="strided")
    x = torch.randn(2, 8, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = norm(x)
    assert got.dtype == torch.bfloat16  # the input's, as torch's group norm on the CPU
    expected = strided_group_norm(x.float(), 4, norm.weight, norm.bias, 1e-5).bfloat16()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("groups", [1, 8])
def test_layer_and_instance_norms_are_torchs_under_either_grouping(groups):
    x = torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        for grouping in ("strided", "contiguous"):
            torch.testing.assert_close(GroupNorm(groups, 8, grouping=grouping)(x), nn.GroupNorm(groups, 8)(x))
    assert NormSpec("layer", grouping="strided").make(8).num_groups == 1


def test_inside_a_backend_that_groups_the_model_emits_torchs_one_op():
    """The IPU path: torch's group_norm, left for PopART's option to group (applied once)."""
    norm, x, seen = GroupNorm(4, 8, grouping="strided"), torch.randn(2, 8, 3, 3), []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Spy(), backend_groups_channels():
        norm(x)
    assert seen.count(nn.functional.group_norm) == 1 and torch.var_mean not in seen
    seen.clear()
    with Spy():
        norm(x)
    assert nn.functional.group_norm not in seen and torch.var_mean in seen


def test_the_lowered_ipu_graph_has_one_group_norm_op_per_norm():
    from app.plan import lowering_reports

    cfg = build_config("b0-g16-gn", ["data.resolution=32", "train.micro_batch=2"])
    assert cfg.model.norm == "group" and cfg.model.norm_grouping == "strided"
    reports = lowering_reports(cfg)
    norms = sum(isinstance(m, GroupNorm) for m in build_model("b0", group_size=16, norm="group").modules())
    for report in reports.values():
        assert report.lowers and report.kinds["native_group_norm"] == norms
        assert report.kinds["var_mean"] == 0


def test_the_ipu_backend_refuses_a_model_of_another_grouping():
    cfg = build_config("digits", ["model.norm=group", "model.norm_grouping=contiguous"])
    spec = ipu_spec(cfg)
    check_norm_grouping(build_model("b0", norm="group", norm_grouping="contiguous"), spec)
    with pytest.raises(
        ValueError, match="group norm grouping 'strided', while the IPU is set for 'contiguous'"
    ):
        check_norm_grouping(build_model("b0", norm="group", norm_grouping="strided"), spec)
    check_norm_grouping(build_model("b0", norm="layer", norm_grouping="strided"), spec)  # the same function
