"""benchmarks/data.py: rows, report and plot of the input-pipeline benchmark, at a toy size."""

import json

import pytest

from benchmarks import data as bench
from benchmarks.data_report import TARGETS, cores_needed, medians


def test_toy_run_writes_rows_report_and_plot(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    monkeypatch.setattr(bench, "RESULTS_DIR", str(tmp_path))
    argv = [
        "--images",
        "4",
        "--resolutions",
        "160",
        "--workers",
        "0",
        "--batch",
        "2",
        "--repeats",
        "2",
        "--out",
        "toy",
    ]
    assert bench.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "toy.jsonl").read_text().splitlines()]
    # 3 pipelines × 2 splits × 1 resolution × 1 worker count × 2 rounds
    assert len(rows) == 12 and {r["pipeline"] for r in rows} == set(bench.PIPELINES)
    for row in rows:
        # 3 photographs × 4 images per split, batch 2: 6 batches, the first one untimed
        assert row["batches"] == 5 and row["images"] == 10 and row["images_per_s"] > 0
        assert row["cpu_ms_per_image"] > 0  # workers=0: all on this process
        assert row["command"].startswith("python -m benchmarks.data --images 4")
        assert {"commit", "date", "pillow", "torchvision", "load_before", "load_after"} <= set(row)
    shares = [r for r in rows if r["pipeline"] == "ours"][0]
    assert abs(sum(shares[f"train_1/{k}"] for k in (1, 2, 4, 8)) - 1) < 1e-6
    report = (tmp_path / "toy.md").read_text()
    assert "| train | 160 | 0 |" in report and "| val | 160 | 0 |" in report
    assert "load average during the rows" in report and "ours / torchvision" in report
    assert "## CPU time per image" in report and "cores (CPU time)" in report
    assert (tmp_path / "toy.png").stat().st_size > 0 and (tmp_path / "toy.cmd").is_file()


def test_bad_options_are_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as error:
        bench.parse_args(["--pipelines", "ours,dali"])
    assert error.value.code == 2 and "unknown dali" in capsys.readouterr().err


def test_core_counts_follow_from_the_measured_rate():
    rows = [
        {"pipeline": "ours", "split": "train", "resolution": r, "workers": 1, "images_per_s": 250.0}
        for r in (224, 160)
    ]
    cpu = {("ours", "train", r): 4.0 for r in (224, 160)}  # 4 CPU ms per image
    lines = cores_needed(medians(rows), cpu)
    assert len(lines) == 2 + len(TARGETS)  # header, rule, one row per target (only "ours" measured)
    for (name, target, _), line in zip(TARGETS, lines[2:]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == name and cells[4] == f"{target * 4 / 1000:,.0f}"
        assert cells[6] == f"{target / 250:,.0f}"
