import json

from typer.testing import CliRunner

from cli import app

KEYS = {"store_steps_per_s", "memory_steps_per_s", "loader_ratio", "offline_steps_per_s", "online_steps_per_s",
        "flops"}


def test_bench_train_reports_the_loader_the_teacher_and_flops(tiny_teacher, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "train", "--teacher", str(tiny_teacher), "--images", "256",
                                      "--buffer-records", "64", "--student", "SDiT-Nano/2", "--batch-size", "8",
                                      "--steps", "2", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "store / memory" in result.output and "sd15_unet" in result.output
    figures = json.loads(out.read_text())
    assert KEYS <= set(figures)
    assert all(figures[k] > 0 for k in KEYS - {"flops"})
    assert figures["loader_ratio"] == figures["store_steps_per_s"] / figures["memory_steps_per_s"]
    assert -0.5 < figures["checksum_share"] < 0.5 and "checksums (CRC32C) on reads" in result.output
    assert figures["store_records"] >= 4 * figures["window_records"] == 4 * 64
    flops = figures["flops"]
    assert set(flops) == {"SDiT-S/2", "SDiT-B/2", "SDiT-L/2", "SDiT-XL/2", "sd15_unet"}
    assert flops["SDiT-S/2"] < flops["SDiT-B/2"] < flops["SDiT-L/2"] < flops["SDiT-XL/2"]
    assert 0.9 < flops["sd15_unet"] / 803.3e9 < 1.1  # SD 1.5's UNet at 64x64 latents, 77 tokens
    assert figures["online_step_flops"]["SDiT-B/2"] == 3 * flops["SDiT-B/2"] + flops["sd15_unet"]


def test_a_store_too_small_for_an_honest_loader_figure_is_refused(labelled_store, tiny_teacher):
    result = CliRunner().invoke(app, ["bench", "train", str(labelled_store), "--teacher", str(tiny_teacher),
                                      "--student", "SDiT-Nano/2", "--buffer-records", "64"])
    assert result.exit_code == 2 and "needs at least 4x the shuffle window (256)" in result.output
