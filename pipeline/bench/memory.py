"""`sdit bench memory`: the peak memory of one training step of each student at SD 1.5's size (512 px: 64x64
latents, 77x768 text), per batch and with or without gradient checkpointing, and the batch that would fit a GPU.

Each (preset, batch, checkpointing) runs in a child process that builds the student and its EMA copy as `sdit
train` does (`pipeline.train.make_state`: AdamW, fp32), notes its resident memory, resets the kernel's high-water
mark (`/proc/self/clear_refs`), and runs one step on random inputs: forward, loss, backward, clipping, AdamW, EMA.
It reports the high-water mark above the resident memory before the step, during forward+backward (activations
and gradients) and over the whole step (then AdamW's two moments join the gradients). A configuration whose peak
the ones already measured predict above `max_rss_gb`, or whose step would take longer than `max_step_seconds`, is
not run; its figures are extrapolated linearly in the batch from the two largest measured batches of the same
preset and mode (marked so). A preset whose weights, EMA copy, gradients and AdamW moments alone (20 bytes a
parameter) exceed `max_rss_gb` is not run at all (L/2 and XL/2 on a 12 GiB budget): its activations per sample
are scaled from the last measured preset of the same mode by depth × width, since at a fixed token count a
block saves activations in proportion to its width (marked "scaled").

The GPU table: the step needs 20 bytes per parameter that do not depend on the batch (fp32 weights, EMA copy,
gradients, AdamW's two moments) plus the activations, b x (per-sample activation memory) + the measured
intercept, plus `CUDA_OVERHEAD_GB` for the CUDA context and allocator slack. Activations are measured in fp32 on
the CPU; bf16 autocast keeps most of them in bf16 on a GPU, so the batches are a lower bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from pipeline.bench.config import MemoryConfig
from sdit.errors import SDiTError
from sdit.flops import TRAIN_STEP_FORWARDS

BYTES_PER_PARAM = 20  # weights 4 + EMA 4 + gradients 4 + AdamW moments 8, all fp32
GRAD_BYTES = 4  # what forward+backward holds beyond activations: the fp32 gradients
CUDA_OVERHEAD_GB = 1.5  # CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation
GPU_SIZES_GB = (24, 40, 80)
GIB = 2**30


def bench_memory(config: MemoryConfig, on_result=None) -> dict:
    from sdit.flops import student_flops

    config.check()
    rows, rate = [], None  # rate: FLOP/s of the last measured step, to predict the next one's time
    parameters = {preset: _parameters(preset, config) for preset in config.presets}
    too_large = [p for p in config.presets if BYTES_PER_PARAM * parameters[p] / GIB > config.max_rss_gb]
    for preset in config.presets:
        if preset in too_large:
            continue
        flops = student_flops(preset, sample_size=config.sample_size, text_dim=config.text_dim, tokens=config.tokens)
        for checkpointing in config.checkpointing:
            measured = []
            for batch in sorted(config.batches):
                step_flops = batch * flops * (TRAIN_STEP_FORWARDS + checkpointing)
                predicted = _predict(measured, batch)
                slow = rate is not None and step_flops / rate > config.max_step_seconds
                slow = slow or batch > (config.max_batch or {}).get(preset, batch)
                too_big = (predicted is not None
                           and predicted["rss_before_gb"] + predicted["step_gb"] > config.max_rss_gb)
                if predicted is not None and (too_big or slow):
                    row = predicted | {"measured": False, "why": "memory" if not slow else "time"}
                else:
                    row = _child(preset, batch, checkpointing, config) | {"measured": True}
                    rate = step_flops / row["seconds"]
                    measured.append(row)
                row |= {"preset": preset, "batch": batch, "checkpointing": checkpointing}
                rows.append(row)
                if on_result:
                    on_result(row)
    fits = per_sample(rows) | scaled_per_sample(per_sample(rows), too_large, config)
    return {"rows": rows, "per_sample": fits, "gpu_batches": gpu_batches(fits, parameters), "parameters": parameters,
            "bytes_per_param": BYTES_PER_PARAM, "cuda_overhead_gb": CUDA_OVERHEAD_GB, "config": asdict(config)}


def _parameters(preset: str, config: MemoryConfig) -> int:
    """The student's parameter count, built on the meta device (no memory, no time)."""
    import torch

    from sdit.dit import build_student, count_parameters

    with torch.device("meta"):
        student = build_student(preset, sample_size=config.sample_size, in_channels=4, text_dim=config.text_dim)
    return count_parameters(student)["total"]


def scaled_per_sample(fits: dict, presets: list[str], config: MemoryConfig) -> dict:
    """Activations per sample of presets too large to run, from the last measured preset of the same mode,
    times the ratio of depth × width."""
    from sdit.dit import PRESETS

    out = {}
    for preset in presets:
        for checkpointing in config.checkpointing:
            suffix = " ckpt" if checkpointing else ""
            measured = [p for p in config.presets if p + suffix in fits]
            if not measured:
                continue
            ref, big = PRESETS[measured[-1]], PRESETS[preset]
            ratio = big.depth * big.hidden_size / (ref.depth * ref.hidden_size)
            out[preset + suffix] = {"per_sample_gb": fits[measured[-1] + suffix]["per_sample_gb"] * ratio,
                                    "intercept_gb": 0.0, "points": 0, "scaled_from": measured[-1]}
    return out


def _predict(measured: list[dict], batch: int) -> dict | None:
    """Linear in the batch through the two largest measured batches; from one, through it and the gradients
    alone (4 bytes a parameter: what forward+backward holds at batch 0); None from none."""
    if not measured:
        return None
    b = measured[-1]
    out = {"parameters": b["parameters"], "rss_before_gb": b["rss_before_gb"]}
    for key in ("fwd_bwd_gb", "step_gb"):
        if len(measured) >= 2:
            a = measured[-2]
            slope = (b[key] - a[key]) / (b["batch"] - a["batch"])
        else:
            slope = (b["fwd_bwd_gb"] - GRAD_BYTES * b["parameters"] / GIB) / b["batch"]
        out[key] = b[key] + slope * (batch - b["batch"])
    out["step_gb"] = max(out["step_gb"], out["fwd_bwd_gb"])  # the step's peak is forward+backward's or AdamW's
    return out


def per_sample(rows: list[dict]) -> dict:
    """GB of activations per sample and the intercept, per preset and mode, from the measured rows: through the
    smallest and largest measured batch, or with one, through it and the gradients alone (see `_predict`)."""
    out = {}
    for key in dict.fromkeys((r["preset"], r["checkpointing"]) for r in rows):
        measured = sorted((r for r in rows if (r["preset"], r["checkpointing"]) == key and r["measured"]),
                          key=lambda r: r["batch"])
        if not measured:
            continue
        lo, hi = measured[0], measured[-1]
        if len(measured) >= 2:
            slope = (hi["fwd_bwd_gb"] - lo["fwd_bwd_gb"]) / (hi["batch"] - lo["batch"])
        else:
            slope = (hi["fwd_bwd_gb"] - GRAD_BYTES * hi["parameters"] / GIB) / hi["batch"]
        out[f"{key[0]}{' ckpt' if key[1] else ''}"] = {"per_sample_gb": slope,
                                                       "intercept_gb": lo["fwd_bwd_gb"] - slope * lo["batch"],
                                                       "points": len(measured)}
    return out


def gpu_batches(fits: dict, params: dict[str, int]) -> dict:
    """The largest per-GPU batch for each GPU size: (size − 20 B/param − CUDA overhead − intercept) / per sample."""
    out = {}
    for name, fit in fits.items():
        preset = name.split()[0]
        # the intercept is mostly the gradients, already in BYTES_PER_PARAM
        extra = max(fit["intercept_gb"] - GRAD_BYTES * params[preset] / GIB, 0)
        fixed = BYTES_PER_PARAM * params[preset] / GIB + CUDA_OVERHEAD_GB + extra
        out[name] = {str(g): max(int((g * 1e9 / GIB - fixed) // fit["per_sample_gb"]), 0) for g in GPU_SIZES_GB}
    return out


def format_memory_table(result: dict) -> str:
    lines = ["peak memory above the model's weights and EMA copy, one training step at 512 px (fp32, CPU RSS):",
             f"{'student':<12}{'ckpt':>5}{'batch':>6}{'fwd+bwd GB':>12}{'step GB':>10}{'seconds':>9}  how"]
    for r in result["rows"]:
        how = r.get("how", "measured") if r["measured"] else f"extrapolated ({r['why']})"
        seconds = f"{r['seconds']:>9.1f}" if r.get("seconds") else f"{'-':>9}"
        lines.append(f"{r['preset']:<12}{'yes' if r['checkpointing'] else 'no':>5}{r['batch']:>6}"
                     f"{r['fwd_bwd_gb']:>12.2f}{r['step_gb']:>10.2f}{seconds}  {how}")
    lines += ["", f"per-GPU batch ({BYTES_PER_PARAM} B/param + {CUDA_OVERHEAD_GB} GB + activations):",
              f"{'student':<16}{'GB/sample':>10}" + "".join(f"{str(g) + ' GB':>8}" for g in GPU_SIZES_GB)]
    for name, batches in result["gpu_batches"].items():
        fit = result["per_sample"][name]
        how = f"  scaled from {fit['scaled_from']}" if "scaled_from" in fit else ""
        lines.append(f"{name:<16}{fit['per_sample_gb']:>10.2f}" + "".join(f"{batches[str(g)]:>8}" for g in GPU_SIZES_GB)
                     + how)
    return "\n".join(lines)


def _child(preset: str, batch: int, checkpointing: bool, config: MemoryConfig) -> dict:
    args = {"preset": preset, "batch": batch, "checkpointing": checkpointing, "config": asdict(config)}
    proc = subprocess.run([sys.executable, "-m", "pipeline.bench.memory", json.dumps(args)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[2])
    if proc.returncode:
        lines = proc.stderr.strip().splitlines()
        raise SDiTError(f"bench memory: {preset} at batch {batch} failed: {lines[-1] if lines else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- in the child ----------------------------------------------------------------------------------------------


def _status_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GIB
    raise SDiTError(f"/proc/self/status has no {field}: peak memory is measured on Linux only")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def measure_step(preset: str, batch: int, checkpointing: bool, c: MemoryConfig) -> dict:
    import torch

    from pipeline.train import TrainConfig, Workers, make_state
    from sdit.dit import build_student, count_parameters
    from sdit.training import update_ema

    torch.set_num_threads(c.threads or os.cpu_count())
    torch.manual_seed(0)
    student = build_student(preset, sample_size=c.sample_size, in_channels=4, text_dim=c.text_dim)
    config = TrainConfig(store="-", out="-", gradient_checkpointing=checkpointing)
    state = make_state(student, config, torch.device("cpu"), Workers())
    x = torch.randn(batch, 4, c.sample_size, c.sample_size)
    t = torch.randint(0, 1000, (batch,))
    text = torch.randn(batch, c.tokens, c.text_dim)
    noise = torch.randn_like(x)
    before = _status_gb("VmRSS")
    _reset_peak()
    started = time.perf_counter()
    loss = torch.nn.functional.mse_loss(state.model(x, t, text), noise)
    loss.backward()
    fwd_bwd = _status_gb("VmHWM") - before
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), 1.0)
    state.optimizer.step()
    update_ema(state.ema, state.model, 0.999)
    seconds = time.perf_counter() - started
    return {"parameters": count_parameters(student)["total"], "rss_before_gb": before, "fwd_bwd_gb": fwd_bwd,
            "step_gb": _status_gb("VmHWM") - before, "seconds": seconds, "loss": float(loss),
            "batch": batch}


if __name__ == "__main__":
    a = json.loads(sys.argv[1])
    cfg = MemoryConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in a["config"].items()})
    print(json.dumps(measure_step(a["preset"], a["batch"], a["checkpointing"], cfg)))
