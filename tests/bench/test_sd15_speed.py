"""The sampling speed of bench sd15: whole runs, warm-up untimed, models taking turns, profiling apart."""

import pytest

from pipeline.bench.config import Sd15Config
from pipeline.bench.sd15_speed import sampling_speed


@pytest.mark.slow
def test_each_model_warms_up_then_runs_whole_in_alternating_rounds(tiny_teacher, tmp_path, monkeypatch):
    import sdit.sampling

    calls = []  # (model, steps, guided) of each denoising loop, in order
    real = sdit.sampling.denoise

    def counted(eps, scheduler, noise, text, null, steps, guidance, progress=None):
        calls.append((eps.__qualname__.split("_")[0], steps, null is not None))
        return real(eps, scheduler, noise, text, null, steps, guidance, progress)

    decodes = []
    real_decode = sdit.sampling.decode
    monkeypatch.setattr(sdit.sampling, "denoise", counted)
    monkeypatch.setattr(sdit.sampling, "decode", lambda vae, latents: decodes.append(1) or real_decode(vae, latents))
    config = Sd15Config(config_dir=str(tiny_teacher), resolution=64, speed_students=("SDiT-Nano/2",), speed_steps=3,
                        repeats=2, warmup_steps=1, speed_images=2, threads=1, device="cpu")
    result = sampling_speed(str(tiny_teacher), {"SDiT-Nano/2": str(tmp_path / "run")}, config)
    # teacher and student: one warm-up run of 1 step each, then 2 rounds of 3 steps taking turns, then the
    # profiled one-step pass of each; every loop guided (text and empty caption)
    turns = [("teacher", 1, True), ("student", 1, True)]
    assert calls == turns + [("teacher", 3, True), ("student", 3, True)] * 2 + turns
    assert len(decodes) == 2 + 4  # the warm-up and timed runs are whole runs; the profiled pass is a loop alone
    models = result["models"]
    assert list(models) == ["sd15_unet", "SDiT-Nano/2"] and result["steps"] == 3 and result["repeats"] == 2
    for m in models.values():
        assert len(m["rounds_seconds"]) == 2 and m["seconds"] == min(m["rounds_seconds"])
        assert m["median_seconds"] == sum(m["rounds_seconds"]) / 2 and m["images_per_s"] == 2 / m["seconds"]
        assert m["step_seconds"] == m["loop_seconds"] / 3 and 0 < m["attention_share"] < 1
    assert models["SDiT-Nano/2"]["loop_speedup"] == models["sd15_unet"]["loop_seconds"] / models["SDiT-Nano/2"][
        "loop_seconds"]
    assert result["compute_seconds"] == pytest.approx(sum(sum(m["rounds_seconds"]) for m in models.values()))
