"""`sdit bench train`: what stage two's loader costs, what the cached labels save, and FLOPs per step.

Three ways to run the same training steps on the same batches, alternated, best of `repeats` each:

    store     the real thing: read blocks, shuffle, rebuild inputs (sdit.loader; read ahead by a thread on a
              GPU, as `sdit train` does), then the student's step
    memory    the same batches built beforehand: the student's step alone; store / memory is the loader's cost
    online    the store's batches, plus the teacher UNet's forward on each to make ε_T: online distillation,
              what the two-stage design saves

FLOPs per forward at SD 1.5's 64x64 latents come from `sdit.flops` (meta device, nothing allocated).
"""

from __future__ import annotations

import itertools
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.bench import checksum_seconds, encoded_store, tiny_teacher
from pipeline.bench.config import BenchTrainConfig
from pipeline.bench.timing import timed
from pipeline.train import TrainConfig, Trainer, Workers, make_state
from sdit.devices import setup_worker
from sdit.errors import SDiTError
from sdit.flops import TRAIN_STEP_FORWARDS, flops_table
from sdit.loader import DrawStream, LabelledStore, Position, read_ahead
from sdit.presets import DEFAULT_PRESETS
from sdit.run import load_student


def bench_train(config: BenchTrainConfig, repeats: int = 3) -> dict:
    from pipeline.init import init_for_store
    from pipeline.label import LabelConfig, label
    from sdit.teacher import load_teacher

    device, _ = setup_worker(config.device, "fp32", None)
    with tempfile.TemporaryDirectory(prefix="sdit-bench-") as tmp:
        tmp = Path(tmp)
        teacher = config.teacher or tiny_teacher(tmp)
        store = config.store
        if store is None:
            store = encoded_store(tmp, teacher, config.images, 64, config.teacher_config)
            label(LabelConfig(store=store, teacher=teacher, teacher_config=config.teacher_config,
                              draws=config.draws))
        data = LabelledStore(store)
        run = init_for_store(store, "default", str(tmp / "run"), config.student, teacher=teacher,
                             teacher_config=config.teacher_config).run
        train_config = TrainConfig(store=store, out=str(run), init=str(run), batch_size=config.batch_size)
        trainer = Trainer(train_config, make_state(load_student(run), train_config, device, Workers()), device,
                          schedule=data.schedule, guided=data.labels.guided)
        unet = load_teacher(teacher, components=("unet",), config_dir=config.teacher_config, device=device).unet
        stream = DrawStream(data, config.batch_size, seed=0, buffer_records=config.buffer_records)
        records = sum(data.counts.values())
        if records < 4 * config.buffer_records:
            raise SDiTError(f"the store has {records} records; the loader figure needs at least 4x the shuffle window "
                            f"({4 * config.buffer_records}): pass more --images or a smaller --buffer-records")
        # built from a reader of its own, so that the store's first timed pass reads with cold caches
        memory = DrawStream(LabelledStore(store), config.batch_size, seed=0, buffer_records=config.buffer_records)
        memory = list(itertools.islice(memory.batches(Position()), max(config.steps, config.warmup)))

        def online(batch):
            with torch.no_grad():
                batch.eps_teacher = unet(batch.x_t.to(device), batch.timesteps.to(device),
                                         encoder_hidden_states=batch.text.to(device).float()).sample.cpu()
            return batch

        rates = {"store": [], "memory": [], "online": []}
        read = {"all": data.store.bytes_read, "captions": data.bank.bytes_read, "caption_reads": data.bank.fetches}
        for _ in range(repeats):  # each timed run starts a fresh stream: its reads are in the timed steps
            rates["store"].append(_steps_per_s(trainer, memory, read_ahead(stream.batches(Position()), device), config,
                                                 device))
            if len(rates["store"]) == 1:  # what one pass of `steps` steps read
                draws = config.steps * config.batch_size
                read = {"read_bytes_per_draw": (data.store.bytes_read - read["all"]) / draws,
                        "caption_bytes_per_draw": (data.bank.bytes_read - read["captions"]) / draws,
                        "caption_reads_per_draw": (data.bank.fetches - read["caption_reads"]) / draws}
            rates["memory"].append(_steps_per_s(trainer, memory, iter(memory), config, device))
            labelled = map(online, read_ahead(stream.batches(Position()), device))
            rates["online"].append(_steps_per_s(trainer, memory, labelled, config, device))
        crc = checksum_seconds(store, ["records", data.labels.group])
        startup = stream_startup(tmp / "startup", config.startup_shards) if config.startup_shards else {}
        supply = {where: loader_supply(str(tmp / "supply") if where == "local" else where)
                  for where in config.supply_at}
    flops = flops_table(DEFAULT_PRESETS, sample_size=64)
    store_rate, memory_rate, online_rate = (max(rates[k]) for k in ("store", "memory", "online"))
    return {
        "store_steps_per_s": store_rate, "memory_steps_per_s": memory_rate, "loader_ratio": store_rate / memory_rate,
        # share of a store step's time that the chunks' CRC32C adds to reading its draws (a record and its draws
        # per `draws` draws of the batch)
        "checksum_share": crc["read_s_per_record"] * config.batch_size / data.labels.draws * store_rate,
        "offline_steps_per_s": store_rate, "online_steps_per_s": online_rate,
        "online_ratio": online_rate / store_rate, "flops": flops,
        "train_step_flops": {p: TRAIN_STEP_FORWARDS * f for p, f in flops.items() if p != "sd15_unet"},
        "online_step_flops": {p: TRAIN_STEP_FORWARDS * f + flops["sd15_unet"] for p, f in flops.items()
                              if p != "sd15_unet"},
        "store_records": records, "window_records": config.buffer_records, **read, **startup,
        "supply": supply, "need": step_need(flops["SDiT-B/2"], supply),
        "label_bytes_per_draw": data.labels.counts["bytes_per_draw"],
        "device": str(device), "config": asdict(config),
    }


SD15_SHAPES = {"latent_shape": (4, 64, 64), "text_shape": (77, 768)}  # 512 px
H100_BF16_TFLOPS = 989.0  # dense, SXM (pipeline/bench/sd15_throughput.py)
UTILISATION = 0.4  # of the bf16 peak a well-fed training step reaches


def loader_supply(url: str, shards: int = 4, records: int = 64, draws: int = 4, batch_size: int = 64) -> dict:
    """What one worker's loader delivers, reading a random labelled store at SD 1.5's size (64x64x4 latents,
    77x768 text; half the draws swap or mix captions) at `url`: draws/s, records/s and MB/s over an epoch,
    inputs rebuilt as training takes them, no training step."""
    from pipeline.bench import random_labelled_store

    random_labelled_store(url, shards, records, draws, **SD15_SHAPES)
    data = LabelledStore(url)
    batches = DrawStream(data, batch_size, buffer_records=256).batches(Position())
    steps = shards * records * draws // batch_size
    _, seconds = timed(lambda: [next(batches) for _ in range(steps)], torch.device("cpu"))
    draws_per_s = steps * batch_size / seconds
    return {"draws_per_s": draws_per_s, "records_per_s": draws_per_s / draws,
            "mb_per_s": data.store.bytes_read / seconds / 1e6,
            "bytes_per_draw": data.store.bytes_read / (steps * batch_size), "draws": draws}


def step_need(forward_flops: float, supply: dict) -> dict:
    """What one GPU's training step of SDiT-B/2 at 512 px takes in on an H100 at `UTILISATION` of its bf16 peak:
    draws/s (3 forwards' FLOPs a draw), and MB/s at the bytes per draw the loader read."""
    draws_per_s = UTILISATION * H100_BF16_TFLOPS * 1e12 / (TRAIN_STEP_FORWARDS * forward_flops)
    per_draw = next(iter(supply.values()), {}).get("bytes_per_draw")
    return {"draws_per_s": draws_per_s, "mb_per_s": per_draw and draws_per_s * per_draw / 1e6,
            "gpu": "H100 SXM", "peak_tflops": H100_BF16_TFLOPS, "utilisation": UTILISATION}


def stream_startup(folder: Path, shards: int, records: int = 4, repeats: int = 3) -> dict:
    """Seconds from opening a labelled store of `shards` shards to the draw stream's first batch, with the labels'
    index and without it (every completion record and `valid` array read instead; labels made before indexes)."""
    from pipeline.bench import random_labelled_store
    from sdit.labels import LABELS_INDEX
    from sdit.store import Store

    url = random_labelled_store(str(folder / "store"), shards, records)

    def first_batch():
        next(iter(DrawStream(LabelledStore(url), 32)))

    indexed = min(timed(first_batch, torch.device("cpu"))[1] for _ in range(repeats))
    Store(url).remove("labels", "default", LABELS_INDEX)
    plain = min(timed(first_batch, torch.device("cpu"))[1] for _ in range(repeats))
    return {"startup_shards": shards, "stream_startup_s": indexed,
            "stream_startup_unindexed_s": plain}


def _steps_per_s(trainer: Trainer, warm: list, batches, config: BenchTrainConfig, device: torch.device) -> float:
    """Steps/s of `config.steps` steps on `batches`, after `config.warmup` untimed steps on the in-memory `warm`
    batches (so the store is read only in the timed steps)."""
    for batch in warm[:config.warmup]:
        trainer.step(batch)
    return config.steps / timed(lambda: [trainer.step(next(batches)) for _ in range(config.steps)], device)[1]


def format_train_table(result: dict) -> str:
    flops = result["flops"]
    lines = [
        f"{'from the store (read, rebuild, step)':<44}{result['store_steps_per_s']:>10.2f} steps/s",
        f"{'from memory (step only)':<44}{result['memory_steps_per_s']:>10.2f} steps/s",
        f"{'store / memory':<44}{result['loader_ratio']:>10.3f}",
        f"{'checksums (CRC32C) on reads':<44}{result['checksum_share']:>10.2%} of a store step",
        f"{'online (+ teacher UNet forward)':<44}{result['online_steps_per_s']:>10.2f} steps/s",
        f"{'online / offline':<44}{result['online_ratio']:>10.3f}",
        f"{'bytes read per draw':<44}{result['read_bytes_per_draw']:>10.0f}",
        f"{'  of it, swapped captions':<44}{result['caption_bytes_per_draw']:>10.0f}"
        f"  ({result['caption_reads_per_draw']:.2f} reads a draw)",
        f"{'  the labels of a draw':<44}{result['label_bytes_per_draw']:>10.0f}",
        *[f"{'loader supply per worker, ' + where:<44}{r['draws_per_s']:>10.0f} draws/s  {r['mb_per_s']:.0f} MB/s"
          for where, r in result["supply"].items()],
        f"{'need: SDiT-B/2 at 512 px, one H100 at 40%':<44}{result['need']['draws_per_s']:>10.0f} draws/s",
        *([f"{'draw stream start-up, ' + format(result['startup_shards'], ',') + ' shards':<44}"
           f"{result['stream_startup_s']:>10.2f} s  ({result['stream_startup_unindexed_s']:.2f} s without the index)"]
          if "stream_startup_s" in result else []),
        "",
        f"{'GFLOPs per forward at 64x64 latents':<44}{'forward':>10}{'train step':>12}{'online step':>13}",
    ]
    for name, value in flops.items():
        train = result["train_step_flops"].get(name)
        online = result["online_step_flops"].get(name)
        step = f"{train / 1e9:>12.1f}{online / 1e9:>13.1f}" if train else ""
        lines.append(f"{name:<44}{value / 1e9:>10.1f}{step}")
    return "\n".join(lines)
