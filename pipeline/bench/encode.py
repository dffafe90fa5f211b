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
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.bench import checksum_seconds, generate_images, tiny_teacher
from pipeline.bench.config import BenchEncodeConfig
from pipeline.bench.timing import timed
from sdit.errors import SDiTError


def bench_encode(config: BenchEncodeConfig) -> dict:
    with tempfile.TemporaryDirectory(prefix="sdit-bench-") as tmp:
        tmp = Path(tmp)
        source = config.source or str(generate_images(tmp / "images", 2 * config.images, config.resolution))
        teacher = config.teacher or tiny_teacher(tmp)
        runs = [_child(config, source, teacher, limit, tmp / f"store-{limit}")
                for limit in (config.images, 2 * config.images)]
        crc = checksum_seconds(str(tmp / f"store-{2 * config.images}"), ["records"])
    small, large = runs
    return {
        # share of the stage's time per record that the chunks' CRC32C adds to writing them
        "checksum_share": crc["write_s_per_record"] * large["stage_records_per_s"],
        "stage_records_per_s": large["stage_records_per_s"],
        "bare_records_per_s": large["bare_records_per_s"],
        "ratio": large["stage_records_per_s"] / large["bare_records_per_s"],
        "peak_rss_mb": [small["peak_rss_mb"], large["peak_rss_mb"]],
        "records": [small["records"], large["records"]],
        "rss_growth": large["peak_rss_mb"] / small["peak_rss_mb"] - 1,
        "config": asdict(config),
    }


def format_table(result: dict) -> str:
    n_small, n_large = result["records"]
    rss_small, rss_large = result["peak_rss_mb"]
    return "\n".join([
        f"{'stage (read, decode, encode, write)':<40}{result['stage_records_per_s']:>10.1f} records/s",
        f"{'bare VAE + text encoder forward':<40}{result['bare_records_per_s']:>10.1f} records/s",
        f"{'stage / bare':<40}{result['ratio']:>10.3f}",
        f"{'peak RSS, ' + str(n_small) + ' records':<40}{rss_small:>10.0f} MB",
        f"{'peak RSS, ' + str(n_large) + ' records':<40}{rss_large:>10.0f} MB  ({result['rss_growth']:+.1%})",
        f"{'checksums (CRC32C) on writes':<40}{result['checksum_share']:>10.2%} of the stage's time",
    ])


def _child(config: BenchEncodeConfig, source: str, teacher: str, limit: int, out: Path) -> dict:
    args = json.dumps({"config": asdict(config), "source": source, "teacher": teacher, "limit": limit,
                       "out": str(out)})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.bench.encode", args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate()
    if proc.returncode:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else proc.returncode
        raise SDiTError(f"benchmark run failed: {last}")
    return json.loads(stdout.strip().splitlines()[-1])


def _measure(args: dict, repeats: int = 3) -> dict:
    """In the child: the stage, then the bare forward on the same records and batches, alternately
    `repeats` times; the best of each, since other processes only ever slow a run down."""
    from pipeline.encode import EncodeConfig, EncoderFactory, encode
    from sdit.decode import load_image
    from sdit.sources import open_source

    c = BenchEncodeConfig(**args["config"])
    enc = EncodeConfig(source=args["source"], teacher=args["teacher"], out=args["out"],
                       teacher_config=c.teacher_config, resolution=c.resolution, batch_size=c.batch_size,
                       shard_size=c.shard_size, limit=args["limit"], device=c.device, dtype=c.dtype, overwrite=True)
    encoder = None
    stage, bare = [], []
    for _ in range(repeats):
        started = []
        summary = encode(enc, on_total=lambda _, s=started: s.append(time.perf_counter()))
        stage.append(summary.records / (time.perf_counter() - started[0]))
        if encoder is None:  # after the first stage run, so peak RSS is the stage's own
            peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            encoder = EncoderFactory(enc)()
            items = [item for item, _ in zip(open_source(args["source"]), range(args["limit"]))]
            pixels = np.stack([load_image(item.read(), c.resolution) for item in items])
            captions = [item.caption for item in items]
        forwards = partial(_bare_forwards, encoder, pixels, captions, c.shard_size, c.batch_size)
        bare.append(len(items) / timed(forwards, encoder.device)[1])
    return {"records": summary.records, "stage_records_per_s": max(stage), "bare_records_per_s": max(bare),
            "peak_rss_mb": peak_rss_mb}


def _bare_forwards(encoder, pixels, captions: list[str], shard_size: int, batch_size: int) -> None:
    """The encoder's forwards over the records, batched within shards as the stage batches them."""
    for shard_start in range(0, len(captions), shard_size):
        shard_end = min(shard_start + shard_size, len(captions))
        for i in range(shard_start, shard_end, batch_size):
            j = min(i + batch_size, shard_end)
            encoder.encode_images(pixels[i:j])
            encoder.encode_text(captions[i:j])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(_measure(json.loads(sys.argv[1]))))


