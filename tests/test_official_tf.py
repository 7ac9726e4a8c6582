"""benchmarks/official_tf.py without TensorFlow: the name table between the official TF variables
and our parameters, the value layouts it converts, and reading the official code from a git
directory (a missing one is exit status 2, before TensorFlow is needed)."""

import subprocess

import numpy as np
import pytest
import torch

from benchmarks import official_tf as otf


@pytest.fixture(scope="module", params=["b0-g16-lnpn", "b0-g1-gn"])
def model(request):
    torch.manual_seed(0)
    net, _ = otf.our_model(request.param, ())
    otf.perturb(net, 0)
    return net


def fake_official(table, params):
    """The variables an official graph holding exactly the table would have."""
    return {entry.official: otf.official_shape(entry, params) for entry in table}


def test_the_table_maps_every_parameter_once(model):
    params = dict(model.named_parameters())
    table = otf.official_names(model)
    mapped = [name for entry in table for name in entry.ours]
    assert sorted(mapped) == sorted(params)  # each of ours exactly once
    names = [entry.official for entry in table]
    assert len(names) == len(set(names))
    assert all(name.startswith("all/") for name in names)  # model_base.py:62
    otf.check_table(table, params, fake_official(table, params))


def test_the_table_names_the_official_scopes():
    torch.manual_seed(0)
    net, _ = otf.our_model("b0-g16-lnpn", ())
    by_name = {entry.official: entry for entry in otf.official_names(net)}
    assert by_name["all/block0/proxy"].ours == (
        "stem.norm.bias",
        "stem.norm.weight",
        "stem.act.proxy_bias",
        "stem.act.proxy_weight",
    )
    assert by_name["all/block2b/a/conv/conv2d/kernel"].ours == ("blocks.1.1.expand.conv.weight",)
    assert by_name["all/block2b/b/block2b/SE/block2b/b/2/conv2d/bias"].ours == ("blocks.1.1.se.expand.bias",)
    # under proxy norm the projection's norm has a scale and no shift (efficientnet.py:254, 361)
    assert by_name["all/block7a/c/GroupNorm/gamma"].ours == ("blocks.6.0.project.norm.weight",)
    assert "all/block7a/c/GroupNorm/beta" not in by_name
    assert by_name["all/Top/logits/dense/kernel"].ours == ("classifier.weight",)


def test_an_unmapped_parameter_on_either_side_stops_the_run(model):
    params = dict(model.named_parameters())
    table = otf.official_names(model)
    official = fake_official(table, params)
    with pytest.raises(ValueError, match="official unmapped: all/extra"):
        otf.check_table(table, params, {**official, "all/extra": (3,)})
    with pytest.raises(ValueError, match=f"ours unmapped: {table[-1].ours[0]}"):
        otf.check_table(table[:-1], params, {e.official: official[e.official] for e in table[:-1]})
    wrong = {**official, table[0].official: (1, 2, 3, 4)}
    with pytest.raises(ValueError, match="shape"):
        otf.check_table(table, params, wrong)


def test_values_go_over_and_back_unchanged(model):
    values = {n: p.detach().numpy() for n, p in model.named_parameters()}
    seen = {}
    for entry in otf.official_names(model):
        official = otf.to_official(entry, values)
        assert official.shape == otf.official_shape(entry, dict(model.named_parameters()))
        seen.update(otf.from_official(entry, official))
    assert sorted(seen) == sorted(values)
    for name, value in values.items():
        np.testing.assert_array_equal(seen[name], value)


def test_the_proxy_rows_are_the_official_layout():
    # proxy_norm.py:60, 77-78, 122-127: rows β, γ, μ̃, 1/σ̃, β̃, γ̃
    torch.manual_seed(0)
    net, _ = otf.our_model("b0-g16-lnpn", ())
    otf.perturb(net, 1)
    values = {n: p.detach().numpy() for n, p in net.named_parameters()}
    entry = next(e for e in otf.official_names(net) if e.official == "all/Top/proxy")
    rows = otf.to_official(entry, values)[:, 0, 0]
    np.testing.assert_array_equal(rows[0], values["head.norm.bias"])
    np.testing.assert_array_equal(rows[1], values["head.norm.weight"])
    np.testing.assert_array_equal(rows[2:4], 0.0)  # the statistics, computed by the official code
    np.testing.assert_array_equal(rows[4], values["head.act.proxy_bias"])
    np.testing.assert_array_equal(rows[5], values["head.act.proxy_weight"])


def test_the_kernel_layouts_compute_what_tensorflow_computes():
    """A TF NHWC conv with kernel [kh, kw, in, out] (tf.nn.conv2d) and a dense layer x·K + b
    (tf.layers.dense), written out in numpy, give our layers' outputs."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 5, 3, padding=1, bias=False)
    x = torch.randn(2, 8, 6, 6)
    entry = otf.Mapping("k", "conv", ("weight",))
    kernel = otf.to_official(entry, {"weight": conv.weight.detach().numpy()})
    nhwc = np.pad(x.numpy().transpose(0, 2, 3, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = sum(
        np.einsum("nhwi,io->nhwo", nhwc[:, i : i + 6, j : j + 6], kernel[i, j])
        for i in range(3)
        for j in range(3)
    )
    np.testing.assert_allclose(out, conv(x).detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)
    linear = torch.nn.Linear(8, 5)
    v = torch.randn(3, 8)
    k = otf.to_official(otf.Mapping("k", "dense", ("w",)), {"w": linear.weight.detach().numpy()})
    np.testing.assert_allclose(
        v.numpy() @ k + linear.bias.detach().numpy(), linear(v).detach().numpy(), atol=1e-5
    )


def test_a_missing_git_dir_is_exit_status_2(tmp_path, capsys):
    assert otf.main([]) == 2
    assert "--examples-gitdir is required" in capsys.readouterr().err
    assert otf.main(["--examples-gitdir", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert otf.main(["--examples-gitdir", str(tmp_path)]) == 2  # a folder, not a git directory
    assert "not a git directory holding commit 09b7c67" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def git(*args, cwd):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True
    )


def test_the_official_files_are_read_from_the_git_dir(tmp_path):
    repo = tmp_path / "examples"
    folder = repo / otf.OFFICIAL_FOLDER
    folder.mkdir(parents=True)
    for name in otf.OFFICIAL_FILES:
        (folder / name).write_text(f"# {name}\n")
    git("init", "-q", cwd=repo)
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", "official", cwd=repo)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    package = otf.extract_official(str(repo / ".git"), head[:7], tmp_path / "out")
    assert package.name == otf.PACKAGE
    assert sorted(p.name for p in package.iterdir()) == sorted([*otf.OFFICIAL_FILES, "__init__.py"])
    assert (package / "proxy_norm.py").read_text() == "# proxy_norm.py\n"
    assert otf.resolve_commit(str(repo / ".git"), head[:7]) == head
    git("rm", "-q", f"{otf.OFFICIAL_FOLDER}/batch_norm.py", cwd=repo)
    git("commit", "-q", "-m", "without", cwd=repo)
    with pytest.raises(otf.OfficialCodeMissing, match="batch_norm.py not found"):
        otf.extract_official(str(repo / ".git"), "HEAD", tmp_path / "again")


def test_the_differences_are_relative_to_the_official():
    diff, rel = otf.relative_difference(np.array([1.0, -2.5]), np.array([1.0, -2.0]))
    assert (diff, rel) == (0.5, 0.25)
    logits = np.array([[1.0, -4.0]])
    row = otf.compare(
        (logits + 0.04, {"a": np.array([1.0]), "b": np.array([2.0])}),
        (logits, {"a": np.array([1.0]), "b": np.array([1.0])}),
    )
    assert row["logits_max_rel_diff"] == pytest.approx(0.01)
    assert row["grad_max_rel_diff"] == pytest.approx(1.0) and row["grad_worst_param"] == "b"
