"""The memory model's activation estimate against the bytes autograd really saves for backward
(saved-tensor hooks on the CPU), and the planner's proposals and refusals."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from app.config import build_config
from app.objective import network_builder
from app.specs import ipu_batch_plan, ipu_spec, model_spec, optim_spec
from ipu_options import memory
from ipu_options.planning import PlanError, make_plan, report, resolve_pipeline
from model import build_model
from model.fast_paths import eager_fast_paths
from model.proxy_norm import ProxyNormAct, _SiluProxyStatistics

RES = 64  # every model is resolution-correct: the counts scale with the feature maps' sizes


def network(cfg):
    """The network the application hands the planner for ``cfg``."""
    return network_builder(cfg)()


def specs(cfg):
    """What the application hands the planner besides the network: model, IPU, batch, optimiser."""
    return model_spec(cfg), ipu_spec(cfg), ipu_batch_plan(cfg), optim_spec(cfg)


def saved_bytes(model, batch: int) -> int:
    """Bytes of distinct non-parameter storages saved for backward by one training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, RES, RES, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    # The activations as a traced graph keeps them (no eager fast paths); the C×200 proxy
    # statistics as the memory model counts them, the hand-written backward's 2 × C × 200 points
    # (autograd of the plain arithmetic keeps more or fewer depending on the torch version).
    statistics = mock.patch.object(
        ProxyNormAct,
        "proxy_statistics",
        lambda pn, w, b: _SiluProxyStatistics.apply(
            pn.proxy_bias, pn.proxy_weight, w, b, pn.quantiles, pn.eps
        ),
    )
    with eager_fast_paths(False), statistics, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(model(x), y)
    return sum(seen.values())


# B0–B4 × G1/G16 × BN/LN+PN; the per-image part is measured as the difference of two batch sizes
# so the batch-independent proxy-norm statistics cannot hide an error in the activations.
@pytest.mark.parametrize("name", ["b0", "b1", "b2", "b3", "b4"])
@pytest.mark.parametrize("group,expand", [(1, 6), (16, 4)])
@pytest.mark.parametrize("norm,proxy", [("batch", False), ("layer", True)])
def test_activation_estimate_within_15_percent_of_saved_tensors(name, group, expand, norm, proxy):
    model = build_model(
        name, group_size=group, expand_ratio=expand, norm=norm, proxy_norm=proxy, num_classes=10
    )
    units = memory.units(model, RES)
    one, three = saved_bytes(model, 1), saved_bytes(model, 3)
    est_one = memory.activations_bytes(units, 1, 4)
    est_three = memory.activations_bytes(units, 3, 4)
    assert abs(est_three - three) <= 0.15 * three
    per_image, est_per_image = (three - one) / 2, (est_three - est_one) / 2
    assert abs(est_per_image - per_image) <= 0.15 * per_image


def test_recomputation_and_fp16_lower_the_estimate():
    model = build_model("b0", group_size=16, expand_ratio=4, norm="layer", proxy_norm=True)
    units = memory.units(model, 224)
    full = memory.activations_bytes(units, 8, 4)
    marks = [u.name for u in units if u.name.endswith(".0")]
    assert memory.activations_bytes(units, 8, 4, marks) < 0.5 * full
    assert memory.activations_bytes(units, 8, 2) < 0.6 * full


def test_pipeline_stash_grows_with_stages_before_the_last():
    units = memory.units(build_model("b0"), 224)
    s = memory.Settings(precision="16.16", grad_accum=8)
    two = memory.per_ipu(units, {"blocks.4.0": 1}, 8, s)
    assert [m.ipu for m in two] == [0, 1]
    assert sum(m.macs for m in two) == sum(u.macs for u in units)
    # the first stage keeps 2×2−1 = 3 micro-batches' inputs: more than its one recomputed pass
    single = memory.stage_memory([u for u in units if u.name in two[0].units], 0, 0, 1, 8, s)
    assert two[0].activations != single.activations


def test_plan_balances_compute_and_names_split_points(capsys):
    cfg = build_config("b4-g16-lnpn", ["ipu.plan_ipus=2"])
    plan = make_plan(network(cfg), *specs(cfg), propose=True)
    assert plan.fits and plan.stages == 2
    shares = [m.macs for m in plan.ipus]
    assert min(shares) / max(shares) > 0.7
    assert list(plan.splits.values()) == [1]
    assert plan.max_micro_batch >= cfg.train.micro_batch
    text = report(plan, *specs(cfg))
    assert "IPU memory plan (estimated" in text and "proposal: ipu.pipeline=" in text


def test_plan_that_cannot_fit_is_refused_with_the_fix():
    cfg = build_config("b4-g16-lnpn", ["train.micro_batch=512", "ipu.plan_ipus=1"])
    with pytest.raises(PlanError, match="lower train.micro_batch"):
        make_plan(network(cfg), *specs(cfg), propose=True)
    explicit = build_config("b4-g16-lnpn", ["train.micro_batch=256", "ipu.pipeline={blocks.4: 1}"])
    with pytest.raises(PlanError, match=r"does not fit: IPU0 .* MB > 630 MB"):
        resolve_pipeline(network(explicit), *specs(explicit))


def test_auto_pipeline_uses_the_plan():
    cfg = build_config("b4-g16-lnpn", ["ipu.pipeline=auto", "ipu.plan_ipus=2"])
    splits, recompute, plan = resolve_pipeline(network(cfg), *specs(cfg))
    assert splits == plan.splits and len(splits) == 1
    assert set(plan.checkpoints) <= set(recompute)


def test_largest_micro_batch_is_the_boundary():
    from ipu_options.planning import balanced_plan, budget_bytes, largest_micro_batch, plan_units

    cfg = build_config("b0-g16-lnpn", ["data.resolution=224"])
    model, ipu, batch, optim = specs(cfg)
    units, s = plan_units(model, network(cfg)), memory.Settings.of(ipu, batch, optim)
    budget = budget_bytes(ipu)
    best = largest_micro_batch(units, 1, s, budget)
    assert best > 1
    assert balanced_plan(units, 1, best, s, budget) is not None
    assert balanced_plan(units, 1, best + 1, s, budget) is None


def test_plan_command_prints_the_table(capsys):
    from app.cli import main as cli

    assert cli(["plan", "--config", "b0-g16-lnpn", "ipu.plan_ipus=2", "train.grad_accum=4"]) == 0
    out = capsys.readouterr().out
    assert "IPU memory plan (estimated" in out and "compute" in out
    assert "needs train.grad_accum >= 3" in out


def test_checkpoint_names_count_the_same_in_any_accepted_spelling():
    # annotate() accepts `blocks.2`, `model.blocks.2.0`; the plan must count those checkpoints too
    def plan(marks):
        cfg = build_config(
            "digits",
            [
                "data.resolution=224",
                "train.micro_batch=8",
                "ipu.pipeline={blocks.4: 1}",
                "train.grad_accum=3",
                f"ipu.recompute=[{','.join(marks)}]",
            ],
        )
        return make_plan(network(cfg), *specs(cfg))

    canonical, aliases = plan(["blocks.2.0", "blocks.3.0"]), plan(["blocks.2", "model.blocks.3"])
    none = plan([])
    assert [m.activations for m in aliases.ipus] == [m.activations for m in canonical.ipus]
    assert aliases.checkpoints == ["blocks.2.0", "blocks.3.0"]
    assert canonical.ipus[0].activations < none.ipus[0].activations


def test_pipeline_stage_stashes_its_checkpoints_for_every_micro_batch_in_flight():
    us = [
        memory.Unit(f"u{i}", params=0, macs=0, stored=100, fixed=0, input_elems=10, output_elems=7)
        for i in range(4)
    ]
    s = memory.Settings(precision="32.32")
    two = memory.stage_memory(us, 0, 0, 3, 1, s, checkpoints=["u1"])  # 2(3-0)-1 = 5 in flight
    none = memory.stage_memory(us, 0, 0, 3, 1, s, checkpoints=[])
    kept = (10 + 7) * 4  # input + checkpoint output, fp32
    segment = 200 * 4  # the larger of the two recomputed segments
    assert two.activations == kept * 5 + segment
    assert none.activations == 10 * 4 * 5 + 400 * 4
