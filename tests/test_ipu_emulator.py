"""The PopTorch emulator reproduces IPU batching, reductions, outputs, pipelining rules,
recomputation and fp16 rounding."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ipu_options import emulator as poptorch
from ipu_options.emulator.executor import BatchSizeError, PipelineError
from ipu_options.emulator.precision import round_half, stochastic_round_half
from model import build_model

LR = 0.02  # realistic step: fp32 noise of the gradients (~1e-5 relative) stays below 1e-5


class WithLoss(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, y=None):
        logits = self.net(x)
        if y is None:
            return logits
        return logits, poptorch.identity_loss(F.cross_entropy(logits, y), reduction="mean")


@pytest.fixture(autouse=True)
def graph_arithmetic():
    """The emulator computes what a traced graph computes; references here do the same, so the
    two agree to the last bits that reduction order allows (the eager fast paths' hand-written
    backwards round differently)."""
    from model.fast_paths import eager_fast_paths

    with eager_fast_paths(False):
        yield


def tiny(norm="layer", proxy=True):
    return build_model(
        "b0",
        group_size=16,
        expand_ratio=4,
        norm=norm,
        proxy_norm=proxy,
        num_classes=5,
        dropout=0.0,
        drop_path=0.0,
    )


def options(replicas=2, ga=3, di=1, reduction=poptorch.ReductionType.Mean):
    o = poptorch.Options().replicationFactor(replicas).deviceIterations(di).broadcastBuffers(replicas == 1)
    o.Training.gradientAccumulation(ga).accumulationAndReplicationReductionType(reduction)
    return o


def data(n=12, res=32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, res, res, generator=g), torch.randint(0, 5, (n,), generator=g)


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def emulated_step(net, x, y, opts, lr=LR):
    model = WithLoss(net)
    step = poptorch.trainingModel(model, opts, torch.optim.SGD(model.parameters(), lr=lr))
    return step(x, y)


def test_layer_norm_step_equals_one_plain_step_on_the_same_images():
    x, y = data()
    plain, emu = tiny(), tiny()
    emu.load_state_dict(plain.state_dict())
    opt = torch.optim.SGD(plain.parameters(), lr=LR)
    F.cross_entropy(plain(x), y).backward()
    opt.step()
    emulated_step(emu, x, y, options(2, 3))
    assert max_diff(plain, emu) <= 1e-5
    assert max_diff(plain, tiny()) > 1e-3  # the step did move the weights


def test_batch_norm_uses_per_micro_batch_statistics():
    x, y = data(res=64)  # 2×2 maps at the last stage: batch norm over 2 images stays well-posed
    start = tiny("batch", False)
    emu, explicit, full = copy.deepcopy(start), copy.deepcopy(start), copy.deepcopy(start)
    emulated_step(emu, x, y, options(2, 3))
    # the explicit computation: host layout [GA=3, replicas=2, micro=2], mean of 6 gradients
    grads = [torch.zeros_like(p) for p in explicit.parameters()]
    for i in range(6):
        explicit.zero_grad()
        F.cross_entropy(explicit(x[2 * i : 2 * i + 2]), y[2 * i : 2 * i + 2]).backward()
        grads = [g + p.grad / 6 for g, p in zip(grads, explicit.parameters())]
    with torch.no_grad():
        for p, g in zip(explicit.parameters(), grads):
            p -= LR * g
    assert max_diff(explicit, emu) <= 1e-5
    opt = torch.optim.SGD(full.parameters(), lr=LR)
    F.cross_entropy(full(x), y).backward()
    opt.step()
    assert max_diff(full, emu) > 1e-4  # whole-batch statistics give a different step


def test_replicas_keep_their_own_running_statistics_and_host_gets_replica_0():
    x, y = data(4, res=64)
    net = tiny("batch", False)
    ref, other = copy.deepcopy(net), copy.deepcopy(net)
    model = WithLoss(net)
    step = poptorch.trainingModel(model, options(2, 1), torch.optim.SGD(model.parameters(), lr=0.0))
    step(x, y)
    step.copyWeightsToHost()
    with torch.no_grad():
        ref(x[:2])  # replica 0's micro-batch only
        other(x[2:])
    assert torch.allclose(net.stem.norm.running_mean, ref.stem.norm.running_mean, atol=1e-6)
    assert not torch.allclose(net.stem.norm.running_mean, other.stem.norm.running_mean, atol=1e-6)


def test_sum_reduction_and_device_iterations():
    x, y = data(8)
    a, b = tiny(), tiny()
    b.load_state_dict(a.state_dict())
    emulated_step(a, x, y, options(1, 2, reduction=poptorch.ReductionType.Sum), lr=0.1)
    emulated_step(b, x, y, options(1, 2), lr=0.2)  # Mean over 2 micro-batches at twice the lr
    assert max_diff(a, b) <= 1e-5
    # two device iterations = two weight updates in one call
    c, d = tiny(), tiny()
    d.load_state_dict(c.state_dict())
    emulated_step(c, x, y, options(1, 1, di=2), lr=0.1)
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    for half in (slice(0, 4), slice(4, 8)):
        opt.zero_grad()
        F.cross_entropy(d(x[half]), y[half]).backward()
        opt.step()
    assert max_diff(c, d) <= 1e-5


@pytest.mark.parametrize("mode,shape", [("Final", (2,)), ("All", (6,)), ("Sum", (2,))])
def test_output_modes(mode, shape):
    x, y = data()
    opts = options(2, 3).outputMode(getattr(poptorch.OutputMode, mode))
    logits, loss = emulated_step(tiny(), x, y, opts, lr=0.0)
    assert tuple(loss.shape) == shape
    assert logits.shape[0] == {"Final": 4, "All": 12, "Sum": 4}[mode]


def test_every_n_and_inference_all():
    x, _ = data(8)
    opts = poptorch.Options().deviceIterations(4).outputMode(poptorch.OutputMode.EveryN, 2)
    net = tiny().eval()
    out = poptorch.inferenceModel(net, opts)(x)
    assert out.shape == (4, 5)  # device iterations 2 and 4, micro-batch 2
    full = poptorch.inferenceModel(net, poptorch.Options().deviceIterations(4))(x)
    with torch.no_grad():
        assert torch.allclose(full, net(x), rtol=1e-4, atol=1e-4)


def test_batch_not_divisible_names_the_numbers():
    x, y = data(10)
    with pytest.raises(BatchSizeError, match=r"10 samples.*\(1\).*\(3\).*\(2\).*micro_batch × 6"):
        emulated_step(tiny(), x, y, options(2, 3))


def _pipelined(net, ipu_of_stage6=1):
    poptorch.BeginBlock(net.blocks[3], "blocks.3", ipu_id=1)
    poptorch.BeginBlock(net.blocks[6], "blocks.6", ipu_id=ipu_of_stage6)
    return net


def test_pipeline_rules_quote_poptorch():
    x, y = data(4)
    with pytest.raises(PipelineError, match=r"at least 3.*|gradientAccumulation is 2"):
        emulated_step(_pipelined(tiny()), x, y, options(1, 2))
    with pytest.raises(PipelineError, match="non-decreasing"):
        emulated_step(_pipelined(tiny(), ipu_of_stage6=0), x[:3], y[:3], options(1, 3))
    with pytest.raises(PipelineError, match="deviceIterations"):
        poptorch.inferenceModel(_pipelined(tiny()).eval(), poptorch.Options())(x)


def test_pipelined_step_equals_plain_accumulation():
    x, y = data(6)
    a, b = tiny(), tiny()
    b.load_state_dict(a.state_dict())
    emulated_step(_pipelined(a), x, y, options(1, 3))
    emulated_step(b, x, y, options(1, 3))
    assert max_diff(a, b) <= 1e-5


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_recomputation_drops_stored_activations_and_keeps_gradients():
    from ipu_options.pipeline import annotate

    x, y = data(4, res=64)
    plain, rec = tiny("batch", False), tiny("batch", False)
    rec.load_state_dict(plain.state_dict())
    annotate(rec, {}, ["blocks.2.0", "blocks.4.0"], poptorch)
    step = poptorch.trainingModel(WithLoss(rec), options(1, 1), torch.optim.SGD(rec.parameters(), lr=LR))
    step.compile(x, y)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    stored_plain = _saved_bytes(lambda: F.cross_entropy(plain(x), y))
    stored_rec = _saved_bytes(lambda: F.cross_entropy(rec(x), y))
    plain.load_state_dict(before)  # the measuring pass must not count as a training step
    assert stored_rec < 0.6 * stored_plain
    opt = torch.optim.SGD(plain.parameters(), lr=LR)
    plain.zero_grad()
    F.cross_entropy(plain(x), y).backward()
    opt.step()
    rec.zero_grad()
    step(x, y)
    assert max_diff(plain, rec) <= 1e-5
    # recomputation did not update batch-norm running statistics twice
    assert torch.allclose(
        plain.blocks[3][0].spatial.norm.running_mean, rec.blocks[3][0].spatial.norm.running_mean, atol=1e-6
    )


def test_stochastic_rounding_is_unbiased_and_on_the_fp16_grid():
    x = torch.full((200000,), 1.0 + 2.0**-12)  # a quarter of the way from 1 to the next fp16
    r = stochastic_round_half(x)
    assert torch.equal(r.half().float(), r)
    assert abs(r.mean().item() - x[0].item()) < 2e-5
    assert torch.equal(round_half(x), torch.ones_like(x))  # nearest rounding loses it


def test_half_model_trains_with_fp16_weights_and_loss_scaling():
    x, y = data(4)
    net = tiny().half()
    model = WithLoss(net)
    opt = poptorch.optim.SGD(model.parameters(), lr=LR, loss_scaling=128.0)
    opts = options(1, 2)
    opts.Precision.enableStochasticRounding(True)
    before = [p.detach().clone() for p in net.parameters()]
    step = poptorch.trainingModel(model, opts, opt)
    _, loss = step(x.half(), y)
    assert loss.dtype == torch.half and torch.isfinite(loss)
    assert all(p.dtype == torch.half for p in net.parameters())
    assert max((p.float() - b.float()).abs().max().item() for p, b in zip(net.parameters(), before)) > 0


def test_automatic_loss_scaling_backs_off_on_overflow():
    x, y = data(2)
    net = tiny().half()
    model = WithLoss(net)
    opts = options(1, 1)
    opts.Training.setAutomaticLossScaling(True)
    step = poptorch.trainingModel(
        model, opts, poptorch.optim.SGD(model.parameters(), lr=0.0, loss_scaling=2.0**40)
    )
    step(x.half(), y)
    assert step.loss_scale < 2.0**40
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_options_setters_return_self_and_dataloader_combines_batches():
    o = poptorch.Options()
    assert o.replicationFactor(2) is o and o.deviceIterations(3) is o
    assert o.Training.gradientAccumulation(4) is o.Training
    ds = torch.utils.data.TensorDataset(torch.arange(200).float())
    loader = poptorch.DataLoader(o, ds, batch_size=2)
    assert next(iter(loader))[0].shape == (2 * 2 * 3 * 4,)


def test_optimisers_accept_poptorch_arguments():
    p = [nn.Parameter(torch.ones(3))]
    rms = poptorch.optim.RMSprop(
        p, lr=0.1, alpha=0.9, eps=1e-3, momentum=0.9, use_tf_variant=True, loss_scaling=64.0
    )
    from backends.optimizers import RMSpropTF

    assert isinstance(rms, RMSpropTF) and rms.loss_scaling == 64.0
    sgd = poptorch.optim.SGD(p, lr=0.1, momentum=0.9, velocity_scaling=8.0, accum_type=torch.float16)
    assert sgd.accum_type == torch.float16
    with pytest.raises(ValueError, match="Accumulation types"):
        poptorch.optim.AdamW(p, lr=0.1, accum_type=torch.int32)


def test_16_32_keeps_fp32_weights_and_computes_in_fp16():
    from ipu_options.precision import apply_precision

    x, y = data(4)
    net = apply_precision(tiny(), "16.32")
    model = WithLoss(net)
    before = [p.detach().clone() for p in net.parameters()]
    step = poptorch.trainingModel(model, options(1, 2), torch.optim.SGD(model.parameters(), lr=LR))
    logits, loss = step(x, y)
    assert logits.dtype == torch.half and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    # fp32 master weights: updates smaller than fp16's spacing still land
    moved = [(p - b).abs().max().item() for p, b in zip(net.parameters(), before)]
    assert max(moved) > 0


def test_replicated_batch_norm_needs_unbroadcast_buffers_as_in_poptorch():
    x, y = data(res=64)
    opts = poptorch.Options().replicationFactor(2)
    opts.Training.gradientAccumulation(3)
    with pytest.raises(RuntimeError, match=r"broadcastBuffers\(False\)"):
        emulated_step(tiny("batch", False), x, y, opts)
    emulated_step(tiny("layer", True), x, y, opts)  # layer norm updates no buffer: compiles


def test_offline_target_compiles_but_never_runs():
    x, y = data()
    opts = options(replicas=1).useOfflineIpuTarget(2)
    model = WithLoss(tiny())
    step = poptorch.trainingModel(model, opts, torch.optim.SGD(model.parameters(), lr=LR))
    step.compile(x, y)
    assert step.isCompiled() and not step.isAttachedToDevice()
    with pytest.raises(AssertionError, match=r"use model.compile\(inputs\)"):
        step(x, y)


def test_optimiser_state_loads_only_in_poptorch_form_and_keeps_its_types():
    p = [nn.Parameter(torch.ones(3, dtype=torch.half))]
    host = torch.optim.SGD([nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9)
    host.param_groups[0]["params"][0].grad = torch.ones(3)
    host.step()
    ipu = poptorch.optim.SGD(p, lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match="Only IPU optimizer states"):
        ipu.load_state_dict(host.state_dict())
    saved = ipu.state_dict()
    saved["ipu_state"] = {0: {"momentum_buffer": torch.full((3,), 0.5)}}  # fp32 beside fp16 weights
    ipu.load_state_dict(saved)
    buf = ipu.state[p[0]]["momentum_buffer"]
    assert buf.dtype == torch.float32 and torch.equal(buf, torch.full((3,), 0.5))
    assert {"ipu_state", "ipu_param", "state", "param_groups"} <= set(ipu.state_dict())
