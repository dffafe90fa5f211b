import functools
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTokenizer
from typer.testing import CliRunner

from cli import app
from conftest import child_env, cli_command, kill_paused_at, kill_when, new_run
from pipeline.init import init_for_store
from pipeline.train import TrainConfig, Trainer, train
from pipeline.train_monitor import read_metrics
from sdit.dit import SDiT, build_student
from sdit.errors import SDiTError
from sdit.loader import DrawStream, LabelledStore
from sdit.run import load_student, read_run
from sdit.store import Store
from sdit.text import tokenize
from sdit.tiny import save_tiny_teacher

FAST = dict(batch_size=8, lr=1e-3, warmup=2, ema_decay=0.9, sample_steps=4, sample_prompts=4)


def _train(store, out, student: str | None = "SDiT-Nano/2", teacher: str | None = None, **options) -> dict:
    """Train as `sdit train` does: a fresh `student` (the init stage) unless `init` or `resume` is given."""
    config = TrainConfig(store=str(store), out=str(out), **FAST | options)
    make_run = None if student is None else functools.partial(
        init_for_store, str(store), config.labels, str(out), student, teacher=teacher, seed=config.seed)
    return train(config, make_run=make_run)


def _losses(run) -> list[tuple]:
    return [(m["step"], m["loss"], m["task_loss"], m["kd_loss"], m["grad_norm"])
            for m in read_metrics(run / "metrics.jsonl")]


def test_a_run_trains_from_the_store_alone(labelled_store, tiny_teacher, tmp_path, monkeypatch):
    no_unet = tmp_path / "teacher"  # the teacher without its UNet: the run cannot have loaded it
    shutil.copytree(tiny_teacher, no_unet, ignore=shutil.ignore_patterns("unet"))

    def refuse(*args, **kwargs):
        raise AssertionError("stage two built or loaded a UNet")

    monkeypatch.setattr(UNet2DConditionModel, "__init__", refuse)
    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", refuse)
    run = tmp_path / "run"
    summary = _train(labelled_store, run, teacher=str(no_unet), steps=6, checkpoint_every=2, keep_checkpoints=2,
                     holdout=0.25, sample_every=3, lr_schedule="linear")
    assert summary["steps"] == 6
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert set(metrics[0]) == {"step", "loss", "task_loss", "kd_loss", "lr", "grad_norm", "samples_per_s", "read_mb"}
    # 2 warm-up steps, then a linear decay over the other 4 (each step logs the rate it took)
    assert [m["lr"] for m in metrics] == pytest.approx([5e-4, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    # The run folder holds the EMA weights of the last checkpoint, as a pipeline folder.
    ema = load_file(run / "checkpoints/step-00000006/ema.safetensors")
    assert all(torch.equal(ema[k], v) for k, v in load_student(run).state_dict().items() if k in ema)
    assert not (run / "unet").exists() and (run / "model_index.json").exists()
    grids = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert grids == ["student_samples_gs-00000003.png", "student_samples_gs-00000006.png"]
    assert Image.open(run / "samples" / grids[0]).size == (4 * 66 + 2, 68)  # 4 samples of 64 px, 2 px borders
    assert Image.open(run / "loss.png").size[0] > 0
    meta = read_run(run)["train"]
    assert (meta["status"], meta["step"], meta["holdout"], meta["labels"]) == ("complete", 6, 0.25, "default")


@pytest.mark.slow
def test_a_resumed_run_repeats_the_uninterrupted_one(labelled_store, tmp_path):
    whole = tmp_path / "whole"
    _train(labelled_store, whole, steps=7, checkpoint_every=2, buffer_records=4)
    part = tmp_path / "part"
    _train(labelled_store, part, steps=3, checkpoint_every=2, buffer_records=4)
    _train(labelled_store, part, steps=7, checkpoint_every=2, buffer_records=4, resume=True)
    assert _losses(part) == _losses(whole)
    a, b = load_student(whole).state_dict(), load_student(part).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("grad_accum", [2, 3])  # 3: parts of 3, 3 and 2 draws
def test_a_batch_in_parts_takes_the_same_steps_as_the_whole_batch(labelled_store, tmp_path, grad_accum):
    _train(labelled_store, tmp_path / "whole", steps=4, buffer_records=4)
    _train(labelled_store, tmp_path / "parts", steps=4, buffer_records=4, grad_accum=grad_accum)
    whole, parts = np.array(_losses(tmp_path / "whole")), np.array(_losses(tmp_path / "parts"))
    np.testing.assert_allclose(parts, whole, rtol=1e-5)
    a, b = load_student(tmp_path / "whole").state_dict(), load_student(tmp_path / "parts").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_a_run_started_before_an_option_existed_resumes_with_its_default(labelled_store, tmp_path):
    run = tmp_path / "run"
    _train(labelled_store, run, steps=1)
    meta = read_run(run)
    del meta["train"]["config"]["synthetic_weight"]  # as a run folder written before --synthetic-weight
    (run / "sdit_run.json").write_text(json.dumps(meta))
    _train(labelled_store, run, steps=2, resume=True)
    assert read_run(run)["train"]["step"] == 2


RESUME_FAST = ["--student", "SDiT-Nano/2", "--batch-size", "4", "--lr", "1e-3", "--warmup", "2", "--buffer-records",
               "4", "--checkpoint-every", "2", "--sample-prompts", "2", "--sample-steps", "2"]


@pytest.mark.slow
def test_a_moved_run_resumes_from_its_own_record(labelled_store, tmp_path, monkeypatch):
    """`--resume --steps N` alone: the options come from the run folder, wherever it has moved, and a store path
    written otherwise (relative, through a link) that leads to the same store is the same; it goes on as the
    uninterrupted run."""
    runner = CliRunner()
    for out, steps in ((tmp_path / "whole", "5"), (tmp_path / "run", "3")):
        result = runner.invoke(app, ["train", str(labelled_store), "--out", str(out), "--steps", steps, *RESUME_FAST])
        assert result.exit_code == 0, result.output
    moved = Path(shutil.move(tmp_path / "run", tmp_path / "elsewhere" / "moved"))
    (tmp_path / "link").symlink_to(labelled_store)
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = runner.invoke(app, ["train", "../link", "--out", "moved", "--resume", "--steps", "5"])
    assert result.exit_code == 0, result.output
    assert _losses(moved) == _losses(tmp_path / "whole")
    record = read_run(moved)["train"]
    assert record["step"] == 5 and record["config"]["steps"] == 5 and record["config"]["batch_size"] == 4
    assert record["config"]["out"] == str(moved.resolve()) and record["config"]["store"] == str(labelled_store)
    # The whole first command again, with --resume: the same options are no change.
    result = runner.invoke(app, ["train", str(labelled_store), "--out", "moved", "--steps", "6", *RESUME_FAST,
                                 "--resume"])
    assert result.exit_code == 0, result.output
    for extra, message in ((["--batch-size", "8"], "--batch-size 8: moved was trained with --batch-size 4; "),
                           (["--student", "SDiT-T/2"], "--student SDiT-T/2: moved was trained with --student "
                                                       "SDiT-Nano/2; ")):
        result = runner.invoke(app, ["train", "../link", "--out", "moved", "--resume", "--steps", "7", *extra])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert result.output.startswith(f"error: {message}only --steps, --checkpoint-every, "), result.output
    result = runner.invoke(app, ["train", str(tmp_path / "whole"), "--out", "moved", "--resume", "--steps", "7"])
    assert result.exit_code == 2 and "--store " in result.output and "moved was trained with --store " in result.output


def test_sample_grids_are_drawn_and_recorded_as_their_options_say(labelled_store, tmp_path, monkeypatch):
    import pipeline.train_monitor as stage
    from pipeline.config import SampleConfig

    assert (TrainConfig.sample_steps, TrainConfig.sample_guidance, TrainConfig.sample_scheduler) == (
        SampleConfig.steps, SampleConfig.guidance, SampleConfig.scheduler)  # `sdit sample`'s defaults
    seen, make, denoise = [], stage.make_scheduler, stage.denoise

    def spy(eps_model, scheduler, noise, text, null, steps, guidance, *args):
        seen.append((type(scheduler).__name__, steps, guidance))
        return denoise(eps_model, scheduler, noise, text, null, steps, guidance, *args)

    monkeypatch.setattr(stage, "make_scheduler", lambda name, config: seen.append(name) or make(name, config))
    monkeypatch.setattr(stage, "denoise", spy)
    run = tmp_path / "run"
    _train(labelled_store, run, steps=1, sample_scheduler="euler", sample_steps=3, sample_guidance=2.0)
    assert seen == ["euler", ("EulerDiscreteScheduler", 3, 2.0)]
    config = read_run(run)["train"]["config"]
    assert (config["sample_scheduler"], config["sample_steps"], config["sample_guidance"]) == ("euler", 3, 2.0)
    with pytest.raises(SDiTError, match="--sample-scheduler 'heun': choose one of ddim, "):
        _train(labelled_store, tmp_path / "heun", steps=1, sample_scheduler="heun")


@pytest.mark.slow
def test_a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(labelled_store, tmp_path, monkeypatch):
    forward, calls = SDiT.forward, []

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        return out * float("nan") if len(calls) == 5 and torch.is_grad_enabled() else out

    monkeypatch.setattr(SDiT, "forward", poisoned)
    run = tmp_path / "run"
    with pytest.raises(SDiTError, match="NaN or inf at step 5; stopped. The last checkpoint is intact"):
        _train(labelled_store, run, steps=10, checkpoint_every=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step-00000004"
    assert all(torch.isfinite(v).all() for v in load_student(run).state_dict().values())
    monkeypatch.setattr(SDiT, "forward", forward)
    _train(labelled_store, run, steps=6, checkpoint_every=2, resume=True)
    assert read_run(run)["train"]["step"] == 6


def test_what_does_not_fit_is_refused_in_one_line(labelled_store, tiny_teacher, tmp_path):
    run = tmp_path / "run"
    _train(labelled_store, run, steps=1)
    with pytest.raises(SDiTError, match="exists; pass --resume"):
        _train(labelled_store, run, steps=2)
    with pytest.raises(SDiTError, match=f"^--lr 0.5: {run} was trained with --lr 0.001; only --steps, "):
        _train(labelled_store, run, steps=2, lr=0.5, resume=True)
    with pytest.raises(SDiTError, match="give --init RUN_FOLDER"):
        train(TrainConfig(store=str(labelled_store), out=str(tmp_path / "x")))
    with pytest.raises(SDiTError, match="--high-noise-weight 0.5: a cap of at least 1"):
        _train(labelled_store, tmp_path / "v", high_noise_weight=0.5)
    with pytest.raises(SDiTError, match=r"--fresh-guidance-range \(4.0, 2.0\): give W_MIN:W_MAX with 0 <= W_MIN"):
        _train(labelled_store, tmp_path / "v", fresh_guidance_range=(4.0, 2.0))
    wide = save_tiny_teacher(tmp_path / "wide", seed=1)  # same shapes, another VAE and text encoder
    other = new_run(tmp_path / "other", wide, "SDiT-Nano/2")
    with pytest.raises(SDiTError, match="not the one the store was encoded with"):
        _train(labelled_store, tmp_path / "y", init=str(other), student=None)
    good = new_run(tmp_path / "good", tiny_teacher, "SDiT-Nano/2")
    build_student("SDiT-Nano/2", sample_size=8, in_channels=4, text_dim=48).save_pretrained(good / "transformer")
    with pytest.raises(SDiTError,
                       match="latents are 4x8x8 with text 32 wide; the student takes 4x8x8 with text 48 wide"):
        _train(labelled_store, tmp_path / "z", init=str(good), student=None)
    build_student("SDiT-Nano/2", sample_size=16, in_channels=4, text_dim=32).save_pretrained(good / "transformer")
    with pytest.raises(SDiTError, match="latents are 4x8x8 with text 32 wide; the student takes 4x16x16 with text 32"):
        _train(labelled_store, tmp_path / "w", init=str(good), student=None)


def test_a_student_reading_fewer_text_positions_trains_only_where_every_caption_fits(labelled_store, tiny_teacher,
                                                                                     tmp_path):
    store = Store(str(labelled_store))
    tokenizer = CLIPTokenizer.from_pretrained(tiny_teacher / "tokenizer")
    captions = [str(c) for group in ("records", "prompts") for _, shard in store.iter_shards(group)
                for c in shard["captions"][:]]
    longest = int(tokenize(tokenizer, captions)[1].max())
    assert store.longest_caption() == longest > 2
    short = new_run(tmp_path / "short", tiny_teacher, text_positions=longest - 1)
    with pytest.raises(SDiTError, match=f"captions run to {longest} tokens .* reads the first {longest - 1} text "
                                        f"positions: init it with --text-positions {longest} or more"):
        _train(labelled_store, tmp_path / "a", init=str(short), student=None, steps=1)
    enough = new_run(tmp_path / "enough", tiny_teacher, text_positions=longest)
    assert _train(labelled_store, tmp_path / "b", init=str(enough), student=None, steps=2)["steps"] == 2
    assert load_student(tmp_path / "b").config.text_positions == longest


@pytest.mark.slow
def test_the_student_learns_the_teachers_targets(labelled_store, tmp_path):
    _train(labelled_store, tmp_path / "run", steps=60, lr=3e-3, batch_size=16, checkpoint_every=60, task_weight=0)
    kd = [m["kd_loss"] for m in read_metrics(tmp_path / "run/metrics.jsonl")]
    assert np.mean(kd[-10:]) < 0.7 * np.mean(kd[:10])  # the tiny random teacher: ε_T is small and rough


def test_cli_init_then_train_from_it(labelled_store, tiny_teacher, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["init", "--teacher", str(tiny_teacher), "--student", "SDiT-Nano/2", "--out",
                                 str(tmp_path / "init"), "--seed", "7"])
    assert result.exit_code == 0, result.output
    assert "SDiT-Nano/2" in result.output and "latents 4x8x8, text width 32" in result.output
    result = runner.invoke(app, ["train", str(labelled_store), "--out", str(tmp_path / "run"), "--init",
                                 str(tmp_path / "init"), "--steps", "2", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output
    assert read_run(tmp_path / "run")["student"] == {"preset": "SDiT-Nano/2", "seed": 7}
    result = runner.invoke(app, ["train", str(labelled_store), "--out", str(tmp_path / "run"), "--student",
                                 "SDiT-Nano/2"])
    assert result.exit_code == 2 and "exists; pass --resume" in result.output and "Traceback" not in result.output


def _whole_then_killed(store, tmp_path, options: list[str], steps: int, kill: Callable[[list], None]) -> Path:
    """Train `steps` steps into tmp_path/whole; start the same run into tmp_path/killed, let `kill(args)` run and
    SIGKILL it, then resume it to `steps`. Returns the killed-and-resumed run folder."""
    subprocess.run(cli_command("train", store, "--out", tmp_path / "whole", "--steps", steps, *options),
                   check=True, env=child_env(), capture_output=True)
    killed = tmp_path / "killed"
    kill(["train", store, "--out", killed, "--steps", 400, *options])
    assert read_metrics(killed / "metrics.jsonl"), "the kill should land after the first step"
    subprocess.run(cli_command("train", store, "--out", killed, "--steps", steps, "--resume", *options),
                   check=True, env=child_env(), capture_output=True)
    return killed


def _after_steps(run: Path, steps: int) -> Callable[[list], None]:
    return lambda args: kill_when(args, lambda: len(read_metrics(run / "metrics.jsonl")) >= steps)


def _assert_same_run(killed: Path, whole: Path, steps: int) -> None:
    """Each step logged once, the same losses, the same final weights."""
    assert [m["step"] for m in read_metrics(killed / "metrics.jsonl")] == list(range(1, steps + 1))
    assert _losses(killed) == _losses(whole)
    a, b = (load_file(run / "transformer" / "diffusion_pytorch_model.safetensors") for run in (killed, whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


TRAIN_FAST = ["--student", "SDiT-Nano/2", "--batch-size", "8", "--lr", "1e-3", "--warmup", "2", "--buffer-records", "4"]


@pytest.mark.slow
def test_sigkill_between_checkpoints_then_resume_gives_the_same_run(labelled_store, tmp_path):
    killed = _whole_then_killed(labelled_store, tmp_path, [*TRAIN_FAST, "--checkpoint-every", "3"], 12,
                                _after_steps(tmp_path / "killed", 5))
    _assert_same_run(killed, tmp_path / "whole", 12)


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_logs_each_step_once(labelled_store, tmp_path):
    def before_the_first_checkpoint(args):
        _after_steps(tmp_path / "killed", 3)(args)
        assert not (tmp_path / "killed" / "checkpoints").exists()

    killed = _whole_then_killed(labelled_store, tmp_path, [*TRAIN_FAST, "--checkpoint-every", "1000"], 8,
                                before_the_first_checkpoint)
    _assert_same_run(killed, tmp_path / "whole", 8)


@pytest.mark.slow
def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_one_before(labelled_store, tmp_path):
    def in_the_second_checkpoint(args):
        # torch.save writes a checkpoint's optimiser state, after its weights: the second call is at step 6
        kill_paused_at(args, "torch:save", 2, tmp_path / "paused")
        checkpoints = tmp_path / "killed" / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == [".step-00000006.tmp", "step-00000003"]
        assert sorted(p.name for p in (checkpoints / ".step-00000006.tmp").iterdir()) == [
            "ema.safetensors", "model.safetensors"]

    killed = _whole_then_killed(labelled_store, tmp_path, [*TRAIN_FAST, "--checkpoint-every", "3"], 9,
                                in_the_second_checkpoint)
    _assert_same_run(killed, tmp_path / "whole", 9)
    assert not list((killed / "checkpoints").glob(".*"))


def test_a_metrics_line_cut_short_by_a_kill_is_dropped(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    assert read_metrics(metrics) == [{"step": 1, "loss": 0.5}]


@pytest.mark.slow
def test_two_data_parallel_workers_take_the_steps_one_worker_takes_on_both_shares(labelled_store, tiny_teacher,
                                                                                  tmp_path):
    """Two gloo workers, each taking its 4 draws of a step in 2 parts (--grad-accum 2) and synchronising once, take
    the steps one worker takes with both workers' shares as its batch; a resume on one worker goes on from where
    both had reached, and says so."""
    from pipeline.train import Trainer, Workers, make_state
    from sdit.loader import Batch, DrawStream, LabelledStore, Position, Split

    env = child_env()
    subprocess.run(cli_command("init", "--teacher", tiny_teacher, "--student", "SDiT-Nano/2", "--out",
                               tmp_path / "init"), check=True, env=env, capture_output=True)
    options = ["--init", str(tmp_path / "init"), "--batch-size", "8", "--lr", "1e-3", "--warmup", "2",
               "--buffer-records", "4"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*torchrun, "-m", "cli", "train", str(labelled_store), "--out", str(tmp_path / "two"),
                           *options, "--steps", "6", "--checkpoint-every", "3", "--grad-accum", "2", "--holdout", "0.3",
                           "--eval-every", "3"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    config = TrainConfig(store=str(labelled_store), out=str(tmp_path / "one"), init=str(tmp_path / "init"),
                         batch_size=8, lr=1e-3, warmup=2, buffer_records=4, steps=6, holdout=0.3)
    data, cpu, split = LabelledStore(str(labelled_store)), torch.device("cpu"), Split(0.3, 0)
    trainer = Trainer(config, make_state(load_student(tmp_path / "init"), config, cpu, Workers()), cpu,
                      schedule=data.schedule, guided=False)
    shares = [DrawStream(data, 8, split=split, buffer_records=4, rank=r, world=2).batches(Position()) for r in (0, 1)]
    one = [trainer.step(Batch.cat([next(s) for s in shares], Position())) for _ in range(6)]
    two = _losses(tmp_path / "two")
    assert [r[0] for r in two] == list(range(1, 7))
    np.testing.assert_allclose(np.array(two, dtype=float)[:, 1:],
                               [[m["loss"], m["task_loss"], m["kd_loss"], m["grad_norm"]] for m in one], rtol=1e-4)
    # --eval-every: each worker measures its share of the held-out draws, summed over both
    held_out = DrawStream(data, 8, split=split, train=False).total
    evals = [m for m in read_metrics(tmp_path / "two" / "metrics.jsonl") if "eval_draws" in m]
    assert [(m["step"], m["eval_draws"]) for m in evals] == [(3, held_out), (6, held_out)]

    resumed = subprocess.run(cli_command("train", labelled_store, "--out", tmp_path / "two", *options, "--steps", "8",
                                         "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "saved by 2 workers, resumed by 1" in resumed.stdout + resumed.stderr
    assert [r[0] for r in _losses(tmp_path / "two")] == list(range(1, 9))


@pytest.mark.slow
def test_each_of_four_workers_reads_a_quarter_of_the_store(tiny_teacher, tmp_path):
    """Over two epochs of 16 shards (a block each), rank 0 of four gloo workers reads at most 0.3 of the bytes one
    worker reads (each reads ahead two batches more, a block at most)."""
    from pipeline.bench import generate_images
    from pipeline.encode import EncodeConfig, encode
    from pipeline.label import LabelConfig, label
    from sdit.perturb import PerturbConfig

    store = tmp_path / "store"
    encode(EncodeConfig(source=str(generate_images(tmp_path / "images", 64, 64)), teacher=str(tiny_teacher),
                        out=str(store), resolution=64, shard_size=4))
    # no caption swaps: each worker's cache of captions would hold this small store whole (bench train counts the
    # bytes swaps read)
    label(LabelConfig(store=str(store), teacher=str(tiny_teacher), draws=2, perturb=PerturbConfig(mix={"none": 1.0})))
    options = ["--student", "SDiT-Nano/2", "--batch-size", "8", "--steps", "32", "--buffer-records", "4"]
    env = child_env()
    subprocess.run(cli_command("train", store, "--out", tmp_path / "one", *options), check=True, env=env,
                   capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    done = subprocess.run([*torchrun, "-m", "cli", "train", str(store), "--out", str(tmp_path / "four"), *options],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    one, four = (read_metrics(tmp_path / run / "metrics.jsonl")[-1]["read_mb"] for run in ("one", "four"))
    assert 0 < four <= 0.3 * one


@pytest.mark.slow
def test_the_train_stage_imports_nothing_that_can_load_a_teacher():
    code = ("import sys, pipeline.train, sdit.loader, sdit.losses; "
            "print(sorted(m for m in sys.modules if m in ('sdit.teacher', 'sdit.convert', 'pipeline.init')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_fresh_student_from_a_single_file_teacher_never_reads_its_unet(labelled_store, tiny_single_file, tmp_path,
                                                                          monkeypatch):
    """`sdit train --student` with a `.safetensors` teacher reads the VAE and text encoder tensors only."""
    from sdit import teacher as teacher_module
    from sdit.convert import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX

    real_open, read = teacher_module.safe_open, []

    class Recording:
        """safe_open, noting every tensor read from the file."""

        def __init__(self, *args, **kwargs):
            self.file = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, key):
            return self.inner.get_slice(key)

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    def refuse(*args, **kwargs):
        raise AssertionError("a UNet was built")

    monkeypatch.setattr(teacher_module, "safe_open", Recording)  # the loader's only way into the file
    monkeypatch.setattr(UNet2DConditionModel, "__init__", refuse)
    result = CliRunner().invoke(app, ["train", str(labelled_store), "--out", str(tmp_path / "run"), "--student",
                                      "SDiT-Nano/2", "--teacher", str(tiny_single_file), "--teacher-config",
                                      str(tiny_single_file.parent), "--steps", "2", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert read and not [k for k in read if k.startswith(UNET_PREFIX)]
    assert {k.split(".")[0] for k in read} == {"first_stage_model", "cond_stage_model"}
    assert any(k.startswith(VAE_PREFIX) for k in read) and any(k.startswith(TEXT_PREFIX) for k in read)
    assert read_run(tmp_path / "run")["teacher"]["layout"] == "single_file"


@pytest.mark.slow
def test_eval_every_logs_held_out_agreement_and_clip_score(labelled_store, clip_folder, tmp_path):
    run = tmp_path / "run"
    _train(labelled_store, run, steps=4, holdout=0.5, eval_every=2, eval_draws=6, eval_clip=str(clip_folder))
    rows = read_metrics(run / "metrics.jsonl")
    evaluated = {r["step"]: r for r in rows if "eval_teacher_mse" in r}
    assert sorted(evaluated) == [2, 4] and all("loss" in r for r in evaluated.values())
    for r in evaluated.values():
        assert r["eval_draws"] == 6 and r["eval_teacher_mse"] > 0 and 0 <= r["eval_clip_score"] <= 100
    assert evaluated[2]["eval_teacher_mse"] != evaluated[4]["eval_teacher_mse"]  # the EMA moved
    assert "eval_teacher_mse" not in rows[0]
    assert Image.open(run / "loss.png").size[0] > 0
    with pytest.raises(SDiTError, match="--eval-every measures the student on held-out draws: give --holdout"):
        _train(labelled_store, tmp_path / "no-holdout", steps=2, eval_every=1)
    with pytest.raises(SDiTError, match="--sample-prompts must be at least 1"):
        _train(labelled_store, tmp_path / "no-prompts", steps=2, holdout=0.5, eval_every=1, eval_clip=str(clip_folder),
               sample_prompts=0)
    with pytest.raises(SDiTError, match="--log 'wandb'"):
        _train(labelled_store, tmp_path / "wandb", steps=2, log="wandb")


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_metrics_and_sample_grids(labelled_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(labelled_store), "--out", str(run), "--student", "SDiT-Nano/2",
                                      "--steps", "4", "--batch-size", "8", "--checkpoint-every", "2", "--holdout",
                                      "0.5", "--eval-every", "2", "--eval-draws", "4", "--sample-every", "2",
                                      "--sample-prompts", "2", "--log", "tensorboard"])
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    tags = events.Tags()
    assert {"train/loss", "train/kd_loss", "train/lr", "train/grad_norm", "train/samples_per_s",
            "eval/teacher_mse"} <= set(tags["scalars"])
    assert "samples" in tags["images"]
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    logged = [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl")]
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in losses], [v for _, v in logged], rtol=1e-6)
    assert [e.step for e in events.Scalars("eval/teacher_mse")] == [2, 4]
    assert [e.step for e in events.Images("samples")] == [2, 4, 4]  # every 2 steps, and the final grid


def test_sample_prompts_0_trains_without_sample_grids(labelled_store, tmp_path):
    run = tmp_path / "run"
    summary = _train(labelled_store, run, steps=2, sample_every=1, sample_prompts=0)
    assert summary["steps"] == 2 and summary["samples"] is None and not (run / "samples").exists()


def test_a_student_of_labels_with_fresh_guidance_trains_on_ws_drawn_anew(fresh_guided_store, tmp_path, monkeypatch):
    seen = []
    original = Trainer.losses

    def spy(self, batch):
        seen.append(batch.guidance.clone())
        return original(self, batch)

    monkeypatch.setattr(Trainer, "losses", spy)
    summary = _train(fresh_guided_store, tmp_path / "run", labels="fresh", steps=12, batch_size=4, task_weight=0.25)
    assert summary["steps"] == 12 and load_student(tmp_path / "run").config.guidance_embed
    w = torch.cat(seen)
    assert len(w) == 48 and ((w == 1) | ((w >= 2) & (w <= 6))).all()
    stored = LabelledStore(str(fresh_guided_store), "fresh")
    own = torch.cat([b.guidance for b in DrawStream(stored, 4, shuffle=False, repeat=False)])
    assert sorted(w[:22].tolist()) != sorted(own.tolist())  # the first epoch's w are not the draws' own
    seen.clear()
    _train(fresh_guided_store, tmp_path / "narrow", labels="fresh", steps=3, batch_size=4, task_weight=0.25,
           fresh_guidance_range=(3.0, 3.5))
    w = torch.cat(seen)
    assert ((w == 1) | ((w >= 3) & (w <= 3.5))).all() and (w != 1).any()


def test_a_window_of_w_is_refused_for_labels_that_keep_one_target_a_draw(labelled_store, tmp_path):
    with pytest.raises(SDiTError, match="--fresh-guidance-range: labels 'default' hold each target at its own w"):
        _train(labelled_store, tmp_path / "run", steps=1, fresh_guidance_range=(2.0, 4.0))


def test_guided_labels_take_a_task_weight_only_with_draws_at_w_1():
    from types import SimpleNamespace

    from pipeline.train import check_targets
    from sdit.labels import LabelsManifest

    def labels(conditional: float):
        meta = LabelsManifest(name="g", teacher={}, scheduler={}, prediction_type="epsilon", seed=0, draws=2,
                              timesteps="uniform", perturb={}, guidance=[1.0, 3.0], guidance_conditional=conditional)
        return SimpleNamespace(labels=meta)

    with pytest.raises(SDiTError, match="no target for them: pass --task-weight 0, or label with --guidance-cond"):
        check_targets(labels(0.0), TrainConfig(store="s", out="o", labels="g", task_weight=1.0))
    check_targets(labels(0.25), TrainConfig(store="s", out="o", labels="g", task_weight=1.0))
    check_targets(labels(0.0), TrainConfig(store="s", out="o", labels="g", task_weight=0.0))
