"""PopTorch 3.4 behaviours the emulator reproduces, each checked against the source line it
follows (graphcore/poptorch, tag sdk/poptorch/3.4.0). PopTorch's own test suite runs on the
emulator with `make conformance` (docs/emulator-conformance.md); these keep the behaviours
in CI without it."""

import copy
import copyreg
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ipu_options import emulator as poptorch


class Regression(nn.Module):
    def __init__(self, loss=None):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.loss = loss or nn.MSELoss()

    def forward(self, x, target=None):
        out = self.linear(x)
        if target is None:
            return out
        return out, self.loss(out, target)


def data(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)


# ---------------------------------------------------------------- theme 1: the wrapper
def test_the_wrapper_forwards_the_models_attributes():
    # python/_poplar_executor.py:480-510: __getattr__ returns the user model's attribute
    model = Regression()
    model.marker = "kept"
    wrapped = poptorch.trainingModel(model)
    assert wrapped.linear is model.linear
    assert wrapped.marker == "kept"
    assert [n for n, _ in wrapped.named_parameters()] == ["linear.weight", "linear.bias"]
    with pytest.raises(AttributeError):
        _ = wrapped.no_such_attribute


def test_error_classes_are_poptorchs():
    # python/poptorch.cpp:745-752: Error(Exception), RecoverableError and UnrecoverableError below it
    assert issubclass(poptorch.Error, Exception) and not issubclass(poptorch.Error, RuntimeError)
    assert issubclass(poptorch.RecoverableError, poptorch.Error)
    assert issubclass(poptorch.UnrecoverableError, poptorch.Error)
    executor = poptorch.inferenceModel(Regression())
    executor(data()[0])
    executor.detachFromDevice()
    with pytest.raises(poptorch.Error, match="Device is not attached"):  # _poplar_executor.py:1560
        executor.detachFromDevice()


# ---------------------------------------------------------------- theme 2: inputs
def test_a_model_without_batched_inputs_runs_once():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("start", torch.arange(3.0))

        def forward(self, scale):
            return self.start * scale

    out = poptorch.inferenceModel(Counter())(torch.tensor(2.0))
    assert torch.equal(out, torch.tensor([0.0, 2.0, 4.0]))
    opts = poptorch.Options().deviceIterations(2)  # nothing to split into two iterations
    with pytest.raises(poptorch.Error, match="no batch dimension"):
        poptorch.inferenceModel(Counter(), opts)(torch.tensor(2.0))


def test_for_loop_feeds_each_output_back():
    # python/ops.py:158-198: inputs cloned, body applied count times, a list of tensors out
    x = torch.ones(3)
    out = poptorch.for_loop(4, lambda t: t * 2, [x])
    assert torch.equal(out[0], torch.full((3,), 16.0)) and torch.equal(x, torch.ones(3))
    with pytest.raises(ValueError, match="to be a list of tensors"):
        poptorch.for_loop(2, lambda t: t, x)


# ---------------------------------------------------------------- theme 5: weights
def test_copy_weights_to_device_writes_the_hosts_weights_over_trained_ones():
    # python/_poplar_executor.py:577-598: the host keeps its weights until copyWeightsToHost;
    # copyWeightsToDevice uploads them, so the trained weights on the device are lost
    torch.manual_seed(0)
    model = Regression()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = data()
    trainer = poptorch.trainingModel(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    for _ in range(3):
        trainer(x, y)
    trainer.copyWeightsToDevice()
    trainer.setOptimizer(torch.optim.SGD(model.parameters(), lr=0.0))
    out, _ = trainer(x, y)
    with torch.no_grad():
        expected = F.linear(x, before["linear.weight"], before["linear.bias"])
    torch.testing.assert_close(out, expected)


def test_touching_the_host_model_copies_trained_weights_back_first():
    # python/_poplar_executor.py:268-276: _parameters/_buffers/forward copy the weights back
    torch.manual_seed(0)
    model = Regression()
    before = model.linear.weight.detach().clone()
    x, y = data()
    trainer = poptorch.trainingModel(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    trainer(x, y)
    model.load_state_dict({"linear.weight": before, "linear.bias": torch.zeros(3)})
    trainer.copyWeightsToDevice()  # the user's weights, not the stale pre-training copy
    trainer.setOptimizer(torch.optim.SGD(model.parameters(), lr=0.0))
    out, _ = trainer(x, y)
    torch.testing.assert_close(out, x @ before.t())


def test_a_wrapped_model_saves_and_copies_as_the_plain_model():
    # python/_impl.py registers the wrapper types with copyreg so that they pickle unwrapped
    model = Regression()
    trainer = poptorch.trainingModel(model)
    trainer(*data())
    assert type(model).__name__ == "PoptorchRegression"
    buffer = io.BytesIO()
    torch.save(model, buffer)
    classes = pickled_classes(buffer.getvalue())  # read without unpickling: a whole model
    assert ("test_emulator_conformance", "Regression") in classes
    assert not any(name.startswith("Poptorch") for _, name in classes)
    if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.4: load it with weights only
        buffer.seek(0)
        allowed = [Regression, nn.Linear, nn.MSELoss, copyreg._reconstructor, object]
        with torch.serialization.safe_globals(allowed):
            loaded = torch.load(buffer, weights_only=True)
        assert type(loaded) is Regression
        torch.testing.assert_close(loaded.linear.weight, model.linear.weight)


def pickled_classes(archive: bytes):
    """(module tail, name) of every global a torch.save archive's pickle refers to."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add((strings[-2].rsplit(".", 1)[-1], strings[-1]))
        elif op.name == "GLOBAL":
            module, name = arg.split(" ", 1)
            found.add((module.rsplit(".", 1)[-1], name))
    return found


def test_destroy_unwraps_so_the_model_can_be_wrapped_again():
    # python/__init__.py:703-708 refuses a second trainingModel; destroy() unwraps
    # (python/_poplar_executor.py:1482-1500, reachable from the model, lines 261-264)
    model = Regression()
    trainer = poptorch.trainingModel(model)  # the model holds it only weakly (line 248)
    trainer(*data())
    with pytest.raises(RuntimeError, match="already been wrapped"):
        poptorch.trainingModel(model)
    model.destroy()
    assert type(model) is Regression
    poptorch.trainingModel(model)(*data())


# ---------------------------------------------------------------- themes 6 and 7: fp16
@pytest.mark.parametrize(
    "act,weights,expected", [(torch.half, torch.float, torch.half), (torch.float, torch.half, torch.float)]
)
@pytest.mark.parametrize("layer", [lambda: nn.Linear(4, 3), lambda: nn.Conv1d(4, 3, 1)])
def test_weights_follow_the_activations_type(layer, act, weights, expected):
    # castWeightAndBias (poptorch/source/Utils.cpp:354): the activation's type wins
    module = layer().to(weights)
    x = torch.randn(2, 4, 1) if isinstance(module, nn.Conv1d) else torch.randn(2, 4)
    out = poptorch.inferenceModel(module)(x.to(act))
    assert out.dtype == expected
    with torch.no_grad():
        reference = module.float()(x.to(act).float())
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)


def test_half_inputs_train_float_master_weights():
    torch.manual_seed(0)
    model = Regression()
    x, y = data()
    trainer = poptorch.trainingModel(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    first = trainer(x.half(), y.half())[1].float()
    for _ in range(20):
        out, loss = trainer(x.half(), y.half())
    assert out.dtype == torch.half and model.linear.weight.dtype == torch.float
    assert loss.float() < first


def test_kl_div_batchmean_trains_on_the_returned_loss():
    # aten::kl_div(sum) then a division by the batch: the loss returned is what trains
    torch.manual_seed(0)

    class KL(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x, target):
            out = F.log_softmax(self.linear(x), dim=1)
            return out, F.kl_div(out, target, reduction="batchmean")

    model = KL()
    reference = KL()
    reference.load_state_dict(model.state_dict())
    x, target = data()[0], torch.softmax(data()[1], dim=1)
    trainer = poptorch.trainingModel(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    trainer(x, target)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference(x, target)[1].backward()
    opt.step()
    torch.testing.assert_close(model.linear.weight, reference.linear.weight)


# ---------------------------------------------------------------- theme 8: numbers
def test_each_modules_mode_is_the_users():
    # PopTorch never calls train()/eval() (python/__init__.py:672-676, 729-732): a batch norm
    # left in eval mode inside a model in train mode normalises with its running statistics
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(4)
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    norm.eval()
    outer = nn.Sequential(nn.Identity(), norm)
    assert outer.training and not norm.training
    x = torch.randn(5, 4)
    with torch.no_grad():
        expected = outer(x)
    torch.testing.assert_close(poptorch.inferenceModel(outer)(x), expected)
    assert outer.training and not norm.training


def test_gradients_left_on_the_host_model_do_not_reach_the_device():
    torch.manual_seed(0)
    model, reference = Regression(), Regression()
    reference.load_state_dict(model.state_dict())
    x, y = data()
    model(x, y)[1].backward()  # a CPU backward leaves .grad behind
    stale = model.linear.weight.grad.clone()
    trainer = poptorch.trainingModel(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    trainer(x, y)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    reference(x, y)[1].backward()
    opt.step()
    torch.testing.assert_close(model.linear.weight, reference.linear.weight)
    torch.testing.assert_close(model.linear.weight.grad, stale)  # the host's, given back


def test_unbroadcast_buffers_stay_per_replica_in_inference():
    class Accumulate(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("total", torch.zeros(1, 2))

        def forward(self, x):
            self.total.copy_(self.total + x)
            return self.total  # the output is a copy of the buffer, not the buffer

    opts = poptorch.Options().replicationFactor(2).broadcastBuffers(False)
    executor = poptorch.inferenceModel(Accumulate(), opts)
    x = torch.tensor([[9.0], [2.0]])
    for _ in range(5):
        out = executor(x)
    torch.testing.assert_close(out, torch.tensor([[45.0, 45.0], [10.0, 10.0]]))


def test_is_running_on_ipu_inside_the_executor_only():
    # python/_impl.py:76-91: True while the model runs for the IPU, False outside
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(poptorch.isRunningOnIpu())
            return x * 2

    poptorch.inferenceModel(Probe())(torch.ones(2))
    assert seen and all(seen) and not poptorch.isRunningOnIpu()


# ---------------------------------------------------------------- theme 9: options
def test_options_freeze_once_used_and_copies_thaw():
    # python/_options_impl.py:105-135 and python/_poplar_executor.py:152-154
    opts = poptorch.Options().deviceIterations(2)
    executor = poptorch.inferenceModel(Regression(), opts)
    with pytest.raises(AttributeError, match="Can't modify frozen Options"):
        opts.randomSeed(42)
    with pytest.raises(AttributeError, match="Can't modify frozen Options"):
        opts._Popart.set("groupNormStridedChannelGrouping", True)
    assert executor.options is not opts and executor.options.device_iterations == 2
    thawed = opts.clone()
    thawed.deviceIterations(4).Training.gradientAccumulation(2)
    assert thawed.device_iterations == 4 and opts.device_iterations == 2


def test_options_print_their_values_and_io_tiles_assert():
    text = repr(poptorch.Options().replicationFactor(4))
    assert text.startswith("Options(") and "replication_factor=4" in text and "0x" not in text
    with pytest.raises(AssertionError, match="numIOTiles must be an even number between 32 and 192"):
        poptorch.Options().TensorLocations.numIOTiles(33)  # python/options.py:616-623


def test_an_executor_resolves_the_default_output_mode_on_its_copy():
    # python/_poplar_executor.py:163-176: Final in training, All in inference
    opts = poptorch.Options()
    assert poptorch.trainingModel(Regression(), opts).options.output_mode == poptorch.OutputMode.Final
    assert poptorch.inferenceModel(Regression(), opts).options.output_mode == poptorch.OutputMode.All
    assert opts.defaultOutputMode()


def test_inputs_must_match_the_compiled_ones():
    # python/_args_parser.py:58-140: dtype, structure and constants fixed at compilation;
    # arguments are bound to forward's parameters, so keyword order does not matter
    class Add(nn.Module):
        def forward(self, x, y=None, scale=1):
            return x * scale if y is None else (x + y) * scale

    executor = poptorch.inferenceModel(Add())
    x = torch.ones(2, 3)
    executor(x, y=x)
    executor(y=x, x=x)
    with pytest.raises(
        poptorch.Error, match="Data type mismatch for x: expected torch.float32 but got torch.int64"
    ):
        executor(x.long(), y=x)
    with pytest.raises(poptorch.Error, match="Type mismatch for y"):
        executor(x)  # y falls back to its default, None
    with pytest.raises(poptorch.Error, match="Value mismatch for scale: expected 1 but got 2"):
        executor(x, y=x, scale=2)
    executor.destroy()  # a new compilation accepts new inputs
    torch.testing.assert_close(executor(x.long()), x.long())


# ---------------------------------------------------------------- theme 3: optimiser state
def test_optimiser_state_is_none_until_compiled_then_named_as_popart_names_it():
    # python/optim.py:68-105: ipu_state / ipu_param are None until an executable holds the
    # optimiser; tests/optimizers_test.py:1229-1262 names them (SGD's compound scalars)
    model = Regression()
    lr, wd, ls = 0.05, 0.025, 0.75
    opt = poptorch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd, loss_scaling=ls)
    step = poptorch.trainingModel(model, optimizer=opt)
    before = opt.state_dict()
    assert before["ipu_state"] is None and before["ipu_param"] is None
    step.compile(*data())
    params = opt.state_dict()["ipu_param"]
    assert params["scaledLearningRate0___specific___linear.bias"].item() == pytest.approx(lr / ls)
    assert params["weightDecayScaleFactor0___specific___linear.weight"].item() == pytest.approx(1 - lr * wd)
    assert params["lossScaling_FLOAT"].item() == pytest.approx(ls)


def test_adam_state_is_read_by_accumulator_name_and_changes_with_training():
    # tests/optimizers_test.py:1261-1281: Accl1___<param> exists once compiled and changes on a run
    model = Regression()
    opt = poptorch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.025)
    step = poptorch.trainingModel(model, optimizer=opt)
    x, y = data()
    step.compile(x, y)
    s0 = opt.state_dict()
    assert s0["ipu_param"]["learningRate___specific___linear.bias"].item() == pytest.approx(0.05)
    assert not s0["ipu_state"]["Accl1___linear.weight"].any()  # PopART's zero accumulators
    step(x, y)
    s1 = opt.state_dict()
    assert not torch.equal(s0["ipu_state"]["Accl1___linear.weight"], s1["ipu_state"]["Accl1___linear.weight"])


def test_an_offline_target_never_fills_the_optimiser_state():
    # tests/optimizers_test.py:1316-1331 (useOfflineIpuTarget: the state stays None)
    model = Regression()
    opt = poptorch.optim.SGD(model.parameters(), lr=0.1)
    step = poptorch.trainingModel(model, poptorch.Options().useOfflineIpuTarget(2), opt)
    step.compile(*data())
    assert opt.state_dict()["ipu_state"] is None


def test_a_loaded_named_state_is_given_back_until_the_next_run(tmp_path):
    # python/optim.py:92-100: the loaded dict is kept as the state until the device runs;
    # python/optim.py:82-84: torch's entries load too, so a scheduler's lr reaches the device
    model = Regression()
    x, y = data()
    opt = poptorch.optim.Adam(model.parameters(), lr=1.0)
    step = poptorch.trainingModel(model, optimizer=opt)
    step(x, y)
    torch.optim.lr_scheduler.ExponentialLR(opt, 0.5).step()
    step.setOptimizer(opt)
    torch.save({"opt": opt.state_dict()}, tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)["opt"]
    fresh = poptorch.optim.Adam(model.parameters(), lr=0.1)
    fresh.load_state_dict(saved)
    loaded = fresh.state_dict()
    assert all(torch.equal(loaded["ipu_state"][k], v) for k, v in saved["ipu_state"].items())
    assert torch.equal(
        fresh.state[fresh.param_groups[0]["params"][0]]["exp_avg"],
        opt.state[opt.param_groups[0]["params"][0]]["exp_avg"],
    )
    step.setOptimizer(fresh)
    step(x, y)
    assert fresh.state_dict()["ipu_param"]["learningRate___specific___linear.bias"].item() == 0.5


def _grads(model, x, y):
    """The gradient of the model's loss at its current weights, on the CPU."""
    twin = copy.deepcopy(model)
    twin(x, y)[1].backward()
    return {n: p.grad.clone() for n, p in twin.named_parameters()}


def test_adamw_without_bias_correction_trains_as_adamw_does():
    # popart_compiler/source/CompilerImpl.cpp:869-882 (3.4.0): ADAMW_NO_BIAS keeps
    # AdamMode::Adam, so PopTorch's AdamW(bias_correction=False) is still bias-corrected
    x, y = data()
    weights = []
    for bias_correction in (False, True):
        torch.manual_seed(0)
        model = Regression()
        opt = poptorch.optim.AdamW(model.parameters(), lr=0.1, bias_correction=bias_correction)
        assert opt.bias_correction is bias_correction
        step = poptorch.trainingModel(model, optimizer=opt)
        for _ in range(3):
            step(x, y)
        weights.append(model.linear.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])


def test_a_learning_rate_loaded_for_one_weight_applies_to_it_alone():
    # python/poptorch.cpp:1004-1031 (3.4.0): each loaded ipu_param value is written to its
    # PopART tensor and used from the next run; a later setOptimizer with new values replaces it
    model = Regression()
    x, y = data()
    opt = poptorch.optim.Adam(model.parameters(), lr=0.0)
    step = poptorch.trainingModel(model, optimizer=opt)
    step.compile(x, y)
    state = opt.state_dict()
    state["ipu_param"]["learningRate___specific___linear.bias"] = torch.tensor(0.1)
    opt.load_state_dict(state)
    weight, bias = model.linear.weight.detach().clone(), model.linear.bias.detach().clone()
    step(x, y)
    assert torch.equal(model.linear.weight, weight) and not torch.equal(model.linear.bias, bias)
    params = opt.state_dict()["ipu_param"]
    assert params["learningRate___specific___linear.bias"].item() == pytest.approx(0.1)
    assert params["learningRate___specific___linear.weight"].item() == 0.0
    opt.param_groups[0]["lr"] = 0.2
    step.setOptimizer(opt)
    assert opt.state_dict()["ipu_param"]["learningRate___specific___linear.bias"].item() == pytest.approx(0.2)


def test_sgd_without_momentum_applies_a_loaded_scaled_learning_rate_as_popart_sgd0():
    # popart/sgd.hpp:435-448 (sdk/poplar/3.4.0): w <- wdsf0 * w - slr0 * g
    model = Regression()
    x, y = data()
    opt = poptorch.optim.SGD(model.parameters(), lr=0.0)
    step = poptorch.trainingModel(model, optimizer=opt)
    step.compile(x, y)
    state = opt.state_dict()
    state["ipu_param"]["scaledLearningRate0___specific___linear.weight"] = torch.tensor(0.5)
    state["ipu_param"]["weightDecayScaleFactor0___specific___linear.weight"] = torch.tensor(0.9)
    opt.load_state_dict(state)
    weight, grad = model.linear.weight.detach().clone(), _grads(model, x, y)["linear.weight"]
    step(x, y)
    torch.testing.assert_close(model.linear.weight.detach(), 0.9 * weight - 0.5 * grad)


def test_sgd_with_variable_momentum_keeps_popart_velocity_and_applies_loaded_scalars():
    # sgd.cpp:152-155: a variable momentum (given, even zero) gives PopART's SGD2 with its
    # velocity Accl1___ (sgd2decompose.cpp:58-62) and compound scalars (sgd.hpp:496-531):
    # v = smm2 * v + dpsf2 * g + swd1 * w; w -= slr2 * v
    model = Regression()
    x, y = data()
    opt = poptorch.optim.SGD(model.parameters(), lr=0.0, momentum=0.0)
    step = poptorch.trainingModel(model, optimizer=opt)
    step.compile(x, y)
    state = opt.state_dict()
    assert not state["ipu_state"]["Accl1___linear.weight"].any()
    assert set(state["ipu_param"]) >= {
        f"{k}___specific___linear.bias"
        for k in ("scaledWeightDecay1", "scaledLearningRate2", "scaledMomentum2", "dampeningScaleFactor2")
    }
    velocity = torch.full((3,), 2.0)
    state["ipu_state"]["Accl1___linear.bias"] = velocity
    state["ipu_param"]["scaledMomentum2___specific___linear.bias"] = torch.tensor(0.5)
    state["ipu_param"]["scaledLearningRate2___specific___linear.bias"] = torch.tensor(0.1)
    opt.load_state_dict(state)
    bias, grad = model.linear.bias.detach().clone(), _grads(model, x, y)["linear.bias"]
    step(x, y)
    v = 0.5 * velocity + grad
    torch.testing.assert_close(opt.state_dict()["ipu_state"]["Accl1___linear.bias"], v)
    torch.testing.assert_close(model.linear.bias.detach(), bias - 0.1 * v)


@pytest.mark.parametrize("bias_correction", [True, False])
def test_lamb_moves_each_weight_by_lr_times_its_clipped_norm(bias_correction):
    # python/optim.py:767-818 (3.4.0): w -= lr * trust * update, trust = min(|w|, max_weight_norm)
    # / |update|, so each weight moves by exactly lr * min(|w|, max_weight_norm)
    model = Regression()
    x, y = data()
    opt = poptorch.optim.LAMB(
        model.parameters(), lr=0.1, max_weight_norm=0.2, bias_correction=bias_correction
    )
    step = poptorch.trainingModel(model, optimizer=opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(x, y)
    for name, p in model.named_parameters():
        moved = (p.detach() - before[name]).norm()
        assert moved.item() == pytest.approx(0.1 * min(before[name].norm().item(), 0.2), rel=1e-4)
    assert "Accl1___linear.weight" in opt.state_dict()["ipu_state"]


def test_the_projects_earlier_checkpoint_form_still_loads():
    # this project's checkpoints once held torch's per-index state under "ipu_state" and a list
    # of groups under "ipu_param": loading them restores that state (the device's then)
    p = nn.Parameter(torch.ones(3))
    opt = poptorch.optim.SGD([p], lr=0.1, momentum=0.9)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.state_dict()["param_groups"]]
    earlier = {
        "state": {},
        "param_groups": opt.state_dict()["param_groups"],
        "ipu_state": {0: {"momentum_buffer": torch.full((3,), 0.5)}},
        "ipu_param": groups,
    }
    opt.load_state_dict(earlier)
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.full((3,), 0.5))
    with pytest.raises(RuntimeError, match="Only IPU optimizer states"):
        opt.load_state_dict({"state": {}, "param_groups": earlier["param_groups"]})


def test_hyper_parameters_the_user_gave_are_variable_and_may_be_marked():
    # python/optim.py:10-64: arguments given to the constructor are variable; markAsVariable /
    # markAsConstant accept the torch defaults plus loss_scaling and assert on anything else
    opt = poptorch.optim.SGD(Regression().parameters(), lr=0.1)
    assert not opt.variable_attrs.isConstant("lr")
    assert opt.variable_attrs.isConstant("loss_scaling")
    opt.variable_attrs.markAsVariable("loss_scaling")
    assert not opt.variable_attrs.isConstant("loss_scaling")
    opt.variable_attrs.markAsConstant("lr")
    assert opt.variable_attrs.isConstant("lr")
    with pytest.raises(AssertionError, match="Unknown attribute"):
        opt.variable_attrs.markAsVariable("not_a_hyper_parameter")


def test_print_and_memory_annotations_return_their_input_and_refuse_non_tensors():
    # python/ops.py:143-156 and 473-478: both return the tensor and refuse anything else
    t = torch.arange(3.0)
    assert poptorch.ipu_print_tensor(t, "title") is t
    assert poptorch.set_available_memory(t, 0.2) is t
    with pytest.raises(poptorch.Error, match="ipu print tensor must take a torch.tensor"):
        poptorch.ipu_print_tensor([1.0])
    with pytest.raises(poptorch.Error, match="set available memory for torch.tensor values"):
        poptorch.set_available_memory(1.0, 0.2)


def test_dict_subclass_inputs_need_no_parser_and_keep_their_type():
    # tests/inputs_test.py:326-357 (an OrderedDict subclass is an input as it is); the compiled
    # structure is still checked (python/_args_parser.py:58-140)
    import collections

    class Named(collections.OrderedDict):
        pass

    class Model(nn.Module):
        def forward(self, args):
            assert isinstance(args, Named)
            return args["a"] * 2 + args["b"]

    run = poptorch.inferenceModel(Model())
    arg = Named(a=torch.ones(2, 2), b=torch.ones(2, 2))
    assert torch.equal(run(arg), torch.full((2, 2), 3.0))
    assert torch.equal(run(Named(a=torch.zeros(2, 2), b=torch.ones(2, 2))), torch.ones(2, 2))
    with pytest.raises(poptorch.Error, match="Type mismatch"):
        run({"a": torch.ones(2, 2), "b": torch.ones(2, 2)})


def test_cycle_counting_is_refused_off_hardware():
    # python/options.py:1781-1795 sets PopART's instrumentWithHardwareCycleCounter;
    # popart_compiler/source/CompilerImpl.cpp:640-645, 1290-1293 refuse it on an IPU model
    opts = poptorch.Options().logCycleCount(True)
    run = poptorch.inferenceModel(Regression(), opts)
    with pytest.raises(poptorch.Error, match="only supported on actual IPU hardware"):
        run(data()[0])
    assert poptorch.inferenceModel(Regression(), poptorch.Options().logCycleCount(False))(
        data()[0]
    ).shape == (6, 3)


def test_a_loss_no_weight_reaches_trains_without_a_backward_pass():
    # tests/misc_nn_layers_test.py:174-204: an eval-mode dropout's loss depends on no trainable
    # weight; PopTorch runs the training model (and the weights stay as they were)
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.ones(3))
            self.loss = nn.L1Loss()

        def forward(self, x, target):
            return x, self.loss(x, target)

    model = Model()
    step = poptorch.trainingModel(model)
    x = torch.randn(4, 3)
    out, loss = step(x, torch.zeros_like(x))
    assert torch.equal(out, x) and loss.item() == pytest.approx(x.abs().mean().item())
    assert torch.equal(model.unused, torch.ones(3))


class _Pair:
    def __init__(self, data, label):
        self.data, self.label = data, label


class _PairParser(poptorch.ICustomArgParser):
    def yieldTensors(self, struct):  # noqa: N802  (PopTorch's name)
        yield struct.data
        yield struct.label

    def reconstruct(self, original_structure, tensor_iterator):
        return type(original_structure)(*tensor_iterator)


def _collate_pairs(items):
    return _Pair(torch.stack([d for d, _ in items]), torch.stack([y for _, y in items]))


@pytest.mark.parametrize("mode", ["Sync", "Async", "AsyncRebatched"])
def test_a_registered_custom_batch_is_rebatched_through_its_parser(mode):
    # PopTorch 3.4 python/__init__.py:800-853 (the parser and its registry) and _dataloader.py:
    # 321-334,457-459 (rebatching a custom type tensor by tensor); tests/dataloader_test.py:1275-1290
    dataset = [(torch.full((2,), float(i)), torch.tensor([i])) for i in range(12)]
    poptorch.registerCustomArgParser(_Pair, _PairParser())
    try:
        opts = poptorch.Options().deviceIterations(2)
        loader = poptorch.DataLoader(
            opts,
            dataset,
            batch_size=3,
            collate_fn=_collate_pairs,
            mode=getattr(poptorch.DataLoaderMode, mode),
        )
        batches = list(loader)
        assert [type(b) for b in batches] == [_Pair, _Pair]
        assert batches[1].data[:, 0].tolist() == [6, 7, 8, 9, 10, 11]
        assert batches[1].label[:, 0].tolist() == [6, 7, 8, 9, 10, 11]
        # the compiled inputs compare a custom object by its tensors (python/_args_parser.py:53-56)
        model = poptorch.inferenceModel(_PairSum(), poptorch.Options())
        assert torch.equal(model(batches[0]), batches[0].data.sum(1) + batches[0].label[:, 0])
        assert torch.equal(model(batches[1]), batches[1].data.sum(1) + batches[1].label[:, 0])
        with pytest.raises(poptorch.Error, match="must inherit from ICustomArgParser"):
            poptorch.registerCustomArgParser(_Pair, object())
    finally:
        poptorch.registerCustomArgParser(_Pair, None)
    assert poptorch.custom_args.custom_parser(batches[0]) is None


class _PairSum(nn.Module):
    def forward(self, pair):
        return pair.data.sum(1) + pair.label[:, 0]


# ---------------------------------------------------------------- theme 9: Options.Distributed
def _loader_values(process_id, num_processes, **kwargs):
    opts = poptorch.Options().deviceIterations(2)
    if kwargs.pop("seed", False):
        opts.randomSeed(7)
    opts.Distributed.configureProcessId(process_id, num_processes)
    loader = poptorch.DataLoader(opts, torch.arange(23), batch_size=2, **kwargs)
    return loader, [batch.tolist() for batch in loader]


def test_distributed_processes_read_consecutive_blocks_of_whole_steps():
    # python/__init__.py:141-148: with drop_last each of 3 processes reads the same whole number
    # of 4-element steps, block after block (23 // 12 = 1 step each; the 11 left over are unused)
    assert [_loader_values(p, 3)[1] for p in range(3)] == [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [[8, 9, 10, 11]]]
    # python/__init__.py:149-157: without it the elements are spread evenly (8, 8, 7)
    assert [len(_loader_values(p, 3, drop_last=False)[0].dataset) for p in range(3)] == [8, 8, 7]
    assert _loader_values(2, 3, drop_last=False)[1][0] == [16, 17, 18, 19]


def test_distributed_shuffling_needs_a_seed_and_uses_the_leftovers_next_epoch():
    # python/__init__.py:401-406: the same order in every process needs options' seed
    with pytest.raises(AssertionError, match="randomSeed"):
        _loader_values(0, 2, shuffle=True)
    # :185-201 and :510-513: each epoch a new global order; the block moves by the leftovers
    loader, first = _loader_values(0, 2, shuffle=True, seed=True)
    second = [batch.tolist() for batch in loader]
    assert sorted(sum(first, [])) != sorted(sum(second, [])) and len(first) == len(second) == 2


def test_distributed_options_read_openmpis_variables_and_freeze(monkeypatch):
    # python/options.py:462-512: OMPI_COMM_WORLD_SIZE / _RANK at creation; disable() ignores them
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    opts = poptorch.Options()
    assert (opts.Distributed.numProcesses, opts.Distributed.processId) == (4, 3)
    monkeypatch.setenv("MY_SIZE", "2")
    assert opts.Distributed.setEnvVarNames("MY_SIZE", "MY_RANK").processId == 0
    assert opts.Distributed.numProcesses == 2
    assert opts.Distributed.disable().numProcesses == 1
    poptorch.DataLoader(opts, torch.arange(4))
    with pytest.raises(AttributeError, match="Can't modify frozen Options"):
        opts.Distributed.configureProcessId(1, 2)


class _Items(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([torch.full((2, 3), float(i)) for i in range(5)])


def test_batch_size_none_hands_items_through_unbatched():
    # PopTorch 3.4 python/__init__.py:318-330: no combined batch; tests/dataloader_test.py:559-578
    loader = poptorch.DataLoader(
        poptorch.Options(), _Items(), batch_size=None, drop_last=False, mode=poptorch.DataLoaderMode.Async
    )
    assert loader.combinedBatchSize is None
    for _ in range(2):  # a second epoch restarts the worker's pass
        assert [t[0, 0].item() for t in loader] == [0, 1, 2, 3, 4]
    with pytest.raises(TypeError, match="has no len"):
        len(loader)


class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise KeyError(f"sample {index} is unreadable")


def test_a_dataset_failing_in_the_worker_stops_the_accessor_with_poptorchs_error(capfd):
    # PopTorch 3.4 python/_dataloader.py:251-256: the worker dies printing its traceback, the parent
    # raises "worker thread failed to start"; tests/dataloader_test.py:605-632
    loader = poptorch.DataLoader(poptorch.Options(), _Broken(), batch_size=1)
    with pytest.raises(poptorch.Error, match="worker thread failed to start"):
        poptorch.AsynchronousDataAccessor(loader)
    assert "sample 0 is unreadable" in capfd.readouterr().err


# ---------------------------------------------------------------- theme 10: inputs, in depth
class _FourStages(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(1, 1) for _ in range(4))

    def forward(self, x):
        for ipu, layer in enumerate(self.layers):
            with poptorch.Block(f"B{ipu}", ipu_id=ipu):
                x = layer(x)
        return x


def test_only_pipelined_execution_needs_a_batch_per_stage():
    # popart_compiler/source/Compiler.cpp:675-702: the deviceIterations / gradientAccumulation
    # rule is checked under ExecutionMode::Pipelined only; ShardedExecution sends mode 1
    # (python/options.py:945-946); tests/batching_test.py:382-405
    sharded = poptorch.Options().deviceIterations(2)
    sharded.setExecutionStrategy(poptorch.ShardedExecution())
    assert poptorch.inferenceModel(_FourStages(), sharded)(torch.zeros(2, 1)).shape == (2, 1)
    pipelined = poptorch.Options().deviceIterations(2)
    with pytest.raises(poptorch.Error, match="deviceIterations"):
        poptorch.inferenceModel(_FourStages(), pipelined)(torch.zeros(2, 1))


def test_a_changed_input_shape_is_refused_until_destroy():
    # python/_args_parser.py:117-120 (the shape, after the dtype); tests/inputs_test.py:66-95
    executor = poptorch.inferenceModel(Regression())
    executor(torch.ones(6, 4))
    with pytest.raises(
        poptorch.Error,
        match=r"Shape mismatch for x: expected torch.Size\(\[6, 4\]\) but got torch.Size\(\[2, 4\]\)",
    ):
        executor(torch.ones(2, 4))
    executor.destroy()
    assert executor(torch.ones(2, 4)).shape == (2, 3)


class _Variadic(nn.Module):
    def forward(self, a, b, *c, y=None, u=3, **w):
        return u * (b + sum(c) + sum(w.values()))


def test_arguments_are_named_as_poptorchs_args_parser_names_them():
    # python/_args_parser.py:231-298: *c's values are positional ("*c[i]"), every parameter
    # after it and **w's entries are named by their own name; a parameter with neither value
    # nor default is refused before compiling (lines 280-282); tests/inputs_test.py:609-719
    executor = poptorch.inferenceModel(_Variadic())
    t = torch.ones(2, 2)
    with pytest.raises(poptorch.Error, match="Mandatory parameter b missing"):
        executor(1)
    assert not executor.isCompiled()
    executor(1, t, t, t, m=t, u=5)
    with pytest.raises(poptorch.Error, match="Value mismatch for u: expected 5 but got 3"):
        executor(1, t, t, t, m=t)
    with pytest.raises(poptorch.Error, match="expected 4 arguments but got 3"):
        executor(1, t, t, m=t, u=5)
    with pytest.raises(poptorch.Error, match="Keys mismatch for named arguments: Missing arguments: m"):
        executor(1, t, t, t, u=5)
    with pytest.raises(poptorch.Error, match=r"Shape mismatch for \*c\[1\]"):
        executor(1, t, t, t[:1], m=t, u=5)


class _Record:
    def __init__(self, **fields):
        self.__dict__.update(fields)


class _RecordParser(poptorch.ICustomArgParser):
    def yieldTensors(self, struct):  # noqa: N802  (PopTorch's name)
        return (struct.__dict__[k] for k in sorted(struct.__dict__))

    def reconstruct(self, original_structure, tensor_iterator):
        return _Record(**{k: next(tensor_iterator) for k in sorted(original_structure.__dict__)})


class _Doubles(nn.Module):
    def forward(self, record):
        assert record.x.shape[0] == 2  # one micro-batch of the host batch
        record.doubled = record.x * 2  # the device's view: the caller's object is not changed
        return record


def test_a_registered_type_is_split_into_micro_batches_and_rebuilt_on_the_way_out():
    # python/_utils.py:94-137: inputs flattened through the parser, outputs rebuilt through it;
    # python/_poplar_executor.py:1007-1024 traces a rebuilt view; tests/inputs_test.py:361-406
    poptorch.registerCustomArgParser(_Record, _RecordParser())
    try:
        executor = poptorch.inferenceModel(_Doubles(), poptorch.Options().deviceIterations(3))
        for i in range(2):
            given = _Record(x=torch.full((6, 1), float(i)))
            out = executor(given)
            assert isinstance(out, _Record) and sorted(vars(given)) == ["x"]
            assert torch.equal(out.x, given.x) and torch.equal(out.doubled, given.x * 2)
    finally:
        poptorch.registerCustomArgParser(_Record, None)


def test_outputs_keep_their_container_types():
    # python/_utils.py:127-133: a dict subclass and a namedtuple come back as themselves
    import collections

    class Out(collections.OrderedDict):
        pass

    Pair = collections.namedtuple("Pair", "first second")

    class Model(nn.Module):
        def forward(self, x):
            out = Out()
            out["sum"], out["x"] = x + 1, x
            return out, Pair(x, 2 * x)

    (out, pair) = poptorch.inferenceModel(Model(), poptorch.Options().deviceIterations(2))(torch.ones(4, 2))
    assert type(out) is Out and list(out) == ["sum", "x"] and torch.equal(out["sum"], torch.full((4, 2), 2.0))
    assert type(pair) is Pair and torch.equal(pair.second, torch.full((4, 2), 2.0))


# ---------------------------------------------------------------- updatable named buffers
class TwoBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("buffer_1", torch.ones(1))
        self.register_buffer("buffer_2", torch.ones(1))

    def forward(self, x):
        return torch.sum(x + self.buffer_1 + self.buffer_2)


def test_copy_named_buffers_writes_only_the_updatable_ones():
    # python/options.py:1863-1869, python/_poplar_executor.py:600-629: only the named buffers
    # reach the device; the others keep the device's value (tests/buffers_test.py:46-63)
    run = poptorch.inferenceModel(TwoBuffers(), poptorch.Options().updatableNamedBuffers(["buffer_1"]))
    with pytest.raises(poptorch.Error, match="Model has not been compiled"):  # line 603-604
        run.copyNamedBuffersToDevice()
    x = torch.ones(3)
    assert run(x) == 9
    run.buffer_1.copy_(run.buffer_1 + 1)
    run.buffer_2.copy_(run.buffer_2 + 1)
    assert run(x) == 9  # the host's buffers are not the device's
    run.copyNamedBuffersToDevice()
    assert run(x) == 12


def test_copy_named_buffers_needs_the_option_and_known_names():
    # python/_poplar_executor.py:607-610 refuses without the option; popart's irlowering.cpp:
    # 3063-3072 refuses a name not in the graph when it compiles
    run = poptorch.inferenceModel(TwoBuffers())
    run(torch.ones(3))
    with pytest.raises(poptorch.Error, match="No named buffers marked as updatable"):
        run.copyNamedBuffersToDevice()
    wrong = poptorch.Options().updatableNamedBuffers(["non_existing_buffer"])
    with pytest.raises(poptorch.Error, match="Invalid named buffer in updatableNamedBuffers"):
        poptorch.inferenceModel(TwoBuffers(), wrong)(torch.ones(3))


# ---------------------------------------------------------------- anchored tensors
def test_anchored_gradient_and_updated_weight_are_read_back():
    # python/options.py:1669-1690 and _poplar_executor.py:538-541, 1273-1281; PopART names
    # Gradient___<param> and UpdatedVar___<param> (tests/debug_tensors_test.py:80-105)
    x, y = data()
    reference = Regression()
    model = Regression()
    model.load_state_dict(reference.state_dict())
    F.mse_loss(reference.linear(x), y).backward()
    opts = poptorch.Options()
    opts.anchorTensor("grad", "Gradient___linear.bias")
    opts.anchorTensor("weight", "UpdatedVar___linear.weight", poptorch.OutputMode.All)
    run = poptorch.trainingModel(model, opts, poptorch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(AssertionError, match="No tensor with name grad found"):
        run.getAnchoredTensor("grad")
    run(x, y)
    torch.testing.assert_close(run.getAnchoredTensor("grad"), reference.linear.bias.grad)
    torch.testing.assert_close(run.getAnchoredTensor("weight"), model.linear.weight.detach())


def test_an_anchor_is_returned_in_the_models_output_mode():
    # poptorch/source/LowerToPopart.cpp:526-538 adds an anchor with the default mode (N), which
    # popart_compiler/source/Compiler.cpp:397-402 makes the model's; batched as outputs are
    x, y = data()
    opts = poptorch.Options().deviceIterations(2).outputMode(poptorch.OutputMode.All)
    opts.anchorTensor("grad", "Gradient___linear.bias", poptorch.OutputMode.Final)
    run = poptorch.trainingModel(Regression(), opts)
    run(x, y)
    assert run.getAnchoredTensor("grad").shape == (6,)  # 2 steps × 3 features


def test_an_anchor_popart_has_no_tensor_for_is_refused_at_compilation():
    # popart willow/src/ir.cpp:2490-2512: a gradient of a parameter that has none, or any name
    # of an inference graph the emulator cannot produce
    class Frozen(Regression):
        def __init__(self):
            super().__init__()
            self.linear.bias.requires_grad_(False)

    opts = poptorch.Options()
    opts.anchorTensor("grad", "Gradient___linear.bias")
    with pytest.raises(poptorch.Error, match="Interestingly, `linear.bias' IS in tensors"):
        poptorch.trainingModel(Frozen(), opts)(*data())
    with pytest.raises(poptorch.Error, match="Anchor tensor `Gradient___linear.bias' not in Ir"):
        poptorch.inferenceModel(Regression(), opts)(data()[0])


def test_final_loss_scale_is_the_scale_times_its_update_factor():
    # popart transforms/automaticlossscaling.cpp:923-983: finalLossScale = loss scaling ×
    # lossScaleUpdateFactor, an optimiser state tensor (tensor.cpp:1071-1073); options_test.py:407
    model = Regression().half()
    opts = poptorch.Options()
    opts.Training.setAutomaticLossScaling(True)
    opts.anchorTensor("ls", "finalLossScale")
    opt = poptorch.optim.SGD(model.parameters(), lr=0.0, loss_scaling=2.0)
    run = poptorch.trainingModel(model, opts, opt)
    x, y = data()
    run.compile(x.half(), y.half())
    seen = []
    for _ in range(3):
        factor = opt.state_dict()["ipu_state"]["lossScaleUpdateFactor"]
        run(x.half(), y.half())
        assert run.getAnchoredTensor("ls").item() == 2.0 * factor.item()
        seen.append(factor.item())
    assert seen[0] == 1.0 and len(set(seen)) == 3  # the factor moves with every step


# ---------------------------------------------------------------- option bookkeeping
def test_default_options_come_from_the_environment(monkeypatch):
    # python/options.py:1198-1238: POPTORCH_DEFAULT_OPTIONS names setters by dotted path
    monkeypatch.setenv(
        "POPTORCH_DEFAULT_OPTIONS",
        '{"deviceIterations": 2, "connectionType": "ConnectionType.OnDemand",'
        ' "Precision.enableFloatingPointExceptions": true,'
        ' "_Popart.set": ["saveInitializersToFile", "my_file.onnx"]}',
    )
    opts = poptorch.Options()
    assert opts.device_iterations == 2 and opts.connection_type == poptorch.ConnectionType.OnDemand
    assert opts.Precision.fp_exceptions
    assert opts._Popart.options["saveInitializersToFile"] == "my_file.onnx"


def test_options_keep_poptorchs_values():
    # python/options.py:395-441 (PopART options), 515-669 (locations), 1528-1539, 1665, 1763-1779
    opts = poptorch.Options().maxRepeatLogs(None).enableSyntheticData(True).logDir("/tmp/x")
    opts._Popart.setPatterns({"PadSum": True}, 0)
    opts.TensorLocations.setWeightLocation(
        poptorch.TensorLocationSettings().useIOTilesToStore(True).useOnChipStorage(False)
    )
    assert opts.max_repeat_logs == 2**64 - 1 and opts.log_dir == "/tmp/x"
    assert opts._Popart.options["syntheticDataMode"] == 2
    assert opts._Popart.options["rearrangeAnchorsOnHost"] is False
    assert opts._Popart.options["patterns"] == {"PadSum": True}
    assert opts._Popart.options["patterns_level"] == 0
    assert opts.TensorLocations.location_weight == {"useIOTilesToStore": 1, "onChip": 0}
    assert opts.sync_pattern == poptorch.SyncPattern.Full
    offline = poptorch.Options().useOfflineIpuTarget()
    assert offline.connection_type == poptorch.ConnectionType.Never
    never = poptorch.inferenceModel(
        Regression(), poptorch.Options().connectionType(poptorch.ConnectionType.Never)
    )
    with pytest.raises(AssertionError, match="offline device"):  # _poplar_executor.py:1232-1235
        never(data()[0])


class _SequenceAndState(nn.Module):
    def forward(self, seq, state):
        return seq.sum(0) + state[0]


def test_inputs_of_different_first_dimensions_run_unsplit_when_nothing_is_split():
    # PopTorch 3.4 splits inputs only into deviceIterations × replicas × accumulation micro-batches;
    # with one, an LSTM's (sequence, batch, feature) input beside its (1, 1, hidden) state runs as
    # given (tests/half_test.py, test_lstm)
    seq, state = torch.ones(5, 1, 3), torch.full((1, 1, 3), 2.0)
    model = poptorch.inferenceModel(_SequenceAndState())
    assert torch.equal(model(seq, state), torch.full((1, 3), 7.0))
    split = poptorch.inferenceModel(_SequenceAndState(), poptorch.Options().deviceIterations(5))
    with pytest.raises(poptorch.Error, match="batch dimensions differ"):
        split(seq, state)
