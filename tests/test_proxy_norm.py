"""Proxy Norm exactly as the paper defines it (Labatie et al. 2021; model/proxy_norm.py's
docstring), and batch independence."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import ConvNormAct, NormSpec, ProxyNormAct, build_model, normal_quantiles
from model.blocks import MBConv


def test_quantiles_are_symmetric_with_unit_variance_in_the_limit():
    u = normal_quantiles(200)
    assert u.dtype == torch.float32 and u.numel() == 200
    assert abs(u.double().mean().item()) < 1e-6
    assert torch.allclose(u, -u.flip(0), atol=1e-6)
    variances = [normal_quantiles(n).double().var(unbiased=False).item() for n in (20, 200, 2000)]
    assert variances[0] < variances[1] < variances[2] < 1.0
    assert variances[2] == pytest.approx(1.0, abs=2e-3)
    # Φ((i + ½)/N) is the defining property.
    p = 0.5 * (1 + torch.erf(u.double() / math.sqrt(2)))
    assert torch.allclose(p, (torch.arange(200, dtype=torch.float64) + 0.5) / 200, atol=1e-6)


def _random_proxy(channels=6):
    pn = ProxyNormAct(channels)
    with torch.no_grad():
        pn.proxy_bias.uniform_(-0.5, 0.5)
        pn.proxy_weight.uniform_(-0.3, 0.3)
    gamma = torch.empty(channels).uniform_(0.5, 1.5)
    beta = torch.empty(channels).uniform_(-0.5, 0.5)
    return pn, gamma, beta


def test_output_is_normalised_for_inputs_from_the_proxy_distribution():
    pn, gamma, beta = _random_proxy()
    c = gamma.numel()
    y = pn.proxy_bias[None, :, None, None] + (1 + pn.proxy_weight[None, :, None, None]) * torch.randn(
        4096, c, 4, 4
    )
    with torch.no_grad():
        out = pn(gamma.view(1, -1, 1, 1) * y + beta.view(1, -1, 1, 1), gamma, beta)
        _, inv_std = pn.proxy_statistics(gamma, beta)
    mean = out.mean((0, 2, 3))
    var = out.var((0, 2, 3))
    proxy_var = 1 / inv_std**2 - pn.eps  # σ̃²: output variance is σ̃² / (σ̃² + ε)
    assert mean.abs().max() < 0.02
    assert torch.allclose(var, proxy_var / (proxy_var + pn.eps), rtol=0.03)
    # Without ε the output is standardised exactly (up to the 200-point approximation).
    pn.eps = 1e-8
    with torch.no_grad():
        out = pn(gamma.view(1, -1, 1, 1) * y + beta.view(1, -1, 1, 1), gamma, beta)
    assert torch.allclose(out.var((0, 2, 3)), torch.ones(c), rtol=0.03)
    assert out.mean((0, 2, 3)).abs().max() < 0.02


def test_statistics_match_the_formula():
    pn, gamma, beta = _random_proxy(3)
    u = normal_quantiles(200)
    proxy = pn.proxy_bias[:, None] + (1 + pn.proxy_weight[:, None]) * u
    z = F.silu(gamma[:, None] * proxy + beta[:, None])
    mean, inv_std = pn.proxy_statistics(gamma, beta)
    assert torch.allclose(mean, z.mean(1), atol=1e-6)
    assert torch.allclose(inv_std, 1 / torch.sqrt(z.var(1, unbiased=False) + 0.03), atol=1e-6)


def test_gradients_reach_affine_and_proxy_parameters():
    layer = ConvNormAct(4, 8, 3, NormSpec("layer", proxy=True))
    layer(torch.randn(2, 4, 9, 9)).square().mean().backward()
    for p in (layer.norm.weight, layer.norm.bias, layer.act.proxy_bias, layer.act.proxy_weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_statistics_stay_float32_under_autocast_and_half_weights():
    layer = ConvNormAct(4, 8, 3, NormSpec("layer", proxy=True))
    seen = []
    original = layer.act.proxy_statistics
    layer.act.proxy_statistics = lambda w, b: seen.append(original(w, b)) or seen[-1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 4, 9, 9))
    assert out.dtype == torch.bfloat16
    layer.to(torch.bfloat16)(torch.randn(2, 4, 9, 9, dtype=torch.bfloat16))
    assert len(seen) == 2 and all(t.dtype == torch.float32 for stats in seen for t in stats)


def test_graph_v1_deferred_scale_folded_into_squeeze_excite_equals_direct_computation():
    # Graph v1 only: its squeeze-excite sees the fully scaled input (the official one does not:
    # tests/test_official_graph.py).
    block = MBConv(16, 16, 3, 1, 4, 16, NormSpec("layer", proxy=True), graph="v1").eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(2, 16, 11, 11)
        direct = block.spatial(block.expand(x))  # fully proxy-normalised, no deferral
        expected = block.project(block.se(direct)) + x
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_projection_norm_keeps_scale_without_trainable_shift():
    block = MBConv(16, 24, 3, 2, 4, 16, NormSpec("layer", proxy=True))
    norm = block.project.norm
    assert [name for name, _ in norm.named_parameters()] == ["weight"]
    # The shift is a fixed zero, passed to the norm (PopTorch stops on a weight without a bias)
    # but neither trained nor saved.
    assert torch.equal(norm.bias, torch.zeros(24)) and not norm.bias.requires_grad
    assert "bias" not in norm.state_dict()
    assert block.project.act is None
    x = torch.randn(2, 24, 5, 5)
    assert torch.equal(norm(x), torch.nn.functional.group_norm(x, 1, norm.weight, None, norm.eps))
    assert build_model("b0").blocks[1][0].project.norm.bias.requires_grad  # BN keeps its shift


def _output_of_first_sample(model, batch):
    torch.manual_seed(0)
    return model(batch)[0]


@pytest.mark.parametrize(
    "norm, independent",
    [
        (dict(norm="layer", proxy_norm=True), True),
        (dict(norm="group"), True),
        (dict(norm="batch"), False),
    ],
)
def test_batch_independence(norm, independent):
    model = build_model(
        "b0", group_size=16, expand_ratio=4, num_classes=10, dropout=0.0, drop_path=0.0, **norm
    ).train()
    batch = torch.randn(4, 3, 64, 64)
    other = batch.clone()
    other[1:] = torch.randn(3, 3, 64, 64) * 3 + 1
    with torch.no_grad():
        a, b = _output_of_first_sample(model, batch), _output_of_first_sample(model, other)
    assert torch.allclose(a, b, atol=1e-5) is independent


def test_fused_inference_matches_the_recorded_path_exactly_and_follows_weight_updates():
    """The fused copy computes the proxy statistics once and writes in place: same bits as the
    path autograd records, and fused again after a weight update (in place, as optimisers do) it
    follows the update."""
    from model import build_model, fuse_for_inference

    model = build_model("b0", group_size=16, norm="layer", proxy_norm=True, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        fused = fuse_for_inference(model)
        with torch.no_grad():
            fast, again = fused(x), fused(x)  # the second call reuses the computed statistics
        recorded = model(x).detach()
        assert torch.equal(fast, recorded) and torch.equal(again, recorded)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "proxy" in name:
                    p.add_(0.1)


def test_hand_written_backward_of_the_proxy_statistics_matches_autograd():
    """The SiLU fast path (hand-written backward) gives autograd's forward bit for bit and its
    gradients to float32 rounding, with and without the norm's bias."""
    import torch.nn.functional as F

    from model.proxy_norm import _proxy_statistics

    pn, gamma, _ = _random_proxy()
    for bias in (torch.randn(gamma.numel()), None):
        w = gamma.detach().clone().requires_grad_(True)
        b = None if bias is None else bias.clone().requires_grad_(True)
        leaves = [pn.proxy_bias, pn.proxy_weight, w] + ([] if b is None else [b])
        g_mean, g_inv = torch.randn(w.numel()), torch.randn(w.numel())
        fast = pn.proxy_statistics(w, b)
        slow = _proxy_statistics(pn.proxy_bias, pn.proxy_weight, w, b, pn.quantiles, pn.eps, F.silu)[:2]
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
        grads_fast = torch.autograd.grad((fast[0] * g_mean).sum() + (fast[1] * g_inv).sum(), leaves)
        grads_slow = torch.autograd.grad((slow[0] * g_mean).sum() + (slow[1] * g_inv).sum(), leaves)
        for a, c in zip(grads_fast, grads_slow):
            assert torch.allclose(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("deferred", [False, True])
def test_hand_written_backward_of_the_standardised_silu_passes_gradcheck(deferred):
    from model.proxy_norm import _StandardisedSilu

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    mean = torch.randn(1, 3, 1, 1, dtype=torch.float64, generator=g).requires_grad_(True)
    inv_std = (torch.rand(1, 3, 1, 1, dtype=torch.float64, generator=g) + 0.5).requires_grad_(True)
    scale = None if deferred else inv_std
    out = _StandardisedSilu.apply(x, mean, scale)
    expected = F.silu(x) - mean if deferred else (F.silu(x) - mean) * inv_std
    assert torch.allclose(out, expected, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: _StandardisedSilu.apply(*t), (x, mean, scale))


def _loss_and_grads(model, x, y, fast):
    from model.fast_paths import eager_fast_paths

    model.zero_grad(set_to_none=True)
    with eager_fast_paths(fast):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("channels_last", [False, True])
def test_eager_training_fast_paths_give_the_traced_arithmetic_loss_and_gradients(channels_last):
    """Training eagerly (hand-written backwards, in-place writes) and the arithmetic PopTorch
    traces give the same loss bit for bit and the same gradients to float32 rounding."""
    model = build_model(
        "b0",
        group_size=16,
        expand_ratio=4,
        norm="layer",
        proxy_norm=True,
        num_classes=10,
        dropout=0.0,
        drop_path=0.0,
    )
    x, y = torch.randn(3, 3, 64, 64), torch.randint(0, 10, (3,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    loss_fast, grads_fast = _loss_and_grads(model, x, y, True)
    loss_graph, grads_graph = _loss_and_grads(model, x, y, False)
    assert torch.equal(loss_fast, loss_graph)
    for name, grad in grads_graph.items():
        scale = grad.abs().max().item()
        assert torch.allclose(grads_fast[name], grad, rtol=1e-4, atol=1e-5 * scale + 1e-8), name
