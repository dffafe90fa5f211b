"""`sdit bench encode`: what the encode stage costs beyond the models it runs, and whether its memory
stays flat as the dataset grows.

Each dataset size runs in a child process (so its peak RSS is its own). The child times the whole stage
from the moment its work starts (teacher loaded, store created) to the finished manifest, then times the
bare VAE + text-encoder forward on the same records in the same batches, decoded beforehand; three
times over, alternately, keeping the best of each.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sdit.errors import SDiTError


@dataclass(frozen=True)
class BenchEncodeConfig:
    source: str | None = None  # default: `images * 2` generated images
    teacher: str | None = None  # default: a tiny random SD-shaped teacher
    teacher_config: str | None = None
    images: int = 1024  # the small run; the large run encodes twice as many
    resolution: int = 128  # at 64 px the tiny VAE's forward costs less than decoding a PNG
    batch_size: int = 32
    shard_size: int = 512
    device: str = "auto"
    dtype: str = "auto"


def bench_encode(config: BenchEncodeConfig) -> dict:
    with tempfile.TemporaryDirectory(prefix="sdit-bench-") as tmp:
        tmp = Path(tmp)
        source = config.source or str(generate_images(tmp / "images", 2 * config.images, config.resolution))
        teacher = config.teacher or tiny_teacher(tmp)
        runs = [_child(config, source, teacher, limit, tmp / f"store-{limit}")
                for limit in (config.images, 2 * config.images)]
    small, large = runs
    return {
        "stage_records_per_s": large["stage_records_per_s"],
        "bare_records_per_s": large["bare_records_per_s"],
        "ratio": large["stage_records_per_s"] / large["bare_records_per_s"],
        "peak_rss_mb": [small["peak_rss_mb"], large["peak_rss_mb"]],
        "records": [small["records"], large["records"]],
        "rss_growth": large["peak_rss_mb"] / small["peak_rss_mb"] - 1,
        "config": asdict(config),
    }


def tiny_teacher(folder: Path) -> str:
    """The benchmarks' default teacher: a tiny random SD-shaped one, written to `folder`/teacher."""
    from sdit.tiny import save_tiny_teacher

    return str(save_tiny_teacher(folder / "teacher"))


def encoded_store(folder: Path, teacher: str, images: int, resolution: int, teacher_config: str | None = None,
                  device: str = "auto", dtype: str = "auto") -> str:
    """The benchmarks' default store: `images` generated images encoded with `teacher` into `folder`/store."""
    from pipeline.encode import EncodeConfig, encode

    store = str(folder / "store")
    encode(EncodeConfig(source=str(generate_images(folder / "images", images, resolution)), teacher=teacher, out=store,
                        teacher_config=teacher_config, resolution=resolution, device=device, dtype=dtype))
    return store


def format_table(result: dict) -> str:
    n_small, n_large = result["records"]
    rss_small, rss_large = result["peak_rss_mb"]
    return "\n".join([
        f"{'stage (read, decode, encode, write)':<40}{result['stage_records_per_s']:>10.1f} records/s",
        f"{'bare VAE + text encoder forward':<40}{result['bare_records_per_s']:>10.1f} records/s",
        f"{'stage / bare':<40}{result['ratio']:>10.3f}",
        f"{'peak RSS, ' + str(n_small) + ' records':<40}{rss_small:>10.0f} MB",
        f"{'peak RSS, ' + str(n_large) + ' records':<40}{rss_large:>10.0f} MB  ({result['rss_growth']:+.1%})",
    ])


def write_json(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def generate_images(folder: Path, n: int, resolution: int, seed: int = 0) -> Path:
    """n PNG images of coloured ellipses and boxes with captions: cheap to decode, like real thumbnails."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
    names = list(colours)
    for i in range(n):
        colour = names[rng.integers(len(names))]
        shape = ("circle", "square")[rng.integers(2)]
        img = Image.new("RGB", (resolution, resolution), (245, 245, 245))
        x0, y0 = rng.integers(0, resolution // 2, size=2)
        box = (int(x0), int(y0), int(x0) + resolution // 3, int(y0) + resolution // 3)
        draw = ImageDraw.Draw(img)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colours[colour])
        img.save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(f"a {colour} {shape} on a white background")
    return folder


def _child(config: BenchEncodeConfig, source: str, teacher: str, limit: int, out: Path) -> dict:
    args = json.dumps({"config": asdict(config), "source": source, "teacher": teacher, "limit": limit,
                       "out": str(out)})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.bench", args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise SDiTError(f"benchmark run failed: {stderr.strip().splitlines()[-1] if stderr.strip() else proc.returncode}")
    return json.loads(stdout.strip().splitlines()[-1])


def _measure(args: dict, repeats: int = 3) -> dict:
    """In the child: the stage, then the bare forward on the same records and batches, alternately
    `repeats` times; the best of each, since other processes only ever slow a run down."""
    from pipeline.encode import EncodeConfig, EncoderFactory, encode
    from sdit.sources import load_image, open_source

    c = BenchEncodeConfig(**args["config"])
    enc = EncodeConfig(source=args["source"], teacher=args["teacher"], out=args["out"],
                       teacher_config=c.teacher_config, resolution=c.resolution, batch_size=c.batch_size,
                       shard_size=c.shard_size, limit=args["limit"], device=c.device, dtype=c.dtype, overwrite=True)
    encoder = None
    stage, bare = [], []
    for _ in range(repeats):
        started = []
        summary = encode(enc, on_total=lambda _: started.append(time.perf_counter()))
        stage.append(summary.records / (time.perf_counter() - started[0]))
        if encoder is None:  # after the first stage run, so peak RSS is the stage's own
            peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            encoder = EncoderFactory(enc)()
            items = [item for item, _ in zip(open_source(args["source"]), range(args["limit"]))]
            pixels = np.stack([load_image(item.read(), c.resolution) for item in items])
            captions = [item.caption for item in items]
        t0 = time.perf_counter()
        for shard_start in range(0, len(items), c.shard_size):  # the stage batches within shards; so do we
            shard_end = min(shard_start + c.shard_size, len(items))
            for i in range(shard_start, shard_end, c.batch_size):
                j = min(i + c.batch_size, shard_end)
                encoder.encode_images(pixels[i:j])
                encoder.encode_text(captions[i:j])
        bare.append(len(items) / (time.perf_counter() - t0))
    return {"records": summary.records, "stage_records_per_s": max(stage), "bare_records_per_s": max(bare),
            "peak_rss_mb": peak_rss_mb}


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(_measure(json.loads(sys.argv[1]))))


# --- sdit bench label ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchLabelConfig:
    store: str | None = None  # default: generated images encoded with the teacher
    teacher: str | None = None  # default: a tiny random SD-shaped teacher
    teacher_config: str | None = None
    images: int = 256
    resolution: int = 64
    draws: int = 4
    batch_size: int = 64
    project_images: int = 1_000_000  # for the projected wall time
    project_draws: int = 4
    device: str = "auto"
    dtype: str = "auto"


def bench_label(config: BenchLabelConfig, repeats: int = 3) -> dict:
    """Draws/s of `sdit teacher-label` against the bare UNet forward on the same batches (best of
    `repeats`, alternating), bytes per draw, the projected wall time, and FLOP rates."""
    import torch

    from pipeline.label import LabelConfig, label, LabelerFactory
    from sdit.labels import teacher_inputs

    with tempfile.TemporaryDirectory(prefix="sdit-bench-") as tmp:
        tmp = Path(tmp)
        teacher = config.teacher or tiny_teacher(tmp)
        store = config.store or encoded_store(tmp, teacher, config.images, config.resolution, config.teacher_config,
                                              config.device, config.dtype)
        lc = LabelConfig(store=store, teacher=teacher, teacher_config=config.teacher_config, name="bench",
                         draws=config.draws, batch_size=config.batch_size, device=config.device, dtype=config.dtype,
                         overwrite=True)
        labeler = None
        stage, bare = [], []
        for _ in range(repeats):
            started = []
            counts = label(lc, on_total=lambda _: started.append(time.perf_counter()))
            stage.append(counts["draws"] / (time.perf_counter() - started[0]))
            if labeler is None:
                labeler = LabelerFactory(lc)()
                batches = list(_label_batches(labeler, lc, teacher_inputs))
            sync = torch.cuda.synchronize if labeler.device.type == "cuda" else (lambda: None)
            t0 = time.perf_counter()
            for inputs in batches:
                labeler.teacher_eps(inputs, None)
            sync()
            bare.append(sum(len(b.timesteps) for b in batches) / (time.perf_counter() - t0))
        flops_per_draw = _unet_flops(labeler, batches[0]) / len(batches[0].timesteps)
    stage_rate, bare_rate = max(stage), max(bare)
    matmul = matmul_gflops(labeler.device)
    return {
        "stage_draws_per_s": stage_rate, "bare_draws_per_s": bare_rate, "ratio": stage_rate / bare_rate,
        "bytes_per_draw": counts["bytes_per_draw"],
        "projected_hours": config.project_images * config.project_draws / stage_rate / 3600,
        "achieved_gflops": flops_per_draw * bare_rate / 1e9, "matmul_gflops": matmul,
        "flops_per_draw": flops_per_draw, "device": str(labeler.device), "config": asdict(config),
    }


def _label_batches(labeler, lc, teacher_inputs):
    """The stage's own batches, inputs prebuilt, for the bare forward."""
    for index, records in labeler.store.iter_shards("records"):
        labels = {k: v[:] for k, v in labeler.store.shard_group(lc.group, index).arrays()}
        latents, text = records["latents"][:], records["text_emb"][:]
        rows, draws = np.divmod(np.arange(len(latents) * lc.draws), lc.draws)
        for s in range(0, len(rows), lc.batch_size):
            yield teacher_inputs(labeler.schedule, latents, text, labels, rows[s:s + lc.batch_size],
                                 draws[s:s + lc.batch_size], labeler.bank, labeler.null, lc.perturb.input_gamma)


def _unet_flops(labeler, inputs) -> float:
    from sdit.flops import forward_flops

    x = inputs.x_t.to(labeler.device, labeler.dtype)
    text = inputs.text.to(labeler.device, labeler.dtype)
    return float(forward_flops(labeler.unet, x, inputs.timesteps.to(labeler.device), encoder_hidden_states=text))


def matmul_gflops(device, n: int = 2048, repeats: int = 5) -> float:
    """The machine's practical ceiling: a large fp32 matmul (TF32 off on GPU), best of `repeats`."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def format_label_table(result: dict) -> str:
    c = result["config"]
    return "\n".join([
        f"{'stage (draw, rebuild, UNet, write)':<40}{result['stage_draws_per_s']:>10.1f} draws/s",
        f"{'bare UNet forward':<40}{result['bare_draws_per_s']:>10.1f} draws/s",
        f"{'stage / bare':<40}{result['ratio']:>10.3f}",
        f"{'bytes per draw on disk':<40}{result['bytes_per_draw']:>10.0f}",
        f"{'UNet compute, achieved':<40}{result['achieved_gflops']:>10.2f} GFLOP/s",
        f"{'fp32 matmul ceiling':<40}{result['matmul_gflops']:>10.2f} GFLOP/s",
        f"{'projected: ' + format(c['project_images'], ',') + ' images x ' + str(c['project_draws']):<40}"
        f"{result['projected_hours']:>10.2f} hours",
    ])
