"""`sdit eval`: teacher agreement on the held-out draws; the sampling protocol (resumable samples, FID with a
stand-in extractor, the CLIP score from a local model, the teacher beside the student); errors."""

import numpy as np
import pytest
import torch

from conftest import SAMPLES, new_run
from pipeline.encode import EncodeConfig, encode
from pipeline.evaluate import EvalConfig, evaluate, format_eval, load_clip
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
    with pytest.raises(SDiTError, match="--fid-resize 'area'"):
        evaluate(EvalConfig(run=str(run), references=str(SAMPLES), fid_resize="area"))
    with pytest.raises(SDiTError, match="--fid-inception .*no such file; FID needs .*inception-2015-12-05.pt"):
        evaluate(EvalConfig(run=str(run), references=str(SAMPLES), fid_inception=str(tmp_path / "i.pt")))


def test_clip_score_from_a_local_model(run, store, clip_folder, tmp_path):
    result = evaluate(EvalConfig(run=str(run), store=str(store), limit=4, clip_model=str(clip_folder),
                                 references=str(SAMPLES), num=3, steps=2, sample_batch_size=2, out=str(tmp_path / "s")))
    clip = result["clip_score"]
    assert 0 <= clip["student"] <= 100 and 0 <= clip["references"] <= 100
    assert result["samples"]["num"] == 3 and result["teacher_agreement"]["draws"] == 4
    assert "CLIP score" in format_eval(result) and "reference images against their captions" in format_eval(result)


# CLIP's pixel normalisation (OpenAI's mean and standard deviation per channel).
CLIP_MEAN, CLIP_STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])


def test_the_clip_score_is_100_times_the_cosine_clamped_at_0(clip_folder):
    """The score of each image against its caption is 100 * max(cos, 0) of the model's embeddings, computed here:
    pixels normalised by hand (32x32 images, which the processor's resize and crop leave as they are), each
    caption tokenised alone. Negating the text projection flips every cosine's sign: the scores that were
    positive become 0 and the others 100 * |cos|."""
    from PIL import Image
    from transformers import CLIPModel, CLIPTokenizer

    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    captions = ["a red circle", "a blue square on a white background", "a green star"]
    model = CLIPModel.from_pretrained(clip_folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_folder)
    x = torch.from_numpy((pixels / 255 - CLIP_MEAN) / CLIP_STD).permute(0, 3, 1, 2).float()  # (3, 3, 32, 32)
    with torch.no_grad():
        img = [model.get_image_features(pixel_values=x[i:i + 1]) for i in range(3)]
        txt = [model.get_text_features(input_ids=torch.tensor([tokenizer(c)["input_ids"]])) for c in captions]
    img, txt = ([getattr(f, "pooler_output", f)[0].double().numpy() for f in fs] for fs in (img, txt))
    cos = np.array([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(img, txt)])
    assert np.all(np.abs(cos) > 1e-4)  # every score tells a clamped cosine from a kept one

    clip = load_clip(clip_folder, torch.device("cpu"))
    images = [Image.fromarray(p) for p in pixels]
    np.testing.assert_allclose(clip.score(images, captions), 100 * np.maximum(cos, 0), atol=1e-4)
    with torch.no_grad():
        clip.model.text_projection.weight.neg_()
    np.testing.assert_allclose(clip.score(images, captions), 100 * np.maximum(-cos, 0), atol=1e-4)


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


def test_a_missing_clip_file_is_named(clip_folder, tmp_path):
    import shutil

    broken = tmp_path / "clip"
    shutil.copytree(clip_folder, broken)
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(SDiTError, match="lacks preprocessor_config.json"):
        load_clip(broken, torch.device("cpu"))
    with pytest.raises(SDiTError, match="CLIP model folder not found"):
        load_clip(tmp_path / "nope", torch.device("cpu"))


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
    assert f["reference"]["images"] == 24 and not f["reference"]["cached"] and f["size"] == 64
    assert f["resize"] == "legacy" and f["extractor"]["features"] == 256
    assert 0 <= c["student"] <= 100 and 0 <= c["teacher"] <= 100
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
