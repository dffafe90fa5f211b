import json

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pipeline.experiments.handoff import ORDERS, with_guidance

FIGURES = ("heldout_acc", "seen_acc", "heldout_hit")


@pytest.mark.slow
def test_a_handoff_at_either_end_draws_the_reports_own_samples(variants, tmp_path):
    """With the first model taking every step (--at -1), the student first is the student's own sample and the
    teacher first the teacher's: the handoff reproduces the report's figures exactly, from the same noise."""
    report = json.loads((variants / "report.json").read_text())
    out = tmp_path / "handoff.json"
    result = CliRunner().invoke(app, ["bench", "handoff", str(variants), "--runs", "no_teacher,swaps", "--at", "-1",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    handoff = json.loads(out.read_text())
    assert handoff["command"].startswith("sdit bench handoff") and handoff["at"] == -1
    assert list(handoff["runs"]) == ["no_teacher", "swaps"] and "| swaps |" in result.output
    for name, run in handoff["runs"].items():
        assert set(run) == set(ORDERS)
        for key in FIGURES:
            assert run["alone"][key] == run["student_first"][key] == report["runs"][name][key], (name, key)
            assert run["teacher_first"][key] == report["teacher"][key], (name, key)
            low, high = run["student_first"]["intervals"][key]
            assert low <= run["student_first"][key] <= high
    assert {key: handoff["teacher"][key] for key in FIGURES} == {key: report["teacher"][key] for key in FIGURES}


def test_a_handoff_needs_a_finished_experiment_and_its_runs(tmp_path):
    missing = CliRunner().invoke(app, ["bench", "handoff", str(tmp_path), "--runs", "no_teacher"])
    assert missing.exit_code != 0 and "report.json not found" in missing.output
    (tmp_path / "report.json").write_text(json.dumps({"runs": {}, "config": {}}))
    unknown = CliRunner().invoke(app, ["bench", "handoff", str(tmp_path), "--runs", "kd_guided"])
    assert unknown.exit_code != 0
    assert "runs ['kd_guided'] are not in" in unknown.output and "it has none" in unknown.output


def test_guidance_is_applied_once_a_step_the_way_each_model_takes_it():
    calls = []

    def eps(x, t, text):
        calls.append(len(x))
        return text[:, :1, :1].expand(len(x), 1, 1).view(len(x), 1, 1, 1) * torch.ones_like(x)

    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([5, 5])
    text, null = torch.full((2, 3, 4), 2.0), torch.full((2, 3, 4), 0.5)
    cfg = with_guidance(eps, 3.0)(x, t, text, null)  # one call on the doubled batch: ε_u + 3(ε_c − ε_u)
    assert calls == [4] and torch.allclose(cfg, torch.full_like(x, 0.5 + 3 * (2.0 - 0.5)))
    calls.clear()
    distilled = with_guidance(eps, 3.0, distilled=True)(x, t, text, null)  # the student takes w itself
    assert calls == [2] and torch.allclose(distilled, torch.full_like(x, 2.0))
