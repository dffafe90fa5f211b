"""Throughput at real batch sizes for `sdit bench sd15` (the GPU check): labels/s of the teacher's UNet and training
steps/s of each preset, with peak memory and TFLOP/s against the device's peak."""

from __future__ import annotations

import json
import resource
from pathlib import Path

from pipeline.bench.timing import timed
from sdit.config import vae_factor

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s (a multiply-add = 2), by the
# exact name torch.cuda.get_device_name reports. The sheets print the sparse figure, twice these.
GPU_PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,  # H100 SXM5
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H200": 989.0,  # H200 SXM
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA L40S": 362.0,
}


def sheet_peak(name: str) -> float | None:
    """The data sheet's dense bf16 peak of the device torch names `name`, TFLOP/s; None for a name not in the
    table (a variant's name is never guessed from another's)."""
    return GPU_PEAK_TFLOPS.get(name)


def peak_tflops(device) -> tuple[float | None, float]:
    """(the data sheet's dense bf16 peak, or None when the device is not in the table; a bf16 matmul measured
    here), TFLOP/s."""
    import torch

    from pipeline.bench import matmul_gflops

    sheet = sheet_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    n = 8192 if device.type == "cuda" else 1024
    return sheet, matmul_gflops(device, n, dtype=torch.bfloat16) / 1000


def throughput(folder: str, config_dir: Path, presets: tuple[str, ...], resolutions: tuple[int, ...],
               label_batch: int, train_batch: dict[int, int], steps: int, device_name: str) -> dict:
    """Labels/s (the teacher's UNet forward in the labelling dtype, fp16 on GPU) and training steps/s (bf16
    autocast, AdamW, EMA, as `sdit train` on GPU) of each preset at each resolution, with peak memory and
    TFLOP/s. A batch that runs out of GPU memory is halved until it fits (and said so)."""
    import torch

    from pipeline.train import TrainConfig, Trainer, Workers, make_state
    from sdit.devices import resolve_device, resolve_dtype
    from sdit.diffusion import NoiseSchedule
    from sdit.dit import build_student
    from sdit.flops import TRAIN_STEP_FORWARDS, student_flops, unet_flops
    from sdit.teacher import load_teacher

    device = resolve_device(device_name)
    dtype = resolve_dtype("auto", device) if device.type == "cuda" else torch.bfloat16
    factor, channels = vae_factor(config_dir)
    text_dim = json.loads((config_dir / "text_encoder" / "config.json").read_text())["hidden_size"]
    sheet, matmul = peak_tflops(device)
    schedule = NoiseSchedule.from_config(json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text()))

    def measure(step, batch: int) -> tuple[float, float]:
        """(seconds per call after 2 warm-up calls, peak GB)"""
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            step(batch)
        seconds = timed(lambda: [step(batch) for _ in range(steps)], device)[1] / steps
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
        return seconds, peak

    def fitting(step, batch: int) -> dict:
        while True:
            try:
                seconds, peak = measure(step, batch)
                return {"batch": batch, "seconds": seconds, "peak_gb": peak}
            except torch.cuda.OutOfMemoryError:
                if batch == 1:
                    return {"batch": 0, "seconds": None, "peak_gb": None, "oom": True}
                batch //= 2

    rows = []
    unet = load_teacher(folder, components=("unet",), device=device, dtype=dtype).unet
    for res in resolutions:
        latent = res // factor

        @torch.no_grad()
        def label_step(b: int, unet=unet, latent=latent) -> None:
            x = torch.randn(b, channels, latent, latent, device=device, dtype=dtype)
            unet(x, torch.randint(0, 1000, (b,), device=device),
                 encoder_hidden_states=torch.randn(b, 77, text_dim, device=device, dtype=dtype))

        r = fitting(label_step, label_batch)
        flops = unet_flops(config_dir, sample_size=latent)
        rows.append(r | {"model": "sd15_unet labels", "resolution": res, "per_s": r["batch"] / r["seconds"]
                         if r["seconds"] else None, "tflops": flops * r["batch"] / r["seconds"] / 1e12
                         if r["seconds"] else None})
    del unet
    for preset in presets:
        for res in resolutions:
            latent = res // factor
            torch.manual_seed(0)
            student = build_student(preset, sample_size=latent, in_channels=channels, text_dim=text_dim)
            # `sdit train`'s own step (bf16 autocast, the loss with its high-noise weight, AdamW, clipping, EMA) on
            # random draws of this size, copied to the device each step as the loader's batches are
            config = TrainConfig(store="-", out="-", precision="bf16", high_noise_weight=5.0)
            trainer = Trainer(config, make_state(student, config, device, Workers()), device, schedule=schedule,
                              guided=False)

            def train_step(b: int, trainer=trainer, latent=latent) -> None:
                trainer.step(random_batch(b, channels, latent, text_dim))

            r = fitting(train_step, train_batch[res])
            flops = TRAIN_STEP_FORWARDS * student_flops(preset, sample_size=latent, in_channels=channels,
                                                        text_dim=text_dim)
            rows.append(r | {"model": preset, "resolution": res, "per_s": 1 / r["seconds"] if r["seconds"] else None,
                             "tflops": flops * r["batch"] / r["seconds"] / 1e12 if r["seconds"] else None})
            del trainer, student
    return {"rows": rows, "peak_tflops_sheet": sheet, "peak_tflops_matmul": matmul,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "teacher_dtype": str(dtype).removeprefix("torch.")}


def random_batch(b: int, channels: int, latent: int, text_dim: int):
    """A batch of `b` draws as the loader makes them (float32 inputs, float16 text and targets), random values."""
    import torch

    from sdit.loader import Batch

    return Batch(x_t=torch.randn(b, channels, latent, latent), text=torch.randn(b, 77, text_dim).half(),
                 timesteps=torch.randint(0, 1000, (b,)), guidance=torch.zeros(b), kind=torch.zeros(b, dtype=torch.long),
                 noise=torch.randn(b, channels, latent, latent).half(),
                 eps_teacher=torch.randn(b, channels, latent, latent).half(),
                 synthetic=torch.zeros(b, dtype=torch.bool))


def format_throughput_table(t: dict) -> str:
    sheet, matmul = t["peak_tflops_sheet"], t["peak_tflops_matmul"]
    lines = [f"throughput on {t['device']}: bf16 matmul {matmul:.1f} TFLOP/s measured, data sheet's dense bf16 "
             f"{'-' if sheet is None else f'{sheet:g}'} TFLOP/s; labels in {t['teacher_dtype']}, training in bf16 "
             f"autocast; TFLOP/s over the timed calls only",
             f"{'model':<20}{'px':>5}{'batch':>6}{'per s':>10}{'peak GB':>9}{'TFLOP/s':>9}{'of matmul':>10}"
             f"{'of peak':>9}"]
    for r in t["rows"]:
        what = "labels/s" if "labels" in r["model"] else "steps/s"
        if r["seconds"] is None:
            lines.append(f"{r['model']:<20}{r['resolution']:>5}  out of memory at batch 1")
            continue
        of_peak = f"{r['tflops'] / sheet:>9.1%}" if sheet else f"{'-':>9}"
        lines.append(f"{r['model']:<20}{r['resolution']:>5}{r['batch']:>6}{r['per_s']:>10.2f}{r['peak_gb']:>9.1f}"
                     f"{r['tflops']:>9.2f}{r['tflops'] / matmul:>10.1%}{of_peak}  {what}")
    return "\n".join(lines)
