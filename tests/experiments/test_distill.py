import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from conftest import child_env, cli_command, kill_paused_at
from experiments.conftest import run_variants, variants_args
from pipeline.config import InitConfig
from pipeline.experiments.config import DistillConfig
from pipeline.experiments.distill import DATA, SPLIT_RECORD, _synthesis, write_split
from pipeline.experiments.plan import load_variants, longest_steps, plan, total_steps, train_configs
from pipeline.experiments.scoring import teacher_samples
from pipeline.experiments.side_by_side import train_side_by_side
from pipeline.init import init, init_for_store
from pipeline.train import TrainConfig
from pipeline.train_monitor import read_metrics
from sdit.loader import LabelledStore
from sdit.perturb import Kind
from sdit.run import read_run
from sdit.shapes import world
from sdit.teacher import load_teacher
from sdit.tiny import save_tiny_teacher


@pytest.mark.slow
def test_bench_distill_runs_every_stage_and_reports_each_run(tiny_teacher, tmp_path):
    """The demo path end to end on the tiny teacher: split, encode, label, train six students, sample, score."""
    out, figures = tmp_path / "distill", tmp_path / "distill.json"
    result = CliRunner().invoke(app, ["bench", "distill", "--out", str(out), "--teacher", str(tiny_teacher),
                                      "--records", "24", "--draws", "2", "--steps", "2", "--batch-size", "8",
                                      "--per-prompt", "2", "--sample-steps", "2", "--jobs", "2",
                                      "--bank-per-pair", "1", "--curve-prompts", "1", "--json", str(figures)])
    assert result.exit_code == 0, result.output
    report = json.loads(figures.read_text())
    assert set(report["runs"]) == {"no_teacher", "kd", "kd_perturb", "kd_synth", "kd_traj", "kd_guided"}
    for name, run in report["runs"].items():
        assert {"heldout_acc", "heldout_hit", "seen_acc", "teacher_mse", "speedup", "curves"} <= set(run)
        assert -1 <= run["heldout_acc"] <= 1 and 0 <= run["heldout_hit"] <= 1 and run["teacher_mse"] > 0
        assert set(run["heldout_concepts"]) == {c.name for c in world.HELDOUT}
        for concept in run["heldout_concepts"].values():
            assert concept["fair"] == pytest.approx(concept["hit"] - concept["false_positive"])
        for key in ("heldout_acc", "seen_acc", "heldout_hit"):  # each figure with its 95% interval
            low, high = run["intervals"][key]
            assert -1 <= low <= high <= 1, (name, key)
        if name != "no_teacher":  # the paired gain over the no-teacher run
            assert run["gain"]["heldout_acc"]["value"] == pytest.approx(
                run["heldout_acc"] - report["runs"]["no_teacher"]["heldout_acc"])
        assert [point["step"] for point in run["curves"]] == [0, 1, 2]  # the initial weights, then each step
        assert all({"heldout_acc", "seen_acc"} <= set(point) for point in run["curves"])
        trained = read_run(out / name)["train"]
        assert (trained["status"], trained["step"]) == ("complete", 2)
    starts = {name: run["curves"][0] for name, run in report["runs"].items() if name != "kd_guided"}
    assert len({json.dumps(start) for start in starts.values()}) == 1  # every run starts from the same weights
    assert {"heldout_acc", "heldout_hit", "seen_acc", "heldout_concepts"} <= set(report["teacher"])
    assert (out / "curves.png").exists() and "curves.png" in result.output
    # the sampling stages count their images up to the totals they announced: 216 evaluation prompts x 2 samples,
    # for the teacher and six runs; the curves' points on their prompts
    assert "sample and score: 3,024/3,024 images (100%)" in result.output
    assert re.search(r"learning curves: ([\d,]+)/\1 images \(100%\)", result.output), result.output
    assert Image.open(out / "budget.png").size == (600, 400) and "budget.png" in result.output
    assert read_run(out / "no_teacher")["train"]["config"]["kd_weight"] == 0
    assert {read_run(out / name)["train"]["config"]["high_noise_weight"] for name in report["runs"]} == {5.0}
    assert read_run(out / "kd_perturb")["train"]["labels"] == "perturbed"
    forwards = {name: run["teacher_forwards"] for name, run in report["runs"].items()}
    assert forwards["no_teacher"] == 0 and forwards["kd"] == forwards["kd_perturb"] < forwards["kd_synth"]
    # kd_guided: a guided target costs two teacher forwards, for each draw of the records and each state of its four
    # trajectories per prompt (two more forwards, the guided step that reaches it)
    assert forwards["kd_guided"] == 2 * forwards["kd_perturb"] + 36 * 4 * 2 * 4
    # kd_traj: 36 prompts x 2 states, each state 2 forwards to reach (a guided step) and 1 to label, in its own store
    assert forwards["kd_traj"] == forwards["kd_perturb"] + 36 * 2 * 3
    assert read_run(out / "kd_traj")["train"]["config"]["store"] == str(out / "store-trajectory")
    trajectory = LabelledStore(str(out / "store-trajectory"), "trajectory").labels.counts["synthetic"]["kinds"]
    assert trajectory == {"none": 0, "input": 0, "swap": 0, "mix": 0, "null": 0, "trajectory": 72}
    # kd_guided: guided targets alone, a student that takes w and samples with one forward a step
    guided = read_run(out / "kd_guided")["train"]
    assert (guided["labels"], guided["config"]["task_weight"]) == ("guided", 0.0)
    assert guided["config"]["store"] == str(out / "store-guided")
    assert LabelledStore(str(out / "store-guided"), "guided").labels.guidance_fresh  # training draws its w afresh
    sampling = {name: run["sample_forwards"] for name, run in {**report["runs"], "teacher": report["teacher"]}.items()}
    assert sampling == {"kd_guided": 2} | {name: 4 for name in sampling if name != "kd_guided"}  # 2 DDIM steps
    assert LabelledStore(str(out / "store"), "synthetic").synthetic_counts
    # Plain labels: real pairs and the empty caption only; perturbed ones also ask about other captions.
    plain = LabelledStore(str(out / "store"), "plain").labels.counts["kinds"]
    assert plain["swap"] == plain["mix"] == plain["input"] == 0 and plain["none"] > 0
    perturbed = LabelledStore(str(out / "store"), "perturbed").labels.counts["kinds"]
    assert perturbed[Kind.SWAP.name.lower()] > 0
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 8 * 64 and grid.size[1] > 7 * 64  # 8 prompts, a teacher row and six student rows
    assert "| kd_perturb |" in (out / "report.md").read_text() and "95% intervals" in (out / "report.md").read_text()


@pytest.mark.slow
def test_runs_trained_side_by_side_equal_runs_trained_one_at_a_time(labelled_store, tiny_teacher, tmp_path):
    init_for_store(str(labelled_store), "default", str(tmp_path / "init"), "SDiT-Nano/2", teacher=str(tiny_teacher))

    def runs(folder: str) -> dict[str, TrainConfig]:
        return {name: TrainConfig(store=str(labelled_store), out=str(tmp_path / folder / name),
                                  init=str(tmp_path / "init"), steps=3, batch_size=8, kd_weight=kd, sample_every=0)
                for name, kd in (("no_teacher", 0.0), ("kd", 1.0))}

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each process side by side gets on two cores: the same rounding
    try:
        train_side_by_side(runs("one"), 1, lambda _: None, None)
    finally:
        torch.set_num_threads(threads)
    stages, steps = [], []
    train_side_by_side(runs("two"), 2, stages.append, lambda m: steps.append(m["step"]))
    assert stages == ["train no_teacher, kd (2 side by side)"] and steps[-1] == 6  # both runs, 3 steps each
    for name in ("no_teacher", "kd"):
        one, two = (read_metrics(tmp_path / folder / name / "metrics.jsonl") for folder in ("one", "two"))
        assert [(m["step"], m["loss"]) for m in one] == [(m["step"], m["loss"]) for m in two]


def test_bad_training_options_are_refused_before_any_work(tiny_teacher, tmp_path):
    out = tmp_path / "distill"
    result = CliRunner().invoke(app, ["bench", "distill", "--out", str(out), "--teacher", str(tiny_teacher),
                                      "--high-noise-weight", "0.5"])
    assert result.exit_code != 0 and "--high-noise-weight 0.5: a cap of at least 1" in result.output
    assert not out.exists()


def test_steps_to_reach_interpolates_between_curve_points():
    from pipeline.experiments.scoring import steps_to_reach

    curve = [{"step": 0, "seen_acc": 0.0}, {"step": 100, "seen_acc": 0.2}, {"step": 200, "seen_acc": 0.6}]
    assert steps_to_reach(curve, 0.2) == 100
    assert steps_to_reach(curve, 0.4) == pytest.approx(150)
    assert steps_to_reach(curve, 0.7) is None  # never reached: no speed-up
    assert steps_to_reach(curve, 0.0) is None  # reached before any step: no step count to compare


@pytest.mark.slow
def test_variants_train_beside_the_runs_on_their_own_labels_and_a_rerun_keeps_what_is_done(tiny_teacher, variants):
    out = variants
    report = json.loads((out / "report.json").read_text())
    assert list(report["runs"]) == ["no_teacher", "swaps", "longer"]
    longer, swaps = read_run(out / "longer")["train"], read_run(out / "swaps")["train"]
    assert (longer["labels"], longer["step"], longer["config"]["kd_weight"]) == ("perturbed", 3, 1.0)
    assert (swaps["labels"], swaps["step"]) == ("swaps", 2)
    labels = LabelledStore(str(out / "store"), "swaps").labels
    assert labels.draws == 3 and labels.perturb["caption_min_t"] == 0
    assert labels.counts["kinds"]["mix"] == labels.counts["kinds"]["input"] == 0 < labels.counts["kinds"]["swap"]
    assert sorted(p.name for p in (out / "store" / "labels").iterdir() if p.is_dir()) == ["perturbed", "plain", "swaps"]
    assert ("swaps: kd_perturb with perturb=none=0.5,swap=0.5, caption_min_t=0, draws=3."
            in (out / "report.md").read_text())
    # Where the time went, and how fast each run trained.
    assert list(report["stages"]) == ["store", "train", "score", "curves"]
    assert 0 < sum(report["stages"].values()) <= report["seconds"]
    assert all(run["train_steps_per_s"] > 0 for run in report["runs"].values())
    assert " s in all (split, encode and labels " in (out / "report.md").read_text()
    assert " steps/s a run)." in (out / "report.md").read_text()

    # A rerun keeps the store, the trained runs and the teacher's samples, and scores the same weights the same.
    kept = {path: path.stat().st_mtime_ns for path in [out / "teacher-samples.npz",
                                                        *out.glob("*/checkpoints/*/model.safetensors")]}
    run_variants(tiny_teacher, out.parent, out)
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    again = json.loads((out / "report.json").read_text())
    for name in report["runs"]:
        assert {k: again["runs"][name][k] for k in ("heldout_acc", "seen_acc", "curves")} == \
            {k: report["runs"][name][k] for k in ("heldout_acc", "seen_acc", "curves")}


@pytest.mark.parametrize("student, positions, seed, trains", [
    ("SDiT-T/2", None, 0, "a SDiT-T/2 student of seed 0"), ("SDiT-Nano/2", None, 1, "a SDiT-Nano/2 student of seed 1"),
    ("SDiT-Nano/2", 20, 0, "a SDiT-Nano/2 student of 20 text positions of seed 0")])
def test_a_rerun_with_another_student_or_seed_is_refused_before_any_work(tiny_teacher, tmp_path, student, positions,
                                                                         seed, trains):
    """Its runs would otherwise resume training the students an earlier start made."""
    out = tmp_path / "distill"
    init(InitConfig(teacher=str(tiny_teacher), student="SDiT-Nano/2", out=str(out / "init"), seed=0))
    result = CliRunner().invoke(app, ["bench", "distill", "--out", str(out), "--teacher", str(tiny_teacher),
                                      "--runs", "no_teacher", "--student", student, "--seed", str(seed),
                                      *(["--text-positions", str(positions)] if positions else [])])
    assert result.exit_code != 0
    assert f"a SDiT-Nano/2 student of seed 0, and this experiment trains {trains}:" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["init"]


@pytest.mark.parametrize("option, value, says", [("--records", "30", "--records 24, not 30"),
                                                  ("--bank-per-pair", "0", "--bank-per-pair 1, not 0")])
def test_a_rerun_with_another_split_is_refused_before_any_work(tiny_teacher, tmp_path, option, value, says):
    """Its runs would otherwise train and be scored on the split an earlier start wrote."""
    out = tmp_path / "distill"
    write_split(out / DATA, DistillConfig(records=24, bank_per_pair=1), say=lambda _: None)
    assert json.loads((out / DATA / SPLIT_RECORD).read_text()) == {"records": 24, "bank_per_pair": 1, "seed": 0}
    args = ["bench", "distill", "--out", str(out), "--teacher", str(tiny_teacher), "--runs", "no_teacher",
            "--records", "24", "--bank-per-pair", "1", option, value]
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0
    assert f"holds a split made with {says}: pass another --out" in result.output
    assert sorted(p.name for p in out.iterdir()) == [DATA]


def test_a_split_left_half_written_is_written_again_whole(tmp_path):
    """A start killed while writing the split leaves only the hidden folder it was writing (sdit.files'
    writing_folder), which the next start replaces."""
    config = DistillConfig(records=24, bank_per_pair=1)
    partial = tmp_path / f".{DATA}.tmp"
    (partial / "images").mkdir(parents=True)
    (partial / "images" / "000000.txt").write_text("a stale caption\n")
    write_split(tmp_path / DATA, config, say=lambda _: None)
    assert not partial.exists()
    assert len(list((tmp_path / DATA / "images").glob("*.png"))) == 24
    assert "a stale caption" not in (tmp_path / DATA / "images" / "000000.txt").read_text()
    assert (tmp_path / DATA / "prompts.txt").read_text().count("\n") == len(world.prompt_bank(0, 1))


def test_each_run_starts_from_the_initial_weights_of_its_kind_of_student():
    variants = {"linear": {"from": "kd_guided", "guidance_linear": True},
                "small": {"from": "kd", "student": "SDiT-Nano/2"}, "traj2": {"from": "kd_traj", "synth_samples": 2},
                "records": {"from": "kd_guided", "trajectories": False, "synth_samples": 0, "fresh_guidance": False},
                "guided_traj": {"from": "kd_guided", "trajectory_steps": 9},
                "guided_traj_linear": {"from": "kd_guided", "synth_samples": 2, "guidance_linear": True},
                "guided_synth": {"from": "kd_guided", "trajectories": False, "synth_samples": 2},
                "fresh24": {"from": "kd_guided", "fresh_guidance_range": "2:4"},
                "light": {"from": "kd_synth", "synthetic_weight": 0.5},
                "short": {"from": "kd_synth", "text_positions": 20}}
    config = DistillConfig(runs=("kd", "kd_synth", "kd_traj", "kd_guided"), variants=variants)
    config.check()  # a guided student of trajectory draws takes kd_traj's options and kd_guided's alike
    labellings, runs = plan(config)
    assert {name: (run.init, run.store, run.guidance_linear) for name, run in runs.items()} == {
        "kd": ("init", "store", False), "kd_synth": ("init", "store", False),
        "kd_traj": ("init", "store-trajectory", False), "kd_guided": ("init-guided", "store-guided", False),
        "linear": ("init-guided-linear", "store-guided", True), "small": ("init-SDiT-Nano-2", "store", False),
        "traj2": ("init", "store-traj2", False),  # a store holds one set of the teacher's samples or trajectories
        "records": ("init-guided", "store", False),
        "guided_traj": ("init-guided", "store-guided_traj", False),
        "guided_traj_linear": ("init-guided-linear", "store-guided_traj_linear", True),
        "guided_synth": ("init-guided", "store-guided_synth", False), "fresh24": ("init-guided", "store-guided", False),
        "light": ("init", "store", False), "short": ("init-text20", "store", False)}
    assert (runs["short"].text_positions, runs["kd"].text_positions) == (20, None)
    assert plan(replace(config, text_positions=20))[1]["short"].init == "init"  # every student reads 20
    # kd_guided's own labels: w from 1:3 kept fresh, on the records and four trajectories per prompt of the bank,
    # their states on a 12-step schedule (kd_traj's take --trajectory-steps, 16)
    guided = labellings["guided"]
    assert (guided.guidance, guided.guidance_fresh, guided.samples, guided.trajectory_steps) == (
        (1.0, 3.0), True, 4, 12)
    assert labellings["trajectory"].trajectory_steps == config.trajectory_steps == 16
    assert runs["linear"].labels == runs["fresh24"].labels == "guided"  # the window is training's: the same labels
    assert train_configs(config, runs)["fresh24"].fresh_guidance_range == (2.0, 4.0)
    assert runs["light"].labels == "synthetic" and train_configs(config, runs)["light"].synthetic_weight == 0.5
    records = labellings["records"]  # a variant that turns the recipe's options off: guided draws of the records
    assert (records.samples, records.guidance_fresh, records.trajectory_steps) == (0, False, 0)
    assert _synthesis(config, records) is None
    assert (labellings["traj2"].samples, labellings["trajectory"].samples) == (2, 1)
    traj = labellings["guided_traj"]  # guided targets at the states of 9-step trajectories
    assert (traj.kind, traj.samples, traj.trajectory_steps, traj.guidance) == ("guided", 4, 9, (1.0, 3.0))
    assert _synthesis(config, traj).trajectory == traj.draws  # the teacher stops at the states it labels
    # without trajectories, a guided variant's samples are finished images, drawn as kd_synth's
    finished = labellings["guided_synth"]
    assert (finished.samples, finished.trajectory_steps) == (2, 0)
    assert _synthesis(config, finished) == replace(_synthesis(config, labellings["synthetic"]), samples=2)
    assert _synthesis(config, finished).trajectory == 0


def test_the_runs_steps_set_the_progress_bars():
    """One run at a time, a bar per run of the longest run's steps; side by side, one bar of all their steps."""
    assert longest_steps(DistillConfig(runs=("kd",), steps=40)) == 40
    longer = {"longer": {"from": "no_teacher", "steps": 90}, "shorter": {"from": "kd", "steps": 10}}
    assert longest_steps(DistillConfig(runs=("kd",), steps=40, variants=longer)) == 90
    assert total_steps(DistillConfig(runs=("kd",), steps=40, variants=longer)) == 40 + 90 + 10


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "docs" / "tuning").glob("*.toml")),
                         ids=lambda p: p.name)
def test_the_shipped_tuning_tables_are_valid_variants(path):
    variants = load_variants(str(path))
    assert variants
    DistillConfig(runs=(), variants=variants).check()  # the shipped tuning commands would not refuse them


@pytest.mark.slow
def test_the_teachers_samples_are_drawn_again_for_a_teacher_with_another_unet(tiny_teacher, tmp_path):
    other = shutil.copytree(tiny_teacher, tmp_path / "other")  # the same VAE and text encoder
    shutil.rmtree(other / "unet")
    shutil.copytree(save_tiny_teacher(tmp_path / "seed1", seed=1) / "unet", other / "unet")
    config = DistillConfig(out=str(tmp_path), sample_steps=2)
    texts = {"heldout": ["a red circle", "a cyan star"]}
    first, _ = teacher_samples(config, tmp_path, load_teacher(tiny_teacher), texts)
    made = (tmp_path / "teacher-samples.npz").stat().st_mtime_ns
    again, _ = teacher_samples(config, tmp_path, load_teacher(tiny_teacher), texts)
    assert (tmp_path / "teacher-samples.npz").stat().st_mtime_ns == made  # read back
    assert all((a == b).all() for a, b in zip(first["heldout"], again["heldout"]))
    others, _ = teacher_samples(config, tmp_path, load_teacher(other), texts)
    assert not any((a == b).all() for a, b in zip(first["heldout"], others["heldout"]))


@pytest.mark.parametrize("text, error", [
    ('[a]\nsteps = 3\n', "say which run it changes, from = one of"),
    ('[a]\nfrom = "kd"\nema_decay = 0.9\n', "unknown option 'ema_decay'"),
    ('[a]\nfrom = "kd"\nsteps = "many"\n', "steps takes a int, not 'many'"),
    ('[kd]\nfrom = "kd"\n', "not a run's name"),
    ('a = 3\n', "'a' is not a table"),
    ('[a\n', "--variants"),
    ('[a]\nfrom = "kd_perturb"\nperturb = "none=0.5,swap=0.2"\n',
     "variant 'a': --perturb none=0.5,swap=0.2 sums to 0.7"),
    ('[a]\nfrom = "kd_perturb"\nguidance_linear = true\n', "guidance_linear is for students of guided labels"),
    ('[a]\nfrom = "kd"\ntext_positions = 1\n', "variant 'a': text_positions 1: give 2 or more"),
    ('[a]\nfrom = "kd_synth"\nfresh_guidance = true\n', "fresh_guidance is for students of guided labels"),
    ('[a]\nfrom = "kd_guided"\nfresh_guidance = false\nfresh_guidance_range = "2:4"\n',
     "for labels with fresh_guidance = true"),
    ('[a]\nfrom = "kd_guided"\nfresh_guidance = true\nfresh_guidance_range = "2"\n',
     "fresh_guidance_range '2': give W_MIN:W_MAX"),
    ('[a]\nfrom = "kd_perturb"\nsynth_samples = 2\n', "synth_samples is for kd_synth's, kd_traj's"),
    ('[a]\nfrom = "kd_synth"\nsynth_samples = 0\n', "synth_samples is 1 or more"),
    ('[a]\nfrom = "kd_guided"\nsynth_samples = 0\n', "synth_samples is 1 or more (0, the records alone, for"),
    ('[a]\nfrom = "kd_traj"\ntrajectory_steps = 8\n', "so trajectory_steps must be above --draws (now 8)"),
    ('[a]\nfrom = "kd_guided"\ntrajectories = false\ntrajectory_steps = 9\n',
     "trajectory_steps is for kd_traj's variants"),
    ('[a]\nfrom = "kd_traj"\ntrajectories = true\n', "trajectories is for kd_guided's variants"),
    ('[a]\nfrom = "kd_guided"\ntrajectories = true\ntrajectory_steps = 8\n',
     "so trajectory_steps must be above --draws (now 8)"),
])
def test_bad_variants_are_refused_in_one_line_before_any_work(tiny_teacher, tmp_path, text, error):
    variants, out = tmp_path / "variants.toml", tmp_path / "distill"
    variants.write_text(text)
    result = CliRunner().invoke(app, ["bench", "distill", "--out", str(out), "--teacher", str(tiny_teacher),
                                      "--variants", str(variants)])
    assert result.exit_code != 0 and error in result.output
    assert not out.exists()


@pytest.mark.parametrize("args, error", [
    (["--runs", "kd_traj", "--trajectory-steps", "8"], "kd_traj: a trajectory stops after its 8 draws' steps, so "
                                                        "--trajectory-steps must be above --draws (now 8)"),
    # kd_guided's schedule is its recipe's (12 steps), not --trajectory-steps
    (["--runs", "kd_guided", "--draws", "12"], "kd_guided: a trajectory stops after its 12 draws' steps, so "
                                               "trajectory_steps must be above --draws (now 12)"),
])
def test_a_trajectory_schedule_within_its_draws_is_refused_naming_what_set_it(tiny_teacher, tmp_path, args, error):
    out = tmp_path / "distill"
    result = CliRunner().invoke(app, ["bench", "distill", "--out", str(out), "--teacher", str(tiny_teacher), *args])
    assert result.exit_code != 0 and error in result.output
    assert not out.exists()


@pytest.mark.slow
def test_an_experiment_killed_while_training_resumes_to_the_same_report(tiny_teacher, variants, tmp_path):
    whole, killed = variants, tmp_path / "killed"
    # torch.save writes each checkpoint's optimiser state: the third call is the swaps run's first checkpoint
    kill_paused_at(variants_args(tiny_teacher, tmp_path, killed), "torch:save", 3, tmp_path / "paused")
    assert read_run(killed / "no_teacher")["train"]["status"] == "complete"
    assert not (killed / "swaps" / "checkpoints" / "step-00000001").exists()
    done = subprocess.run(cli_command(*variants_args(tiny_teacher, tmp_path, killed)), env=child_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (json.loads((folder / "report.json").read_text()) for folder in (whole, killed))
    for name in one["runs"]:
        assert [(m["step"], m["loss"]) for m in read_metrics(whole / name / "metrics.jsonl")] == \
            [(m["step"], m["loss"]) for m in read_metrics(killed / name / "metrics.jsonl")]
        assert {k: one["runs"][name][k] for k in ("heldout_acc", "seen_acc", "curves", "teacher_mse")} == \
            {k: two["runs"][name][k] for k in ("heldout_acc", "seen_acc", "curves", "teacher_mse")}


@pytest.mark.slow
def test_killing_the_experiment_ends_the_runs_training_beside_it(tiny_teacher, tmp_path):
    """A killed experiment leaves no orphan going on writing into a run folder that a rerun would resume."""
    out = tmp_path / "distill"
    metrics = [out / name / "metrics.jsonl" for name in ("no_teacher", "kd")]
    proc = subprocess.Popen(cli_command("bench", "distill", "--out", out, "--teacher", tiny_teacher, "--runs",
                                        "no_teacher,kd", "--records", "24", "--draws", "2", "--steps", "100000",
                                        "--batch-size", "8", "--curve-points", "0", "--jobs", "2"),
                            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not all(m.exists() for m in metrics):  # both runs are training, each in a process of its own
        assert proc.poll() is None and time.monotonic() < deadline, "the runs never started training"
        time.sleep(0.05)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len(children) >= 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"still running after the experiment was killed: {[p.cmdline()[:3] for p in alive]}"
    steps = [len(read_metrics(m)) for m in metrics]
    time.sleep(1.0)
    assert [len(read_metrics(m)) for m in metrics] == steps  # nothing writes there any more


@pytest.mark.slow
def test_toy_eval_scores_the_teacher_as_the_experiments_teacher_row(tmp_path):
    """`sdit toy eval` and the teacher's row of the experiment sample one code path: same settings, same scores."""
    import inspect

    from cli import toy_eval
    from sdit.shapes import reader, samples
    from sdit.shapes.scores import figures

    defaults = {name: p.default for name, p in inspect.signature(toy_eval).parameters.items()}
    assert (defaults["guidance"], defaults["steps"]) == (DistillConfig.guidance, DistillConfig.sample_steps)
    assert defaults["teacher"] == DistillConfig.teacher
    prompts = {"heldout": world.heldout_prompts()[::24], "seen": world.seen_prompts()[::30]}  # 4 of each
    config = DistillConfig(out=str(tmp_path), per_prompt=1, sample_steps=5, seed=7)
    toy = samples.score_teacher(config.teacher, config.per_prompt, config.guidance, config.sample_steps, config.seed,
                                prompts)
    asked = samples.repeat(prompts, config.per_prompt)
    images, _ = teacher_samples(config, tmp_path, load_teacher(config.teacher),
                                {split: [p.text for p in plist] for split, plist in asked.items()})
    row = figures({split: reader.read_batch(images[split]) for split in asked}, asked)
    for split in asked:
        assert json.dumps(row[f"{split}_attributes"]) == json.dumps(toy[split].accuracy)
    assert row["seen_attributes"]["colour"] > 0.5  # a teacher that draws the world: the scores say something
