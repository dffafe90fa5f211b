"""`sdit bench label`: draws/s of `sdit teacher-label` against the bare UNet forward on the same prebuilt
batches (best of three, alternating), bytes per draw written and read (swapped captions apart), and the UNet's
FLOP rate against a matmul."""

import tempfile
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np

from pipeline.bench import encoded_store, matmul_gflops, tiny_teacher
from pipeline.bench.config import BenchLabelConfig
from pipeline.bench.timing import timed


def bench_label(config: BenchLabelConfig, repeats: int = 3) -> dict:
    """Draws/s of `sdit teacher-label` against the bare UNet forward on the same batches (best of
    `repeats`, alternating), bytes per draw, the projected wall time, and FLOP rates."""

    from pipeline.label import LabelConfig, LabelerFactory, label
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
            counts = label(lc, on_total=lambda _, s=started: s.append(time.perf_counter()))
            stage.append(counts["draws"] / (time.perf_counter() - started[0]))
            if labeler is None:
                labeler = LabelerFactory(lc)()
                batches = list(_label_batches(labeler, lc, teacher_inputs))
            _, seconds = timed(partial(_bare_labels, labeler, batches), labeler.device)
            bare.append(sum(len(b.timesteps) for b in batches) / seconds)
        flops_per_draw = _unet_flops(labeler, batches[0]) / len(batches[0].timesteps)
        text_row_bytes = batches[0].text[0].numel() * 2  # one caption's embedding in fp16
    stage_rate, bare_rate = max(stage), max(bare)
    matmul = matmul_gflops(labeler.device)
    return {
        "stage_draws_per_s": stage_rate, "bare_draws_per_s": bare_rate, "ratio": stage_rate / bare_rate,
        "bytes_per_draw": counts["bytes_per_draw"], "read_bytes_per_draw": counts["read_bytes_per_draw"],
        # what caption swaps and mixes read of other records' embeddings, per draw (of all), and per embedding read
        "caption_bytes_per_draw": counts["caption_bytes_per_draw"],
        "caption_bytes_per_read": counts["caption_bytes_per_draw"] / max(counts["caption_reads_per_draw"], 1e-9),
        "caption_reads_per_draw": counts["caption_reads_per_draw"], "text_row_bytes": text_row_bytes,
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


def _bare_labels(labeler, batches) -> None:
    """The teacher's forwards alone over prepared batches."""
    for inputs in batches:
        labeler.teacher_eps(inputs, None)


def _unet_flops(labeler, inputs) -> float:
    from sdit.flops import forward_flops

    x = inputs.x_t.to(labeler.device, labeler.dtype)
    text = inputs.text.to(labeler.device, labeler.dtype)
    return float(forward_flops(labeler.unet, x, inputs.timesteps.to(labeler.device), encoder_hidden_states=text))


def format_label_table(result: dict) -> str:
    c = result["config"]
    return "\n".join([
        f"{'stage (draw, rebuild, UNet, write)':<40}{result['stage_draws_per_s']:>10.1f} draws/s",
        f"{'bare UNet forward':<40}{result['bare_draws_per_s']:>10.1f} draws/s",
        f"{'stage / bare':<40}{result['ratio']:>10.3f}",
        f"{'bytes per draw on disk':<40}{result['bytes_per_draw']:>10.0f}",
        f"{'bytes read per draw':<40}{result['read_bytes_per_draw']:>10.0f}",
        f"{'  of it, swapped captions':<40}{result['caption_bytes_per_draw']:>10.0f}"
        f"  ({result['caption_reads_per_draw']:.2f} reads of {result['caption_bytes_per_read']:.0f} bytes;"
        f" a caption is {result['text_row_bytes']:,} bytes)",
        f"{'UNet compute, achieved':<40}{result['achieved_gflops']:>10.2f} GFLOP/s",
        f"{'fp32 matmul ceiling':<40}{result['matmul_gflops']:>10.2f} GFLOP/s",
        f"{'projected: ' + format(c['project_images'], ',') + ' images x ' + str(c['project_draws']):<40}"
        f"{result['projected_hours']:>10.2f} hours",
    ])
