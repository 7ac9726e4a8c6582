"""The eager fast paths (model/fast_paths.py) and the fused inference copy (model/inference.py)
never change what the model computes: no cache outlives a weight, hooks see real layer outputs,
torch.func transforms and second derivatives take the plain arithmetic or fail saying so."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from model import build_model, fuse_for_inference, normal_quantiles
from model.fast_paths import eager_fast_paths

VARIANTS = [("batch", False), ("layer", True)]


def net(norm, proxy, seed=0):
    torch.manual_seed(seed)
    m = build_model(
        "b0",
        group_size=16,
        expand_ratio=4,
        norm=norm,
        proxy_norm=proxy,
        num_classes=5,
        dropout=0.0,
        drop_path=0.0,
    )
    with torch.no_grad():  # statistics away from their initial values, so a stale one shows
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
            if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                mod.weight.uniform_(0.8, 1.2)
                if mod.bias is not None:  # a projection under proxy norm has no shift
                    mod.bias.normal_(0, 0.2)
    return m.eval()


def plain(m, *args, fn=None):
    with eager_fast_paths(False):
        return (fn or m)(*args)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("norm,proxy", VARIANTS)
def test_functional_call_with_fresh_parameters_never_sees_a_stale_cache(norm, proxy):
    m, x = net(norm, proxy), torch.randn(2, 3, 64, 64)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for i in range(12):
            scaled = {k: v * (1 + 0.02 * i) if k.endswith("norm.weight") else v for k, v in params.items()}
            fast = functional_call(m, scaled, (x,))
            assert rel(fast, plain(m, scaled, (x,), fn=lambda *a: functional_call(m, *a))) < 1e-4


@pytest.mark.parametrize("norm,proxy", VARIANTS)
def test_writes_that_bypass_version_counters_are_seen_at_once_and_a_fused_copy_is_a_snapshot(norm, proxy):
    """The model keeps no inference caches: a ``.data`` write (no version bump) shows in the next
    call. The fused copy holds the weights it was made from until it is fused again."""
    m, x = net(norm, proxy), torch.randn(2, 3, 64, 64)
    features = lambda net: net.blocks[0](net.stem(x))  # noqa: E731
    with torch.no_grad():
        fused = fuse_for_inference(m)
        before = features(m)
        assert rel(features(fused), before) < 1e-5
        m.stem.conv.weight.data.neg_()  # .data: no version bump, as autograd documents
        after = features(m)
        assert rel(after, plain(m, m, fn=features)) < 1e-5 and rel(after, before) > 1e-2
        assert rel(features(fused), before) < 1e-5  # the snapshot
        assert rel(features(fuse_for_inference(m)), after) < 1e-5


@pytest.mark.parametrize("norm,proxy", VARIANTS)
def test_a_hook_on_a_norm_sees_its_output_not_the_activation_written_over_it(norm, proxy):
    m, x = net(norm, proxy), torch.randn(2, 3, 64, 64)
    norm_layer = m.blocks[1][0].spatial.norm
    seen = []
    handle = norm_layer.register_forward_hook(lambda mod, inputs, out: seen.append(out))
    with torch.no_grad():
        m(x)
        plain(m, x)
    handle.remove()
    assert torch.allclose(seen[0], seen[1], atol=1e-5)


def test_per_sample_gradients_with_vmap_take_the_plain_arithmetic():
    m, x, y = net("layer", True), torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 1])
    params = {k: v.detach() for k, v in m.named_parameters()}
    buffers = dict(m.named_buffers())

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(m, (p, buffers), (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    one = grad(loss)(params, x[1], y[1])
    for name in ("stem.conv.weight", "head.act.proxy_weight"):
        assert rel(per_sample[name][1], one[name]) < 1e-4


def test_second_derivatives_through_the_hand_written_backwards_equal_the_plain_path():
    m, x = net("layer", True).train(), torch.randn(2, 3, 32, 32)

    def gradient_penalty_grad():  # d/dγ of ||dL/dW||², as a gradient penalty needs
        loss = m(x).square().mean()
        g = torch.autograd.grad(loss, m.stem.conv.weight, create_graph=True)[0]
        return torch.autograd.grad(g.square().sum(), [m.stem.norm.weight, m.stem.act.proxy_weight])

    for fast, reference in zip(gradient_penalty_grad(), plain(m, fn=gradient_penalty_grad)):
        assert rel(fast, reference) < 1e-4


@pytest.mark.parametrize("dtype", [torch.half, torch.bfloat16])
def test_quantiles_stay_exact_float32_when_the_model_is_cast(dtype):
    m = build_model("b0", group_size=16, expand_ratio=4, norm="layer", proxy_norm=True).to(dtype)
    q = m.stem.act.quantiles
    assert q.dtype == torch.float32 and torch.equal(q, normal_quantiles(q.numel()))
