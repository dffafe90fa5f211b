"""`sdit eval`: teacher agreement on the held-out draws; the sampling protocol (resumable samples, FID with a
stand-in extractor, the CLIP score from a local model, the teacher beside the student); errors."""

import numpy as np
import pytest

from conftest import SAMPLES, new_run
from pipeline.encode import EncodeConfig, encode
from pipeline.evaluate import EvalConfig, evaluate, format_eval
from pipeline.label import LabelConfig, label
from sdit.errors import SDiTError
from sdit.loader import Split
from sdit.perturb import Kind, PerturbConfig
from sdit.run import update_run
from sdit.store import Store
from test_pipeline_sdit import make_run

MIX = PerturbConfig(mix={"none": 0.2, "input": 0.2, "swap": 0.2, "mix": 0.2, "null": 0.2}, caption_min_t=0)
HOLDOUT, SEED, DRAWS = 0.5, 3, 4


@pytest.fixture(scope="module")
def store(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "store"
    encode(EncodeConfig(source=str(SAMPLES), teacher=str(tiny_teacher), out=str(out), resolution=64, shard_size=4))
    label(LabelConfig(store=str(out), teacher=str(tiny_teacher), perturb=MIX, draws=DRAWS, batch_size=16))
    return out


def trained(run, store, **train):
    update_run(run, train={"store": str(store), "labels": "default", "holdout": HOLDOUT, "split_seed": SEED} | train)
    return run


@pytest.fixture(scope="module")
def run(tiny_teacher, store, tmp_path_factory):
    return trained(make_run(tmp_path_factory.mktemp("eval-run") / "run", tiny_teacher), store)


def held_out_eps_teacher(store) -> tuple[np.ndarray, np.ndarray]:
    """Straight from the store: ε_T and timesteps of the held-out records' valid draws."""
    s = Store(str(store))
    eps, t = [], []
    for index, _ in s.iter_shards("records"):
        labels = s.shard_group("labels/default", index)
        held = Split(HOLDOUT, SEED).held_out(index, labels["valid"].shape[0])
        keep = labels["valid"][:] & held[:, None]
        eps.append(labels["eps_teacher"][:][keep].astype(np.float64))
        t.append(labels["timesteps"][:][keep])
    return np.concatenate(eps), np.concatenate(t)


def test_an_untrained_student_scores_the_mean_square_of_the_teacher(tiny_teacher, store, tmp_path):
    run = trained(new_run(tmp_path / "zero", tiny_teacher, "SDiT-Nano/2"), store)  # ε = 0 exactly
    eps, t = held_out_eps_teacher(store)
    assert 0 < len(eps) < 11 * DRAWS  # some records held out, not all
    result = evaluate(EvalConfig(run=str(run), store=str(store), batch_size=5, buckets=4))
    a = result["teacher_agreement"]
    assert a["draws"] == len(eps)
    np.testing.assert_allclose(a["mse"], (eps**2).mean(axis=(1, 2, 3)).mean(), rtol=1e-6)
    for b in a["by_timestep"]:
        in_bucket = (t >= b["from"]) & (t <= b["to"])
        assert b["draws"] == in_bucket.sum()
        if b["draws"]:
            np.testing.assert_allclose(b["mse"], (eps[in_bucket] ** 2).mean(), rtol=1e-6)
    assert [(b["from"], b["to"]) for b in a["by_timestep"]] == [(0, 249), (250, 499), (500, 749), (750, 999)]
    assert sum(k["draws"] for k in a["by_kind"].values()) == len(eps)
    assert set(a["by_kind"]) <= {k.name.lower() for k in Kind}
    assert result["split"] == {"holdout": HOLDOUT, "seed": SEED, "from": "run"}


def test_a_student_that_predicts_something_scores_otherwise(run, store):
    result = evaluate(EvalConfig(run=str(run), store=str(store), limit=7))
    a = result["teacher_agreement"]
    assert a["draws"] == 7 and a["mse"] > 0 and a["true_noise"]["draws"] <= 7
    table = format_eval(result)
    assert "teacher agreement" in table and "0-99" in table and "900-999" in table


def test_the_split_can_be_named_by_options(tiny_teacher, store, tmp_path):
    run = new_run(tmp_path / "untrained", tiny_teacher, "SDiT-Nano/2")
    with pytest.raises(SDiTError, match="not trained with --holdout"):
        evaluate(EvalConfig(run=str(run), store=str(store)))
    result = evaluate(EvalConfig(run=str(run), store=str(store), holdout=HOLDOUT, split_seed=SEED))
    assert result["split"]["from"] == "options"
    assert result["teacher_agreement"]["draws"] == len(held_out_eps_teacher(store)[0])


def test_errors(run, tiny_teacher, store, tmp_path):
    with pytest.raises(SDiTError, match="run folder not found"):
        evaluate(EvalConfig(run=str(tmp_path / "nope"), store=str(store)))
    with pytest.raises(SDiTError, match="not an SDiT run folder"):
        evaluate(EvalConfig(run=str(tiny_teacher), store=str(store)))
    everything = trained(new_run(tmp_path / "all", tiny_teacher, "SDiT-Nano/2"), store, holdout=0.0)
    with pytest.raises(SDiTError, match="trained on every record"):
        evaluate(EvalConfig(run=str(everything), store=str(store)))
    elsewhere = trained(new_run(tmp_path / "else", tiny_teacher, "SDiT-Nano/2"), tmp_path / "other-store")
    with pytest.raises(SDiTError, match="was trained on .*other-store"):
        evaluate(EvalConfig(run=str(elsewhere), store=str(store)))
    guided = trained(new_run(tmp_path / "g", tiny_teacher, "SDiT-Nano/2", guidance_embed=True), store)
    with pytest.raises(SDiTError, match="guidance-distilled"):
        evaluate(EvalConfig(run=str(guided), store=str(store)))
    with pytest.raises(SDiTError, match="no labels 'other'"):
        evaluate(EvalConfig(run=str(run), store=str(store), labels="other"))
    with pytest.raises(SDiTError, match="--clip-model, --teacher and --fid-inception score samples"):
        evaluate(EvalConfig(run=str(run), store=str(store), clip_model=str(tmp_path)))
    with pytest.raises(SDiTError, match="nothing to evaluate"):
        evaluate(EvalConfig(run=str(run)))
    with pytest.raises(SDiTError, match="FID needs statistics to compare with"):
        evaluate(EvalConfig(run=str(run), prompts=str(tmp_path / "p.txt"), fid_inception=str(tmp_path / "i.pt")))
    with pytest.raises(SDiTError, match="--fid-stats needs --fid-inception"):
        evaluate(EvalConfig(run=str(run), prompts=str(tmp_path / "p.txt"), fid_stats=str(tmp_path / "s.npz")))
    with pytest.raises(SDiTError, match="--fid-protocol 'legacy': choose one of bk-sdm, clean, tf"):
        evaluate(EvalConfig(run=str(run), references=str(SAMPLES), fid_protocol="legacy"))
    with pytest.raises(SDiTError, match="--fid-stats-protocol 'pytorch-fid': choose one of"):
        evaluate(EvalConfig(run=str(run), references=str(SAMPLES), fid_stats_protocol="pytorch-fid"))
    with pytest.raises(SDiTError, match="--fid-stats-protocol says what a --fid-stats file holds"):
        evaluate(EvalConfig(run=str(run), references=str(SAMPLES), fid_stats_protocol="clean"))
    with pytest.raises(SDiTError, match="--clip-score 'openai': choose one of torchmetrics, bk-sdm"):
        evaluate(EvalConfig(run=str(run), references=str(SAMPLES), clip_score="openai", clip_model="c"))
    with pytest.raises(SDiTError, match="--clip-score picks how CLIP cosines are averaged: give --clip-model"):
        evaluate(EvalConfig(run=str(run), references=str(SAMPLES), clip_score="bk-sdm"))
    with pytest.raises(SDiTError, match="--fid-inception .*no such file; FID needs .*inception-2015-12-05.pt"):
        evaluate(EvalConfig(run=str(run), references=str(SAMPLES), fid_inception=str(tmp_path / "i.pt")))


def test_clip_score_from_a_local_model(run, store, clip_folder, tmp_path):
    result = evaluate(EvalConfig(run=str(run), store=str(store), limit=4, clip_model=str(clip_folder),
                                 references=str(SAMPLES), num=3, steps=2, sample_batch_size=2, out=str(tmp_path / "s")))
    clip = result["clip_score"]
    assert (clip["convention"], clip["protocol"], clip["images"], clip["size"]) == ("bk-sdm", "bk-sdm", "fitted", 256)
    assert -1 <= clip["student"] <= 1 and -1 <= clip["references"] <= 1  # BK-SDM's: the mean raw cosine
    assert result["samples"]["num"] == 3 and result["teacher_agreement"]["draws"] == 4
    again = evaluate(EvalConfig(run=str(run), clip_model=str(clip_folder), clip_score="torchmetrics",
                                references=str(SAMPLES), num=3, steps=2, sample_batch_size=2, out=str(tmp_path / "s")))
    assert again["samples"]["sampled_now"] == 0 and again["clip_score"]["convention"] == "torchmetrics"
    for key in ("student", "references"):  # the same images and cosines: 100 × the mean, clamped at 0
        assert again["clip_score"][key] == pytest.approx(100 * max(clip[key], 0), abs=1e-9)
    assert "CLIP score" in format_eval(result) and "reference images against their captions" in format_eval(result)


@pytest.mark.slow
def test_samples_are_resumed_and_their_settings_checked(run, tiny_teacher, tmp_path):
    from dataclasses import replace

    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "samples"
    config = EvalConfig(run=str(run), prompts=str(prompts), num=3, steps=2, sample_batch_size=2,
                        teacher=str(tiny_teacher), out=str(out))
    first = evaluate(config)
    assert first["samples"]["sampled_now"] == 3 and first["samples"]["models"] == ["student", "teacher"]
    assert [len(list((out / m).glob("*.png"))) for m in ("student", "teacher")] == [3, 3]
    with Image.open(out / "student" / "000002.png") as image:  # image i shows prompt i mod P, seed seed + i
        assert image.text["prompt"] == "a red circle" and image.text["seed"] == "2"
    kept, lost = (out / "student" / "000000.png").stat().st_mtime_ns, (out / "teacher" / "000001.png").read_bytes()
    (out / "teacher" / "000001.png").unlink()
    again = evaluate(replace(config, num=4))
    assert again["samples"]["sampled_now"] == 2  # image 1 (its teacher PNG was lost) and the new image 3
    assert (out / "student" / "000000.png").stat().st_mtime_ns == kept
    assert (out / "teacher" / "000001.png").read_bytes() == lost  # the same image again
    with pytest.raises(SDiTError, match="holds samples made with other settings \\(steps 2 -> 3\\)"):
        evaluate(replace(config, steps=3))
    settings = out / "settings.json"
    settings.write_text(settings.read_text()[:30])  # cut short by a full disk
    with pytest.raises(SDiTError, match="settings.json is damaged .*delete the folder to sample again"):
        evaluate(config)


def test_the_command(run, store, tmp_path):
    import json

    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["eval", str(run), str(store), "--limit", "6", "--buckets", "5", "--json",
                                      str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    assert "teacher agreement" in result.output and "800-999" in result.output
    figures = json.loads((tmp_path / "eval.json").read_text())
    assert figures["teacher_agreement"]["draws"] == 6 and len(figures["teacher_agreement"]["by_timestep"]) == 5
    result = CliRunner().invoke(app, ["eval", str(run), str(tmp_path / "no-store")])
    assert result.exit_code == 2 and result.output.startswith("error: ") and len(result.output.splitlines()) == 1, \
        result.output


def test_statistics_of_another_protocol_are_refused_before_sampling(run, tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from conftest import save_stand_in_inception
    from sdit.fid import Stats

    inception = save_stand_in_inception(tmp_path / "inception-2015-12-05.pt", dim=8)
    Stats(np.zeros(8), np.eye(8), 10, "clean", 256).save(tmp_path / "clean.npz")
    np.savez(tmp_path / "plain.npz", mu=np.zeros(8), sigma=np.eye(8))  # as pytorch-fid writes: no protocol
    (tmp_path / "p.txt").write_text("a red circle\n")
    base = ["eval", str(run), "--prompts", str(tmp_path / "p.txt"), "--fid-inception", str(inception), "--out",
            str(tmp_path / "s"), "--fid-stats"]
    for stats, words in (("clean.npz", ("'clean'", "'bk-sdm'", "--fid-protocol clean")),
                         ("plain.npz", ("does not say its protocol", "'bk-sdm'", "--fid-stats-protocol bk-sdm"))):
        result = CliRunner().invoke(app, [*base, str(tmp_path / stats)])
        assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
        assert all(w in result.output for w in words), result.output
    assert not list((tmp_path / "s").glob("*/*.png"))  # refused before any image was drawn


@pytest.mark.slow
def test_the_protocol_on_the_shapes_world_beside_the_teacher(clip_folder, tmp_path):
    """`sdit eval RUN STORE --prompts --teacher` with the toy teacher: agreement, FID (the stand-in extractor)
    and CLIP score of the student and the teacher side by side, in one table and one JSON."""
    import json

    from typer.testing import CliRunner

    from cli import app
    from conftest import REPO, save_stand_in_inception
    from sdit.shapes import files, world

    toy = REPO / "data" / "toy-sd"
    files.write_split(world.sample(24, seed=1), tmp_path / "shapes")
    files.write_prompts(world.heldout_prompts()[:4], tmp_path / "prompts.txt")
    store = tmp_path / "store"
    encode(EncodeConfig(source=str(tmp_path / "shapes"), teacher=str(toy), out=str(store), resolution=64,
                        shard_size=8))
    label(LabelConfig(store=str(store), teacher=str(toy), perturb=MIX, draws=2, batch_size=16))
    run = trained(new_run(tmp_path / "run", toy, "SDiT-Nano/2"), store)
    inception = save_stand_in_inception(tmp_path / "inception-2015-12-05.pt", dim=256)
    args = ["eval", str(run), str(store), "--prompts", str(tmp_path / "prompts.txt"), "--num-images", "8",
            "--steps", "3", "--guidance", "3", "--sample-batch-size", "4", "--teacher", str(toy), "--references",
            str(tmp_path / "shapes"), "--fid-inception", str(inception), "--fid-cache", str(tmp_path / "cache"),
            "--clip-model", str(clip_folder), "--out", str(tmp_path / "samples"), "--json", str(tmp_path / "e.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "e.json").read_text())
    f, c, s = figures["fid"], figures["clip_score"], figures["samples"]
    assert f["student"] > 0 and f["teacher"] > 0 and f["student_vs_teacher"] > 0
    assert f["reference"]["images"] == 24 and not f["reference"]["cached"] and f["size"] == 256
    assert f["protocol"] == f["reference"]["protocol"] == "bk-sdm" and f["extractor"]["features"] == 256
    assert -1 <= c["student"] <= 1 and -1 <= c["teacher"] <= 1 and c["convention"] == "bk-sdm"
    assert figures["teacher_agreement"]["draws"] > 0
    assert (s["num"], s["height"], s["steps"], s["guidance"], s["seeds"], s["batch_size"]) == (8, 64, 3, 3.0, [0, 7], 4)
    assert "FID" in result.output and "CLIP score" in result.output and "teacher agreement" in result.output
    assert "student" in result.output and "teacher" in result.output
    again = CliRunner().invoke(app, args)  # nothing sampled again, the statistics from the cache: same figures
    assert again.exit_code == 0, again.output
    second = json.loads((tmp_path / "e.json").read_text())
    assert second["samples"]["sampled_now"] == 0 and second["fid"]["reference"]["cached"]
    assert second["fid"]["student"] == pytest.approx(f["student"], rel=1e-9)
    assert second["clip_score"]["teacher"] == pytest.approx(c["teacher"], rel=1e-9)
