"""The model family against the paper's tables and against the peers users already trust."""

import pytest
import torch

from model import VARIANTS, build_model, convert_state_dict, count_macs, count_parameters, spatial_groups


@pytest.fixture(scope="module")
def timm():
    return pytest.importorskip("timm")


# paper.md: parameters / multiply-adds at native resolution.
PAPER_G16_E4 = {
    "b0": (5.91e6, 0.64e9),
    "b1": (8.33e6, 1.11e9),
    "b2": (9.50e6, 1.52e9),
    "b3": (12.6e6, 2.73e9),
    "b4": (19.3e6, 6.18e9),
    "b5": (28.7e6, 13.5e9),
}
PAPER_G1_E6_MACS = {"b0": 0.39e9, "b1": 0.69e9, "b2": 0.99e9, "b3": 1.83e9, "b4": 4.39e9, "b5": 10.3e9}


@pytest.mark.parametrize("name", ["b0", "b1", "b2", "b3", "b4", "b5"])
def test_parameter_count_equals_timm(name, timm):
    ours = count_parameters(build_model(name))
    assert ours == count_parameters(timm.create_model(f"efficientnet_{name}"))
    if name == "b0":
        assert ours == 5_288_548


@pytest.mark.parametrize("name", ["b0", "b1", "b2", "b3", "b4", "b5"])
def test_g16_sizes_and_macs_match_paper(name):
    model = build_model(name, group_size=16, expand_ratio=4)
    params, macs = PAPER_G16_E4[name]
    resolution = VARIANTS[name].resolution
    assert count_parameters(model) == pytest.approx(params, rel=0.01)
    assert count_macs(model, resolution) == pytest.approx(macs, rel=0.03)
    assert count_macs(build_model(name), resolution) == pytest.approx(PAPER_G1_E6_MACS[name], rel=0.03)


def test_group_size_sweep_matches_paper():
    # paper.md: B0 e=4 with G1 4.09M/0.27G, G4 4.46M/0.34G, G64 11.9M/1.88G.
    for g, (params, macs) in {1: (4.09e6, 0.27e9), 4: (4.46e6, 0.34e9), 64: (11.9e6, 1.88e9)}.items():
        model = build_model("b0", group_size=g, expand_ratio=4)
        assert count_parameters(model) == pytest.approx(params, rel=0.01)
        assert count_macs(model, 224) == pytest.approx(macs, rel=0.03)


def test_macs_scale_with_resolution_and_meta_equals_cpu():
    model = build_model("b0")
    # Convs dominate and scale with pixels; the classifier does not.
    small, large = count_macs(model, 112), count_macs(model, 224)
    assert 3.5 < large / small < 4.1
    # The meta-device pass must count what a real pass counts.
    macs = []
    hooks = [
        m.register_forward_hook(
            lambda m, i, o: macs.append(
                o[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            )
        )
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    fc = model.classifier
    assert count_macs(model, 64) == sum(macs) + fc.in_features * fc.out_features


def test_spatial_groups_rule():
    assert spatial_groups(96, 1) == 96  # depthwise
    assert spatial_groups(96, 16) == 6
    assert spatial_groups(24, 16) == 1  # B3 stage 1: narrower than a group
    assert spatial_groups(40, 16) == 2  # floor, and 2 divides 40
    assert spatial_groups(56, 16) == 2  # 56 // 16 = 3 does not divide 56: nearest divisor below
    model = build_model("b3", group_size=16, expand_ratio=4)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1 and m.in_channels > 3:
            assert m.in_channels % m.groups == 0
            assert m.groups == spatial_groups(m.in_channels, 16)


def _same_logits(ours, peer, resolution=224):
    """The largest logit difference relative to the peer's largest logit (freshly built peers
    give logits of ~1e-5: an absolute bound would pass anything)."""
    ours.eval()
    peer.eval()
    x = torch.randn(2, 3, resolution, resolution)
    with torch.no_grad():
        expected = peer(x)
        return ((ours(x) - expected).abs().max() / expected.abs().max()).item()


def test_timm_checkpoint_converts_to_identical_logits(timm):
    peer = timm.create_model("efficientnet_b0")
    eps = next(m.eps for m in peer.modules() if isinstance(m, torch.nn.BatchNorm2d))
    ours = build_model("b0", norm_eps=eps, padding="symmetric")
    ours.load_state_dict(convert_state_dict(peer.state_dict(), "timm"))
    assert _same_logits(ours, peer) <= 1e-4


def test_timm_b2_converts_with_its_stage_one_skip(timm):
    # B2's depth 1.2 gives stage 1 two separable blocks (the second with a residual).
    peer = timm.create_model("efficientnet_b2")
    ours = build_model("b2", norm_eps=1e-5, padding="symmetric")
    ours.load_state_dict(convert_state_dict(peer.state_dict(), "timm"))
    assert _same_logits(ours, peer, 96) <= 1e-4


def test_torchvision_checkpoint_converts_to_identical_logits():
    torchvision = pytest.importorskip("torchvision")
    peer = torchvision.models.efficientnet_b0()
    eps = next(m.eps for m in peer.modules() if isinstance(m, torch.nn.BatchNorm2d))
    ours = build_model("b0", norm_eps=eps, padding="symmetric")
    ours.load_state_dict(convert_state_dict(peer.state_dict(), "torchvision"))
    assert _same_logits(ours, peer) <= 1e-4


def test_convert_rejects_foreign_checkpoints():
    with pytest.raises(ValueError, match="timm, torchvision"):
        convert_state_dict({}, "keras")
    with pytest.raises(ValueError, match="no counterpart"):
        convert_state_dict({"fc.weight": torch.zeros(1)}, "timm")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="b8"), "efficientnet-b0"),
        (dict(name="b0", norm="instance"), "batch, group, layer"),
        (dict(name="b0", group_size=0), "group_size"),
        (dict(name="b0", norm="group", norm_groups=3), "norm_groups=3"),
        (dict(name="b0", dropout=1.5), "dropout"),
    ],
)
def test_invalid_builds_name_the_valid_choices(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        build_model(name, **kwargs)


def test_short_and_long_names_build_the_same_model():
    assert count_parameters(build_model("efficientnet-b1")) == count_parameters(build_model("B1"))


def test_stable_module_names():
    names = dict(build_model("b0", norm="layer", proxy_norm=True).named_modules())
    for name in [
        "stem",
        "stem.conv",
        "stem.norm",
        "stem.act",
        "blocks.0.0.spatial",
        "blocks.0.0.se",
        "blocks.0.0.project",
        "blocks.3.0.expand",
        "blocks.6.0",
        "head",
        "pool",
        "dropout",
        "classifier",
    ]:
        assert name in names
    assert "blocks.0.0.expand" not in names  # the first stage has no expansion conv


@pytest.mark.parametrize("classes", [2, 10, 1000])
def test_initial_logits_are_moderate_for_any_number_of_classes(classes):
    # A classifier initialised for 1000 classes must not start a 2-class task at a loss of ~12.
    model = build_model(
        "b0", group_size=16, expand_ratio=4, norm="layer", proxy_norm=True, num_classes=classes
    ).eval()
    with torch.no_grad():
        logits = model(torch.randn(16, 3, 64, 64))
    assert logits.std().item() < 2.0
    loss = torch.nn.functional.cross_entropy(logits, torch.randint(classes, (16,)))
    assert abs(loss.item() - torch.log(torch.tensor(float(classes))).item()) < 1.5
