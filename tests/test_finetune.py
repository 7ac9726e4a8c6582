"""Fine-tuning: freezing (frozen parameters and statistics bit-identical after training), batch-norm
recalibration (only running statistics change, to the exact batch statistics), and a tiny
end-to-end finetune."""
import pytest
import torch
import torch.nn.functional as F

from app.finetune import batch_norm_layers, freeze_before, recalibrate_batch_norm, trainable_parameters
from model import build_model


def _b0(norm="batch", **kw):
    return build_model("b0", group_size=16, expand_ratio=4, norm=norm, num_classes=10, **kw)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_freeze_before_last_stage_keeps_frozen_layers_bit_identical():
    model = _b0(drop_path=0.2)
    frozen = freeze_before(model, "blocks.6")
    assert frozen and all(n.startswith(("stem.", "blocks.")) for n in frozen)
    assert not any(n.startswith("blocks.6.") for n in frozen)
    trainable = trainable_parameters(model)
    assert trainable and all(n.startswith(("blocks.6.", "head.", "classifier.")) for n in trainable)
    assert len(frozen) + len(trainable) == len(list(model.parameters()))

    before = _snapshot(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        model.train()  # what the training loop does every step
        x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    # frozen: every parameter and every batch-norm statistic untouched (the layers stayed in eval)
    frozen_keys = [k for k in before if k.startswith(("stem.", "blocks.")) and not k.startswith("blocks.6.")]
    assert all(torch.equal(before[k], after[k]) for k in frozen_keys)
    assert model.stem.training is False and model.blocks[0].training is False
    assert model.blocks[6].training and model.head.training
    # trainable: changed
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert not torch.equal(before["blocks.6.0.project.conv.weight"], after["blocks.6.0.project.conv.weight"])
    assert not torch.equal(before["head.norm.running_mean"], after["head.norm.running_mean"])


def test_freeze_before_other_layers_and_bad_names():
    model = _b0(norm="layer", proxy_norm=True)
    assert freeze_before(model, "stem") == []
    model = _b0(norm="layer", proxy_norm=True)
    freeze_before(model, "classifier")
    assert trainable_parameters(model) == ["classifier.weight", "classifier.bias"]
    model = _b0(norm="layer", proxy_norm=True)
    freeze_before(model, "blocks.5.2")  # inside a stage: blocks 5.0 and 5.1 frozen, 5.2 on trainable
    names = trainable_parameters(model)
    assert names[0].startswith("blocks.5.2.") and not any(n.startswith("blocks.5.1.") for n in names)
    with pytest.raises(ValueError, match="trainable_from='blocks.9'.*blocks.<stage>"):
        freeze_before(_b0(), "blocks.9")


def test_batch_norm_recalibration_changes_only_running_statistics():
    model = _b0(dropout=0.5, drop_path=0.2)
    model.train()
    before = _snapshot(model)
    momenta = [m.momentum for m in batch_norm_layers(model)]
    batches = [(torch.randint(0, 256, (4, 3, 48, 48)).float(), torch.zeros(4)) for _ in range(3)]

    # the stem norm's input, to check the statistics are the exact average of the batch statistics
    stem_inputs = []
    hook = model.stem.conv.register_forward_hook(lambda m, i, o: stem_inputs.append(o.detach()))
    used = recalibrate_batch_norm(model, batches)
    hook.remove()

    assert used == 3
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    assert changed and all(k.endswith(statistics) for k in changed)
    assert all(p.grad is None for p in model.parameters())
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert [m.momentum for m in batch_norm_layers(model)] == momenta
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in stem_inputs]).mean(0)
    variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in stem_inputs]).mean(0)
    torch.testing.assert_close(model.stem.norm.running_mean, means, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.stem.norm.running_var, variances, rtol=1e-4, atol=1e-4)


def test_recalibration_is_a_no_op_without_batch_norm():
    model = _b0(norm="layer", proxy_norm=True)
    before = _snapshot(model)
    assert recalibrate_batch_norm(model, [torch.zeros(2, 3, 32, 32)]) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_recalibration_reaches_frozen_layers_and_keeps_them_frozen():
    model = _b0()
    freeze_before(model, "blocks.6")
    before = model.stem.norm.running_mean.clone()
    recalibrate_batch_norm(model, [torch.randn(2, 3, 32, 32) * 50])
    assert not torch.equal(before, model.stem.norm.running_mean)
    model.train()
    assert not model.stem.training  # still locked in eval after recalibration


def test_training_images_with_validation_preprocessing():
    """data.augment=false (what fine-tuning sets): training images are resized and centre-cropped
    exactly as for validation, the same whatever the augmentation seed."""
    from app.config import build_config
    from app.data import build_dataset
    from app.data.transforms import val_transform

    plain = build_dataset(build_config("digits", ["data.augment=false"]), "train", 40)
    a, b = plain.sample(3, seed=1)[0], plain.sample(3, seed=2)[0]
    assert torch.equal(a, b) and torch.equal(a, val_transform(plain.image(3), 40))
    augmented = build_dataset(build_config("digits"), "train", 40)
    assert not torch.equal(augmented.sample(3, seed=1)[0], augmented.sample(3, seed=2)[0])
