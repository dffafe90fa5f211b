"""The shapes world's toy Stable Diffusion teacher: SD 1.5's component classes, trained on a CPU.

The teacher is built from exactly what SD 1.5 is built from (`AutoencoderKL`, `CLIPTextModel` with the
real CLIP tokenizer, `UNet2DConditionModel`, SD 1.5's scheduler config, epsilon prediction), only small,
and trained on the whole shapes world (held-out concepts included: the teacher knows everything). It is
saved in the diffusers layout and loads with `sdit.teacher.load_teacher`, like SD 1.5 itself.

Training runs as three stages, each a function of a frozen config, reporting steps done through a
`sdit.progress.Progress` and its figures through a `Metrics` callback, and checkpointing atomically every
`checkpoint_every` steps (a rerun with `resume` continues from there):

    render_world(work, data)           -> images (N, 64, 64, 3) uint8 + captions, cached in `work`
    train_vae(models, images, cfg)     reconstruction MSE + a small KL
    encode_latents(vae, images)        posterior mean and std; sets `scaling_factor` to 1/std, as SD did
    train_unet(models, data, cfg)      epsilon prediction on scaled latents, 10% empty captions (CFG);
                                       the text encoder learns jointly (or stays frozen, `train_text`)
    save_teacher(models, out)          model_index.json, vae/, text_encoder/, tokenizer/, unet/, scheduler/

    sdit toy train OUT_DIR [--minutes M] [--resume] [--work-dir DIR]
    sdit toy eval [--teacher DIR] [--per-prompt K] [--guidance W]   (sdit.shapes.samples)

Randomness: step k of a stage draws its batch, noise and timesteps from a generator seeded with
(stage seed, k), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdit.config import check_high_noise_weight
from sdit.diffusion import NoiseSchedule
from sdit.errors import SDiTError
from sdit.files import replace_folder
from sdit.latents import to_latent_space
from sdit.losses import distillation_loss, timestep_weight
from sdit.progress import Progress, no_progress
from sdit.shapes import reader, scores, world
from sdit.shapes.config import SIZES, DataConfig, ToyConfig, UNetConfig, VAEConfig
from sdit.teacher import SD15_CONFIG_DIR, load_scheduler_config, load_tokenizer
from sdit.text import tokenize
from sdit.tiny import save_configs
from sdit.training import ema_decay, load_checkpoint, save_checkpoint, update_ema, warmup_factor

Metrics = Callable[[dict], None]  # hears a stage's latest figures (a step's losses, the VAE's check)
Stages = Callable[[str, int], tuple[Progress, Metrics]]  # (stage name, its units) -> how it reports, as it starts


def no_metrics(figures: dict) -> None:
    """`Metrics` for callers that show none."""


def quiet_stages(stage: str, total: int) -> tuple[Progress, Metrics]:
    """`Stages` for callers that show none."""
    return no_progress, no_metrics


# --- components ---------------------------------------------------------------------------------------


@dataclass
class ToyModels:
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    tokenizer: CLIPTokenizer


def build_models(size: str, seed: int = 0) -> ToyModels:
    if size not in SIZES:
        raise SDiTError(f"unknown toy size {size!r}; choose one of {', '.join(SIZES)}")
    s = SIZES[size]
    torch.manual_seed(seed)  # the classes initialise from global state; fix it once, here
    return ToyModels(AutoencoderKL(**s.vae), CLIPTextModel(CLIPTextConfig(**s.text)), UNet2DConditionModel(**s.unet),
                     load_tokenizer(SD15_CONFIG_DIR))


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# --- data ---------------------------------------------------------------------------------------------


@dataclass
class World:
    images: np.ndarray  # (N, H, W, 3) uint8
    captions: list[str]


def render_world(n: int, seed: int, resolution: int, cache: Path | None = None) -> World:
    """`n` records of the whole world as arrays, cached as `cache/world-{n}-{seed}-{resolution}.npz`."""
    file = cache / f"world-{n}-{seed}-{resolution}.npz" if cache is not None else None
    if file is not None and file.exists():
        with np.load(file) as z:
            return World(z["images"], [str(c) for c in z["captions"]])
    records = list(world.sample(n, seed, resolution))
    renders = World(np.stack([np.asarray(r.image) for r in records]), [r.caption for r in records])
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp.npz")
        np.savez(tmp, images=renders.images, captions=np.array(renders.captions))
        os.replace(tmp, file)
    return renders


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def caption_ids(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """(N, 77) ids, as every stage makes them (sdit.text.tokenize)."""
    return tokenize(tokenizer, captions)[0]


# --- stage 1: the VAE -------------------------------------------------------------------------------------


def vae_loss(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator, kl_weight: float,
             object_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    posterior = vae.encode(pixels).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    recon = vae.decode(z).sample
    error = (recon - pixels) ** 2  # (B, 3, H, W)
    mse = error.mean()
    loss = mse
    if object_weight:
        # The world's shapes never reach the corner pixel, so it is the background.
        shape = ((pixels - pixels[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.05).float()  # (B, 1, H, W)
        loss = (error * (1 + object_weight * shape)).mean()
    kl = posterior.kl().mean() / pixels[0].numel()  # per pixel value, so the weight is size-free
    return loss + kl_weight * kl, {"mse": mse.item(), "kl": kl.item()}


def train_vae(vae: AutoencoderKL, images: np.ndarray, cfg: VAEConfig, checkpoint: Path | None = None,
              resume: bool = False, progress: Progress = no_progress, deadline: float | None = None,
              metrics: Metrics = no_metrics) -> int:
    """Train `vae` in place on `images` (N, H, W, 3) uint8. Returns the steps done."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    start = _resume(checkpoint, resume, {"vae": vae}, opt)
    vae.train()

    def one_step(step: int, g: torch.Generator) -> dict:
        idx = torch.randint(len(images), (cfg.batch_size,), generator=g).numpy()
        loss, figures = vae_loss(vae, to_pixels(images[idx]), g, cfg.kl_weight, cfg.object_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return figures

    step = _steps(cfg, start, one_step, {"vae": vae}, opt, checkpoint, progress, metrics, deadline)
    vae.eval()
    return step


def _steps(cfg, start: int, one_step: Callable[[int, torch.Generator], dict], modules: dict[str, torch.nn.Module],
           opt: torch.optim.Optimizer, checkpoint: Path | None, progress: Progress, metrics: Metrics,
           deadline: float | None) -> int:
    """Steps `start`..`cfg.steps - 1` of `one_step(step, generator) -> figures`, each from its own generator, counted
    and its figures reported; stops early past `deadline` (time.monotonic()). Checkpoints `modules` and `opt`
    every `cfg.checkpoint_every` steps and where it stops. Returns the step reached."""
    if start:
        progress(start)
    step = start
    for step in range(start, cfg.steps):
        if deadline is not None and time.monotonic() > deadline:
            break
        figures = one_step(step, _generator(cfg.seed, step))
        progress(1)
        metrics(figures)
        if checkpoint is not None and (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(checkpoint, modules, opt, {"step": step + 1})
    else:
        step = cfg.steps
    if checkpoint is not None and step > start:
        save_checkpoint(checkpoint, modules, opt, {"step": step})
    return step


def _resume(checkpoint: Path | None, resume: bool, modules: dict[str, torch.nn.Module],
            opt: torch.optim.Optimizer) -> int:
    """The step a (resumed) stage starts at: its checkpoint's, with `modules` and `opt` restored, or 0."""
    if checkpoint is None or not resume or not checkpoint.exists():
        return 0
    return int(load_checkpoint(checkpoint, modules, opt)["step"])


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Decode the posterior mean of each image: (N, H, W, 3) uint8 -> (N, H, W, 3) uint8."""
    out = []
    for i in range(0, len(images), batch_size):
        x = vae.decode(vae.encode(to_pixels(images[i:i + batch_size])).latent_dist.mean).sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def check_vae(vae: AutoencoderKL, data: DataConfig) -> dict[str, float]:
    """Attribute accuracy of reconstructions of a fresh draw of the world, beside the originals'."""
    records = list(world.sample(data.check_images, data.seed + 1, data.resolution))
    images = np.stack([np.asarray(r.image) for r in records])
    asked = [r.attrs for r in records]
    clean = scores.score(reader.read_batch(list(images)), asked).accuracy
    recon = reconstruct(vae, images)
    mse = float(((recon.astype(np.float32) - images) / 127.5).__pow__(2).mean())
    rec = scores.score(reader.read_batch(list(recon)), asked).accuracy
    return {"mse": mse} | {f"clean_{k}": v for k, v in clean.items()} | {f"recon_{k}": v for k, v in rec.items()}


# --- latents -----------------------------------------------------------------------------------------------


@dataclass
class Latents:
    mean: torch.Tensor  # (N, 4, h, w) posterior mean, unscaled
    std: torch.Tensor  # (N, 4, h, w)
    ids: torch.Tensor  # (N, 77) caption token ids


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, tokenizer: CLIPTokenizer, renders: World, batch_size: int = 256) -> Latents:
    means, stds = [], []
    for i in range(0, len(renders.images), batch_size):
        d = vae.encode(to_pixels(renders.images[i:i + batch_size])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return Latents(torch.cat(means), torch.cat(stds), caption_ids(tokenizer, renders.captions))


def latent_scale(latents: Latents, seed: int = 0) -> float:
    """1 / std of posterior samples over the data set, as SD's `scaling_factor` was chosen."""
    g = torch.Generator().manual_seed(seed)
    z = latents.mean + latents.std * torch.randn(latents.mean.shape, generator=g)
    return float(1.0 / z.std())


# --- stage 2+3: the UNet and the text encoder -------------------------------------------------------------


def noise_scheduler() -> DDPMScheduler:
    """SD 1.5's training noise: its scheduler config, as a DDPM scheduler (epsilon prediction)."""
    return DDPMScheduler.from_config(load_scheduler_config(SD15_CONFIG_DIR))


def diffusion_loss(models: ToyModels, latents: Latents, idx: torch.Tensor, cfg: UNetConfig,
                   scheduler: DDPMScheduler, empty: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """SD's loss on a posterior sample of each latent, in the VAE's scaled latent space."""
    b = len(idx)
    z = latents.mean[idx] + latents.std[idx] * torch.randn(latents.mean[idx].shape, generator=g)
    z = to_latent_space(models.vae, z)
    ids = latents.ids[idx].clone()  # (B, 77)
    ids[torch.rand(b, generator=g) < cfg.empty_caption_rate] = empty
    noise = torch.randn(z.shape, generator=g)  # (B, 4, h, w)
    if cfg.offset_noise:
        noise = noise + cfg.offset_noise * torch.randn(b, z.shape[1], 1, 1, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g)
    noisy = scheduler.add_noise(z, noise, t)
    with torch.set_grad_enabled(cfg.train_text and torch.is_grad_enabled()):
        text = models.text_encoder(ids)[0]  # (B, 77, D)
    eps = models.unet(noisy, t, text).sample
    schedule = NoiseSchedule(scheduler.alphas_cumprod.to(torch.float32), "epsilon")
    weight = timestep_weight(schedule, t, 0.0, cfg.high_noise_weight)  # (B,), None when off
    # `sdit train`'s loss with the true noise as the only target: weighted draws summed over the batch size
    return distillation_loss(eps, noise, noise, torch.ones(b, dtype=torch.bool), 1.0, 0.0, weight).loss


def _trained(models: ToyModels, cfg: UNetConfig) -> dict[str, torch.nn.Module]:
    return {"unet": models.unet} | ({"text_encoder": models.text_encoder} if cfg.train_text else {})


def train_unet(models: ToyModels, latents: Latents, cfg: UNetConfig, checkpoint: Path | None = None,
               resume: bool = False, progress: Progress = no_progress, deadline: float | None = None,
               metrics: Metrics = no_metrics) -> int:
    """Train the UNet (and the text encoder, with `train_text`) in place, on latents scaled by the VAE's
    `scaling_factor`; on return their weights are the EMA weights. Returns the steps done."""
    trained = _trained(models, cfg)
    models.text_encoder.requires_grad_(cfg.train_text)
    models.text_encoder.embeddings.token_embedding.requires_grad_(cfg.train_text and cfg.train_token_embedding)
    params = [p for m in trained.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ema = {f"ema_{name}": copy.deepcopy(m).requires_grad_(False) for name, m in trained.items()}
    start = _resume(checkpoint, resume, trained | ema, opt)
    for group in opt.param_groups:  # the warm-up's lr at step `start` (a fresh LambdaLR starts at step 0)
        group["lr"] = cfg.lr * warmup_factor(start, cfg.warmup)
    scheduler = noise_scheduler()
    empty = caption_ids(models.tokenizer, [""])[0]
    for m in trained.values():
        m.train()

    def one_step(step: int, g: torch.Generator) -> dict:
        idx = torch.randint(len(latents.ids), (cfg.batch_size,), generator=g)
        loss = diffusion_loss(models, latents, idx, cfg, scheduler, empty, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warmup_factor(step + 1, cfg.warmup)
        for name, m in trained.items():
            update_ema(ema[f"ema_{name}"], m, ema_decay(step, cfg.ema_decay))
        return {"loss": loss.item()}

    step = _steps(cfg, start, one_step, trained | ema, opt, checkpoint, progress, metrics, deadline)
    for name, m in trained.items():
        m.load_state_dict(ema[f"ema_{name}"].state_dict())
        m.eval()
    models.text_encoder.requires_grad_(False)
    return step


# --- the whole run -------------------------------------------------------------------------------------------


def save_teacher(models: ToyModels, out: Path, readme: str | None = None,
                 dtype: torch.dtype = torch.float32) -> Path:
    """The diffusers layout, weights as safetensors in `dtype` (the shipped teacher is fp16; stages load it in
    fp32); written beside `out` and moved into place whole."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    parts = {"vae": models.vae, "text_encoder": models.text_encoder, "unet": models.unet}
    save_configs(parts, tmp)
    for name, model in parts.items():
        copy.deepcopy(model).to(dtype).save_pretrained(tmp / name, safe_serialization=True)
    keep = out / "README.md"
    if readme is not None:
        (tmp / "README.md").write_text(readme)
    elif keep.exists():
        (tmp / "README.md").write_text(keep.read_text())
    return replace_folder(tmp, out)


def train(out: str | Path, config: ToyConfig = ToyConfig(), work: str | Path | None = None, resume: bool = False,
          minutes: float | None = None, stages: Stages = quiet_stages, dtype: torch.dtype = torch.float16) -> dict:
    """Every stage, then the teacher folder at `out`. Returns a summary (also `work/summary.json`).

    `minutes` caps the wall time: the VAE gets a quarter of it, the UNet what is left; a stage cut short
    saves its checkpoint, and the summary says how many steps it did."""
    check_high_noise_weight(config.unet.high_noise_weight)
    out = Path(out)
    work = Path(work) if work is not None else out.with_name(out.name + "-work")
    work.mkdir(parents=True, exist_ok=True)
    _check_config(work / "config.json", config, resume)
    torch.set_num_threads(config.threads)
    t0 = time.monotonic()
    deadline = t0 + 60 * minutes if minutes is not None else None
    done, metrics = stages("data", 1)
    renders = render_world(config.data.images, config.data.seed, config.data.resolution, work)
    done(1)
    metrics({"images": len(renders.images), "s": time.monotonic() - t0})
    models = build_models(config.size, config.data.seed)
    vae_deadline = t0 + 15 * minutes if minutes is not None else None
    done, metrics = stages("vae", config.vae.steps)
    vae_steps = train_vae(models.vae, renders.images, config.vae, work / "vae-checkpoint", resume, done, vae_deadline,
                          metrics)
    t_vae = time.monotonic() - t0
    vae_check = check_vae(models.vae, config.data)
    latents = encode_latents(models.vae, models.tokenizer, renders)
    scale = latent_scale(latents)
    models.vae.register_to_config(scaling_factor=scale)
    done, metrics = stages("latents", 1)
    done(1)
    metrics({"scaling_factor": scale, **vae_check})
    done, metrics = stages("unet", config.unet.steps)
    unet_steps = train_unet(models, latents, config.unet, work / "unet-checkpoint", resume, done, deadline, metrics)
    summary = {"config": config.to_json(), "vae_steps": vae_steps, "unet_steps": unet_steps,
               "scaling_factor": scale, "vae_check": vae_check, "vae_seconds": t_vae,
               "seconds": time.monotonic() - t0, "parameters": parameter_counts(models)}
    save_teacher(models, out, dtype=dtype)
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _check_config(file: Path, config: ToyConfig, resume: bool) -> None:
    """A resume must repeat the run's config, except for more UNet steps or another thread count (which changes
    the rounding of later steps, not what is trained)."""
    if resume and file.exists():
        old = ToyConfig.from_json(json.loads(file.read_text()))
        extended = replace(config, threads=old.threads, unet=replace(config.unet, steps=old.unet.steps))
        if old != extended or config.unet.steps < old.unet.steps:
            raise SDiTError(f"{file.parent} was trained with another config; resume with the same options "
                            "(only --unet-steps may grow, and --threads change) or start again without --resume")
    file.write_text(json.dumps(config.to_json(), indent=2))


def parameter_counts(models: ToyModels) -> dict[str, int]:
    return {n: sum(p.numel() for p in getattr(models, n).parameters()) for n in ("vae", "text_encoder", "unet")}
