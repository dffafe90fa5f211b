"""The precision check of `sdit bench sd15`: each reduced-precision path (the teacher's UNet in fp16 and bf16, each
student under bf16 autocast) against fp32 on the same inputs."""

from __future__ import annotations

import json
import time
from pathlib import Path

from sdit.config import vae_factor

# --- precision paths --------------------------------------------------------------------------------------------

# Relative RMS error, |ε_low − ε_fp32| / |ε_fp32|, allowed for each reduced-precision path. fp16 keeps 11 bits of
# mantissa, bf16 8: a deep network's outputs move by about their unit roundoff times a small factor.
TOLERANCES = {"teacher_fp16": 1e-2, "teacher_bf16": 5e-2, "student_bf16_autocast": 5e-2}


def relative_error(low, high) -> float:
    high = high.float()
    return float((low.float() - high).norm() / high.norm().clamp_min(1e-12))


def precision_paths(folder: str, config_dir: Path, presets: tuple[str, ...], latent: int, fp16_latent: int,
                    threads: int | None = None) -> dict:
    """Each reduced-precision path against fp32 on the same inputs, on the CPU: the teacher's UNet loaded in fp16
    (at `fp16_latent`: this CPU has no fp16 kernels and runs them about 100x slower than fp32) and in bf16, and each
    student's forward under bf16 autocast (`trained_like`). Returns per path: the relative RMS error, whether the
    low-precision output is finite, both times, and whether it is within `TOLERANCES`."""
    import torch

    from sdit.dit import build_student
    from sdit.teacher import load_teacher

    if threads:
        torch.set_num_threads(threads)
    factor, channels = vae_factor(config_dir)
    g = torch.Generator().manual_seed(0)
    text_dim = json.loads((config_dir / "text_encoder" / "config.json").read_text())["hidden_size"]
    results = {}

    def compare(name: str, run_low, run_high, inputs) -> None:
        t0 = time.perf_counter()
        high = run_high(*inputs)
        t1 = time.perf_counter()
        low = run_low(*inputs)
        t2 = time.perf_counter()
        err = relative_error(low, high)
        results[name] = {"relative_error": err, "finite": bool(torch.isfinite(low).all()), "fp32_seconds": t1 - t0,
                         "low_seconds": t2 - t1, "tolerance": TOLERANCES[name.split(" ")[0]],
                         "ok": bool(torch.isfinite(low).all()) and err <= TOLERANCES[name.split(" ")[0]]}

    def unet_inputs(side: int):
        return (torch.randn(1, channels, side, side, generator=g), torch.tensor([500]),
                torch.randn(1, 77, text_dim, generator=g))

    with torch.no_grad():
        unet32 = load_teacher(folder, components=("unet",)).unet
        for dtype, side in ((torch.float16, fp16_latent), (torch.bfloat16, latent)):
            low = load_teacher(folder, components=("unet",), dtype=dtype).unet
            compare(f"teacher_{'fp16' if dtype == torch.float16 else 'bf16'} ({side}x{side} latents)",
                    lambda x, t, c, m=low, d=dtype: m(x.to(d), t, encoder_hidden_states=c.to(d)).sample,
                    lambda x, t, c, m=unet32: m(x, t, encoder_hidden_states=c).sample, unet_inputs(side))
            del low
        del unet32
        for preset in presets:
            torch.manual_seed(0)
            student = build_student(preset, sample_size=latent, in_channels=channels, text_dim=text_dim).eval()
            trained_like(student)

            def autocast(x, t, c, m=student):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return m(x, t, c)

            compare(f"student_bf16_autocast {preset}", autocast, lambda x, t, c, m=student: m(x, t, c),
                    unet_inputs(latent))
            del student
    return results


def trained_like(student) -> None:
    """Random weights where a fresh student has zeros (each block's adaLN-Zero modulation, the final layer), so
    that every block acts and ε is not 0: what a precision check needs."""
    import torch

    for layer in [b.adaLN_modulation[-1] for b in student.blocks] + [student.final_layer.adaLN_modulation[-1],
                                                                      student.final_layer.linear]:
        torch.nn.init.normal_(layer.weight, std=0.02)
