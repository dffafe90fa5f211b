import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
import zarr
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli import app
from conftest import SAMPLES, child_env, cli_command, kill_paused_at, new_run
from pipeline.encode import EncodeConfig, encode
from pipeline.label import LabelConfig, ShardLabeler, label
from pipeline.train import TrainConfig, train
from pipeline.train_monitor import read_metrics
from sdit import sampling
from sdit.config import SynthesisConfig
from sdit.diffusion import NoiseSchedule, noisy_latents
from sdit.errors import SDiTError
from sdit.loader import Batch, DrawStream, LabelledStore, Position
from sdit.losses import distillation_loss, draw_weight, true_noise_mask
from sdit.perturb import Kind, PerturbConfig
from sdit.store import Store, columns_of
from sdit.synthesize import ShardSynthesizer, initial_noise, read_prompts, read_synthetic
from sdit.teacher import load_teacher

MIX = PerturbConfig(mix={"none": 0.4, "input": 0.15, "swap": 0.15, "mix": 0.15, "null": 0.15}, caption_min_t=0)
# 3 prompts x 2 samples: 2 prompts a synthetic shard (the store's shard size 4 // 2 samples), so two shards.
SYNTH = SynthesisConfig(samples=2, steps=4, guidance=5.0)
TRAJECTORY = SynthesisConfig(samples=2, steps=4, guidance=5.0, trajectory=2)  # the labels' 2 draws: 2 DDIM steps
runner = CliRunner()


@pytest.fixture(scope="module")
def encoded(encoded_store):
    """The bundled samples (11 records in 3 shards) and a 3-prompt bank; tests label copies."""
    return encoded_store


@pytest.fixture
def store(encoded, tmp_path):
    return shutil.copytree(encoded, tmp_path / "store")


@pytest.fixture
def unet_rows(monkeypatch) -> list[int]:
    """The rows of every teacher UNet call from here on: the teacher forwards a test's run took."""
    rows, forward = [], UNet2DConditionModel.forward

    def counting(self, sample, *args, **kwargs):
        rows.append(len(sample))
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counting)
    return rows


def _label(store, teacher, name="synth", synthesis=SYNTH, **options):
    config = dict(store=str(store), teacher=str(teacher), name=name, draws=2, perturb=MIX, batch_size=3,
                  synthesis=synthesis)
    return label(LabelConfig(**config | options))


def _arrays(store, group: str) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(store), mode="r")
    return {path: arr[:] for path, arr in root[group].members(max_depth=None) if isinstance(arr, zarr.Array)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_synthetic_records_are_the_teachers_samples_and_deterministic_for_a_seed(store, tiny_teacher, tmp_path):
    again = shutil.copytree(store, tmp_path / "again")
    other = shutil.copytree(store, tmp_path / "other")
    _label(store, tiny_teacher)
    _label(again, tiny_teacher)
    _label(other, tiny_teacher, synthesis=SynthesisConfig(samples=2, steps=4, guidance=5.0, seed=1))
    synth = _arrays(store, "synthetic")
    assert _same(synth, _arrays(again, "synthetic")) and _same(_arrays(store, "labels"), _arrays(again, "labels"))
    assert not np.array_equal(synth["00000/latents"], _arrays(other, "synthetic")["00000/latents"])
    # Shard k holds prompts [2k, 2k + 2), two samples each, with the prompt's own embedding and caption.
    bank = read_prompts(Store(str(store)), 0, 3)
    prompt = np.concatenate([synth["00000/prompt_index"], synth["00001/prompt_index"]])
    assert prompt.tolist() == [0, 0, 1, 1, 2, 2]
    assert np.concatenate([synth["00000/sample"], synth["00001/sample"]]).tolist() == [0, 1] * 3
    assert np.array_equal(np.concatenate([synth["00000/text_emb"], synth["00001/text_emb"]]), bank["text_emb"][prompt])
    assert list(synth["00001/captions"]) == ["a green star"] * 2
    assert list(synth["00000/ids"]) == ["synth-0-0", "synth-0-1", "synth-1-0", "synth-1-1"]
    assert synth["00001/positions"].tolist() == [4, 5]
    latents = synth["00000/latents"]
    assert latents.dtype == np.float16 and latents.shape == (4, 4, 8, 8) and np.isfinite(latents).all()
    assert not np.array_equal(latents[0], latents[1])  # two samples of one prompt: two initial noises


@pytest.mark.slow
def test_a_samples_noise_and_latent_do_not_depend_on_its_batch(store, tiny_teacher, tmp_path):
    noise = initial_noise(0, np.array([0, 2, 1]), np.array([1, 0, 1]), (4, 8, 8))
    assert torch.equal(noise[1], initial_noise(0, np.array([2]), np.array([0]), (4, 8, 8))[0])
    one = shutil.copytree(store, tmp_path / "one")
    _label(store, tiny_teacher)
    _label(one, tiny_teacher, batch_size=1)
    a, b = _arrays(store, "synthetic"), _arrays(one, "synthetic")
    assert np.allclose(a["00000/latents"].astype(np.float32), b["00000/latents"].astype(np.float32), atol=2e-2)


@pytest.mark.slow
def test_sigkill_while_synthesizing_or_labelling_synthetic_records_then_rerun_equals_an_uninterrupted_run(
        store, tiny_teacher, tmp_path):
    def args(target):
        return ["teacher-label", target, "--teacher", tiny_teacher, "--labels", "synth", "--draws", 2, "--perturb",
                "none=0.4,input=0.15,swap=0.15,mix=0.15,null=0.15", "--caption-min-t", 0, "--batch-size", 3,
                "--synthesize", SYNTH.samples, "--synth-steps", SYNTH.steps, "--synth-guidance", SYNTH.guidance]

    whole = shutil.copytree(store, tmp_path / "whole")
    subprocess.run(cli_command(*args(whole)), check=True, env=child_env(), capture_output=True)
    n_synthetic, n_labels = (sum(not column.optional for column in columns_of(group).values())
                             for group in ("synthetic", "labels/synth"))
    n_records = len(Store(str(store)).finished("records"))
    # Zarr arrays are written in this order: 2 synthetic shards, the labels of the record shards, then those of
    # the 2 synthetic shards. Kill just before the second array of the second synthetic shard, and of its labels.
    for name, call in (("synthesizing", n_synthetic + 2),
                       ("labelling", 2 * n_synthetic + (n_records + 1) * n_labels + 2)):
        killed = shutil.copytree(store, tmp_path / name)
        kill_paused_at(args(killed), "zarr:Group.create_array", call, tmp_path / f"{name}.paused")
        group = "synthetic" if name == "synthesizing" else "labels/synth/synthetic"
        assert list(Store(str(killed)).finished(group)) == [0], name
        subprocess.run(cli_command(*args(killed)), check=True, env=child_env(), capture_output=True)
        for group in ("synthetic", "labels"):
            assert _same(_arrays(killed, group), _arrays(whole, group)), (name, group)
        assert _manifests(killed) == _manifests(whole), name


def _manifests(store) -> tuple[dict, dict]:
    """The synthetic set's and its labels' manifests, less what names one run (its id and creation time)."""
    synthetic = json.loads((store / "synthetic" / "manifest.json").read_text())
    labels = json.loads((store / "labels" / "synth" / "manifest.json").read_text())
    return ({k: v for k, v in synthetic.items() if k not in ("set_id", "created")},
            {k: v for k, v in labels.items() if k != "synthetic_set"})


@pytest.mark.parametrize("synthesis", [SYNTH, TRAJECTORY], ids=["samples", "trajectories"])
def test_stage_two_rebuilds_every_input_from_the_store_alone(store, tiny_teacher, monkeypatch, synthesis):
    seen, original = [], ShardLabeler.teacher_eps

    def spy(self, inputs, guidance):
        seen.append(inputs)
        return original(self, inputs, guidance)

    monkeypatch.setattr(ShardLabeler, "teacher_eps", spy)
    _label(store, tiny_teacher, synthesis=synthesis)
    data = LabelledStore(str(store), "synth")
    assert data.synthetic_counts == {0: 4, 1: 2}
    # Stage one labelled records shards, then synthetic shards, each in (record, draw) order: so does an
    # unshuffled stream, rebuilt from the store alone.
    got = Batch.cat(list(DrawStream(data, 5, shuffle=False, repeat=False)), Position())
    assert len(got) == (11 + 6) * 2
    assert torch.equal(got.x_t, torch.cat([i.x_t for i in seen]))
    assert torch.equal(got.text, torch.cat([i.text for i in seen]))
    assert torch.equal(got.timesteps, torch.cat([i.timesteps for i in seen]))
    assert got.synthetic.tolist() == [False] * 22 + [True] * 12
    synth = Store(str(store)).shard_group("labels/synth/synthetic", 0)
    assert torch.equal(got.eps_teacher[22:30], torch.as_tensor(synth["eps_teacher"][:]).flatten(0, 1))


@pytest.mark.slow
def test_a_synthetic_set_resumes_with_the_same_weights_from_another_place_and_refuses_other_weights(
        store, tiny_teacher, tmp_path):
    _label(store, tiny_teacher)
    made = _arrays(store, "synthetic")
    (store / "_done" / "synthetic" / "00001.json").unlink()  # the second of its two shards, to make again
    elsewhere = shutil.copytree(tiny_teacher, tmp_path / "another-machine" / "teacher")
    _label(store, elsewhere, name="moved")
    assert _same(_arrays(store, "synthetic"), made)
    retrained = shutil.copytree(tiny_teacher, tmp_path / "retrained")
    unet = retrained / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(unet).items()}, unet)
    with pytest.raises(SDiTError, match=r"made with another teacher \(.*: other unet weights\)"):
        _label(store, retrained, name="retrained")


@pytest.mark.slow
def test_labels_of_a_replaced_synthetic_set_are_refused(store, tiny_teacher):
    _label(store, tiny_teacher, synthesis=SynthesisConfig(samples=1, steps=2))
    shutil.rmtree(store / "synthetic")
    shutil.rmtree(store / "_done" / "synthetic")
    _label(store, tiny_teacher, name="new", synthesis=SynthesisConfig(samples=1, steps=2))  # a new set, same options
    with pytest.raises(SDiTError, match="describe synthetic records the store no longer holds"):
        LabelledStore(str(store), "synth")
    with pytest.raises(SDiTError, match="were made with another set of synthetic records"):
        _label(store, tiny_teacher, synthesis=SynthesisConfig(samples=1, steps=2))
    assert LabelledStore(str(store), "new").synthetic_counts == {0: 3}


@pytest.mark.slow
def test_synthetic_draws_have_their_own_generators_and_respect_the_caption_range(store, tiny_teacher):
    window = PerturbConfig(mix={"none": 0.4, "swap": 0.3, "mix": 0.3}, caption_min_t=500)
    _label(store, tiny_teacher, name="window", draws=8, perturb=window)
    labels = _arrays(store, "labels/window")
    for shard in ("synthetic/00000", "synthetic/00001", "00000"):
        kinds, ts = labels[f"{shard}/kind"], labels[f"{shard}/timesteps"]
        captions = (kinds == Kind.SWAP) | (kinds == Kind.MIX)
        assert captions.any() and (ts[captions] >= 500).all(), shard
    # Record r of synthetic shard 0 and of records shard 0 draw from different generators; the records' draws
    # are those of a labelling without synthesis.
    assert not np.array_equal(labels["synthetic/00000/noise"], labels["00000/noise"])
    _label(store, tiny_teacher, name="plain", draws=8, perturb=window, synthesis=None)
    plain = _arrays(store, "labels/plain")
    assert all(np.array_equal(plain[k], labels[k]) for k in plain)


@pytest.mark.slow
def test_manifests_record_provenance_and_teacher_forwards(store, tiny_teacher, unet_rows):
    counts = _label(store, tiny_teacher)
    s = Store(str(store))
    made = s.read_json("synthetic", "manifest.json")
    assert made["status"] == "complete" and made["config"] == {"samples": 2, "steps": 4, "guidance": 5.0, "seed": 0,
                                                               "scheduler": None, "trajectory": 0}
    assert made["scheduler"]["class"] == "PNDMScheduler" and set(made["teacher"]["hashes"]) == {"vae", "text_encoder",
                                                                                              "unet"}
    assert made["forwards_per_sample"] == (4 + 1) * 2  # PNDM runs steps + 1 timesteps; x2 with guidance
    assert made["counts"] == {"samples": 6, "dropped": 0, "planned": 6, "shards": 2, "teacher_forwards": 60}
    forwards = counts["teacher_forwards"]
    assert forwards == {"records": 22, "synthetic": 12, "synthesis": 60, "total": 94}
    assert sum(unet_rows) == forwards["total"]  # every UNet row the run computed, and no other
    meta = s.read_json("labels/synth/manifest.json")
    assert meta["synthesis"] == made["config"] and meta["synthetic_set"] == made["set_id"]
    assert meta["counts"]["synthetic"]["records"] == 6 and meta["counts"]["draws"] == 22


@pytest.mark.slow
def test_non_finite_samples_are_dropped_or_stop_the_run(store, tiny_teacher, monkeypatch):
    original = ShardSynthesizer.sample

    def poisoned(self, noise, text):
        latents, states, forwards = original(self, noise, text)
        latents = latents.copy()
        latents[0] = float("nan")
        return latents, states, forwards

    monkeypatch.setattr(ShardSynthesizer, "sample", poisoned)
    # Batches of 3 samples: shard 0 (4 samples) loses samples 0 and 3, shard 1 (2 samples) its first.
    with pytest.raises(SDiTError, match="sample was NaN or inf for 2 of 4 samples"):
        _label(store, tiny_teacher, max_dropped=0.0)
    counts = _label(store, tiny_teacher, max_dropped=0.5)  # resumes: shard 0 is kept
    assert counts["synthetic"]["samples_dropped"] == 3 and counts["synthetic"]["records"] == 3
    synth = _arrays(store, "synthetic")
    assert synth["00000/ids"].tolist() == ["synth-0-1", "synth-1-0"] and synth["00001/ids"].tolist() == ["synth-2-1"]
    assert all(np.isfinite(v).all() for k, v in synth.items() if k.endswith("latents"))


def test_the_synthetic_weight_scales_synthetic_draws_in_both_losses():
    synthetic = torch.tensor([False, True, True, False])
    eps, noise, eps_t = torch.randn(3, 4, 4, 2, 2).unbind()
    mask = torch.tensor([True, True, False, False])
    w = draw_weight(synthetic, 0.25)
    assert w.tolist() == [1.0, 0.25, 0.25, 1.0]
    assert draw_weight(synthetic, 1.0) is None
    snr = torch.tensor([0.5, 0.5, 2.0, 2.0])
    assert draw_weight(synthetic, 0.25, snr).tolist() == [0.5, 0.125, 0.5, 2.0]
    got = distillation_loss(eps, noise, eps_t, mask, 1.0, 2.0, w).loss
    task = (eps - noise).pow(2).mean(dim=(1, 2, 3)) * mask
    kd = (eps - eps_t).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(got, (w * task).sum() / 4 + 2.0 * (w * kd).sum() / 4)


@pytest.mark.slow
def test_training_on_synthetic_records(store, tiny_teacher, tmp_path):
    _label(store, tiny_teacher)
    fast = dict(store=str(store), init=str(new_run(tmp_path / "init", tiny_teacher)), batch_size=8, lr=1e-3, warmup=2,
                ema_decay=0.9, sample_steps=2, sample_prompts=2, steps=2, checkpoint_every=2)
    train(TrainConfig(out=str(tmp_path / "run"), labels="synth", synthetic_weight=0.5, **fast))
    assert [m["step"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    _label(store, tiny_teacher, name="real", synthesis=None)
    with pytest.raises(SDiTError, match="labels 'real' have no synthetic records"):
        train(TrainConfig(out=str(tmp_path / "run2"), labels="real", synthetic_weight=0.5, **fast))
    assert not (tmp_path / "run2").exists()  # refused before any work


@pytest.mark.slow
def test_trajectory_draws_are_the_states_the_teachers_sampler_visits(store, tiny_teacher, unet_rows):
    counts = _label(store, tiny_teacher, synthesis=TRAJECTORY)
    s = Store(str(store))
    made = read_synthetic(s)
    # DDIM with 4 steps strides 250 from 751: the states after its first two steps sit at 501 and 251.
    assert made.trajectory_timesteps == [501, 251] and made.forwards_per_sample == 2 * 2
    assert counts["teacher_forwards"] == {"records": 22, "synthetic": 12, "synthesis": 24, "total": 58}
    assert sum(unet_rows) == 58 and counts["synthetic"]["kinds"] == {"none": 0, "input": 0, "swap": 0, "mix": 0,
                                                                "null": 0, "trajectory": 12}
    # The stored (x̂_0, ε) rebuild the states the teacher's own DDIM loop visits from the same initial noise.
    teacher = load_teacher(tiny_teacher)
    synth, labels = s.shard_group("synthetic", 0), s.shard_group("labels/synth/synthetic", 0)
    text = torch.as_tensor(synth["text_emb"][:]).float()
    null = torch.as_tensor(s.null_embedding()).float().expand_as(text)
    noise = initial_noise(0, synth["prompt_index"][:], synth["sample"][:], (4, 8, 8))
    scheduler = sampling.make_scheduler("ddim", teacher.scheduler_config)
    steps = sampling.denoising_steps(sampling.teacher_eps(teacher.unet), scheduler, noise, text, null, 4, 5.0)
    visited = torch.stack([next(steps).prev_sample for _ in range(2)], dim=1)  # (4, 2, C, h, w)
    schedule = NoiseSchedule.from_config(teacher.scheduler_config)
    for d, t in enumerate(made.trajectory_timesteps):
        rebuilt = noisy_latents(schedule, synth["latents"][:], synth["states"][:, d], torch.full((4,), t))
        assert torch.allclose(rebuilt, visited[:, d], atol=1e-2), d
    # Each state is a draw with its record's own caption, the state as noise, and no true-noise target.
    assert (labels["kind"][:] == Kind.TRAJECTORY).all() and (labels["timesteps"][:] == [501, 251]).all()
    assert np.array_equal(labels["noise"][:], synth["states"][:]) and (labels["caption_index"][:] == -1).all()
    kinds = torch.as_tensor(labels["kind"][:]).flatten().long()
    assert not true_noise_mask(kinds, torch.zeros(len(kinds)), guided=False).any()


def test_errors_are_one_line(encoded, store, tiny_teacher, tmp_path):
    def one_line(args: list[str], fragment: str) -> None:
        result = runner.invoke(app, args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert fragment in lines[0], result.output

    no_bank = tmp_path / "no-bank"
    encode(EncodeConfig(source=str(SAMPLES), teacher=str(tiny_teacher), out=str(no_bank), resolution=64, shard_size=8,
                        limit=8))
    base = ["teacher-label", "--teacher", str(tiny_teacher), "--draws", "1", "--synthesize", "2"]
    one_line([base[0], str(no_bank), *base[1:]], "--synthesize needs a text-only prompt bank")
    one_line([base[0], str(store), *base[1:], "--synth-scheduler", "ddpm"], "draws noise at every step")
    one_line([base[0], str(store), *base[1:], "--synth-scheduler", "heun"], "--synth-scheduler 'heun'")
    assert runner.invoke(app, [*base[:1], str(store), *base[1:], "--synth-steps", "2"]).exit_code == 0
    one_line([base[0], str(store), *base[1:], "--synth-steps", "3", "--labels", "other"],
             "synthetic records were made with steps 2 (now 3)")
    one_line([base[0], str(store), *base[1:5], "--synth-trajectory"], "give --synthesize N as well")
    one_line([base[0], str(store), *base[1:], "--synth-trajectory", "--draws", "4", "--synth-steps", "4"],
             "give --synth-steps above 4 (now 4)")
    one_line([base[0], str(store), *base[1:], "--synth-trajectory", "--synth-scheduler", "pndm"],
             "drop --synth-scheduler pndm")


@pytest.mark.slow
def test_ray_makes_the_same_synthetic_records_and_labels(store, tiny_teacher, tmp_path):
    import ray

    local = shutil.copytree(store, tmp_path / "local")
    _label(local, tiny_teacher)
    try:
        _label(store, tiny_teacher, ray_address="local", num_workers=2)
    finally:
        ray.shutdown()
    for group in ("synthetic", "labels"):
        assert _same(_arrays(store, group), _arrays(local, group)), group


@pytest.mark.slow
def test_trajectory_draws_take_guided_targets(store, tiny_teacher, unet_rows):
    """With guidance, a trajectory state is labelled as a record's draw is: ε_u + w(ε_c − ε_u), w drawn per draw."""
    counts = _label(store, tiny_teacher, synthesis=TRAJECTORY, guidance=(1.0, 3.0))
    assert counts["teacher_forwards"] == {"records": 44, "synthetic": 24, "synthesis": 24, "total": 92}
    assert sum(unet_rows) == 92
    s = Store(str(store))
    teacher = load_teacher(tiny_teacher)
    schedule = NoiseSchedule.from_config(teacher.scheduler_config)
    synth, labels = s.shard_group("synthetic", 0), s.shard_group("labels/synth/synthetic", 0)
    w = labels["guidance"][:]
    assert ((w >= 1.0) & (w <= 3.0)).all() and len(np.unique(w)) == w.size
    text = torch.as_tensor(synth["text_emb"][:]).float()
    null = torch.as_tensor(s.null_embedding()).float().expand_as(text)
    for d, t in enumerate(read_synthetic(s).trajectory_timesteps):
        x = noisy_latents(schedule, synth["latents"][:], synth["states"][:, d], torch.full((len(text),), t))
        with torch.no_grad():
            eps_c, eps_u = (teacher.unet(x, t, encoder_hidden_states=e).sample for e in (text, null))
        guided = eps_u + torch.as_tensor(w[:, d]).view(-1, 1, 1, 1) * (eps_c - eps_u)
        torch.testing.assert_close(torch.as_tensor(labels["eps_teacher"][:, d]).float(), guided, atol=2e-3,
                                   rtol=2e-3)  # stored in fp16
