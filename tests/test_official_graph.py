"""The paper's network as Graphcore's official TensorFlow code builds it (graphcore/examples at
09b7c67, vision/cnns/tensorflow1/training/: Models/efficientnet.py, Models/proxy_norm.py,
train.py, ipu_optimizer.py). Each test pins one choice against the official semantics, read
from the cited lines; docs/official-code.md lists them."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from app import checkpoint as ckpt
from app.checkpoint import CheckpointError, check_architecture
from app.cli import main as cli
from app.config import build_config
from app.optim import decay_split
from app.plan import lowering_reports
from ipu_options import memory
from model import build_model, convert_state_dict, count_macs, count_parameters, fuse_for_inference
from model.blocks import MBConv
from model.efficientnet import TRUNCATED_STD
from model.fast_paths import eager_fast_paths
from model.norms import NormSpec
from model.padding import Conv2dSame, make_conv, same_pads


def lnpn_b0(**kwargs):
    return build_model(
        "b0", group_size=16, expand_ratio=4, norm="layer", proxy_norm=True, num_classes=10, **kwargs
    )


def perturbed(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter moved off its initial value (norm scales around 1, proxy parameters and
    biases around 0), so that no term of the arithmetic vanishes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return module


# ----------------------------------------------------------------------------- padding
# efficientnet.py:112-115: every conv is tf.nn.conv2d(..., padding='SAME'). TensorFlow's SAME:
# out = ceil(H / s), total = max((out - 1)·s + k - H, 0), total // 2 before, the rest after.


@pytest.mark.parametrize("size", [6, 7, 8, 9, 14, 15, 224, 225])
@pytest.mark.parametrize("kernel,stride", [(3, 2), (5, 2), (3, 1), (5, 1), (1, 1)])
def test_same_pads_are_tensorflows(size, kernel, stride):
    before, after = same_pads(size, kernel, stride)
    out = math.ceil(size / stride)
    assert before + after == max((out - 1) * stride + kernel - size, 0)
    assert before == (before + after) // 2
    # the conv then gives TensorFlow's output size
    assert (size + before + after - kernel) // stride + 1 == out


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [8, 9, 16, 17])
def test_stride_two_conv_equals_an_explicitly_padded_reference(kernel, size):
    """SAME at stride 2 is an explicit zero pad, one pixel fewer before than after on an even
    input (k=3: 0 and 1; k=5: 1 and 2), symmetric (k//2) on an odd one."""
    torch.manual_seed(0)
    conv = make_conv(4, 6, kernel, stride=2, bias=True, padding="same")
    x = torch.randn(2, 4, size, size)
    if size % 2 == 0:
        pads = ((kernel - 2) // 2, kernel // 2)
    else:
        pads = (kernel // 2, kernel // 2)
    reference = F.conv2d(F.pad(x, (pads[0], pads[1], pads[0], pads[1])), conv.weight, conv.bias, 2)
    assert torch.allclose(conv(x), reference, atol=1e-6)
    symmetric = F.conv2d(x, conv.weight, conv.bias, 2, kernel // 2)
    assert symmetric.shape == reference.shape
    assert torch.equal(torch.isclose(symmetric, reference, atol=1e-6).all(), torch.tensor(size % 2 == 1))


def test_stride_two_conv_on_an_even_input_reads_the_pixels_tensorflow_reads():
    """Output (0, 0) of a 3×3 stride-2 SAME conv on 8×8 reads rows and columns 0-2 (TF pads none
    before); the last output, (3, 3), reads 6-7 and the bottom/right pad. Symmetric k//2 padding
    would read the pad before 0 and never pixel 7."""
    conv = make_conv(1, 1, 3, stride=2, padding="same")
    x = torch.randn(1, 1, 8, 8, requires_grad=True)
    out = conv(x)
    assert out.shape[-2:] == (4, 4)
    for (i, j), rows in (((0, 0), [0, 1, 2]), ((3, 3), [6, 7])):
        (grad,) = torch.autograd.grad(out[0, 0, i, j], x, retain_graph=True)
        read = grad[0, 0].abs().sum(1).nonzero().flatten().tolist()
        assert read == rows
        assert grad[0, 0].abs().sum(0).nonzero().flatten().tolist() == rows


def test_only_the_paper_presets_stride_two_convs_on_even_inputs_pad_separately():
    """The pad is a plain F.pad (aten::constant_pad_nd, which PopTorch 3.4 lowers:
    RegisterOptionalAtenOps.cpp.inc:110, AtenHandlers.gen.cpp:791), once per stride-2 conv on an
    even input: B0 at 224 has five (224, 112, 56, 28, 14 before the stem and stages 2, 3, 4, 6);
    at 225 every such input is odd and the conv pads itself."""
    for resolution, pads in ((224, 5), (225, 0)):
        cfg = build_config("b0-g16-lnpn", [f"data.resolution={resolution}"])
        assert cfg.model.padding == "same" and cfg.model.graph == "official"
        for mode, report in lowering_reports(cfg).items():
            assert report.lowers, (mode, report.problems)
            assert report.kinds.get("constant_pad_nd", 0) == pads


def test_convs_that_same_pads_symmetrically_stay_plain_convs():
    assert type(make_conv(4, 4, 3, stride=1, padding="same")) is nn.Conv2d
    assert type(make_conv(4, 4, 3, stride=2, padding="same")) is Conv2dSame
    assert type(make_conv(4, 4, 3, stride=2, padding="symmetric")) is nn.Conv2d
    with pytest.raises(ValueError, match="same, symmetric"):
        make_conv(4, 4, 3, padding="valid")


def _redrawn(peer: nn.Module) -> nn.Module:
    """A peer with He-scaled weights: a freshly built timm classifier gives logits of ~1e-5."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in peer.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
    return peer.eval()


@pytest.mark.parametrize(
    "peer_name,padding", [("efficientnet_b0", "symmetric"), ("tf_efficientnet_b0", "same")]
)
def test_peer_import_is_exact_with_the_peers_padding_and_not_with_the_other(peer_name, padding):
    """timm's efficientnet_b0 pads k//2; its tf_efficientnet_b0 pads as TensorFlow's SAME (an
    independent implementation of the official padding)."""
    timm = pytest.importorskip("timm")
    peer = _redrawn(timm.create_model(peer_name))
    eps = next(m.eps for m in peer.modules() if isinstance(m, nn.BatchNorm2d))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = peer(x)
        for ours_padding in ("same", "symmetric"):
            ours = build_model("b0", norm_eps=eps, padding=ours_padding).eval()
            ours.load_state_dict(convert_state_dict(peer.state_dict(), "timm"))
            error = ((ours(x) - expected).abs().max() / expected.abs().max()).item()
            assert (error <= 1e-4) == (ours_padding == padding), (ours_padding, error)


# ----------------------------------------------------------------------------- squeeze-excite


def _pn_parts(layer, x):
    """(φ(γY + β) − μ̃, 1/σ̃) of a conv-norm-PN layer, written out from proxy_norm.py:82-89."""
    y = layer.norm(layer.conv(x))
    mean, inv_std = layer.act.proxy_statistics(layer.norm.weight, layer.norm.bias)
    return F.silu(y) - mean.view(1, -1, 1, 1), inv_std.view(1, -1, 1, 1)


def test_squeeze_excite_pools_the_unscaled_proxy_output_and_scales_the_gate():
    """efficientnet.py:225-242: the spatial conv's PN runs with delay_scale=True, the SE pools
    φ(γY + β) − μ̃ (no 1/σ̃), and 1/σ̃ multiplies the gate after the sigmoid."""
    block = perturbed(MBConv(16, 24, 3, 2, 4, 16, NormSpec("layer", proxy=True))).eval()
    x = torch.randn(2, 16, 10, 10)
    seen = {}
    block.se.reduce.register_forward_hook(lambda m, i, o: seen.__setitem__("pooled", i[0]))
    with torch.no_grad():
        out = block(x)
        unscaled, inv_std = _pn_parts(block.spatial, block.expand(x))
        pooled = unscaled.mean((2, 3), keepdim=True)
        assert torch.allclose(seen["pooled"], pooled, atol=1e-6)
        gate = torch.sigmoid(block.se.expand(F.silu(block.se.reduce(pooled)))) * inv_std
        assert torch.allclose(out, block.project(unscaled * gate), atol=1e-5)
        # graph v1 pooled the scaled tensor: another function
        block.se.scale_pooled = True
        assert not torch.allclose(block(x), out, atol=1e-3)


# ----------------------------------------------------------------------------- head


def test_head_applies_proxy_norm_without_its_inverse_std():
    """efficientnet.py:383-384: the top's PN has delay_scale=True and drops the returned 1/σ̃; the
    pooled features go to the classifier as φ(γY + β) − μ̃."""
    for graph, scaled in (("official", False), ("v1", True)):
        model = perturbed(lnpn_b0(graph=graph)).eval()
        x = torch.randn(2, 3, 64, 64)
        seen = {}
        model.head.register_forward_hook(lambda m, i, o, seen=seen: seen.update(input=i[0], output=o))
        with torch.no_grad():
            logits = model(x)
            unscaled, inv_std = _pn_parts(model.head, seen["input"])
            expected = unscaled * inv_std if scaled else unscaled
            assert torch.allclose(seen["output"], expected, atol=1e-5), graph
            pooled = expected.mean((2, 3))
            assert torch.allclose(logits, model.classifier(pooled), atol=1e-5)


def test_fused_inference_and_the_fast_paths_compute_the_official_graph():
    model = perturbed(lnpn_b0(dropout=0.0, drop_path=0.0))
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(fuse_for_inference(model)(x), model(x), atol=1e-5)
    model.train()
    losses, grads = [], []
    for fast in (True, False):
        model.zero_grad()
        with eager_fast_paths(fast):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.equal(losses[0], losses[1])
    for name, grad in grads[1].items():
        tolerance = 1e-5 * grad.abs().max().item() + 1e-8
        assert torch.allclose(grads[0][name], grad, rtol=1e-4, atol=tolerance), name


def gn_b0(**kwargs):
    return build_model("b0", group_size=16, expand_ratio=4, norm="group", num_classes=10, **kwargs)


def test_group_norm_fast_paths_fused_inference_and_compile_compute_the_strided_function():
    """Every path where group norm runs (eager with and without the fast paths, fused inference,
    torch.compile) computes the official strided grouping: the same outputs and gradients."""
    model = perturbed(gn_b0(dropout=0.0, drop_path=0.0, norm_grouping="strided"))
    x, y = torch.randn(2, 3, 48, 48), torch.randint(0, 10, (2,))
    model.eval()
    with torch.no_grad():
        reference = model(x)
        contiguous = gn_b0(dropout=0.0, drop_path=0.0, norm_grouping="contiguous").eval()
        contiguous.load_state_dict(model.state_dict())
        assert not torch.allclose(contiguous(x), reference, atol=1e-3)  # the grouping is in play
        assert torch.allclose(fuse_for_inference(model)(x), reference, atol=1e-5)
        assert torch.allclose(torch.compile(model, backend="aot_eager")(x), reference, atol=1e-5)
    model.train()
    grads = []
    for fast in (True, False):
        model.zero_grad()
        with eager_fast_paths(fast):
            F.cross_entropy(model(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[1].items():
        assert torch.allclose(grads[0][name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item() + 1e-8), (
            name
        )


def test_torch_compile_traces_the_same_function():
    model = perturbed(lnpn_b0(dropout=0.0, drop_path=0.0)).eval()
    x = torch.randn(2, 3, 48, 48)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)


# ----------------------------------------------------------------------------- weight decay


def official_decays(tf_name: str, proxy_row: int = -1) -> bool:
    """train.py:234-244 with efficientnet.py:557: decay unless the name holds beta, gamma, proxy
    or moving_; the proxy variable's rows 4-5 (β̃, γ̃) are decayed by the PN optimiser instead
    (proxy_norm.py:148-152: weight decay [0, 0, 0, 0, wd, wd])."""
    if "proxy" in tf_name:
        return proxy_row in (4, 5)
    return not any(s in tf_name for s in ("beta", "gamma", "proxy", "moving_"))


def tf_name_of(module: nn.Module, name: str):
    """The official variable (and proxy row) that holds one of our parameters."""
    if isinstance(module, nn.Conv2d):
        return f"conv2d/{'kernel' if name == 'weight' else 'bias'}", -1  # efficientnet.py:107, 117
    if isinstance(module, nn.Linear):
        return f"logits/dense/{'kernel' if name == 'weight' else 'bias'}", -1  # :89
    if isinstance(module, nn.GroupNorm):  # group_norm's gamma/beta; under PN, proxy rows 1/0
        return f"GroupNorm/{'gamma' if name == 'weight' else 'beta'}", -1
    return "act/proxy", {"proxy_bias": 4, "proxy_weight": 5}[name]  # proxy_norm.py:60, 122


@pytest.mark.parametrize("proxy", [True, False])
def test_weight_decay_follows_the_official_name_rule(proxy):
    model = build_model(
        "b0",
        group_size=16,
        expand_ratio=4,
        norm="layer" if proxy else "group",
        proxy_norm=proxy,
        num_classes=10,
    )
    decay, no_decay = (dict(part) for part in decay_split(model))
    modules = dict(model.named_modules())
    for full in list(decay) + list(no_decay):
        owner, _, leaf = full.rpartition(".")
        assert (full in decay) == official_decays(*tf_name_of(modules[owner], leaf)), full
    biases = [n for n in decay if n.endswith(".bias") and ".se." in n or n == "classifier.bias"]
    assert len(biases) == 2 * 16 + 1  # every SE conv bias of B0's 16 blocks, and the classifier's


# ----------------------------------------------------------------------------- initialisation


def test_initialisation_is_the_official_truncated_normal_and_glorot_uniform():
    """efficientnet.py:345 (dense convs, fan-out) and :350 (grouped convs, fan-in): TF1's
    variance_scaling_initializer(scale=2), a normal of std sqrt(2/fan)/0.8796 cut at ±2 of that
    std; :90 the classifier glorot-uniform; biases zero (:121, tf.layers.dense's default)."""
    torch.manual_seed(0)
    model = build_model("b0", group_size=16, expand_ratio=4, norm="layer", proxy_norm=True, num_classes=1000)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            in_per_group = m.in_channels // m.groups
            k2 = m.kernel_size[0] * m.kernel_size[1]
            fan = k2 * in_per_group if m.groups > 1 else k2 * m.out_channels
            std = math.sqrt(2.0 / fan)
            bound = 2 * std / TRUNCATED_STD
            w = m.weight.detach()
            assert w.abs().max() <= bound + 1e-7, name
            if w.numel() >= 20000:  # enough draws to see the distribution
                assert abs(w.std().item() / std - 1) < 0.05, name
                assert w.abs().max() > 0.95 * bound, name  # reaches the truncation
            assert m.bias is None or not m.bias.any(), name
    limit = math.sqrt(6.0 / (1280 + 1000))
    w = model.classifier.weight.detach()
    assert w.abs().max() <= limit and w.abs().max() > 0.99 * limit
    assert abs(w.std().item() - limit / math.sqrt(3)) < 0.02 * limit
    assert not model.classifier.bias.any()


# ----------------------------------------------------------------------------- sizes


def test_g16_b0_lnpn_has_the_official_parameter_count():
    # The official network's trainable variables for G16 B0 LN+PN number 5,938,484 (the issue's
    # count from the official code; the proxy variable's μ̃ and 1/σ̃ rows are not counted there
    # as they are not parameters here).
    for graph in ("official", "v1"):
        for padding in ("same", "symmetric"):
            model = build_model(
                "b0",
                group_size=16,
                expand_ratio=4,
                norm="layer",
                proxy_norm=True,
                padding=padding,
                graph=graph,
            )
            assert count_parameters(model) == 5_938_484


def test_padding_changes_no_shape_or_multiply_add():
    same, symmetric = lnpn_b0(), lnpn_b0(padding="symmetric")
    for resolution in (224, 225):
        assert count_macs(same, resolution) == count_macs(symmetric, resolution)


def test_memory_model_counts_the_padded_tensors():
    """Each asymmetric F.pad's output is what the conv keeps: B0 at 64 pads the image (3×64²→65²)
    and the spatial input of every stride-2 block's (H→H+1 for k=3, H→H+3 for k=5)."""
    same, symmetric = lnpn_b0(), lnpn_b0(padding="symmetric")
    a, b = memory.units(same, 64), memory.units(symmetric, 64)
    grown = {u.name: u.stored - v.stored for u, v in zip(a, b) if u.stored != v.stored}
    expected = {"stem": 3 * (65**2 - 64**2)}
    for name, module in same.named_modules():
        if isinstance(module, MBConv) and module.spatial.conv.stride[0] == 2:
            h = {"blocks.1.0": 32, "blocks.2.0": 16, "blocks.3.0": 8, "blocks.5.0": 4}[name]
            k = module.spatial.conv.kernel_size[0]
            expected[name] = module.spatial.conv.in_channels * ((h + k - 2) ** 2 - h**2)
    assert grown == expected


# ----------------------------------------------------------------------------- checkpoints


def test_unrecorded_checkpoints_are_refused_unless_their_graph_is_asked_for():
    cfg = build_config("digits")
    recorded = {"arch": ckpt.arch_of(cfg.model, 10)}
    check_architecture(recorded, cfg.model, 10, "runs/new")
    unrecorded = {"arch": {k: v for k, v in recorded["arch"].items() if k not in ("padding", "graph")}}
    with pytest.raises(CheckpointError, match="model.padding=symmetric model.graph=v1"):
        check_architecture(unrecorded, cfg.model, 10, "runs/old")
    old = build_config("digits", ["model.padding=symmetric", "model.graph=v1"])
    check_architecture(unrecorded, old.model, 10, "runs/old")
    # a recorded graph is compared as any other architectural field
    with pytest.raises(CheckpointError, match="model.graph: checkpoint 'official', this run 'v1'"):
        check_architecture(recorded, build_config("digits", ["model.graph=v1"]).model, 10, "runs/new")


def test_unrecorded_group_norm_checkpoints_are_refused_unless_contiguous_groups_are_asked_for():
    """A group-norm checkpoint without ``norm_grouping`` computed torch's contiguous groups."""
    cfg = build_config("b0-g16-gn")
    recorded = {"arch": ckpt.arch_of(cfg.model, 10)}
    check_architecture(recorded, cfg.model, 10, "runs/new")
    unrecorded = {"arch": {k: v for k, v in recorded["arch"].items() if k != "norm_grouping"}}
    with pytest.raises(CheckpointError, match="Add model.norm_grouping=contiguous to the command line"):
        check_architecture(unrecorded, cfg.model, 10, "runs/old")
    check_architecture(
        unrecorded, build_config("b0-g16-gn", ["model.norm_grouping=contiguous"]).model, 10, "x"
    )
    # before padding and graph were recorded too: every override, in one message
    older = {"arch": {k: v for k, v in unrecorded["arch"].items() if k not in ("padding", "graph")}}
    with pytest.raises(
        CheckpointError, match="model.padding=symmetric model.graph=v1 model.norm_grouping=contiguous"
    ):
        check_architecture(older, cfg.model, 10, "runs/older")
    # a recorded grouping is compared as any other architectural field
    with pytest.raises(
        CheckpointError, match="model.norm_grouping: checkpoint 'strided', this run 'contiguous'"
    ):
        check_architecture(
            recorded, build_config("b0-g16-gn", ["model.norm_grouping=contiguous"]).model, 10, "x"
        )


@pytest.mark.parametrize("preset", ["b0-g16-lnpn", "digits"])
def test_layer_and_batch_norm_checkpoints_load_under_either_grouping(preset):
    cfg = build_config(preset)
    unrecorded = {"arch": {k: v for k, v in ckpt.arch_of(cfg.model, 10).items() if k != "norm_grouping"}}
    for grouping in ("strided", "contiguous"):
        other = build_config(preset, [f"model.norm_grouping={grouping}"]).model
        check_architecture(unrecorded, other, 10, "runs/old")
        check_architecture({"arch": ckpt.arch_of(cfg.model, 10)}, other, 10, "runs/new")


def test_validating_a_checkpoint_written_before_the_record_exits_2_with_the_override(tmp_path, capsys):
    args = [
        "--device",
        "cpu",
        "data.resolution=32",
        "data.workers=0",
        "train.micro_batch=8",
        "train.max_steps=1",
        "train.ema_decay=0",
        f"log.out_dir={tmp_path}",
        "log.name=r",
        "model.padding=symmetric",
        "model.graph=v1",
    ]
    assert cli(["train", *args]) == 0
    run = tmp_path / "r"
    # Make it a checkpoint of before the record: neither its arch nor its config.yaml has the fields.
    for path in (run / ckpt.CHECKPOINT_DIR).glob("*.pt"):
        payload = torch.load(path, weights_only=True)
        for key in ("padding", "graph"):
            del payload["arch"][key]
        torch.save(payload, path)
    config = run / "config.yaml"
    config.write_text(
        "\n".join(
            line
            for line in config.read_text().splitlines()
            if not line.strip().startswith(("padding:", "graph:"))
        )
        + "\n"
    )
    capsys.readouterr()
    assert cli(["validate", "--checkpoint", str(run)]) == 2
    err = capsys.readouterr().err
    assert "model.padding=symmetric model.graph=v1" in err and "Traceback" not in err
    assert cli(["validate", "--checkpoint", str(run), "model.padding=symmetric", "model.graph=v1"]) == 0
