import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.experiments.substitution import records_to_reach
from sdit.tiny import save_tiny_teacher

# What the end-to-end tests measure: two sizes, tiny runs.
OPTIONS = ["--sizes", "12,24", "--multiplier-at", "12", "--draws", "2", "--steps", "2", "--batch-size", "8",
           "--per-prompt", "2", "--sample-steps", "2", "--jobs", "1"]


@pytest.fixture(scope="module")
def measured(tiny_teacher, tmp_path_factory) -> tuple[Path, dict, str]:
    """One `sdit bench substitution` with OPTIONS: its folder, its --json report and what it printed."""
    tmp = tmp_path_factory.mktemp("substitution")
    out, figures = tmp / "sub", tmp / "sub.json"
    result = CliRunner().invoke(app, ["bench", "substitution", "--out", str(out), "--teacher", str(tiny_teacher),
                                      *OPTIONS, "--json", str(figures)])
    assert result.exit_code == 0, result.output
    return out, json.loads(figures.read_text()), result.output


@pytest.mark.slow
def test_bench_substitution_writes_the_curve_and_the_multiplier(measured):
    out, report, output = measured
    assert set(report["sizes"]) == {"12", "24"}
    for size in report["sizes"].values():
        assert set(size) == {"no_teacher", "kd_perturb", "teacher"}
        assert all(-1 <= run["heldout_acc"] <= 1 and 0 <= run["seen_acc"] <= 1 for run in size.values())
    assert report["reference_seen_acc"] == report["sizes"]["12"]["kd_perturb"]["seen_acc"]
    # 12 is the smallest size: no_teacher needs 12 to 24 records to reach it, or never gets there.
    assert report["multiplier"] is None or 1 <= report["multiplier"] <= 2
    assert (out / "substitution.png").exists() and "Data multiplier at 12 records" in output
    assert json.loads((out / "n24" / "report.json").read_text())["config"]["records"] == 24


def test_the_multiplier_interpolates_in_log_records():
    points = [(250, 0.1), (500, 0.2), (1000, 0.3), (4000, 0.5)]
    assert records_to_reach(points, 0.2) == pytest.approx(500)
    assert records_to_reach(points, 0.05) == 250  # the smallest size already reaches it
    assert records_to_reach(points, 0.4) == pytest.approx(2000)  # half-way between 1,000 and 4,000 in log
    assert math.isclose(records_to_reach(points, 0.25), math.sqrt(500 * 1000))
    assert records_to_reach(points, 0.6) is None  # never reached within the largest size


# no_teacher's accuracies at 250, 500, 1,000 and 4,000 records.
NO_TEACHER_SEEN = (0.1, 0.2, 0.3, 0.5)
NO_TEACHER_HELDOUT = (0.0, 0.05, 0.1, 0.2)


@pytest.mark.parametrize(("kd_seen", "kd_heldout", "multiplier", "heldout_multiplier"), [
    # seen 0.4: half-way from 0.3 to 0.5, so half-way from 1,000 to 4,000 in log records: 2,000 = 4x of 500.
    # held-out 0.1: exactly no_teacher's at 1,000 records: 2x.
    (0.4, 0.1, 4.0, 2.0),
    # seen 0.6: never reached within 4,000 records. held-out 0.02: 0.4 of the way from 250 to 500 in log
    # records, 250 * 2 ** 0.4 = 329.9 records: 0.66x of 500.
    (0.6, 0.02, None, 2 ** -0.6),
])
def test_the_multipliers_of_hand_built_curves(tiny_teacher, tmp_path, monkeypatch, kd_seen, kd_heldout, multiplier,
                                              heldout_multiplier):
    """Each size's distill report replaced by hand-built accuracies; the multipliers at 500 records computed by
    hand."""
    from pipeline.experiments import substitution as module
    from pipeline.experiments.config import DistillConfig, SubstitutionConfig

    sizes = (250, 500, 1000, 4000)

    def report(config, *args):
        Path(config.out).mkdir(parents=True)
        i = sizes.index(config.records)
        no_teacher = {"seen_acc": NO_TEACHER_SEEN[i], "heldout_acc": NO_TEACHER_HELDOUT[i], "heldout_hit": 0.0}
        kd = {"seen_acc": kd_seen, "heldout_acc": kd_heldout, "heldout_hit": 0.0} if config.records == 500 else \
            {"seen_acc": 0.9, "heldout_acc": 0.9, "heldout_hit": 0.0}
        return {"runs": {"no_teacher": no_teacher, "kd_perturb": kd}, "teacher": kd}

    monkeypatch.setattr(module, "distill", report)
    config = SubstitutionConfig(sizes=sizes, multiplier_at=500, distill=DistillConfig(
        out=str(tmp_path / "sub"), teacher=str(tiny_teacher), runs=("no_teacher", "kd_perturb"), curve_points=0))
    result = module.substitution(config)
    assert result["reference_seen_acc"] == kd_seen and result["reference_heldout_acc"] == kd_heldout
    for key, expected in (("multiplier", multiplier), ("heldout_multiplier", heldout_multiplier)):
        assert result[key] == (None if expected is None else pytest.approx(expected, rel=1e-12))
    table = (tmp_path / "sub" / "substitution.md").read_text()
    assert ("more than 8x (not reached within 4,000 records)" in table) == (multiplier is None)


@pytest.mark.parametrize("command", ["substitution", "distill"])
def test_bad_sizes_are_refused_in_one_line(tiny_teacher, tmp_path, command):
    for sizes, message in (("500,250", "increasing"), ("250,x", "whole numbers"), ("250,500", "--multiplier-at")):
        result = CliRunner().invoke(app, ["bench", command, "--out", str(tmp_path / "x"), "--sizes", sizes,
                                          "--teacher", str(tiny_teacher)])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_rerun_reads_back_the_sizes_already_measured(measured, tiny_teacher, tmp_path, monkeypatch):
    from pipeline.experiments import substitution as module

    out = shutil.copytree(measured[0], tmp_path / "sub")
    args = ["bench", "substitution", "--out", str(out), "--teacher", str(tiny_teacher), *OPTIONS]
    first = json.loads((out / "substitution.json").read_text())
    assert {"heldout_multiplier", "reference_heldout_acc", "no_teacher_records_needed_heldout"} <= set(first)

    def run_again(*args, **kwargs):
        raise RuntimeError("a measured size was run again")

    monkeypatch.setattr(module, "distill", run_again)
    result = CliRunner().invoke(app, [*args, "--jobs", "2"])  # side by side or not: the same measurement
    assert result.exit_code == 0, result.output
    assert json.loads((out / "substitution.json").read_text())["sizes"] == first["sizes"]
    # The folder moved and the same teacher copied elsewhere: still the same measurement.
    moved, teacher = tmp_path / "moved", shutil.copytree(tiny_teacher, tmp_path / "copy" / "tiny-sd")
    out.rename(moved)
    elsewhere = [*args[:2], "--out", str(moved), "--teacher", str(teacher), *args[6:]]
    assert CliRunner().invoke(app, elsewhere).exit_code == 0
    assert json.loads((moved / "substitution.json").read_text())["sizes"] == first["sizes"]
    for changed in (["--steps", "3"], ["--teacher", str(save_tiny_teacher(tmp_path / "other", seed=1))]):
        again = CliRunner().invoke(app, [*elsewhere, *changed])  # other options or weights: measured again
        assert again.exit_code != 0 and "a measured size was run again" in str(again.exception)
