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
    model = build_model(name, group_size=16, expand_ratio=4, norm="layer", proxy_norm=True,
                        num_classes=7)
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
