import itertools
import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from cli import app

KEYS = {"store_steps_per_s", "memory_steps_per_s", "loader_ratio", "offline_steps_per_s", "online_steps_per_s",
        "flops"}

# Seconds of each timed measurement of 2 steps, in the order bench train takes them: store, memory, online, three
# times. Best steps/s: store 2 / 0.5 = 4 (first), memory 2 / 0.25 = 8 (third), online 2 / 1.0 = 2 (second).
SECONDS = [0.5, 0.5, 2.0, 1.0, 1.0, 1.0, 2.0, 0.25, 4.0]
# Then the draw stream's start-up, three times with the labels' index (best 0.2 s) and three without (best 1.0 s), and
# the loader's supply on an SD 1.5-sized store: an epoch of 1,024 draws in 0.5 s.
SECONDS += [0.3, 0.2, 0.4, 1.5, 1.0, 2.0, 0.5]


@pytest.mark.slow
def test_bench_train_reports_the_loader_the_teacher_and_flops(tiny_teacher, tmp_path, monkeypatch):
    from pipeline.bench import timing as module  # the clock every benchmark reads

    ticks = itertools.accumulate(itertools.chain.from_iterable((0.0, s) for s in SECONDS))  # start, end, ...
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "train", "--teacher", str(tiny_teacher), "--images", "256",
                                      "--buffer-records", "64", "--student", "SDiT-Nano/2", "--batch-size", "8",
                                      "--steps", "2", "--startup-shards", "8", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "store / memory" in result.output and "sd15_unet" in result.output
    figures = json.loads(out.read_text())
    assert KEYS <= set(figures)
    assert next(ticks, None) is None  # every measurement timed by the clock above
    assert figures["store_steps_per_s"] == figures["offline_steps_per_s"] == 4.0
    assert figures["memory_steps_per_s"] == 8.0 and figures["online_steps_per_s"] == 2.0
    assert figures["loader_ratio"] == 0.5 and figures["online_ratio"] == 0.5
    assert "0.500" in result.output
    assert -0.5 < figures["checksum_share"] < 0.5 and "checksums (CRC32C) on reads" in result.output
    assert figures["store_records"] >= 4 * figures["window_records"] == 4 * 64
    assert figures["stream_startup_s"] == pytest.approx(0.2)
    assert figures["stream_startup_unindexed_s"] == pytest.approx(1.0)
    assert "1.00 s without the index" in result.output
    supply = figures["supply"]["local"]
    assert supply["draws_per_s"] == pytest.approx(2048) and supply["records_per_s"] == pytest.approx(512)
    assert supply["bytes_per_draw"] > 2 * 4 * 64 * 64 * 2  # the noise and ε_T of a draw at 512 px, at least
    assert supply["mb_per_s"] == pytest.approx(supply["bytes_per_draw"] * 2048 / 1e6)
    need = figures["need"]  # SDiT-B/2 at 512 px, 3 forwards a draw, on an H100 at 40% of 989 TFLOP/s
    assert need["draws_per_s"] == pytest.approx(0.4 * 989e12 / (3 * figures["flops"]["SDiT-B/2"]))
    # bytes read: the draws' records and labels, and (a fraction of them) the captions of swaps and mixes
    assert 0 < figures["caption_bytes_per_draw"] < figures["read_bytes_per_draw"]
    assert 0 < figures["caption_reads_per_draw"] < 1 and figures["label_bytes_per_draw"] > 0
    flops = figures["flops"]
    assert set(flops) == {"SDiT-S/2", "SDiT-B/2", "SDiT-L/2", "SDiT-XL/2", "sd15_unet"}
    assert flops["SDiT-S/2"] < flops["SDiT-B/2"] < flops["SDiT-L/2"] < flops["SDiT-XL/2"]
    assert 0.9 < flops["sd15_unet"] / 803.3e9 < 1.1  # SD 1.5's UNet at 64x64 latents, 77 tokens
    assert figures["online_step_flops"]["SDiT-B/2"] == 3 * flops["SDiT-B/2"] + flops["sd15_unet"]


def test_a_store_too_small_for_an_honest_loader_figure_is_refused(labelled_store, tiny_teacher):
    result = CliRunner().invoke(app, ["bench", "train", str(labelled_store), "--teacher", str(tiny_teacher),
                                      "--student", "SDiT-Nano/2", "--buffer-records", "64"])
    assert result.exit_code == 2 and "needs at least 4x the shuffle window (256)" in result.output
