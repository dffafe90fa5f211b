"""The toy teacher's training stages at a test size: they learn, resume exactly, and save a teacher that
loads like SD 1.5 (diffusers folder and original-layout single file)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdit.config import DATA_DIR
from sdit.convert import to_original_layout
from sdit.errors import SDiTError
from sdit.shapes import reader, samples, toy
from sdit.teacher import load_teacher

DATA = toy.DataConfig(images=32, resolution=32, check_images=8)
VAE = toy.VAEConfig(steps=4, batch_size=4, checkpoint_every=2)
UNET = toy.UNetConfig(steps=4, batch_size=4, checkpoint_every=2, warmup=2)
CONFIG = toy.ToyConfig("test", DATA, VAE, UNET)


@pytest.fixture(scope="module")
def world() -> toy.World:
    return toy.render_world(DATA.images, DATA.seed, DATA.resolution)


@pytest.fixture(scope="module")
def latents(world) -> toy.Latents:
    models = toy.build_models("test")
    return toy.encode_latents(models.vae, models.tokenizer, world)


def test_vae_loss_falls_on_a_fixed_batch(world):
    vae = toy.build_models("test").vae
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    pixels = toy.to_pixels(world.images[:8])
    losses = []
    for _ in range(20):
        loss, _ = toy.vae_loss(vae, pixels, torch.Generator().manual_seed(0), kl_weight=1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("train_text", [True, False])
def test_diffusion_loss_falls_on_a_fixed_batch(latents, train_text):
    models = toy.build_models("test")
    cfg = replace(UNET, train_text=train_text)
    models.text_encoder.requires_grad_(train_text)
    params = [*models.unet.parameters(), *(models.text_encoder.parameters() if train_text else [])]
    opt = torch.optim.AdamW(params, lr=3e-3)
    scheduler, empty = toy.noise_scheduler(), toy.caption_ids(models.tokenizer, [""])[0]
    idx = torch.arange(8)
    before = {k: v.clone() for k, v in models.text_encoder.state_dict().items()}
    losses = []
    for _ in range(20):
        g = torch.Generator().manual_seed(0)  # the same noise and timesteps every step
        loss = toy.diffusion_loss(models, latents, idx, cfg, scheduler, empty, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    changed = any(not torch.equal(v, before[k]) for k, v in models.text_encoder.state_dict().items())
    assert changed == train_text  # the UNet's loss reaches the text encoder only when asked to


def test_high_noise_weight_weighs_the_plain_loss_as_sdit_train_does(latents):
    models = toy.build_models("test")
    scheduler, empty = toy.noise_scheduler(), toy.caption_ids(models.tokenizer, [""])[0]
    idx = torch.arange(8)

    def loss(gamma: float) -> float:
        cfg = replace(UNET, high_noise_weight=gamma)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            return toy.diffusion_loss(models, latents, idx, cfg, scheduler, empty, generator).item()

    plain = loss(0.0)
    assert loss(1.0) == pytest.approx(plain, rel=1e-6)  # every weight min(1/ᾱ_t, 1) = 1
    assert loss(1e4) != pytest.approx(plain, rel=1e-3)  # uncapped, high-noise draws dominate


def test_a_high_noise_cap_below_one_is_refused_before_any_work(tmp_path):
    config = replace(CONFIG, unet=replace(UNET, high_noise_weight=0.5))
    with pytest.raises(SDiTError, match="--high-noise-weight 0.5: a cap of at least 1"):
        toy.train(tmp_path / "teacher", config, work=tmp_path / "work")
    assert not (tmp_path / "work").exists()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_vae_resume_matches_an_uninterrupted_run(world, tmp_path):
    whole = toy.build_models("test").vae
    assert toy.train_vae(whole, world.images, VAE, tmp_path / "a") == 4
    part = toy.build_models("test").vae
    assert toy.train_vae(part, world.images, replace(VAE, steps=2), tmp_path / "b") == 2
    resumed = toy.build_models("test").vae
    assert toy.train_vae(resumed, world.images, VAE, tmp_path / "b", resume=True) == 4
    assert _same(whole, resumed)
    assert not _same(whole, part)


@pytest.mark.slow
def test_unet_resume_matches_an_uninterrupted_run(latents, tmp_path):
    whole = toy.build_models("test")
    toy.train_unet(whole, latents, UNET, tmp_path / "a")
    toy.train_unet(toy.build_models("test"), latents, replace(UNET, steps=3), tmp_path / "b")
    resumed = toy.build_models("test")
    assert toy.train_unet(resumed, latents, UNET, tmp_path / "b", resume=True) == 4
    assert _same(whole.unet, resumed.unet) and _same(whole.text_encoder, resumed.text_encoder)
    assert json.loads((tmp_path / "a" / "state.json").read_text())["step"] == 4
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 4
    for name in ("ema_unet", "ema_text_encoder"):
        a, b = load_file(tmp_path / "a" / f"{name}.safetensors"), load_file(tmp_path / "b" / f"{name}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_config(tmp_path):
    toy._check_config(tmp_path / "config.json", CONFIG, resume=False)
    with pytest.raises(toy.SDiTError, match="another config"):
        toy._check_config(tmp_path / "config.json", replace(CONFIG, size="f8"), resume=True)
    longer = replace(CONFIG, threads=1, unet=replace(CONFIG.unet, steps=CONFIG.unet.steps + 100))
    toy._check_config(tmp_path / "config.json", longer, resume=True)  # more UNet steps, other threads: fine
    with pytest.raises(toy.SDiTError, match="another config"):
        toy._check_config(tmp_path / "config.json", replace(longer, unet=replace(longer.unet, steps=1)), resume=True)


@pytest.mark.slow
def test_trained_teacher_loads_like_sd15_in_both_layouts(tmp_path):
    out = tmp_path / "toy-sd"
    summary = toy.train(out, CONFIG, work=tmp_path / "work")
    assert (summary["vae_steps"], summary["unet_steps"]) == (4, 4)
    folder = load_teacher(out)
    assert folder.vae.config.scaling_factor == pytest.approx(summary["scaling_factor"])
    assert folder.scheduler_config["prediction_type"] == "epsilon"
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]

    file = tmp_path / "toy-sd.safetensors"
    save_file(to_original_layout(folder.unet, folder.vae, folder.text_encoder), file)
    single = load_teacher(file, config_dir=out)
    for name in ("vae", "text_encoder", "unet"):
        assert _same(getattr(folder, name), getattr(single, name)), name
    assert single.identity.hashes == folder.identity.hashes

    images = samples.sample_teacher(folder, ["a red circle on a white background"] * 2, steps=2)
    assert len(images) == 2 and images[0].shape == (32, 32, 3) and images[0].dtype == np.uint8


@pytest.mark.slow
def test_the_shipped_toy_teacher_loads_like_sd15_and_draws_the_world(tmp_path):
    """data/toy-sd, as the stages load it: SD 1.5's classes and 8x8x4 latents at 64 px, in either layout."""
    folder = load_teacher(DATA_DIR / "toy-sd")
    assert folder.unet.config.sample_size == 8 and folder.unet.config.cross_attention_dim == 64
    assert next(folder.unet.parameters()).dtype == torch.float32  # fp16 on disk, fp32 in the stages
    file = tmp_path / "toy-sd.safetensors"
    save_file(to_original_layout(folder.unet, folder.vae, folder.text_encoder), file)
    assert load_teacher(file, config_dir=DATA_DIR / "toy-sd").identity.hashes == folder.identity.hashes
    images = samples.sample_teacher(folder, ["a large red square in the center on a white background"] * 2, steps=20)
    readings = reader.read_batch(images)
    assert [(r.shape, r.colour, r.background) for r in readings] == [("square", "red", "white")] * 2
