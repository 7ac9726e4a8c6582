"""app/optim.py: weight-decay groups, RMSprop TF variant, schedules, EMA."""

import math

import pytest
import torch
from torch import nn

from app.config import build_config
from app.optim import EMA, RMSpropTF, build_optimizer, decay_split, lr_at, param_groups
from model import build_model


@pytest.fixture(scope="module")
def lnpn_model():
    return build_model("b0", group_size=16, expand_ratio=4, norm="layer", proxy_norm=True, num_classes=10)


def test_param_groups_exclusions_by_name(lnpn_model):
    decay, no_decay = (dict(part) for part in decay_split(lnpn_model))
    # The official rule (efficientnet.py:557, train.py:234-244, proxy_norm.py:148-152): conv and
    # dense kernels and biases decay, and proxy norm's β̃, γ̃; the norms' gamma/beta do not.
    for name in (
        "stem.conv.weight",
        "stem.act.proxy_bias",
        "stem.act.proxy_weight",
        "blocks.0.0.se.reduce.weight",
        "blocks.0.0.se.reduce.bias",
        "blocks.0.0.se.expand.bias",
        "blocks.1.0.expand.act.proxy_weight",
        "head.act.proxy_bias",
        "classifier.weight",
        "classifier.bias",
    ):
        assert name in decay, name
    for name in ("stem.norm.weight", "stem.norm.bias", "blocks.0.0.project.norm.weight", "head.norm.bias"):
        assert name in no_decay, name
    every = dict(lnpn_model.named_parameters())
    assert set(decay) | set(no_decay) == set(every) and not set(decay) & set(no_decay)
    # exactly the norm parameters are left out
    assert set(no_decay) == {n for n in every if ".norm." in n}

    groups = param_groups(lnpn_model, 1e-5)
    assert [g["weight_decay"] for g in groups] == [1e-5, 0.0]
    assert [len(g["params"]) for g in groups] == [len(decay), len(no_decay)]


def test_param_groups_skip_frozen_and_batchnorm():
    model = build_model("b0", num_classes=10)
    for p in model.stem.parameters():
        p.requires_grad_(False)
    decay, no_decay = (dict(part) for part in decay_split(model))
    assert not any(n.startswith("stem.") for n in list(decay) + list(no_decay))
    assert "blocks.0.0.spatial.norm.weight" in no_decay and "blocks.0.0.spatial.conv.weight" in decay


def reference_tf_rmsprop(theta, grads, lrs, alpha, eps, momentum, wd):
    """Hand-written TF RMSProp (ms starts at 1) in float64."""
    ms, mom = torch.ones_like(theta), torch.zeros_like(theta)
    for g, lr in zip(grads, lrs):
        g = g + wd * theta
        ms = alpha * ms + (1 - alpha) * g * g
        mom = momentum * mom + lr * g / torch.sqrt(ms + eps)
        theta = theta - mom
    return theta


def test_rmsprop_tf_matches_hand_computed_update():
    torch.manual_seed(0)
    start = torch.randn(5, dtype=torch.float64)
    grads = [torch.randn(5, dtype=torch.float64) for _ in range(4)]
    lrs = [0.1, 0.1, 0.05, 0.02]  # lr changes between steps: only new contributions see it
    param = nn.Parameter(start.clone())
    opt = RMSpropTF([param], lr=lrs[0], alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=0.01)
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        param.grad = g.clone()
        opt.step()
    expected = reference_tf_rmsprop(start, grads, lrs, 0.9, 1e-3, 0.9, 0.01)
    assert torch.allclose(param.detach(), expected, rtol=1e-12, atol=1e-12)
    # and it is not torch's RMSprop (ε outside the sqrt, v from 0): the first step differs a lot
    p2 = nn.Parameter(start.clone())
    torch_opt = torch.optim.RMSprop([p2], lr=0.1, alpha=0.9, eps=1e-3, momentum=0.9)
    p2.grad = grads[0].clone()
    torch_opt.step()
    first = reference_tf_rmsprop(start, grads[:1], lrs[:1], 0.9, 1e-3, 0.9, 0.0)
    assert not torch.allclose(p2.detach(), first, atol=1e-3)


def test_build_optimizer_kinds():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(1, 4), nn.Flatten(), nn.Linear(4, 2))
    rms = build_optimizer(model, build_config(None, ["optim.name=rmsprop"]), 0.1)
    assert isinstance(rms, RMSpropTF) and rms.param_groups[0]["eps"] == 1e-3
    sgd = build_optimizer(model, build_config(None, ["optim.name=sgd", "optim.nesterov=true"]), 0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    adamw = build_optimizer(model, build_config(None, ["optim.name=adamw", "optim.weight_decay=0.05"]), 0.1)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]
    with pytest.raises(ValueError, match="optim.nesterov"):
        build_config(None, ["optim.name=rmsprop", "optim.nesterov=true"])


def schedule_cfg(name, **extra):
    overrides = [
        f"schedule.name={name}",
        "schedule.warmup_epochs=2",
        "schedule.decay_rate=0.5",
        "schedule.decay_epochs=1.5",
        "train.epochs=10",
    ]
    return build_config(None, overrides + [f"{k}={v}" for k, v in extra.items()])


def test_lr_warmup_is_linear():
    cfg = schedule_cfg("exponential")
    assert [lr_at(s, cfg, 10, 1.0) for s in (0, 5, 10, 15)] == pytest.approx([0, 0.25, 0.5, 0.75])


def test_lr_exponential_staircase_from_step_zero():
    cfg = schedule_cfg("exponential")
    # epochs 2.0 and 2.9 are in the second stair (floor(e / 1.5) = 1), 3.0 in the third
    values = [lr_at(e * 10, cfg, 10, 1.0) for e in (2.0, 2.9, 3.0, 4.4, 4.5, 9.0)]
    assert values == pytest.approx([0.5, 0.5, 0.25, 0.25, 0.125, 0.5**6])


def test_lr_step_counts_from_end_of_warmup():
    cfg = schedule_cfg("step")
    values = [lr_at(e * 10, cfg, 10, 2.0) for e in (2.0, 3.4, 3.5, 5.0)]
    assert values == pytest.approx([2.0, 2.0, 1.0, 0.5])


def test_lr_cosine_shape_and_end():
    cfg = schedule_cfg("cosine", **{"schedule.min_lr_ratio": 0.1})
    assert lr_at(20, cfg, 10, 1.0) == pytest.approx(1.0)  # end of warm-up
    assert lr_at(60, cfg, 10, 1.0) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway
    assert lr_at(100, cfg, 10, 1.0) == pytest.approx(0.1)  # end of training
    assert lr_at(130, cfg, 10, 1.0) == pytest.approx(0.1)  # stays at the floor
    values = [lr_at(s, cfg, 10, 1.0) for s in range(20, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_ema_math_buffers_and_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9)
    start = model[0].weight.detach().clone()
    expected = start.clone()
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].running_mean.add_(2.0)
        ema.update(model)
        expected = 0.9 * expected + 0.1 * model[0].weight.detach()
    assert torch.allclose(ema.module[0].weight, expected)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)  # buffers copied
    assert not ema.module[0].weight.requires_grad and not ema.module.training

    other = EMA(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and other.updates == 3
    assert torch.equal(other.module[0].weight, ema.module[0].weight)

    warm = EMA(model, decay=0.999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    warm.update(model)
    assert warm.current_decay() == pytest.approx(2 / 11)
    assert math.isclose(EMA(model, 0.5, warmup=True).current_decay(), 0.1)


def test_ema_update_every_k_steps_uses_decay_to_the_power_k():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, 0.9)
    start = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, steps=3)
    expected = start * 0.9**3 + model.weight * (1 - 0.9**3)
    assert torch.allclose(ema.module.weight, expected)
