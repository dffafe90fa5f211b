import json

import pytest

from pipeline.bench import write_json
from pipeline.bench.encode import BenchEncodeConfig, bench_encode, format_table


@pytest.mark.slow
def test_bench_encode_reports_every_figure(tmp_path):
    result = bench_encode(BenchEncodeConfig(images=16, resolution=32, batch_size=8, shard_size=8))
    assert result["records"] == [16, 32]
    assert result["stage_records_per_s"] > 0 and result["bare_records_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["stage_records_per_s"] / result["bare_records_per_s"])
    assert len(result["peak_rss_mb"]) == 2 and all(r > 100 for r in result["peak_rss_mb"])
    write_json(result, tmp_path / "b.json")
    saved = json.loads((tmp_path / "b.json").read_text())
    assert {"stage_records_per_s", "bare_records_per_s", "ratio", "peak_rss_mb"} <= saved.keys()
    assert "stage / bare" in format_table(result) and "checksums (CRC32C) on writes" in format_table(result)
    assert -0.5 < result["checksum_share"] < 0.5  # measured, so noise can make it slightly negative


@pytest.mark.slow
def test_bench_label_reports_every_figure():
    from pipeline.bench.label import BenchLabelConfig, bench_label, format_label_table

    result = bench_label(BenchLabelConfig(images=8, draws=2, batch_size=8), repeats=1)
    keys = {"stage_draws_per_s", "bare_draws_per_s", "ratio", "bytes_per_draw", "achieved_gflops", "matmul_gflops"}
    assert keys <= result.keys() and all(result[k] > 0 for k in keys)
    assert result["bytes_per_draw"] > 2 * 2 * 4 * 8 * 8  # noise + ε_T at 64 px, fp16
    assert result["flops_per_draw"] > 1e6
    assert 0 < result["caption_bytes_per_draw"] < result["read_bytes_per_draw"]
    assert result["text_row_bytes"] < result["caption_bytes_per_read"] < 2 * result["text_row_bytes"]
    assert "stage / bare" in format_label_table(result)


@pytest.mark.slow
def test_bench_ray_encode_runs_both_engines_on_the_same_job(tmp_path):
    from pipeline.bench.ray_encode import BenchRayEncodeConfig, bench_ray_encode
    from pipeline.bench.ray_encode import format_table as ray_table

    result = bench_ray_encode(BenchRayEncodeConfig(images=24, resolution=32, batch_size=8, shard_size=16, repeats=1))
    assert result["same_records"] is True  # both wrote the same store: the comparison is of one job
    assert result["pool_records_per_s"] > 0 and result["ray_data_records_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["pool_records_per_s"] / result["ray_data_records_per_s"])
    assert result["ray_data_driver_bytes_per_record"] > 4 * 4 * 4 * 2  # at least each record's latents
    assert "pool / Ray Data" in ray_table(result)
