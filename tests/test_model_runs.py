"""Every model builds and trains a step at odd resolutions, in channels-last and under bf16."""

import pytest
import torch

from model import build_model

NORMS = [dict(norm="batch"), dict(norm="group"), dict(norm="layer", proxy_norm=True)]


def _train_step(model, x):
    model.train()
    out = model(x)
    out.float().logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    return out


@pytest.mark.parametrize("name", ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7"])
def test_every_model_trains_at_an_odd_resolution(name):
    model = build_model(name, group_size=16, expand_ratio=4, norm="layer", proxy_norm=True, num_classes=7)
    out = _train_step(model, torch.randn(2, 3, 97, 97))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("resolution", [97, 161, 225])
@pytest.mark.parametrize("norm", NORMS, ids=["bn", "gn", "lnpn"])
def test_b0_variants_at_odd_resolutions(resolution, norm):
    model = build_model("b0", group_size=16, expand_ratio=4, num_classes=10, **norm)
    assert _train_step(model, torch.randn(2, 3, resolution, resolution)).shape == (2, 10)


@pytest.mark.parametrize("norm", NORMS, ids=["bn", "gn", "lnpn"])
def test_channels_last_matches_contiguous(norm):
    model = build_model("b0", group_size=16, expand_ratio=4, num_classes=10, **norm).eval()
    x = torch.randn(2, 3, 97, 97)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    _train_step(model, x.to(memory_format=torch.channels_last))


@pytest.mark.parametrize("norm", NORMS, ids=["bn", "gn", "lnpn"])
def test_bf16_autocast_on_cpu(norm):
    model = build_model("b0", group_size=16, expand_ratio=4, num_classes=10, **norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _train_step(model, torch.randn(2, 3, 65, 65))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "norm", [dict(norm="batch"), dict(norm="batch", proxy_norm=True)], ids=["bn", "bn+pn"]
)
def test_fused_inference_copy_folds_batch_norm_into_the_conv(norm, monkeypatch):
    """``fuse_for_inference`` runs conv+BN as one conv (batch norm never runs) and gives the
    unfolded result to float32 rounding; the model itself still runs its norms, hooks included,
    and the copy follows the weights only when fused again."""
    import torch.nn.functional as F

    from model import fuse_for_inference

    torch.manual_seed(0)
    model = build_model("b0", group_size=16, expand_ratio=4, num_classes=10, **norm)
    x = torch.randn(4, 3, 64, 64)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0  # running statistics = one batch's, as after calibration
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 64, 64))
    model.eval()
    calls = []

    def counting_batch_norm(*args, **kwargs):
        calls.append(1)
        return batch_norm(*args, **kwargs)

    batch_norm = F.batch_norm
    monkeypatch.setattr(F, "batch_norm", counting_batch_norm)
    with torch.no_grad():
        fused = fuse_for_inference(model)
        folded = fused(x)
        assert not calls
        plain = model(x)
        assert calls
        calls.clear()
        seen = []
        handle = model.blocks[2][0].spatial.conv.register_forward_hook(lambda *_: seen.append(1))
        model(x)
        assert seen == [1]
        handle.remove()
    # float32 rounding of ~50 folded layers compounds: 1e-4 of the largest logit (a wrong fold
    # is off by the logits' own size).
    assert torch.allclose(folded, plain, rtol=1e-4, atol=1e-4 * plain.abs().max().item())
    assert model.stem.conv.weight.requires_grad  # the model is left trainable
    with torch.no_grad():
        model.stem.norm.running_mean.add_(0.5)
        model.head.conv.weight.mul_(1.5)
        changed = model(x)
        assert torch.equal(fused(x), folded)  # a snapshot
        refused = fuse_for_inference(model)(x)
    assert not torch.allclose(changed, plain, atol=1e-3)
    assert torch.allclose(refused, changed, rtol=1e-4, atol=1e-4 * changed.abs().max().item())
