"""The resolution helper: half-resolution sizes, the residue rule (odd sizes, other stage counts),
the stage count read off a model, the warning, and the sweep's table and plot."""

import warnings

import pytest
import torch
from torch import nn

from app.resolution import (
    HALF_RESOLUTIONS,
    ResolutionWarning,
    check_resolutions,
    compatible_resolutions,
    downsampling_stages,
    feature_sizes,
    half_resolution,
    keeps_residue,
    model_stages,
    nearest_compatible,
    parse_resolutions,
    plot_sweep,
    residue,
    sweep,
    sweep_table,
    trained_resolution,
    write_sweep_report,
)
from model import build_model
from model.efficientnet import VARIANTS

PAPER_HALF = {"b0": 160, "b1": 176, "b2": 196, "b3": 204, "b4": 252, "b5": 328}


def test_half_resolutions_reproduce_the_paper_table():
    assert {k: HALF_RESOLUTIONS[k] for k in PAPER_HALF} == PAPER_HALF
    assert half_resolution("efficientnet-b3") == 204
    assert half_resolution(224) == 160


@pytest.mark.parametrize("key", ["b6", "b7"])
def test_b6_b7_half_resolution_follows_the_same_rule(key):
    native, half = VARIANTS[key].resolution, HALF_RESOLUTIONS[key]
    assert keeps_residue(native, half)
    assert 0.4 < (half / native) ** 2 < 0.6  # about half the pixels
    # the nearest size with the residue to 0.7 × native: no other candidate is closer
    others = [s for s in compatible_resolutions(native, 1, native) if s != half]
    assert all(abs(s - 0.7 * native) > abs(half - 0.7 * native) for s in others)
    assert (half_resolution("b6"), half_resolution("b7")) == (368, 408)


def test_half_resolution_with_other_stage_counts_and_too_small_sizes():
    assert half_resolution(96) == 64
    assert half_resolution(64, stages=3) == 48  # mod 8: 0.7 × 64 = 44.8 → 48 (ties to none)
    assert half_resolution(24, stages=2) == 16  # 0.7 × 24 = 16.8
    with pytest.raises(ValueError, match="native resolution of at least"):
        half_resolution(48)  # mod 32 the only smaller size is 16, far from 33.6


def test_residue_of_odd_and_even_sizes():
    assert residue(224) == 0 and residue(225) == 1 and residue(257) == 1 and residue(300) == 12
    assert keeps_residue(225, 257) and keeps_residue(225, 193)
    assert not keeps_residue(225, 224) and not keeps_residue(225, 226)
    assert residue(225, stages=3) == 1 and keeps_residue(225, 233, stages=3)
    assert keeps_residue(97, 123, stages=0)  # no downsampling: every size is compatible
    with pytest.raises(ValueError):
        residue(0)


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5])
def test_same_residue_means_same_odd_stages(stages):
    """The rule's meaning, exhaustively: two sizes agree mod 2^n exactly when every one of the n
    downsampling steps sees an odd map at the same steps (odd sizes included)."""
    for a in range(33, 130):
        for b in range(33, 130):
            pattern_a = [s % 2 for s in feature_sizes(a, stages)[:stages]]
            pattern_b = [s % 2 for s in feature_sizes(b, stages)[:stages]]
            assert keeps_residue(a, b, stages) == (pattern_a == pattern_b), (a, b, stages)


def _side_sizes(model, resolution, modules):
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(o.shape[-1])) for m in modules]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, resolution, resolution))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("resolution", [64, 97, 101, 225])
def test_feature_sizes_match_efficientnet(resolution):
    model = build_model("b0", group_size=16, expand_ratio=4, num_classes=10)
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.stride[0] == 2]
    assert _side_sizes(model, resolution, strided) == feature_sizes(resolution)[1:]


def test_compatible_resolutions():
    assert compatible_resolutions(160, 128, 320) == [128, 160, 192, 224, 256, 288, 320]
    assert compatible_resolutions(225, 200, 300) == [225, 257, 289]
    assert compatible_resolutions(204, 250, 310) == [268, 300]  # B3's half and native share 12
    assert compatible_resolutions(61, 60, 80, stages=3) == [61, 69, 77]
    assert compatible_resolutions(50, 60, 63, stages=0) == [60, 61, 62, 63]
    assert compatible_resolutions(160, 161, 191) == []
    with pytest.raises(ValueError, match="low <= high"):
        compatible_resolutions(160, 300, 200)


def test_nearest_compatible():
    assert nearest_compatible(160, 250) == (224, 256)
    assert nearest_compatible(160, 224) == (224, 224)
    assert nearest_compatible(225, 240) == (225, 257)
    assert nearest_compatible(200, 5) == (None, 8)  # nothing >= 1 below
    assert nearest_compatible(61, 64, stages=3) == (61, 69)


def _conv(cin, cout, stride, k=3):
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2)


class ResidualDown(nn.Module):
    """Main path and shortcut both stride 2 from the same map: one downsampling stage."""

    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(_conv(4, 4, 2), nn.ReLU(), _conv(4, 4, 1))
        self.shortcut = nn.Conv2d(4, 4, 1, 2)

    def forward(self, x):
        return self.main(x) + self.shortcut(x)


def test_downsampling_stages_of_models():
    assert downsampling_stages(build_model("b0", num_classes=10)) == 5
    assert downsampling_stages(nn.Sequential(_conv(3, 4, 2), _conv(4, 4, 2), _conv(4, 4, 2, k=5))) == 3
    net = nn.Sequential(_conv(3, 4, 2), ResidualDown(), ResidualDown(), nn.AdaptiveAvgPool2d(1))
    assert downsampling_stages(net) == 3  # 5 strided convs, 3 stages
    assert downsampling_stages(nn.Sequential(_conv(3, 4, 4), nn.MaxPool2d(2))) == 3  # 4 = two stages
    assert downsampling_stages(nn.Sequential(_conv(3, 4, 1), nn.AdaptiveAvgPool2d(1))) == 0
    with pytest.raises(ValueError, match="power of two"):
        downsampling_stages(nn.Sequential(_conv(3, 4, 3)))
    net.train()
    downsampling_stages(net)
    assert net.training  # the probe leaves the mode as it found it


@pytest.mark.parametrize("train_res,stages", [(160, 5), (161, 5), (204, 5), (60, 3)])
def test_warning_fires_exactly_when_the_rule_is_broken(train_res, stages, capsys):
    for test_res in range(max(1, train_res - 70), train_res + 71):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            broken = check_resolutions(train_res, [test_res], stages, what="validation")
        mine = [w for w in caught if issubclass(w.category, ResolutionWarning)]
        expected = (test_res - train_res) % 2**stages != 0
        assert (len(mine) == 1) == expected == (broken == [test_res]), test_res
        console = capsys.readouterr().out
        assert ("warning: validation resolution" in console) == expected
        if expected:
            below, above = nearest_compatible(train_res, test_res, stages)
            nearby = f"{below} or {above}" if below else f"{above}"
            assert str(mine[0].message).endswith(f"Nearby sizes that keep it: {nearby}")


def test_parse_resolutions():
    assert parse_resolutions("224,256,288") == [224, 256, 288]
    assert parse_resolutions("288, 224") == [224, 288]
    assert parse_resolutions("160:224:32") == [160, 192, 224]
    assert parse_resolutions("160:180") == [160, 168, 176]
    for bad in ("", "a,b", "300:200", "1:2:3:4", "0,32", "160:224:0"):
        with pytest.raises(ValueError, match="--resolutions"):
            parse_resolutions(bad)


def test_sweep_table_and_plot(tmp_path):
    fake = {96: 97.0, 100: 90.0, 128: 95.5}

    def evaluate_at(r):
        return {"raw": {"top1": fake[r], "top5": 100.0}, "ema": {"top1": fake[r] + 1, "top5": 100.0}}

    rows = sweep(evaluate_at, [96, 100, 128], train_resolution=64)
    assert [(r["resolution"], r["keeps_residue"]) for r in rows if r["weights"] == "raw"] == [
        (96, True),
        (100, False),
        (128, True),
    ]
    table = sweep_table(rows, 64)
    lines = table.splitlines()
    assert "| 96 | 0 | ✓ | 98.00 | 97.00 |" in lines  # columns: ema, raw
    assert "| 100 | 4 |  | 91.00 | 90.00 |" in lines
    plot_sweep(rows, 64, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_half_presets_train_at_the_half_resolution():
    from app.config import build_config

    for key, half in PAPER_HALF.items():
        assert build_config(f"{key}-g16-lnpn-half").data.resolution == half
        assert build_config(f"{key}-g16-lnpn").data.resolution == VARIANTS[key].resolution


def test_sweep_report_from_validation_results_keeps_earlier_reports(tmp_path):
    results = {
        "raw@64": {"top1": 90.0, "top5": 99.0},
        "raw@72": {"top1": 80.0, "top5": 98.0},
        "ema@64": {"top1": 91.0, "top5": 99.5},
    }
    md, png = write_sweep_report(results, 96, tmp_path, title="b0 sweep")
    text = md.read_text()
    assert text.startswith("# b0 sweep") and "| 64 | 0 | ✓ | 91.00 | 90.00 |" in text
    assert "| 72 | 8 |  | – | 80.00 |" in text
    md2, png2 = write_sweep_report(results, 96, tmp_path)
    assert (md2.name, png2.name) == ("resolution-sweep-1.md", "resolution-sweep-1.png")
    assert md.read_text() == text and png.is_file()


def test_stage_count_and_trained_resolution_from_what_we_save():
    assert model_stages("b0") == 5
    assert trained_resolution({"config": {"data": {"resolution": 64}}}) == 64
    assert trained_resolution({"model": {}}) is None
