"""Stage one, part 2: K labelled draws per record, and the teacher UNet's ε for each.

    check (driver)          the store's VAE/text encoder are the teacher's; shapes fit the UNet
    synthesize (worker)     with `synthesis`: the teacher's samples for the prompt bank, as synthetic records
                            (sdit.synthesize), first, on the same workers
    label_shard (worker)    draws from (seed, shard, record, draw) generators, rebuild inputs, run the
                            UNet in batches, drop non-finite outputs, write the label shard whole
    finish (driver)         counts per kind, dropped draws, bytes per draw, teacher forwards, manifest "complete"

Labels go to `labels/<name>/NNNNN` beside the records shard NNNNN they describe (and to
`labels/<name>/synthetic/NNNNN` beside synthetic shard NNNNN), with their own manifest
`labels/<name>/manifest.json`; another teacher or seed goes into another name.
"""

import dataclasses
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config import LabelConfig
from pipeline.executors import LocalExecutor, RayExecutor, ray_session, worker_device
from sdit.config import DRAWN_KINDS
from sdit.devices import setup_worker
from sdit.diffusion import NoiseSchedule, epsilon_from_prediction
from sdit.errors import SDiTError
from sdit.labels import (
    LABELS_VERSION,
    CaptionBank,
    LabelsManifest,
    guidance_scale,
    read_labels,
    teacher_inputs,
    write_index,
    write_labels,
)
from sdit.loader import read_ahead
from sdit.perturb import Kind, draw_generator, sample_draw
from sdit.progress import Progress, no_progress
from sdit.store import LABEL_COLUMNS, Store, resume_value, write_shard
from sdit.synthesize import (
    SYNTHETIC,
    ShardSynthesizer,
    SyntheticManifest,
    finish_synthesis,
    plan_synthesis,
    prepare_synthesis,
    read_synthetic,
    synthetic_draw_generator,
)
from sdit.teacher import Teacher, load_teacher


@dataclass(frozen=True)
class Task:
    """One shard of a teacher worker's work: label shard `index` of `group`, or make synthetic shard `index`."""

    group: str  # "records" or "synthetic"
    index: int
    synthesize: bool = False


class ShardLabeler:
    """Holds the teacher's UNet; turns one records (or synthetic) shard into one label shard, and with
    `config.synthesis` makes synthetic shards too."""

    def __init__(self, config: LabelConfig, teacher: Teacher, device: torch.device, dtype: torch.dtype):
        self.config, self.unet, self.device, self.dtype = config, teacher.unet, device, dtype
        self.schedule = NoiseSchedule.from_config(teacher.scheduler_config)
        self.store = Store(config.store)
        self.manifest = self.store.manifest()
        self.bank = CaptionBank(self.store)
        self.null = self.store.null_embedding()
        self.synthesizer = ShardSynthesizer(self.store, config.synthesis, teacher, device, dtype, config.batch_size) \
            if config.synthesis else None

    def draw_labels(self, shard: int, n: int, synthetic: bool = False, states: np.ndarray | None = None) -> dict:
        """Every random choice of the shard's draws; nothing here depends on batching or workers. A synthetic
        shard's draws come from generators of their own, apart from those of the records shard of its number;
        a trajectory set's draws are its `states` (n, K, C, h, w), at the set's timesteps."""
        c, K = self.config, self.config.draws
        generator = synthetic_draw_generator if synthetic else draw_generator
        shape = tuple(self.manifest.latent_shape)
        labels = {name: np.zeros((n, K, *self._tail(name, shape)), dtype=col.dtype)
                  for name, col in LABEL_COLUMNS.items() if col.per_record and (not col.optional or c.guidance_fresh)}
        labels["xi_index"][:] = -1
        if states is not None:
            labels["timesteps"][:] = self.synthesizer.state_timesteps
            labels["kind"][:], labels["caption_index"][:], labels["noise"][:] = Kind.TRAJECTORY, -1, states
        xi = []
        for r in range(n):
            for d in range(K):
                gen = generator(c.seed, shard, r, d)
                if states is not None:
                    if c.guidance:
                        labels["guidance"][r, d] = guidance_scale(gen, c.guidance, c.guidance_conditional)
                    continue
                draw = sample_draw(c.perturb, gen, latent_shape=shape, num_timesteps=self.schedule.num_timesteps,
                                   num_records=self.bank.size("records"), num_prompts=self.bank.size("prompts"),
                                   stratum=(d, K) if c.timesteps == "stratified" else None)
                labels["timesteps"][r, d], labels["kind"][r, d] = draw.timestep, draw.kind
                labels["caption_from"][r, d], labels["caption_index"][r, d] = draw.caption_from, draw.caption_index
                labels["weight"][r, d], labels["noise"][r, d] = draw.weight, draw.noise
                if draw.xi is not None:
                    labels["xi_index"][r, d] = len(xi)
                    xi.append(draw.xi)
                if c.guidance:
                    labels["guidance"][r, d] = guidance_scale(gen, c.guidance, c.guidance_conditional)
        labels["xi"] = np.stack(xi) if xi else np.zeros((0, *shape), np.float16)
        return labels

    @staticmethod
    def _tail(name: str, latent_shape: tuple) -> tuple:
        per_draw = {"caption_from": (2,), "caption_index": (2,), "noise": latent_shape, "eps_teacher": latent_shape,
                    "eps_uncond": latent_shape}
        return per_draw.get(name, ())

    @torch.inference_mode()
    def teacher_eps(self, inputs, guidance: np.ndarray | None) -> torch.Tensor:
        """(B, C, h, w) float32 ε of the teacher; with `guidance`, ε_u + w(ε_c − ε_u), or with fresh guidance
        (2, B, C, h, w): ε_c and ε_u."""
        x = inputs.x_t.to(self.device, self.dtype)
        t = inputs.timesteps.to(self.device)
        text = inputs.text.to(self.device, self.dtype)
        if guidance is None:
            out = self.unet(x, t, encoder_hidden_states=text).sample
            return epsilon_from_prediction(self.schedule, out.float(), inputs.x_t.to(self.device), inputs.timesteps)
        null = torch.as_tensor(self.null).to(self.device, self.dtype).expand_as(text)
        out = self.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([text, null])).sample
        x_t2 = torch.cat([inputs.x_t, inputs.x_t]).to(self.device)
        eps_c, eps_u = epsilon_from_prediction(self.schedule, out.float(), x_t2,
                                               torch.cat([inputs.timesteps, inputs.timesteps])).chunk(2)
        if self.config.guidance_fresh:
            return torch.stack([eps_c, eps_u])
        w = torch.as_tensor(guidance, dtype=torch.float32, device=self.device).view(-1, 1, 1, 1)
        return eps_u + w * (eps_c - eps_u)

    def __call__(self, task: Task) -> dict:
        if task.synthesize:
            return self.synthesizer(task.index)
        shard = task.index
        read, caption_read, fetched = self.store.bytes_read, self.bank.bytes_read, self.bank.fetches
        trajectory = task.group == SYNTHETIC and self.config.synthesis.trajectory
        records = self.store.read(task.group, shard, ("latents", "text_emb") + (("states",) if trajectory else ()))
        latents, text_emb = records["latents"], records["text_emb"]
        n, K = len(latents), self.config.draws
        labels = self.draw_labels(shard, n, synthetic=task.group == SYNTHETIC, states=records.get("states"))
        rows, draws = np.divmod(np.arange(n * K), K)

        def batches():  # the teacher's inputs, batch by batch: captions of swaps read from the store as needed
            for start in range(0, n * K, self.config.batch_size):
                r, d = rows[start:start + self.config.batch_size], draws[start:start + self.config.batch_size]
                yield r, d, teacher_inputs(self.schedule, latents, text_emb, labels, r, d, self.bank, self.null,
                                           self.config.perturb.input_gamma)

        for r, d, inputs in read_ahead(batches(), self.device):  # on a GPU, built while the UNet runs
            eps = self.teacher_eps(inputs, labels["guidance"][r, d] if self.config.guidance else None)
            eps16 = eps.cpu().to(torch.float16).numpy()
            finite = np.isfinite(eps16)
            if self.config.guidance_fresh:  # ε_c and ε_u: a draw is valid when both are finite
                labels["valid"][r, d] = finite.reshape(2, len(r), -1).all(axis=(0, 2))
                labels["eps_teacher"][r, d], labels["eps_uncond"][r, d] = np.where(finite, eps16, 0)
            else:
                labels["valid"][r, d] = finite.reshape(len(r), -1).all(axis=1)
                labels["eps_teacher"][r, d] = np.where(finite, eps16, 0)
        kinds = {k.name.lower(): int(((labels["kind"] == k) & labels["valid"]).sum()) for k in Kind}
        kinds = {name: count for name, count in kinds.items() if count or Kind[name.upper()] in DRAWN_KINDS}
        invalid = (~labels["valid"]).sum(axis=1)
        record = {"draws": n * K, "dropped": int(invalid.sum()), "kinds": kinds,
                  "invalid_rows": {str(row): int(invalid[row]) for row in np.flatnonzero(invalid)},
                  "bytes": int(sum(v.nbytes for v in labels.values())),
                  # bytes read: in all (the records shard and the captions), and for swaps' and mixes' captions
                  "read_bytes": self.store.bytes_read - read, "caption_bytes": self.bank.bytes_read - caption_read,
                  "caption_reads": self.bank.fetches - fetched}
        write_shard(self.store, self.config.label_group(task.group), shard, labels, record)
        return {"group": task.group, "index": shard, "count": n, **record}


@dataclass(frozen=True)
class LabelerFactory:
    config: LabelConfig

    def __call__(self) -> ShardLabeler:
        device, dtype = setup_worker(self.config.device, self.config.dtype, self.config.threads)
        teacher = load_teacher(self.config.teacher, components=("unet",), config_dir=self.config.teacher_config,
                               device=device, dtype=dtype)
        return ShardLabeler(self.config, teacher, device, dtype)


def label(config: LabelConfig, progress: Progress = no_progress,
          on_total: Callable[[int], None] | None = None,
          on_stage: Callable[[str, int], None] | None = None) -> dict:
    """Run stage one, part 2 (and with `config.synthesis` part 3 first) over a finished store; resumes an
    unfinished run of the same config. `on_stage(name, total)` opens each stage ("synthesize": samples,
    "label": draws), `progress(n)` counts that stage's units; `on_total` hears the label stage's total."""
    config.check()
    config = dataclasses.replace(config, threads=config.threads or torch.get_num_threads())
    store = Store(config.store)
    manifest = store.encoded()
    teacher = load_teacher(config.teacher, config_dir=config.teacher_config)  # all parts: hashes and shapes
    check_teacher(manifest, teacher)
    synthetic = plan_synthesis(store, config.synthesis, teacher) if config.synthesis else None  # refusals first
    with store.writer("teacher-label"):
        return _label(store, config, teacher, synthetic, progress, on_total, on_stage)


def _label(store: Store, config: LabelConfig, teacher: Teacher, synthetic: SyntheticManifest | None, progress,
           on_total, on_stage) -> dict:
    meta = prepare_labels(store, config, teacher, synthetic)
    to_synthesize = prepare_synthesis(store, synthetic) if synthetic else []
    started = time.perf_counter()
    with _executor(config, teacher) as executor:
        if synthetic:  # first, so that the synthetic records exist when their labelling starts
            if on_stage:
                on_stage("synthesize", synthetic.prompts * config.synthesis.samples)
            progress(sum(r["samples"] for r in store.finished(SYNTHETIC).values()))
            _run(executor, [Task(SYNTHETIC, k, synthesize=True) for k in to_synthesize], config, progress, "samples")
            finish_synthesis(store, synthetic)
        todo = _label_tasks(store, config, progress, on_total, on_stage)
        _run(executor, todo, config, progress, "draws")
    return finish(store, config, meta, time.perf_counter() - started)


def _label_tasks(store: Store, config: LabelConfig, progress, on_total, on_stage) -> list[Task]:
    """The shards still to label (records, then synthetic ones); finished ones count as progress."""
    groups = ["records", SYNTHETIC] if config.synthesis else ["records"]
    shards = {group: store.finished(group) for group in groups}
    total = sum(r["count"] for done in shards.values() for r in done.values()) * config.draws
    if on_stage:
        on_stage("label", total)
    if on_total:
        on_total(total)
    todo = []
    for group, done in shards.items():
        labelled = store.finished(config.label_group(group))
        for index, record in done.items():
            if index not in labelled:
                todo.append(Task(group, index))
            else:
                progress(record["count"] * config.draws)
    return todo


@contextmanager
def _executor(config: LabelConfig, teacher: Teacher):
    """Workers that each hold the teacher's UNet: Ray actors, or the driver's teacher as the one worker."""
    if config.ray_address:
        with ray_session(config.ray_address, config.store):
            device, gpus = worker_device(config.device)
            yield RayExecutor(LabelerFactory(dataclasses.replace(config, device=device)),
                              num_workers=config.num_workers, gpus_per_worker=gpus)
        return
    device, dtype = setup_worker(config.device, config.dtype, config.threads)
    teacher.unet.to(device=device, dtype=dtype)
    labeler = ShardLabeler(config, teacher, device, dtype)
    yield LocalExecutor(lambda: labeler)


def _run(executor, tasks: list[Task], config: LabelConfig, progress, unit: str) -> None:
    """Run the tasks; stop once more than --max-dropped of the `unit`s (draws or samples) were not finite."""
    total = dropped = 0
    for result in executor.map(tasks):
        total, dropped = total + result[unit], dropped + result["dropped"]
        if dropped > config.max_dropped * max(total, 1) and dropped > 0:
            what = "output" if unit == "draws" else "sample"
            raise SDiTError(f"the teacher's {what} was NaN or inf for {dropped} of {total} {unit} (over "
                            f"{config.max_dropped:.0%}); try --dtype fp32 or bf16. Finished shards are kept")
        progress(result[unit])


def check_teacher(manifest, teacher: Teacher) -> None:
    """One-line refusals: the store's latents and embeddings must come from this teacher's VAE and text
    encoder, and their shapes must fit its UNet."""
    for part in ("vae", "text_encoder"):
        if manifest.teacher["hashes"].get(part) != teacher.identity.hashes.get(part):
            raise SDiTError(f"the store was encoded with another {part.replace('_', ' ')} than this teacher's "
                            f"({manifest.teacher['path']}); label it with that teacher or re-encode")
    unet = teacher.unet.config
    if manifest.latent_shape[0] != unet.in_channels or manifest.text_shape[1] != unet.cross_attention_dim:
        raise SDiTError(f"the store's latents {manifest.latent_shape} / text width {manifest.text_shape[1]} "
                        f"do not fit the UNet ({unet.in_channels} channels, text width {unet.cross_attention_dim})")


def _manifest(config: LabelConfig, teacher: Teacher, synthetic: SyntheticManifest | None) -> LabelsManifest:
    schedule = NoiseSchedule.from_config(teacher.scheduler_config)
    return LabelsManifest(
        name=config.name, teacher=teacher.identity.to_json(), scheduler=teacher.scheduler_config,
        prediction_type=schedule.prediction_type, seed=config.seed, draws=config.draws, timesteps=config.timesteps,
        perturb=dataclasses.asdict(config.perturb), guidance=list(config.guidance) if config.guidance else None,
        guidance_conditional=config.guidance_conditional, guidance_fresh=config.guidance_fresh,
        synthesis=dataclasses.asdict(config.synthesis) if config.synthesis else None,
        synthetic_set=synthetic.set_id if synthetic else None,
        schema_version=LABELS_VERSION if config.guidance_fresh else 1)


# What must match (as `resume_value` compares it) for a rerun to resume a labelling rather than refuse it.
_RESUME_KEYS = ("teacher", "seed", "draws", "timesteps", "perturb", "guidance", "guidance_conditional",
                "guidance_fresh", "synthesis", "synthetic_set")


def prepare_labels(store: Store, config: LabelConfig, teacher: Teacher,
                   synthetic: SyntheticManifest | None = None) -> LabelsManifest:
    meta = _manifest(config, teacher, synthetic)
    if config.overwrite:
        store.remove(config.group)
        store.remove("_done", config.group)
    elif (old := read_labels(store, config.name)) is not None:
        for key in _RESUME_KEYS:
            if resume_value(old, key) != resume_value(meta, key):
                what = "set of synthetic records" if key == "synthetic_set" else key
                raise SDiTError(f"labels {config.name!r} were made with another {what}; pass --labels NAME for a "
                                "new set, or --overwrite")
    root = store.root_group(mode="a")
    for group in ["records", SYNTHETIC] if config.synthesis else ["records"]:
        root.require_group(config.label_group(group))
        store.remove_unfinished(config.label_group(group))
    write_labels(store, meta)
    return meta


def _tally(done: dict[int, dict]) -> dict:
    kinds: dict[str, int] = {}
    for record in done.values():
        for kind, count in record["kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + count
    total = {key: sum(r.get(key, 0) for r in done.values())
             for key in ("draws", "dropped", "bytes", *_READS)}
    return total | {"kinds": kinds, "shards": len(done)}


# What reading cost (a resumed run reads with cold caches): in the returned counts, not the labels' manifest.
_READS = ("read_bytes", "caption_bytes", "caption_reads")


def finish(store: Store, config: LabelConfig, meta: LabelsManifest, seconds: float) -> dict:
    """Counts of the records' draws (and, apart, the synthetic records'), and the teacher forwards the labels
    cost in all: one a draw (two with guidance), plus the synthesis of the synthetic records they label."""
    done = {"records": store.all_finished(config.group, store.finished("records"))}
    records = _tally(done["records"])
    counts = {k: v for k, v in records.items() if k not in ("bytes", *_READS)}
    counts["bytes_per_draw"] = records["bytes"] / max(records["draws"], 1)
    reads = {f"{k}_per_draw": records[k] / max(records["draws"], 1) for k in _READS}
    per_draw = 2 if config.guidance else 1
    forwards = {"records": records["draws"] * per_draw}
    if config.synthesis:
        done[SYNTHETIC] = store.all_finished(config.label_group(SYNTHETIC), store.finished(SYNTHETIC))
        synthetic = _tally(done[SYNTHETIC])
        made = read_synthetic(store).counts
        counts["synthetic"] = {k: v for k, v in synthetic.items() if k not in ("bytes", *_READS)} | {
            "records": made["samples"], "samples_dropped": made["dropped"]}
        forwards |= {"synthetic": synthetic["draws"] * per_draw, "synthesis": made["teacher_forwards"]}
    counts["teacher_forwards"] = forwards | {"total": sum(forwards.values())}
    write_index(store, config.name, done, config.draws)
    write_labels(store, dataclasses.replace(meta, counts=counts, status="complete"))
    return counts | reads | {"seconds": seconds}
