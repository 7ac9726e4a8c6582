"""`python -m experiments study`: tiny runs (one seed, one step, synthetic images) and the report's logic."""

import json

import pytest

import experiments.study
from experiments.cli import main as cli
from experiments.study_report import compare, verdict, write_report

TINY = [
    "--device",
    "cpu",
    "data.dataset=synthetic",
    "data.synthetic_images=64",
    "train.max_steps=1",
    "study.seeds=[0]",
]


def run_study(name, tmp_path, *extra):
    return cli(
        [
            "study",
            name,
            "--config",
            "digits",
            *TINY,
            f"study.out_dir={tmp_path}",
            f"log.out_dir={tmp_path / 'runs'}",
            *extra,
        ]
    )


def rows_of(tmp_path, name):
    path = tmp_path / f"study-{name}-synthetic-cpu.jsonl"
    return path, [json.loads(line) for line in path.read_text().splitlines()]


def test_norms_study_keeps_the_global_batch_and_writes_rows_report_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments.study, "MICRO_BATCHES", (2, 32))
    monkeypatch.setattr(
        experiments.study, "NORM_VARIANTS", (("BN", "batch", False), ("LN+PN", "layer", True))
    )
    assert run_study("norms", tmp_path) == 0
    path, rows = rows_of(tmp_path, "norms")
    assert [r["variant"] for r in rows] == ["BN mb2", "BN mb32", "LN+PN mb2", "LN+PN mb32"]
    assert all(r["micro_batch"] * r["grad_accum"] == 32 and r["steps"] == 1 for r in rows)
    assert all(0 <= r["top1"] <= 100 and r["commit"] and r["torch"] for r in rows)
    report = path.with_suffix(".md").read_text()
    assert "| BN |" in report and "mb 2 (× 16)" in report and "Command: `" in report
    assert path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert path.with_suffix(".csv").read_text().startswith("study,variant,seed")
    assert not (tmp_path / "study-norms-synthetic-cpu.jsonl.partial").exists()
    path.with_suffix(".md").unlink()  # regenerated from the rows alone
    assert run_study("norms", tmp_path, "study.report_only=true") == 0
    assert path.with_suffix(".md").read_text() == report


def test_groups_and_resolution_studies_run(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments.study, "GROUP_EXPANSION", ((1, 6), (16, 4)))
    assert run_study("groups", tmp_path) == 0
    _, rows = rows_of(tmp_path, "groups")
    assert [(r["group_size"], r["expand_ratio"]) for r in rows] == [(1, 6), (16, 4)]
    assert rows[0]["parameters_1000"] == 5288548 and rows[0]["images_per_s"] > 0
    assert run_study("resolution", tmp_path, "finetune.resolution=64") == 0
    _, rows = rows_of(tmp_path, "resolution")
    assert [r["variant"] for r in rows] == ["native", "native + fine-tune", "half", "half + fine-tune"]
    assert [r["train_resolution"] for r in rows] == [64, 64, 32, 32]
    assert rows[1]["finetune_seconds"] > 0 and rows[0]["finetune_seconds"] == 0


def test_study_name_is_required_and_checked(tmp_path, capsys):
    assert cli(["study", "--config", "digits", f"study.out_dir={tmp_path}"]) == 2
    assert cli(["study", "norm", "--config", "digits"]) == 2
    assert "one of norms, groups, resolution" in capsys.readouterr().err
    assert (
        cli(["study", "norms", "--config", "digits", f"study.out_dir={tmp_path}", "study.report_only=true"])
        == 2
    )  # no rows yet: says which command makes them
    assert (
        cli(["study", "groups", "--config", "digits", f"study.out_dir={tmp_path}", "study.variants=[G2 e6]"])
        == 2
    )
    assert "not variants of the groups study" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before any run or file


def test_report_separates_only_beyond_the_seeds_spread():
    tight, shifted, noisy = (90.0, 0.5, 3), (95.0, 0.5, 3), (95.0, 6.0, 3)
    assert compare(shifted, tight) == (5.0, True)
    assert compare(noisy, tight)[1] is False
    assert compare((95.0, 0.0, 1), tight)[1] is False  # one seed: never separated
    stats = {"a": shifted, "b": tight, "c": noisy}
    assert "separated" in verdict("a", "b", stats) and "cannot tell them apart" in verdict("c", "b", stats)
    assert verdict("a", "z", stats) == "a vs z: not measured."
    assert "no spread" in verdict("a", "one", {**stats, "one": (1.0, 0.0, 1)})


def test_report_refuses_empty_rows(tmp_path):
    empty = tmp_path / "rows.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no rows"):
        write_report("norms", empty)


def test_a_partial_grid_completes_the_rows_a_whole_grid_replaces_them(tmp_path, capsys):
    from experiments.study import RowWriter
    from experiments.study_report import load_rows

    stem = tmp_path / "study-norms-digits-cpu"
    first = RowWriter(stem)
    for variant, seed in (("BN mb2", 0), ("BN mb4", 0), ("BN mb2", 1)):
        first.add({"variant": variant, "seed": seed, "top1": 10.0})
    first.finish()

    part = RowWriter(stem)  # runs again one cell that is there, and one that is missing
    part.add({"variant": "BN mb4", "seed": 0, "top1": 20.0})
    part.add({"variant": "GN mb4", "seed": 0, "top1": 30.0})
    rows = load_rows(part.finish(merge=True))
    assert sorted((r["variant"], r["seed"], r["top1"]) for r in rows) == [
        ("BN mb2", 0, 10.0),
        ("BN mb2", 1, 10.0),
        ("BN mb4", 0, 20.0),
        ("GN mb4", 0, 30.0),
    ]
    assert "2 new rows beside 2 of the 3 already there" in capsys.readouterr().out
    assert (tmp_path / "study-norms-digits-cpu.csv").read_text().count("\n") == 5  # header + 4 rows

    whole = RowWriter(stem)
    whole.add({"variant": "LN mb2", "seed": 0, "top1": 40.0})
    assert [r["variant"] for r in load_rows(whole.finish())] == ["LN mb2"]
    assert "replacing the 4 rows" in capsys.readouterr().out


def test_a_resume_continues_only_a_study_folder_as_it_started(tmp_path, capsys):
    """--resume FOLDER: a folder the study started (its progress.json), without overrides, of the
    same study; each refusal exits 2 and names the way on."""
    import yaml

    from app.config import build_config

    folder = tmp_path / "study-groups-x"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(build_config("digits").to_dict()))
    assert cli(["study", "groups", "--resume", str(folder)]) == 2
    assert "no progress.json there" in capsys.readouterr().err
    (folder / "progress.json").write_text(
        json.dumps(
            {
                "setup": {
                    "study": "groups",
                    "command": "c",
                    "variants": [],
                    "keep_max_steps": False,
                    "native": None,
                },
                "done": {},
                "partial": {},
            }
        )
    )
    assert cli(["study", "groups", "--resume", str(folder), "train.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "without overrides (train.epochs=2)" in err and f"study groups --resume {folder}" in err
    assert cli(["study", "norms", "--resume", str(folder)]) == 2
    assert "holds the groups study; " in capsys.readouterr().err
