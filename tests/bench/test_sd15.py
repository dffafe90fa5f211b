import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.bench import write_json
from pipeline.bench.config import Sd15Config
from pipeline.bench.sd15 import bench_sd15, format_sd15_table, photographs, sampling_flops, stage_flops
from pipeline.bench.sd15_precision import TOLERANCES, precision_paths
from pipeline.bench.sd15_teacher import random_teacher
from sdit.errors import SDiTError
from sdit.teacher import SD15_CONFIG_DIR, check_shapes, expected_shapes, load_teacher

runner = CliRunner()
TINY = dict(resolution=64, students=("SDiT-Nano/2",), speed_students=("SDiT-Nano/2",), threads=1, speed_steps=2,
            repeats=2)


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory) -> Path:
    """A config folder of SD 1.5's layout describing the tiny teacher: what data/sd15 is at full size."""
    from sdit.tiny import build_tiny_components, save_configs

    folder = tmp_path_factory.mktemp("configs") / "tiny"
    save_configs(build_tiny_components(), folder)
    return folder


def test_the_random_teacher_is_built_once_in_both_layouts_with_the_same_weights(tiny_configs, tmp_path):
    made = random_teacher(tiny_configs, tmp_path / "cache", seed=3)
    folder = load_teacher(made.folder)
    single = load_teacher(made.single_file, config_dir=tiny_configs)
    assert folder.identity.hashes == single.identity.hashes  # the store's teacher check accepts either
    stamp = made.single_file.stat().st_mtime_ns
    time.sleep(0.01)
    assert random_teacher(tiny_configs, tmp_path / "cache", seed=3) == made
    assert made.single_file.stat().st_mtime_ns == stamp  # cached, not rebuilt
    other = load_teacher(random_teacher(tiny_configs, tmp_path / "cache", seed=4).folder)
    assert other.identity.hashes["unet"] != folder.identity.hashes["unet"]  # another seed rebuilds


def test_an_unfinished_cache_is_rebuilt(tiny_configs, tmp_path):
    made = random_teacher(tiny_configs, tmp_path / "cache")
    (made.folder.parent / "done.json").unlink()  # a folder of that name left unfinished
    made.single_file.write_bytes(b"torn")
    killed = made.folder.parent.with_name(made.folder.parent.name + ".building-999999999")  # a build killed half way
    killed.mkdir()
    assert load_teacher(random_teacher(tiny_configs, tmp_path / "cache").single_file, config_dir=tiny_configs).unet
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [made.folder.parent.name]


def test_photographs_are_distinct_real_views_at_least_the_resolution(tmp_path):
    import numpy as np
    from PIL import Image

    folder = photographs(tmp_path / "photos", 8, 512)
    images = [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.jpg"))]
    assert len(images) == 8 and all(min(i.shape[:2]) >= 512 and i.shape[2] == 3 for i in images)
    assert len({i.tobytes()[:4096] for i in images}) == 8
    assert all((folder / f"{k:04d}.txt").read_text() for k in range(8))


@pytest.mark.slow
def test_bench_sd15_reports_every_stage_at_tiny_size(tiny_configs, tmp_path):
    result = bench_sd15(Sd15Config(out=str(tmp_path / "bench"), config_dir=str(tiny_configs), **TINY))
    stages = {s["stage"].split(" ")[0] for s in result["stages"]}
    assert {"teacher", "encode", "teacher-label", "init", "sample", "eval", "speed:", "precision:"} <= stages
    for s in result["stages"]:
        assert s["seconds"] > 0 and s["peak_rss_mb"] > 100
    compute = [s for s in result["stages"] if s["stage"].split(" ")[0] in ("encode", "teacher-label", "init")]
    assert all(s["gflop"] > 0 and s["gflops"] > 0 for s in compute)
    encode, label = result["stages"][1]["outputs"], result["stages"][2]["outputs"]
    assert encode["latents"]["shape"] == [8, 4, 8, 8] and encode["text_emb"]["shape"] == [8, 77, 32]
    assert encode["latents"]["finite"] and encode["text_emb"]["finite"]
    assert label["eps_teacher"]["shape"] == [8, 2, 4, 8, 8] and label["eps_teacher"]["finite"]
    assert label["synthetic"]["latents"]["shape"] == [1, 4, 8, 8]
    # 16 draws + 4 guided forwards to sample the one prompt (DDIM, 2 steps) + its 2 draws
    assert label["teacher_forwards"] == 16 + 4 + 2
    trains = [s["outputs"] for s in result["stages"] if s["stage"].startswith("init + train")]
    assert [t["checkpointing"] for t in trains] == [False, True] and all(t["finite"] for t in trains)
    samples = [s["outputs"] for s in result["stages"] if s["stage"].startswith("sample")]
    assert [s["guidance"] for s in samples] == [7.5, 1.0] and all(s["image_shape"] == [64, 64, 3] for s in samples)
    speed = result["speed"]["models"]
    assert set(speed) == {"sd15_unet", "SDiT-Nano/2"} and speed["sd15_unet"]["speedup"] == 1.0
    for m in speed.values():  # the fastest of 2 timed rounds, each a whole 2-step run
        assert len(m["rounds_seconds"]) == 2 and m["seconds"] == min(m["rounds_seconds"]) > 0
        assert m["text_seconds"] + m["loop_seconds"] + m["decode_seconds"] <= m["seconds"]
        assert m["images_per_s"] == 1 / m["seconds"] and 0 <= m["attention_share"] < 1
    student = speed["SDiT-Nano/2"]
    assert student["speedup"] == speed["sd15_unet"]["seconds"] / student["seconds"]
    assert student["forwards_per_step"] == speed["sd15_unet"]["forwards_per_step"] == 2
    timed = next(s for s in result["stages"] if s["stage"].startswith("speed"))
    assert timed["outputs"]["compute_seconds"] == pytest.approx(sum(sum(m["rounds_seconds"]) for m in speed.values()))
    for s in compute:  # FLOP rates over compute seconds: loading and I/O left out
        assert 0 < s["outputs"]["compute_seconds"] < s["seconds"]
        assert s["gflops"] == pytest.approx(s["gflop"] / s["outputs"]["compute_seconds"])
    assert all(p["ok"] for p in result["precision"]["paths"].values())
    table = format_sd15_table(result)
    assert "whole sampling runs side by side" in table and "precision path" in table
    write_json(result, tmp_path / "b.json")
    assert json.loads((tmp_path / "b.json").read_text())["stages"][0]["stage"].startswith("teacher")


@pytest.mark.slow
def test_the_gpu_check_runs_on_cpu_at_tiny_size(tiny_configs, tmp_path):
    """`sdit bench sd15 --device cuda`'s throughput stage, on the CPU with tiny sizes: the same code."""
    config = Sd15Config(out=str(tmp_path / "bench"), config_dir=str(tiny_configs), **TINY)
    from pipeline.bench.sd15_throughput import format_throughput_table, throughput

    folder = random_teacher(tiny_configs, tmp_path / "cache").folder
    t = throughput(str(folder), tiny_configs, ("SDiT-Nano/2",), (64, 128), 4, {64: 4, 128: 2}, 1, "cpu")
    assert [(r["model"], r["resolution"]) for r in t["rows"]] == [
        ("sd15_unet labels", 64), ("sd15_unet labels", 128), ("SDiT-Nano/2", 64), ("SDiT-Nano/2", 128)]
    assert all(r["per_s"] > 0 and r["tflops"] > 0 and r["peak_gb"] > 0 for r in t["rows"])
    assert t["peak_tflops_matmul"] > 0 and t["peak_tflops_sheet"] is None and "labels/s" in format_throughput_table(t)
    assert "throughput" not in config.stages  # not on CPU by default


def test_the_gpu_profile_runs_every_preset_at_real_batch_sizes():
    gpu = Sd15Config.for_device("cuda", records=64)
    assert gpu.records == 64 and gpu.device == "cuda" and gpu.batch_size == 32
    assert gpu.throughput_presets == gpu.speed_students == ("SDiT-S/2", "SDiT-B/2", "SDiT-L/2", "SDiT-XL/2")
    assert "throughput" in gpu.stages and "precision" not in gpu.stages
    assert gpu.speed_steps == 25 and gpu.repeats == 3  # the ratios come from timed 25-step runs, fastest of 3
    assert gpu.throughput_resolutions == (256, 512) and len(gpu.train_batches) == 2
    gpu.check()
    assert Sd15Config.for_device("cpu") == Sd15Config(device="cpu")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here")
def test_bench_gpu_without_a_gpu_is_one_line(tmp_path):
    result = runner.invoke(app, ["bench", "sd15", "--device", "cuda", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "no CUDA device" in result.output and len(result.output.splitlines()) == 1


def test_precision_paths_agree_with_fp32_at_tiny_size(tiny_configs, tmp_path):
    folder = random_teacher(tiny_configs, tmp_path / "cache").folder
    paths = precision_paths(str(folder), tiny_configs, ("SDiT-Nano/2", "SDiT-S/2"), 8, 8, threads=1)
    assert set(paths) == {"teacher_fp16 (8x8 latents)", "teacher_bf16 (8x8 latents)",
                          "student_bf16_autocast SDiT-Nano/2", "student_bf16_autocast SDiT-S/2"}
    for name, p in paths.items():
        assert p["finite"], name
        assert 0 < p["relative_error"] <= TOLERANCES[name.split(" ")[0]], name  # not 0: the path really ran low


# --- bad input at full size: one line, before any work ------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--resolution", "500"], "the VAE divides images by 8; use a positive multiple of 8"),
    (["--resolution", "520"], "SDiT-S/2: its patch 2 does not divide the 65x65 latent grid of 520 px"),
    (["--resolution", "512", "--student", "SDiT-S/8", "--speed-student", "SDiT-B/2"], None),
])
def test_bench_sd15_refuses_sizes_it_cannot_run_in_one_line(args, message, tmp_path, monkeypatch):
    if message is None:  # 64 latents / patch 8 is fine: the check passes and the first stage would start
        Sd15Config(resolution=512, students=("SDiT-S/8",)).check()
        return
    result = runner.invoke(app, ["bench", "sd15", "--out", str(tmp_path / "b"), *args])
    assert result.exit_code == 2 and message in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "b").exists()  # refused before any work


@pytest.mark.parametrize("args, message", [
    (["--stage", "sample"], "--stage sample needs what --stage train makes: add it"),
    (["--stage", "train", "--stage", "encode"], "--stage train needs what --stage label makes: add it"),
    (["--stage", "timing"], "unknown stages ['timing']; choose from: encode, label, train"),
])
def test_bench_sd15_refuses_stages_without_what_they_need_in_one_line(args, message, tmp_path):
    result = runner.invoke(app, ["bench", "sd15", "--out", str(tmp_path / "b"), *args])
    assert result.exit_code == 2 and message in result.output and len(result.output.splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_the_speed_stage_counts_every_timed_run():
    """Hand count: per run, each image's text encodes (2 with guidance), steps x forwards and one decode."""
    flops = {"unet": 100.0, "SDiT-S/2": 10.0, "text_encoder": 3.0, "vae_decode": 50.0}
    speed = {"images": 2, "steps": 5, "repeats": 3, "models": {"sd15_unet": {"forwards_per_step": 2},
                                                               "SDiT-S/2": {"forwards_per_step": 1}}}
    teacher = 2 * (5 * 2 * 100 + 2 * 3 + 50)  # 2112
    student = 2 * (5 * 1 * 10 + 1 * 3 + 50)  # 206
    assert sampling_flops(speed, "sd15_unet", flops) == teacher and sampling_flops(speed, "SDiT-S/2", flops) == student
    assert stage_flops("speed", speed, flops) == 3 * (teacher + student)


def test_encode_refuses_a_resolution_the_vae_cannot_divide(tiny_single_file, tmp_path):
    result = runner.invoke(app, ["encode", str(tmp_path), "--teacher", str(tiny_single_file), "--out",
                                 str(tmp_path / "s"), "--resolution", "500"])
    assert result.exit_code == 2 and "--resolution 500: must be a positive multiple of 8" in result.output


def test_a_student_whose_patch_does_not_divide_sd15s_latents_is_refused(tiny_single_file, tmp_path):
    result = runner.invoke(app, ["init", "--teacher", str(tiny_single_file), "--student", "SDiT-S/2",
                                 "--sample-size", "65", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "sample_size 65 is not a multiple of patch_size 2" in result.output
    assert len(result.output.splitlines()) == 1


def test_a_single_file_that_does_not_fit_sd15s_configs_names_the_tensor(tiny_single_file, tmp_path):
    samples = Path(__file__).resolve().parents[2] / "data" / "samples"
    result = runner.invoke(app, ["encode", str(samples), "--teacher", str(tiny_single_file), "--out",
                                 str(tmp_path / "s")])
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1
    assert ("the vae weights do not fit" in result.output and "first_stage_model.encoder.conv_in.weight is "
            "[8, 3, 3, 3] in the file, [128, 3, 3, 3] there" in result.output)


def test_sd15_shapes_are_checked_before_any_tensor_is_read():
    expected = expected_shapes(SD15_CONFIG_DIR, ("unet", "vae", "text_encoder"))
    shapes = {k: v for part in expected.values() for k, v in part.items()}
    assert len(shapes) > 1000
    check_shapes(Path("sd15.safetensors"), SD15_CONFIG_DIR, expected, shapes)  # SD 1.5's own shapes pass
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    with pytest.raises(SDiTError, match=rf"the unet weights do not fit .*\({key} is \[640, 1280, 1, 1\] in the file"):
        check_shapes(Path("sd15.safetensors"), SD15_CONFIG_DIR, expected, shapes | {key: (640, 1280, 1, 1)})
    shapes.pop("cond_stage_model.transformer.text_model.final_layer_norm.weight")
    with pytest.raises(SDiTError, match="has no cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        check_shapes(Path("sd15.safetensors"), SD15_CONFIG_DIR, expected, shapes)


# --- the full-size path end to end ----------------------------------------------------------------------------


@pytest.mark.slow
def test_sd15_at_full_size_end_to_end(tmp_path):
    """SD 1.5's architecture (random weights) at 512 px: encode one photograph with the single file, label one
    draw with the diffusers folder, train SDiT-S/2 one step, sample one step."""
    config = Sd15Config(out=str(tmp_path / "bench"), records=1, draws=1, synthesize=0, students=("SDiT-S/2",),
                        checkpointing=(False,), train_steps=1, batch_size=1, sample_steps=1, sample_guidance=(7.5,),
                        stages=("encode", "label", "train", "sample"), threads=os.cpu_count())
    result = bench_sd15(config)
    stages = {s["stage"].split(" ")[0]: s["outputs"] for s in result["stages"]}
    assert stages["encode"]["latents"]["shape"] == [1, 4, 64, 64] and stages["encode"]["latents"]["finite"]
    assert stages["encode"]["text_emb"]["shape"] == [1, 77, 768] and stages["encode"]["text_emb"]["finite"]
    assert stages["teacher-label"]["eps_teacher"]["shape"] == [1, 1, 4, 64, 64]
    assert stages["teacher-label"]["eps_teacher"]["finite"] and stages["teacher-label"]["dropped"] == 0
    assert stages["init"]["steps"] == 1 and stages["init"]["finite"]
    assert stages["sample"]["image_shape"] == [512, 512, 3]
