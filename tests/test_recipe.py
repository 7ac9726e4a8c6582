"""The paper's recipe: mixing distributions, per-epoch weight averaging, the fine-tuning rate, presets."""

import math

import numpy as np
import pytest
import torch
from scipy.special import betainc
from torch import nn

from app.config import ConfigError, build_config
from app.data.mixing import cutmix_v1_lambda, mix_batch, mixup_coefficients
from app.finetune import finetune_config, finetune_lr
from app.weight_average import EpochAverage, StepEMA, build_weight_average

DRAWS = 200_000


# ----------------------------------------------------------------------------- mixing


@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_mixup_coefficients_have_the_moments_of_max_of_a_beta(alpha):
    """m = max(b, 1 − b), b ~ Beta(α, α): E[m] = 1 − I½(α+1, α), E[m²] = (α+1)/(2α+1)·(1 − I½(α+2, α))
    (I the regularised incomplete beta function; by symmetry E[m^k] = 2·E[b^k; b > ½])."""
    m = mixup_coefficients(DRAWS, alpha, np.random.default_rng(0))
    assert m.min() >= 0.5 and m.max() <= 1.0
    mean = 1 - betainc(alpha + 1, alpha, 0.5)
    second = (alpha + 1) / (2 * alpha + 1) * (1 - betainc(alpha + 2, alpha, 0.5))
    assert m.mean() == pytest.approx(mean, abs=3e-3)
    assert (m**2).mean() == pytest.approx(second, abs=3e-3)
    assert len(set(mixup_coefficients(8, alpha, np.random.default_rng(1)).tolist())) == 8  # per sample


@pytest.mark.parametrize("lambda0", [0.95, 0.9, 0.85, 0.8])
def test_cutmix_v1_lambda_has_the_analytic_moments(lambda0):
    """λ = 1 with probability p = 1.55·λ₀ − 0.96, else 1 + L/4, L = ln u, u ~ U(a, 1), a = e⁻⁴:
    E[L] = (5a − 1)/(1 − a), E[L²] = (2 − 26a)/(1 − a)."""
    rng = np.random.default_rng(0)
    lam = np.array([cutmix_v1_lambda(lambda0, rng) for _ in range(DRAWS // 4)])
    p, a = 1.55 * lambda0 - 0.96, math.exp(-4)
    el, el2 = (5 * a - 1) / (1 - a), (2 - 26 * a) / (1 - a)
    mean = p + (1 - p) * (1 + el / 4)
    second = p + (1 - p) * (1 + el / 2 + el2 / 16)
    assert lam.min() > 0 and lam.max() <= 1
    assert (lam == 1.0).mean() == pytest.approx(p, abs=6e-3)
    assert lam.mean() == pytest.approx(mean, abs=3e-3)
    assert (lam**2).mean() == pytest.approx(second, abs=3e-3)


def test_mixup_then_cutmix_targets_are_the_pixel_shares():
    """Each image a constant grey level of its own class: with both mixings on, every output
    image's mean level is the target-weighted mean of the class levels (mixup is linear, the
    CutMix λ is the share of pixels kept), for every batch drawn."""
    batch, size = 6, 32
    levels = torch.arange(batch, dtype=torch.float32) * 40 + 20
    images = levels.view(-1, 1, 1, 1).expand(batch, 3, size, size).round().to(torch.uint8).contiguous()
    targets = torch.arange(batch)
    cut = 0
    for seed in range(20):
        out, soft = mix_batch(images, targets, batch, 0.2, 0.8, np.random.default_rng(seed))
        assert torch.allclose(soft.sum(1), torch.ones(batch))
        assert torch.allclose(out.float().mean((1, 2, 3)), soft @ levels, atol=0.51)
        cut += int((soft > 0).sum(1).max() > 2)  # more than two labels: mixed and cut
    assert cut > 0
    same, ints = mix_batch(images, targets, batch, 0.0, 1.0, np.random.default_rng(0))
    assert same is images and ints is targets  # both off: untouched


# ----------------------------------------------------------------------------- weight averaging


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_epoch_average_matches_the_hand_computation():
    """V₁ = θ₁, V₂ = d·V₁ + (1 − d)·θ₂, V₃ = d·V₂ + (1 − d)·θ₃ (TF1 weight_avg.py), for weights and
    batch-norm statistics; the integer counter is the newest."""
    d, net = 0.97, tiny_net()
    avg = EpochAverage(net, d, steps_per_epoch=4)
    seen = []
    for k in range(3):
        with torch.no_grad():
            for t in net.state_dict().values():
                if t.is_floating_point():
                    t.copy_(torch.randn_like(t))
            net[1].num_batches_tracked.fill_(10 * (k + 1))
        seen.append({n: t.clone() for n, t in net.state_dict().items()})
        avg.update(net)
    for name, value in avg.module.state_dict().items():
        if value.is_floating_point():
            by_hand = d * (d * seen[0][name] + (1 - d) * seen[1][name]) + (1 - d) * seen[2][name]
            assert torch.allclose(value, by_hand, atol=1e-6), name
        else:
            assert int(value) == 30
    restored = EpochAverage(tiny_net(), d, 4)
    restored.load_state_dict(avg.state_dict())
    assert restored.updates == 3 and torch.equal(restored.module[0].weight, avg.module[0].weight)


def test_weight_average_kind_and_schedule():
    cfg = build_config("digits", ["train.weight_avg_exp=0.97", "train.ema_decay=0"])
    avg = build_weight_average(cfg, tiny_net(), steps_per_epoch=5)
    assert isinstance(avg, EpochAverage)
    assert [s for s in range(1, 13) if avg.due(s, 12)] == [5, 10, 12]  # epoch ends and the last step
    ema = build_weight_average(build_config("digits", ["train.ema_every=3"]), tiny_net(), 5)
    assert isinstance(ema, StepEMA) and [s for s in range(1, 8) if ema.due(s, 7)] == [3, 6, 7]
    assert build_weight_average(build_config("digits", ["train.ema_decay=0"]), tiny_net(), 5) is None
    with pytest.raises(ConfigError, match="one weight average at a time"):
        build_config("digits", ["train.weight_avg_exp=0.97", "train.ema_decay=0.99"])


# ----------------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("micro, accum, expected", [(32, 16, 0.25), (16, 48, 0.375), (32, 1, 2**-6)])
def test_finetune_rate_is_per_image_times_the_global_batch(tmp_path, micro, accum, expected):
    """2⁻¹¹ per image × global batch (TF1 cosine.py); the fine-tuning run gets SGD without
    momentum, cosine without warm-up, and the training loop's scaling gives the same rate."""
    cfg = build_config(
        "b0-g16-lnpn", [f"train.micro_batch={micro}", f"train.grad_accum={accum}", f"log.out_dir={tmp_path}"]
    )
    assert finetune_lr(cfg) == pytest.approx(expected)
    ft = finetune_config(cfg, {}, tmp_path / "src" / "checkpoints" / "best.pt", 224)
    assert (ft.optim.name, ft.optim.momentum, ft.schedule.name, ft.schedule.warmup_epochs) == (
        "sgd",
        0.0,
        "cosine",
        0.0,
    )
    assert ft.optim.lr * ft.global_batch / ft.optim.lr_reference_batch == pytest.approx(expected)
    assert (ft.data.augment, ft.data.mixup, ft.data.cutmix_lambda) == (False, 0.0, 1.0)
    assert ft.train.weight_avg_exp == 0 and ft.train.ema_decay == 0


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize(
    "name, mixup, lambda0",
    [
        ("b0-g1-gn", 0.1, 1.0),
        ("b1-g16-lnpn", 0.1, 0.95),
        ("b3-g16-gn-half", 0.2, 0.9),
        ("b5-g16-lnpn", 0.2, 0.8),
    ],
)
def test_grid_presets_carry_the_configs_recipe(name, mixup, lambda0):
    cfg = build_config(name)
    assert (cfg.data.mixup, cfg.data.cutmix_lambda) == (mixup, lambda0)
    assert cfg.data.random_crop_scale == [0.05, 1.0] and cfg.global_batch == 768
    assert cfg.train.weight_avg_exp == 0.97 and cfg.train.ema_decay == 0
    assert cfg.ipu.precision == "16.32" and cfg.ipu.loss_scaling == 128
    assert cfg.optim.lr * cfg.global_batch / cfg.optim.lr_reference_batch == pytest.approx(2**-14 * 768)
    assert finetune_lr(build_config(name, ["train.micro_batch=32", "train.grad_accum=16"])) == 0.25
