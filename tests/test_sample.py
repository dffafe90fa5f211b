"""`sdit sample`: PNGs with their settings, the captioned grid, the teacher beside the student, errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.sample import SampleConfig, captioned_grid, sample
from sdit import sampling
from sdit.errors import SDiTError
from test_pipeline_sdit import make_run


@pytest.fixture(scope="module")
def run(tiny_teacher, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("sample") / "run", tiny_teacher)


def config(run, out, **options) -> SampleConfig:
    defaults = dict(run=str(run), out=str(out), prompts=("a red circle", "a blue square"), num_images=2, steps=3)
    return SampleConfig(**defaults | options)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_pngs_carry_their_settings_and_the_grid_its_captions(run, tmp_path):
    done = []
    summary = sample(config(run, tmp_path / "out", negative_prompt="blurry", seed=7, guidance=3.0),
                     progress=done.append)
    files = sorted((tmp_path / "out" / "student").glob("*.png"))
    assert [f.name for f in files] == ["0000.png", "0001.png", "0002.png", "0003.png"] and sum(done) == 4
    text = Image.open(files[2]).text
    assert text["prompt"] == "a blue square" and text["seed"] == "9" and text["negative_prompt"] == "blurry"
    assert (text["steps"], text["guidance"], text["scheduler"], text["model"]) == ("3", "3.0", "ddim", "student")
    assert (text["height"], text["width"]) == ("64", "64") and text["software"].startswith("sdit ")
    grid = Image.open(summary.grid)
    assert grid.width > 4 * 64 and grid.height > 64 and not (tmp_path / "out" / "teacher").exists()
    assert "4 images" in summary.line()


def test_image_i_does_not_depend_on_the_batch_size(run, tmp_path):
    sample(config(run, tmp_path / "b1", batch_size=1))
    sample(config(run, tmp_path / "b4", batch_size=4))
    for i in range(4):
        a, b = (pixels(tmp_path / f / "student" / f"{i:04d}.png") for f in ("b1", "b4"))
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3  # float rounding only (test_pipeline_sdit)


@pytest.mark.slow
def test_compare_teacher_feeds_both_the_same_noise_scheduler_and_steps(run, tiny_teacher, tmp_path, monkeypatch):
    calls, denoise = [], sampling.denoise

    def spy(eps_model, scheduler, noise, text, null, steps, guidance, progress=None):
        calls.append((noise.clone(), type(scheduler).__name__, steps, guidance))
        return denoise(eps_model, scheduler, noise, text, null, steps, guidance, progress)

    monkeypatch.setattr(sampling, "denoise", spy)
    summary = sample(config(run, tmp_path / "out", scheduler="euler", batch_size=3, compare_teacher=str(tiny_teacher)))
    assert len(calls) == 4  # two batches (3 + 1 images), student then teacher
    for student, teacher in (calls[0:2], calls[2:4]):
        assert torch.equal(student[0], teacher[0])
        assert student[1:] == teacher[1:] == ("EulerDiscreteScheduler", 3, 7.5)
    assert not torch.equal(calls[0][0][0], calls[0][0][1])
    student, teacher = (tmp_path / "out" / m / "0003.png" for m in ("student", "teacher"))
    assert Image.open(teacher).text["model"] == "teacher" and Image.open(teacher).text["seed"] == "3"
    assert not np.array_equal(pixels(student), pixels(teacher))
    solo = Image.open(sample(config(run, tmp_path / "solo")).grid)
    assert Image.open(summary.grid).height > solo.height  # a teacher row under each student row


def test_grid_layout():
    images = {m: [np.full((64, 64, 3), v, np.uint8) for v in range(5)] for m in ("student", "teacher")}
    grid = captioned_grid(images, ["a long caption that must wrap over lines"] * 5, columns=3)
    solo = captioned_grid({"student": images["student"]}, ["x"] * 5, columns=3)
    assert grid.width > solo.width  # row labels
    assert grid.height > solo.height  # two rows a band


def test_prompts_file(run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a green star  \n")
    sample(config(run, tmp_path / "out", prompts=(), prompts_file=str(prompts), num_images=1))
    texts = [Image.open(tmp_path / "out" / "student" / f"000{i}.png").text["prompt"] for i in range(2)]
    assert texts == ["a red circle", "a green star"]


@pytest.mark.parametrize("options, message", [
    (dict(run="MISSING"), "run folder not found"),
    (dict(run="TEACHER"), "holds a StableDiffusionPipeline, not an SDiTPipeline"),
    (dict(prompts=(), prompts_file="EMPTY"), "has no prompts"),
    (dict(prompts=()), "no prompts"),
    (dict(height=100), "height 100 does not fit this student: use a positive multiple of 16"),
    (dict(width=24), "width 24 does not fit"),
    (dict(scheduler="heun"), "--scheduler 'heun'"),
    (dict(steps=0), "--steps must be at least 1"),
])
def test_errors(run, tiny_teacher, tmp_path, options, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    names = {"MISSING": str(tmp_path / "nope"), "TEACHER": str(tiny_teacher), "EMPTY": str(empty)}
    options = {k: names.get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    with pytest.raises(SDiTError, match=message):
        sample(config(options.pop("run", run), tmp_path / "out", **options))
    assert not (tmp_path / "out" / "grid.png").exists()


def test_bench_sample_reports_speed_and_flops(tiny_teacher):
    from pipeline.bench.sample import BenchSampleConfig, bench_sample, format_sample_table

    result = bench_sample(BenchSampleConfig(teacher=str(tiny_teacher), student="SDiT-Nano/2", images=2, steps=2,
                                            repeats=1, presets=("SDiT-S/2",)))
    assert result["student_images_per_s"] > 0 and result["teacher_images_per_s"] > 0
    flops, distilled = result["flops_per_step"], result["flops_per_step_distilled"]
    assert set(flops) == {"SDiT-S/2", "sd15_unet"} and set(distilled) == {"SDiT-S/2"}
    assert 1.9 < flops["SDiT-S/2"] / distilled["SDiT-S/2"] < 2.0  # two forwards; w's embedder costs a little
    assert flops["sd15_unet"] > 1e12  # SD 1.5's UNet at 64x64, twice a step
    assert result["run_flops_per_step"]["student"] > 0 and result["resolution"] == [64, 64]
    assert "images/s" in format_sample_table(result) and "sd15_unet" in format_sample_table(result)


@pytest.mark.slow
def test_the_commands(run, tiny_teacher, tmp_path):
    import json

    from typer.testing import CliRunner

    from cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["sample", str(run), "--prompt", "a red circle", "-p", "a blue square", "--out",
                                 str(tmp_path / "out"), "--steps", "2", "--per-prompt", "2", "--scheduler", "dpm++",
                                 "--compare-teacher", str(tiny_teacher)])
    assert result.exit_code == 0, result.output
    assert "wrote 4 images beside the teacher's" in result.output
    assert Image.open(tmp_path / "out" / "teacher" / "0003.png").text["scheduler"] == "dpm++"
    out = ["-o", str(tmp_path / "o")]
    for args, message in [(["sample", str(tmp_path / "nope"), "-p", "x", *out], "run folder not found"),
                          (["sample", str(run), *out], "no prompts"),
                          (["sample", str(run), "-p", "x", *out, "--width", "72"], "multiple of 16")]:
        result = runner.invoke(app, args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    result = runner.invoke(app, ["bench", "sample", "--teacher", str(tiny_teacher), "-s", "SDiT-Nano/2", "--images",
                                 "1", "--steps", "1", "--preset", "SDiT-S/2", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "b.json").read_text())
    assert {"student_images_per_s", "teacher_images_per_s", "flops_per_step"} <= set(figures)
    assert set(figures["flops_per_step"]) == {"SDiT-S/2", "sd15_unet"}
