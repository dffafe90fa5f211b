import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file

import pipeline.label as label_stage
from conftest import ALL_KINDS, child_env, cli_command, kill_paused_at, kill_when
from pipeline.encode import EncodeConfig, encode
from pipeline.label import LabelConfig, ShardLabeler, label
from sdit.config import DRAWN_KINDS
from sdit.diffusion import NoiseSchedule
from sdit.errors import SDiTError
from sdit.labels import CaptionBank, read_index, teacher_inputs
from sdit.perturb import CaptionFrom, Kind, PerturbConfig
from sdit.store import LABEL_COLUMNS, Store

MIX = PerturbConfig(mix=ALL_KINDS, caption_min_t=0)
DRAWN = [name for name in LABEL_COLUMNS if name not in ("eps_teacher", "eps_uncond", "valid")]


@pytest.fixture(scope="module")
def store(encoded_store, tmp_path_factory):
    return shutil.copytree(encoded_store, tmp_path_factory.mktemp("label") / "store")


def _label(store, teacher, **options):
    defaults = dict(store=str(store), teacher=str(teacher), perturb=MIX, batch_size=5)
    return label(LabelConfig(**defaults | options))


def _labels(store, name="default") -> dict:
    root = zarr.open_group(str(store), mode="r")
    return {f"{shard}/{col}": arr[:] for shard, group in sorted(root[f"labels/{name}"].groups())
            for col, arr in group.arrays()}


def test_inputs_rebuilt_from_the_store_equal_what_the_teacher_saw(store, tiny_teacher, monkeypatch):
    seen = []
    original = ShardLabeler.teacher_eps

    def spy(self, inputs, guidance):
        seen.append(inputs)
        return original(self, inputs, guidance)

    monkeypatch.setattr(ShardLabeler, "teacher_eps", spy)
    counts = _label(store, tiny_teacher, name="rebuild", draws=3)
    assert counts["draws"] == 11 * 3 and all(counts["kinds"][k.name.lower()] > 0 for k in DRAWN_KINDS)
    # Stage two's view: the store alone, no teacher.
    s = Store(str(store))
    schedule = NoiseSchedule.from_config(s.manifest().teacher["scheduler"])
    bank, null = CaptionBank(s), s.root_group()["null_text_emb"][:]
    meta = s.read_json("labels/rebuild/manifest.json")
    x_t, text, t = [], [], []
    for index, records in s.iter_shards("records"):
        labels = {k: v[:] for k, v in s.shard_group("labels/rebuild", index).arrays()}
        rows, draws = np.divmod(np.arange(records["latents"].shape[0] * 3), 3)
        rebuilt = teacher_inputs(schedule, records["latents"][:], records["text_emb"][:], labels, rows, draws, bank,
                                 null, meta["perturb"]["input_gamma"])
        x_t.append(rebuilt.x_t), text.append(rebuilt.text), t.append(rebuilt.timesteps)
    assert torch.equal(torch.cat(x_t), torch.cat([i.x_t for i in seen]))
    assert torch.equal(torch.cat(text), torch.cat([i.text for i in seen]))
    assert torch.equal(torch.cat(t), torch.cat([i.timesteps for i in seen]))
    # A swap or mix reads one embedding for each caption it takes, about its own bytes (plus a shard index).
    row = 2 * np.prod(s.manifest().text_shape)
    per_read = counts["caption_bytes_per_draw"] / counts["caption_reads_per_draw"]
    assert row < per_read < 1.5 * row  # and its checksum, and a shard's index and zarr.json when first read
    assert counts["read_bytes_per_draw"] > counts["caption_bytes_per_draw"]


def test_the_caption_bank_reads_a_row_once_while_it_is_cached(store):
    s = Store(str(store))
    bank = CaptionBank(s, cache_bytes=2 * 2 * np.prod(s.manifest().text_shape))  # two rows
    text = {i: s.read("records", k, ("text_emb",))["text_emb"] for i, k in enumerate(s.finished("records"))}
    first = bank.get(CaptionFrom.RECORD, 0)
    assert np.array_equal(first, text[0][0]) and bank.fetches == 1 and bank.bytes_read > first.nbytes
    bank.get(CaptionFrom.RECORD, 0)
    assert bank.fetches == 1
    bank.get(CaptionFrom.RECORD, 1), bank.get(CaptionFrom.RECORD, 2), bank.get(CaptionFrom.RECORD, 0)
    assert bank.fetches == 4  # row 0 left the cache of two rows
    assert np.array_equal(bank.get(CaptionFrom.PROMPT, 0), s.read("prompts", 0, ("text_emb",))["text_emb"][0])


@pytest.mark.slow
def test_same_seed_same_labels_whatever_the_batch_size(store, tiny_teacher):
    _label(store, tiny_teacher, name="b5", draws=2)
    _label(store, tiny_teacher, name="b5again", draws=2)
    _label(store, tiny_teacher, name="b1", draws=2, batch_size=1)
    _label(store, tiny_teacher, name="seed1", draws=2, seed=1)
    b5, again, b1, seed1 = (_labels(store, n) for n in ("b5", "b5again", "b1", "seed1"))
    for key in b5:
        assert np.array_equal(b5[key], again[key]), key  # same batch size and device: the same bytes
        if key.endswith(tuple(DRAWN)):
            assert np.array_equal(b5[key], b1[key]), key  # everything drawn: the same bytes
    eps = [k for k in b5 if k.endswith("eps_teacher")]
    assert all(np.allclose(b5[k], b1[k], atol=2e-3) for k in eps)  # batched kernels: within fp16 rounding
    assert not np.array_equal(b5["00000/noise"], seed1["00000/noise"])


def test_inputs_built_ahead_give_the_same_labels(store, tiny_teacher, monkeypatch):
    """On a GPU the next batches' inputs are built on a thread while the UNet runs: the same bytes either way."""
    from sdit.loader import prefetch

    _label(store, tiny_teacher, name="inline", draws=2)
    threads = []
    monkeypatch.setattr(label_stage, "read_ahead", lambda batches, device: threads.append(1) or prefetch(batches))
    _label(store, tiny_teacher, name="ahead", draws=2)
    inline, ahead = _labels(store, "inline"), _labels(store, "ahead")
    assert threads and inline.keys() == ahead.keys()
    assert all(np.array_equal(inline[key], ahead[key]) for key in inline)


@pytest.mark.slow
def test_resume_after_a_crash_equals_an_uninterrupted_run(store, tiny_teacher):
    _label(store, tiny_teacher, name="whole", draws=2)
    _label(store, tiny_teacher, name="crash", draws=2)
    (store / "_done" / "labels" / "crash" / "00001.json").unlink()
    counts = _label(store, tiny_teacher, name="crash", draws=2)
    assert counts["shards"] == 4
    whole, crash = _labels(store, "whole"), _labels(store, "crash")
    assert whole.keys() == crash.keys() and all(np.array_equal(whole[k], crash[k]) for k in whole)


def test_a_labelling_resumes_with_the_same_weights_from_another_place_and_refuses_other_weights(
        store, tiny_teacher, tmp_path):
    _label(store, tiny_teacher, name="moved", draws=2)
    whole = _labels(store, "moved")
    (store / "_done" / "labels" / "moved" / "00001.json").unlink()
    elsewhere = shutil.copytree(tiny_teacher, tmp_path / "another-machine" / "teacher")
    assert _label(store, elsewhere, name="moved", draws=2)["shards"] == 4
    resumed = _labels(store, "moved")
    assert resumed.keys() == whole.keys() and all(np.array_equal(whole[k], resumed[k]) for k in whole)
    retrained = shutil.copytree(tiny_teacher, tmp_path / "retrained")  # the same VAE and text encoder
    unet = retrained / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(unet).items()}, unet)
    with pytest.raises(SDiTError, match="made with another teacher"):
        _label(store, retrained, name="moved", draws=2)


def test_label_shards_the_driver_cannot_see_leave_the_labels_unfinished(store, tiny_teacher, monkeypatch):
    run = label_stage._run

    def workers_on_their_own_disks(executor, tasks, config, progress, unit):  # shard 2 lands on a worker's disk
        run(executor, tasks, config, progress, unit)
        (store / "_done" / "labels" / "unseen" / "00002.json").unlink(missing_ok=True)

    monkeypatch.setattr(label_stage, "_run", workers_on_their_own_disks)
    with pytest.raises(SDiTError, match=r"1 of 4 shards are not in .*\(labels/unseen/00002\)"):
        _label(store, tiny_teacher, name="unseen", draws=1)
    assert json.loads((store / "labels" / "unseen" / "manifest.json").read_text())["status"] != "complete"


@pytest.mark.slow
def test_caption_perturbations_respect_their_timestep_range(store, tiny_teacher):
    _label(store, tiny_teacher, name="window", draws=4,
           perturb=PerturbConfig(mix={"none": 0.5, "swap": 0.25, "mix": 0.25}, caption_min_t=500))
    labels = _labels(store, "window")
    for shard in ("00000", "00001", "00002"):
        kinds, ts = labels[f"{shard}/kind"], labels[f"{shard}/timesteps"]
        assert (ts[(kinds == Kind.SWAP) | (kinds == Kind.MIX)] >= 500).all()


@pytest.mark.slow
def test_guidance_targets(store, tiny_teacher):
    counts = _label(store, tiny_teacher, name="guided", draws=2, guidance=(2.0, 6.0))
    labels = _labels(store, "guided")
    w = np.concatenate([labels[k].ravel() for k in labels if k.endswith("/guidance")])
    assert ((w >= 2.0) & (w <= 6.0)).all() and counts["dropped"] == 0
    meta = json.loads((store / "labels" / "guided" / "manifest.json").read_text())
    assert meta["guidance"] == [2.0, 6.0] and meta["status"] == "complete"
    assert set(meta["teacher"]["hashes"]) == {"vae", "text_encoder", "unet"}
    assert meta["counts"]["bytes_per_draw"] > 2 * 2 * 4 * 8 * 8  # noise and ε_T in fp16, at least
    assert meta["counts"]["teacher_forwards"] == {"records": 11 * 2 * 2, "total": 11 * 2 * 2}  # two a guided draw
    # Each stored target is ε_u + w(ε_c − ε_u) for its stored w: recomputed from the store alone and the UNet.
    from diffusers import UNet2DConditionModel

    assert meta["prediction_type"] == "epsilon"
    unet = UNet2DConditionModel.from_pretrained(tiny_teacher / "unet").eval()
    s = Store(str(store))
    schedule = NoiseSchedule.from_config(s.manifest().teacher["scheduler"])
    bank, null = CaptionBank(s), torch.as_tensor(s.root_group()["null_text_emb"][:])
    for index, records in s.iter_shards("records"):
        stored = {k: v[:] for k, v in s.shard_group("labels/guided", index).arrays()}
        rows, draws = np.divmod(np.arange(records["latents"].shape[0] * 2), 2)
        inputs = teacher_inputs(schedule, records["latents"][:], records["text_emb"][:], stored, rows, draws, bank,
                                null.numpy(), meta["perturb"]["input_gamma"])
        x, t, text = inputs.x_t.float(), inputs.timesteps, inputs.text.float()
        with torch.no_grad():
            eps_c = unet(x, t, encoder_hidden_states=text).sample
            eps_u = unet(x, t, encoder_hidden_states=null.float().expand_as(text)).sample
        w = torch.as_tensor(stored["guidance"][rows, draws]).view(-1, 1, 1, 1)
        target = torch.as_tensor(stored["eps_teacher"][rows, draws]).float()
        torch.testing.assert_close(target, eps_u + w * (eps_c - eps_u), atol=2e-3, rtol=2e-3)  # stored in fp16


def test_a_share_of_guided_draws_at_w_1(store, tiny_teacher):
    counts = _label(store, tiny_teacher, name="conditional", draws=4, guidance=(2.0, 6.0), guidance_conditional=0.5)
    labels = _labels(store, "conditional")
    w = np.concatenate([labels[k].ravel() for k in labels if k.endswith("/guidance")])
    assert 0.25 < (w == 1.0).mean() < 0.75 and ((w == 1.0) | ((w >= 2.0) & (w <= 6.0))).all()
    meta = json.loads((store / "labels" / "conditional" / "manifest.json").read_text())
    assert meta["guidance_conditional"] == 0.5 and counts["dropped"] == 0
    with pytest.raises(SDiTError, match="another guidance_conditional"):
        _label(store, tiny_teacher, name="conditional", draws=4, guidance=(2.0, 6.0), guidance_conditional=0.25)
    with pytest.raises(SDiTError, match="--guidance-conditional"):
        _label(store, tiny_teacher, name="other", draws=4, guidance_conditional=0.5)


def test_fresh_guidance_keeps_both_eps_of_the_same_draws(store, tiny_teacher):
    _label(store, tiny_teacher, name="composed", draws=2, guidance=(2.0, 6.0), guidance_conditional=0.25)
    counts = _label(store, tiny_teacher, name="fresh", draws=2, guidance=(2.0, 6.0), guidance_conditional=0.25,
                    guidance_fresh=True)
    composed, fresh = _labels(store, "composed"), _labels(store, "fresh")
    assert set(fresh) == set(composed) | {k.replace("eps_teacher", "eps_uncond") for k in composed}
    for key in composed:
        if key.endswith(tuple(DRAWN)):
            assert np.array_equal(composed[key], fresh[key]), key  # the same draws, the same w
    for key in (k for k in composed if k.endswith("eps_teacher")):  # ε_c and ε_u give the stored guided target
        eps_c, eps_u = fresh[key].astype(np.float32), fresh[key.replace("eps_teacher", "eps_uncond")]
        w = fresh[key.replace("eps_teacher", "guidance")][..., None, None, None]
        np.testing.assert_allclose(eps_u + w * (eps_c - eps_u), composed[key], atol=2e-2, rtol=1e-2)  # fp16 parts
        assert not np.allclose(eps_c, composed[key], atol=2e-2)  # ε_c itself is not the guided target
    meta = json.loads((store / "labels" / "fresh" / "manifest.json").read_text())
    assert meta["guidance_fresh"] and counts["teacher_forwards"] == {"records": 11 * 2 * 2, "total": 11 * 2 * 2}
    # an SDiT that reads version 1 alone would take ε_c for the target: it refuses these; other labels stay at 1
    assert meta["schema_version"] == 2
    assert json.loads((store / "labels" / "composed" / "manifest.json").read_text())["schema_version"] == 1
    with pytest.raises(SDiTError, match="another guidance_fresh"):
        _label(store, tiny_teacher, name="fresh", draws=2, guidance=(2.0, 6.0), guidance_conditional=0.25)
    with pytest.raises(SDiTError, match="--fresh-guidance keeps both ε of guided labels: give --guidance"):
        _label(store, tiny_teacher, name="other", draws=2, guidance_fresh=True)


@pytest.mark.slow
def test_labels_made_before_synthesis_existed_still_resume(store, tiny_teacher):
    _label(store, tiny_teacher, name="older", draws=2)
    path = store / "labels" / "older" / "manifest.json"
    meta = json.loads(path.read_text())
    assert meta["synthesis"] is None and meta["synthetic_set"] is None
    path.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("synthesis", "synthetic_set")}))
    (store / "_done" / "labels" / "older" / "00001.json").unlink()
    assert _label(store, tiny_teacher, name="older", draws=2)["shards"] == 4


@pytest.mark.slow
def test_non_finite_teacher_outputs_are_dropped_or_stop_the_run(store, tiny_teacher, monkeypatch):
    original = ShardLabeler.teacher_eps

    def poisoned(self, inputs, guidance):
        eps = original(self, inputs, guidance).clone()
        eps[0] = float("nan")
        return eps

    monkeypatch.setattr(ShardLabeler, "teacher_eps", poisoned)
    counts = _label(store, tiny_teacher, name="nan", draws=2, batch_size=4, max_dropped=0.5)
    labels = _labels(store, "nan")
    batches = sum(-(-r["count"] * 2 // 4) for r in Store(str(store)).finished("records").values())
    assert counts["dropped"] == batches and not labels["00000/valid"][0, 0]  # the first draw of every batch
    valid = read_index(Store(str(store)), "nan")["records"].valid_by_shard()  # readers count draws from it
    assert all(np.array_equal(valid[k], labels[f"{k:05d}/valid"].sum(axis=1)) for k in valid)
    assert all(np.isfinite(labels[k]).all() for k in labels if k.endswith("eps_teacher"))
    with pytest.raises(SDiTError, match="NaN or inf"):
        _label(store, tiny_teacher, name="nan2", draws=2, max_dropped=0.0)


def test_a_store_from_another_teacher_is_refused(store, tmp_path):
    from sdit.tiny import save_tiny_teacher

    other = save_tiny_teacher(tmp_path / "other", seed=1)
    with pytest.raises(SDiTError, match="another vae"):
        _label(store, other, name="other")


@pytest.mark.slow
def test_ray_writes_the_same_labels(store, tiny_teacher):
    import ray

    _label(store, tiny_teacher, name="local", draws=2)
    try:
        _label(store, tiny_teacher, name="ray", draws=2, ray_address="local", num_workers=2)
    finally:
        ray.shutdown()
    local, remote = _labels(store, "local"), _labels(store, "ray")
    assert local.keys() == remote.keys() and all(np.array_equal(local[k], remote[k]) for k in local)


@pytest.fixture(scope="module")
def sharded(tiny_teacher, tmp_path_factory):
    """A store of 24 shards, labelled once uninterrupted ("whole"), and the label command's arguments."""
    from pipeline.bench import generate_images

    tmp = tmp_path_factory.mktemp("sharded")
    store = tmp / "store"
    encode(EncodeConfig(source=str(generate_images(tmp / "images", 96, 64)), teacher=str(tiny_teacher),
                        out=str(store), resolution=64, shard_size=4))
    args = ["teacher-label", store, "--teacher", tiny_teacher, "--draws", "2", "--batch-size", "4"]
    subprocess.run(cli_command(*args, "--labels", "whole"), check=True, env=child_env(), capture_output=True)
    return store, args


def _done(store, name: str) -> list:
    return sorted((store / "_done" / "labels" / name).glob("*.json"))


def _same_as_whole(store, name: str) -> None:
    whole, other = _labels(store, "whole"), _labels(store, name)
    assert whole.keys() == other.keys() and all(np.array_equal(whole[k], other[k]) for k in whole), name
    assert _manifest(store, name) | {"name": "whole"} == _manifest(store, "whole")


@pytest.mark.slow
def test_a_cluster_joined_at_ray_address_writes_the_same_labels(store, tiny_teacher, tmp_path):
    """`--ray-address ray://host:port` (Ray Client, from the declared extras) joins a head started apart, as on a
    cluster; a relative store is refused in one line before any work."""
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    env = child_env() | {"RAY_AUTH_MODE": "disabled"}
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    ray = str(Path(sys.executable).parent / "ray")  # the environment's, whether or not it is on PATH
    subprocess.run([ray, "start", "--head", "--port", str(ports[0]), "--ray-client-server-port", str(ports[1]),
                    "--num-cpus", "2", "--temp-dir", temp, "--include-dashboard", "false"], check=True, env=env,
                   capture_output=True)
    try:
        address = f"ray://127.0.0.1:{ports[1]}"
        args = ["teacher-label", "--teacher", tiny_teacher, "--draws", "2", "--ray-address", address]
        refused = subprocess.run(cli_command(*args[:1], "store", *args[1:]), env=env, capture_output=True, text=True,
                                 cwd=tmp_path)
        assert refused.returncode == 2 and "relative path" in refused.stderr and len(refused.stderr.splitlines()) == 1
        done = subprocess.run(cli_command(*args[:1], store, *args[1:], "--labels", "client", "--num-workers", "2"),
                              env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)
    subprocess.run(cli_command("teacher-label", store, *args[1:5], "--labels", "here"), check=True, env=env,
                   capture_output=True)
    here, client = _labels(store, "here"), _labels(store, "client")
    assert here.keys() == client.keys() and all(np.array_equal(here[k], client[k]) for k in here)


@pytest.mark.slow
def test_sigkill_between_shards_or_mid_shard_then_rerun_equals_an_uninterrupted_run(sharded, tmp_path):
    store, args = sharded

    def done(name: str) -> list:
        return _done(store, name)

    kill_when([*args, "--labels", "between"], lambda: len(done("between")) >= 3)
    # Just before the second array of the third shard: its first array written, the rest not, no completion mark.
    arrays = sum(not column.optional for column in LABEL_COLUMNS.values())  # a shard of unguided labels
    kill_paused_at([*args, "--labels", "mid-shard"], "zarr:Group.create_array", 2 * arrays + 2, tmp_path / "paused")
    assert len(done("mid-shard")) == 2 and len(list((store / "labels" / "mid-shard" / "00002").iterdir())) == 2
    for name in ("between", "mid-shard"):
        assert 2 <= len(done(name)) < 24, "the kill should land mid-run"
        assert _manifest(store, name)["status"] == "in_progress"
        subprocess.run(cli_command(*args, "--labels", name), check=True, env=child_env(), capture_output=True)
        _same_as_whole(store, name)


@pytest.mark.slow
def test_a_ray_worker_killed_mid_run_is_started_again_and_the_run_ends_as_an_uninterrupted_one(sharded):
    """SIGKILL of one of two Ray workers while it labels: Ray starts it again, its shard is labelled again, the
    command exits 0 and the labels equal an uninterrupted run's."""
    store, args = sharded
    command = cli_command(*args, "--labels", "ray", "--ray-address", "local", "--num-workers", "2")
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(command, env=child_env(), stdout=subprocess.DEVNULL, stderr=stderr)
        deadline, victim = time.monotonic() + 180, None
        while victim is None:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before a worker ran a task"
            busy = [p for p in psutil.Process(proc.pid).children(recursive=True) if _title(p) == "ray::Worker.run"]
            victim = busy[0] if busy else None
            time.sleep(0.002)
        victim.kill()
        killed_at = len(_done(store, "ray"))
        assert proc.wait(timeout=300) == 0, stderr.seek(0) or stderr.read().decode()[-2000:]
    assert killed_at < 24, "the kill should land mid-run"
    _same_as_whole(store, "ray")


def _title(process) -> str:
    try:
        return " ".join(process.cmdline()).strip()
    except psutil.Error:
        return ""


def _manifest(store, name: str) -> dict:
    return json.loads((store / "labels" / name / "manifest.json").read_text())
