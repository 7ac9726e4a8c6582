"""The benchmark harness's accounting on tiny models (not speed: no timing thresholds)."""

import csv
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from benchmarks import budget, measure, peers, report, run, tf32
from benchmarks.cases import Case, parse_variant
from model import build_model, count_macs, count_parameters

ROW_FIELDS = {
    "name",
    "subject",
    "model",
    "group_size",
    "expand_ratio",
    "norm",
    "resolution",
    "batch",
    "precision",
    "layout",
    "compile",
    "mode",
    "device",
    "status",
    "step_ms_median",
    "step_ms_p90",
    "step_ms_mean",
    "images_per_s",
    "params",
    "gmacs",
    "achieved_tflops",
    "peak_tflops",
    "utilisation",
    "peak_mem_mb",
    "peak_mem_kind",
    "device_name",
    "emulated",
    "torch",
    "cuda",
    "threads",
    "date",
    "commit",
    "load_avg",
    "repeat_ms_median",
    "tf32",
}


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1000)
    )


@pytest.fixture
def tiny_peer(monkeypatch):
    """A fake peer (a 2-layer net) registered under a real peer's name, so no timm is needed."""
    monkeypatch.setitem(peers.PEERS, "timm/efficientnet_b0", ("torch", tiny_net))
    return "timm/efficientnet_b0"


def test_summary_figures_follow_from_step_times():
    case = Case(batch=8, mode="train")
    prepared = type("P", (), {"macs": 1_000_000, "params": 10})()
    row = measure.summarise(case, prepared, [0.4, 0.1, 0.3, 0.2, 0.5], peak_flops=1e9)
    assert row["step_ms_median"] == pytest.approx(300.0)
    assert row["step_ms_p90"] == pytest.approx(500.0)
    assert row["images_per_s"] == pytest.approx(8 / 0.3, rel=1e-3)
    achieved = 3 * 2 * 1_000_000 * 8 / 0.3  # training counts 3x the forward's 2 FLOPs per MAC
    assert row["achieved_tflops"] == pytest.approx(achieved / 1e12, rel=1e-3)
    assert row["utilisation"] == pytest.approx(achieved / 1e9, rel=1e-3)


def test_rows_have_all_fields_and_consistent_accounting(tiny_peer):
    cases = [Case(tiny_peer, resolution=16, batch=3, mode=m) for m in ("train", "infer")]
    rows = run.run_cases(cases, warmup=1, steps=3, repeats=2, log=lambda m: None)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for row in rows:
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert row["images_per_s"] == pytest.approx(3 / (row["step_ms_median"] / 1e3), rel=1e-2)
        assert row["step_ms_p90"] >= row["step_ms_median"]
        assert len(row["repeat_ms_median"]) == 2  # interleaved rounds, one median each
        assert row["steps"] == 6
        assert row["params"] == count_parameters(tiny_net())
        assert row["gmacs"] == pytest.approx(count_macs(tiny_net(), 16) / 1e9, abs=1e-4)


def test_our_rows_count_macs_like_the_model():
    case = Case(model="b0", group_size=16, norm="ln+pn", resolution=32, batch=1, mode="infer")
    prepared = measure.Prepared(case)
    ours = build_model("b0", group_size=16, norm="layer", proxy_norm=True)
    assert prepared.macs == count_macs(ours, 32)
    assert prepared.params == count_parameters(ours)


class _Hungry(nn.Module):
    """A peer whose every forward briefly holds 96 MiB (touched, so resident)."""

    def __init__(self):
        super().__init__()
        self.net = tiny_net()

    def forward(self, x):
        scratch = torch.ones(24 * 2**20)
        return self.net(x) + scratch[:1] - 1


def test_peak_memory_is_per_case_even_when_cases_interleave(monkeypatch, tiny_peer):
    """The hungry case's 96 MiB shows in its own row and not in the tiny case timed after it, nor
    do its weights while it stays resident between rounds."""
    monkeypatch.setitem(peers.PEERS, "torchvision/resnet50", ("torch", _Hungry))
    cases = [
        Case("torchvision/resnet50", resolution=16, batch=2, mode="infer"),
        Case(tiny_peer, resolution=16, batch=2, mode="infer"),
    ]
    rows = run.run_cases(cases, warmup=1, steps=2, repeats=2, log=lambda m: None)
    kinds = {r["peak_mem_kind"] for r in rows}
    if measure.start_peak("cpu") is None:  # no /proc/self/clear_refs: the lifetime peak, said so
        assert kinds == {"process-peak-rss"}
        return
    assert kinds == {"rss-per-case"}
    hungry, tiny = (r["peak_mem_mb"] for r in rows)
    assert hungry >= 64 and tiny < 32


def test_missing_peer_is_skipped_and_others_still_run(monkeypatch, tiny_peer):
    monkeypatch.setitem(peers.PEERS, "timm/efficientnet_b2", ("no_such_library_xyz", tiny_net))
    cases = [
        Case("timm/efficientnet_b2", resolution=16, batch=2, mode="infer"),
        Case(tiny_peer, resolution=16, batch=2, mode="infer"),
    ]
    rows = run.run_cases(cases, warmup=0, steps=1, repeats=1, log=lambda m: None)
    assert rows[0]["status"] == "skipped" and "pip install no_such_library_xyz" in rows[0]["reason"]
    assert rows[1]["status"] == "ok"


def test_ipu_without_sdk_is_an_error_row_and_ipu_model_is_labelled_emulated(tiny_peer):
    import ipu_options

    cases = [Case(tiny_peer, resolution=16, batch=2, mode=m, device="ipu-model") for m in ("infer", "train")]
    if ipu_options.EMULATED:
        cases.append(Case(tiny_peer, resolution=16, batch=2, mode="infer", device="ipu"))
    rows = run.run_cases(cases, warmup=0, steps=1, repeats=1, log=lambda m: None)
    assert [r["status"] for r in rows[:2]] == ["ok", "ok"]
    assert all(r["emulated"] and "emulated" in r["device_name"] for r in rows[:2])
    if ipu_options.EMULATED:
        assert rows[2]["status"] == "error" and "PopTorch unavailable" in rows[2]["reason"]


def test_cli_writes_rows_and_report_builds_tables_and_plots(tmp_path):
    out = str(tmp_path / "r")
    code = run.main(
        [
            "--preset",
            "tiny",
            "--variants",
            "g1-e6-bn,g16-e6-bn",
            "--modes",
            "infer",
            "--peers",
            "none",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--out",
            out,
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in open(out + ".jsonl")]
    assert [r["name"] for r in rows] == ["ours-b0-g1-e6-bn", "ours-b0-g16-e6-bn"]
    with open(out + ".csv") as f:
        assert [r["name"] for r in csv.DictReader(f)] == [r["name"] for r in rows]
    assert report.main([out + ".jsonl", "--out", str(tmp_path / "report.md")]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "ours-b0-g16-e6-bn" in text and "G16-BN vs G1-BN step cost" in text
    assert "--variants g1-e6-bn,g16-e6-bn" in text  # the command that produced the rows
    assert (tmp_path / "r-throughput.png").stat().st_size > 0


def ok_row(case: Case, step_ms: float, repeats=(), utilisation=None) -> dict:
    """A result row as run.py writes it, with made-up figures."""
    return {
        **case.as_dict(),
        "status": "ok",
        "step_ms_median": step_ms,
        "images_per_s": case.batch / step_ms * 1e3,
        "repeat_ms_median": list(repeats),
        "utilisation": utilisation,
        "load_avg": 1.0,
    }


def test_ratios_pair_rows_of_the_same_setting_only():
    ours = Case(resolution=64, batch=4)
    timm = Case("timm/efficientnet_b0", resolution=64, batch=4)
    rows = [
        ok_row(ours, 10.0, [10.0, 12.0], utilisation=0.3),
        ok_row(timm, 15.0, [15.0, 12.0], utilisation=0.2),
        ok_row(Case("timm/efficientnet_b0", resolution=64, batch=8), 1.0),
    ]
    found = report.ratios(rows)
    assert len(found) == 1
    assert found[0]["what"] == "ours B0 vs timm B0 (img/s ratio, >=1: ours faster)"
    assert found[0]["ratio"] == pytest.approx(1.5)
    assert found[0]["per_repeat"] == [1.5, 1.0]
    assert found[0]["utilisation"] == (0.3, 0.2)


def test_ratios_pair_variants_by_size_group_expansion_and_norm():
    """gpu.sh's rows: LN+PN vs BN at G16-e4 and G16 vs G1 at e6, once per layout and precision;
    never across sizes or expansions. B0-e6 labels read as the CPU reports always did."""
    rows, expected = [], []
    for precision in ("fp32", "bf16"):
        for layout in ("nchw", "channels_last"):
            axes = dict(resolution=64, batch=4, precision=precision, layout=layout, device="cuda")
            rows += [
                ok_row(Case(group_size=16, expand_ratio=4, norm="ln+pn", **axes), 12.0),
                ok_row(Case(group_size=16, expand_ratio=4, norm="bn", **axes), 10.0),
                ok_row(Case(group_size=16, expand_ratio=6, norm="bn", **axes), 8.0),
                ok_row(Case(group_size=1, expand_ratio=6, norm="bn", **axes), 4.0),
                ok_row(Case(model="b2", group_size=1, expand_ratio=6, norm="bn", **axes), 1.0),
            ]
            setting = f"cuda 64px b4 {precision} {layout}"
            expected += [
                ("B0 e4: G16-LN+PN vs G16-BN step cost (goal <= 1.25)", setting, 1.2),
                ("G16-BN vs G1-BN step cost", setting, 2.0),
            ]
    found = report.ratios(rows)
    assert sorted((f["what"], f["setting"], f["ratio"]) for f in found) == sorted(expected)


def test_gpu_preset_runs_both_sides_of_each_comparison():
    """The gpu preset's cases, given made-up figures, yield LN+PN vs BN and G16 vs G1 rows for
    every size, layout and mode (the report had none of the former)."""
    cases = run.build_cases(run.settings(run.parser().parse_args(["--preset", "gpu"])))
    rows = [ok_row(c, 10.0) for c in cases]
    found = report.ratios(rows)
    for what in ("G16-LN+PN vs G16-BN", "G16-BN vs G1-BN"):
        got = {(f["setting"], f["mode"]) for f in found if what in f["what"]}
        want = {(report.describe_setting(r), r["mode"]) for r in rows if r["subject"] == "ours"}
        assert got == want, what


def test_report_names_tf32_only_for_fp32_rows_that_used_it():
    rows = [
        dict(ok_row(Case(device="cuda", precision=p), 10.0), tf32=t)
        for p, t in (("fp32", True), ("fp32", False), ("bf16", True))
    ]
    assert [report.describe_setting(r) for r in rows] == [
        "cuda 224px b32 fp32 (TF32) nchw",
        "cuda 224px b32 fp32 nchw",
        "cuda 224px b32 bf16 nchw",
    ]


@pytest.mark.parametrize("before", ["ieee", "tf32"])
def test_matmul_tf32_is_on_exactly_when_asked_and_restored(before):
    matmul = torch.backends.cuda.matmul
    if tf32._attr(matmul, "fp32_precision") is None:
        pytest.skip("torch < 2.9: the legacy branch is tested with a stand-in below")
    original = matmul.fp32_precision
    try:
        matmul.fp32_precision = before
        for enabled in (True, False):
            with tf32.matmul_tf32(enabled):
                assert tf32.matmul_tf32_enabled() is enabled
            assert matmul.fp32_precision == before
        with pytest.raises(RuntimeError, match="mid-block"), tf32.matmul_tf32(before != "tf32"):
            raise RuntimeError("mid-block")  # the flag must come back on an exception too
        assert matmul.fp32_precision == before
    finally:
        matmul.fp32_precision = original


def test_matmul_tf32_on_torch_2_0_keeps_the_precision_string(monkeypatch):
    """torch 2.0 (the Poplar SDK's) has no fp32_precision: the global matmul precision is set and
    put back as it was, 'medium' included."""
    store = {"precision": "medium"}
    monkeypatch.setattr(torch.backends.cuda, "matmul", SimpleNamespace(allow_tf32=True))
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: store["precision"])
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda value: store.update(precision=value))
    with tf32.matmul_tf32(False):
        assert store["precision"] == "highest" and not tf32.matmul_tf32_enabled()
    assert store["precision"] == "medium"
    with tf32.matmul_tf32(True):
        assert store["precision"] == "high"
    assert store["precision"] == "medium"


@pytest.mark.parametrize(
    "cudnn, expected",
    [
        (SimpleNamespace(conv=SimpleNamespace(fp32_precision="tf32"), fp32_precision="none"), True),
        (SimpleNamespace(conv=SimpleNamespace(fp32_precision="ieee"), fp32_precision="tf32"), False),
        (SimpleNamespace(conv=SimpleNamespace(fp32_precision="none"), fp32_precision="tf32"), True),
        (SimpleNamespace(allow_tf32=True), True),  # torch 2.0: the legacy flag
        (SimpleNamespace(allow_tf32=False), False),
    ],
)
def test_conv_tf32_reads_the_setting_the_convolutions_use(monkeypatch, cudnn, expected):
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    assert tf32.conv_tf32() is expected


def test_peak_matmul_runs_in_tf32_exactly_when_the_convolutions_do(monkeypatch):
    seen = []
    real = torch.matmul

    def spy(a, b):
        seen.append(tf32.matmul_tf32_enabled())
        return real(a, b)

    before = tf32.matmul_tf32_enabled()
    monkeypatch.setattr(torch, "matmul", spy)
    assert measure.measure_peak_flops("cpu", "fp32", size=8, repeats=2, tf32=True) > 0
    assert seen == [True] * 3 and tf32.matmul_tf32_enabled() == before
    seen.clear()
    measure.measure_peak_flops("cpu", "fp32", size=8, repeats=2)  # default on a CPU: off
    assert seen == [False] * 3 and tf32.matmul_tf32_enabled() == before
    for conv in (True, False):
        monkeypatch.setattr(measure, "conv_tf32", lambda conv=conv: conv)
        assert measure.peak_uses_tf32("cuda", "fp32") is conv
        assert measure.peak_uses_tf32("cuda", "bf16") is False
        assert measure.peak_uses_tf32("cpu", "fp32") is False


def test_bad_input_is_refused_before_work(tmp_path):
    with pytest.raises(ValueError, match="g16-e4-ln\\+pn"):
        parse_variant("g16")
    with pytest.raises(ValueError, match="precision"):
        Case(precision="fp8")
    with pytest.raises(SystemExit, match="must look like"):
        run.main(["--variants", "bn", "--out", str(tmp_path / "x")])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            run.main(["--device", "cuda", "--out", str(tmp_path / "x")])
    assert not list(tmp_path.iterdir())


def test_time_budget_turns_unstarted_cases_into_skipped_rows(tiny_peer):
    cases = [Case(tiny_peer, resolution=16, batch=2, mode=m) for m in ("infer", "train")]
    rows = run.run_cases(cases, warmup=0, steps=1, repeats=1, log=lambda m: None, budget_s=0.0)
    assert rows[0]["status"] == "ok"  # the first case always starts
    assert rows[1]["status"] == "skipped" and "time budget" in rows[1]["reason"]


def test_budget_starts_a_case_only_if_its_estimate_fits():
    now = [0.0]
    b = budget.Budget(100.0, clock=lambda: now[0])
    small = Case(resolution=16, batch=2, mode="infer")
    assert b.refusal(Case(resolution=512, batch=64)) is None  # nothing to estimate from: starts
    now[0] = 10.0
    b.record(small, since=0.0)  # the small case took 10 s
    now[0] = 12.0
    b.record(Case(resolution=16, batch=2, mode="train"), since=10.0)  # this one 2 s: the longest counts
    assert budget.estimate_seconds(small, b.durations) == pytest.approx(10.0)
    four_times_the_pixels = Case(resolution=32, batch=2, mode="infer")
    assert budget.estimate_seconds(four_times_the_pixels, b.durations) == pytest.approx(40.0)
    now[0] = 85.0
    assert b.refusal(small) is None  # ends at 95 s
    assert "~40 s" in b.refusal(four_times_the_pixels)  # would end at 125 s
    now[0] = 95.5
    assert "time budget of 100 s" in b.refusal(small)
    assert budget.Budget(None, clock=lambda: 1e9).refusal(small) is None


class _Interrupting(nn.Module):
    """A peer whose forward is interrupted (as by Ctrl-C or gpu.sh's SIGINT at its time limit)."""

    def forward(self, x):
        raise KeyboardInterrupt


def test_interrupt_keeps_the_rows_measured_so_far(monkeypatch, tiny_peer):
    monkeypatch.setitem(peers.PEERS, "torchvision/resnet50", ("torch", _Interrupting))
    cases = [
        Case(tiny_peer, resolution=16, batch=2, mode="infer"),
        Case("torchvision/resnet50", resolution=16, batch=2, mode="infer"),
        Case(tiny_peer, resolution=16, batch=2, mode="train"),
    ]
    rows = run.run_cases(cases, warmup=0, steps=1, repeats=1, log=lambda m: None)
    assert [r["status"] for r in rows] == ["ok", "skipped", "skipped"]
    assert all("interrupted" in r["reason"] for r in rows[1:])


def test_out_of_memory_halves_the_batch_and_says_so(monkeypatch, tiny_peer):
    real = measure.Prepared

    def prepared_that_fits_4(case):
        if case.batch > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(case)

    monkeypatch.setattr(run, "Prepared", prepared_that_fits_4)
    rows = run.run_cases(
        [Case(tiny_peer, resolution=16, batch=16, mode="train")],
        warmup=0,
        steps=2,
        repeats=1,
        log=lambda m: None,
    )
    assert rows[0]["status"] == "ok" and rows[0]["batch"] == 4
    assert "lowered from 16" in rows[0]["reason"]
    assert rows[0]["images_per_s"] == pytest.approx(4 / (rows[0]["step_ms_median"] / 1e3), rel=1e-2)


def test_report_without_files_reads_only_throughput_rows(tmp_path, monkeypatch):
    shutil.copy(os.path.join(report.RESULTS_DIR, "quick-cpu.jsonl"), tmp_path / "quick-cpu.jsonl")
    shutil.copy(os.path.join(report.RESULTS_DIR, "data-cpu.jsonl"), tmp_path / "data-cpu.jsonl")
    (tmp_path / "study-norms-digits-cpu.jsonl").write_text('{"variant": "bn", "top1": 0.5}\n')
    monkeypatch.setattr(report, "RESULTS_DIR", str(tmp_path))
    out = tmp_path / "out" / "report.md"
    assert report.main(["--out", str(out), "--no-plots"]) == 0
    text = out.read_text()
    assert "## quick-cpu.jsonl" in text
    assert "data-cpu" not in text and "study-norms" not in text
