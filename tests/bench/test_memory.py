import json

import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.bench.memory import BYTES_PER_PARAM, MemoryConfig, _predict, bench_memory, gpu_batches, per_sample


@pytest.mark.slow
def test_memory_of_a_train_step_per_batch_and_checkpointing(tmp_path):
    out = tmp_path / "m.json"
    result = CliRunner().invoke(app, ["bench", "memory", "--student", "SDiT-Nano/2", "--batch", "1", "--batch", "4",
                                      "--sample-size", "16", "--json", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    rows = figures["rows"]
    assert [(r["batch"], r["checkpointing"]) for r in rows] == [(1, False), (4, False), (1, True), (4, True)]
    assert all(r["measured"] and r["step_gb"] >= r["fwd_bwd_gb"] > 0 and r["parameters"] > 0 for r in rows)
    assert set(figures["gpu_batches"]) == {"SDiT-Nano/2", "SDiT-Nano/2 ckpt"}
    assert "per-GPU batch" in result.output


def test_what_would_not_fit_is_extrapolated_not_run(monkeypatch):
    import pipeline.bench.memory as memory

    def fake_child(preset, batch, checkpointing, config):  # 1 GB of activations a sample above 2 GB
        return {"parameters": 10**8, "rss_before_gb": 2.0, "fwd_bwd_gb": 1.0 * batch, "step_gb": 1.0 * batch + 0.5,
                "seconds": 1.0, "batch": batch}

    monkeypatch.setattr(memory, "_child", fake_child)
    result = bench_memory(MemoryConfig(presets=("SDiT-S/2",), batches=(1, 2, 4, 16), checkpointing=(False,),
                                       max_rss_gb=11))
    rows = {r["batch"]: r for r in result["rows"]}
    assert [rows[b]["measured"] for b in (1, 2, 4, 16)] == [True, True, True, False]
    assert rows[16]["why"] == "memory" and rows[16]["step_gb"] == 16.5
    assert result["per_sample"]["SDiT-S/2"]["per_sample_gb"] == 1.0
    fixed = BYTES_PER_PARAM * result["parameters"]["SDiT-S/2"] / 2**30 + 1.5  # the intercept is below the gradients
    assert result["gpu_batches"]["SDiT-S/2"]["80"] == int((80e9 / 2**30 - fixed) // 1.0)


def test_prediction_is_linear_through_the_two_largest_batches():
    rows = [{"batch": 1, "fwd_bwd_gb": 1.0, "step_gb": 2.0, "parameters": 5, "rss_before_gb": 1.0},
            {"batch": 2, "fwd_bwd_gb": 1.5, "step_gb": 2.5, "parameters": 5, "rss_before_gb": 1.0}]
    assert _predict([], 4) is None
    assert _predict(rows[:1], 4)["fwd_bwd_gb"] == pytest.approx(4.0)  # through (1, 1.0) and the gradients (~0)
    assert _predict(rows, 4)["fwd_bwd_gb"] == 2.5
    fit = per_sample([r | {"preset": "P", "checkpointing": False, "measured": True} for r in rows])
    assert fit == {"P": {"per_sample_gb": 0.5, "intercept_gb": 0.5, "points": 2}}
    assert gpu_batches(fit, {"P": 5})["P"]["24"] > 0


def test_a_student_too_large_to_run_is_scaled_by_depth_times_width(monkeypatch):
    import pipeline.bench.memory as memory

    def fake_child(preset, batch, checkpointing, config):
        assert preset == "SDiT-S/2"  # B/2's 20 bytes a parameter (3.4 GB) alone exceed the 3 GB budget
        return {"parameters": 10**7, "rss_before_gb": 0.5, "fwd_bwd_gb": 0.5 * batch, "step_gb": 0.5 * batch,
                "seconds": 1.0, "batch": batch}

    monkeypatch.setattr(memory, "_child", fake_child)
    result = bench_memory(MemoryConfig(presets=("SDiT-S/2", "SDiT-B/2"), batches=(1, 2), checkpointing=(False,),
                                       max_rss_gb=3))
    assert {r["preset"] for r in result["rows"]} == {"SDiT-S/2"}
    scaled = result["per_sample"]["SDiT-B/2"]
    assert scaled["scaled_from"] == "SDiT-S/2" and scaled["per_sample_gb"] == pytest.approx(2 * 0.5)  # 768/384
    assert result["gpu_batches"]["SDiT-B/2"]["80"] < result["gpu_batches"]["SDiT-S/2"]["80"]
    assert "scaled from SDiT-S/2" in memory.format_memory_table(result)
