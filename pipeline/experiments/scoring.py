"""Scoring the experiment: samples of the teacher and every student from the same noise, read by the shapes
reader; each run's learning curve over its checkpoints, and the steps it needed against the no-teacher run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from safetensors.torch import load_model

from pipeline.evaluate import EvalConfig, evaluate
from pipeline.experiments.config import GUIDED_LABELS, PROMPTS_PER_PAIR, DistillConfig
from pipeline.experiments.plan import STORE, Labelling, Run
from pipeline.experiments.plots import plot_curves, write_grid
from pipeline.train_run import checkpoint_dirs
from sdit.files import replacing
from sdit.pipeline_sdit import SDiTPipeline
from sdit.progress import Progress, no_progress
from sdit.run import read_run
from sdit.shapes import reader, samples, world
from sdit.shapes.scores import HEADLINES, figures, headline_draws, interval, resample


def score_all(config: DistillConfig, out: Path, teacher, labellings: dict[str, Labelling],
              runs: dict[str, Run], progress: Progress = no_progress) -> dict[str, dict]:
    """Samples of the teacher and every student from the same noise (`progress(n)` counts them, `scoring_images`
    in all); fair held-out scores, attribute accuracy on held-out and seen prompts; teacher agreement on held-out
    draws."""
    prompts = samples.evaluation_prompts()
    asked = samples.repeat(prompts, config.per_prompt)
    texts = {split: [p.text for p in plist] for split, plist in asked.items()}
    images, seconds = {}, {}
    images["teacher"], seconds["teacher"] = teacher_samples(config, out, teacher, texts, progress)
    for name in config.names:  # the clock runs over sampling only: the pipeline is loaded before it starts
        pipe = student_pipeline(out / name)
        started = time.perf_counter()
        images[name] = {split: _sample(config, out / name, teacher, t, pipe=pipe, progress=progress)
                        for split, t in texts.items()}
        seconds[name] = time.perf_counter() - started
    results, weights, draws = {}, resample(asked, seed=config.seed), {}
    for name in images:
        readings = {split: reader.read_batch(images[name][split]) for split in prompts}
        results[name] = figures(readings, asked)
        draws[name] = headline_draws(readings, asked, weights)
        results[name]["sample_s_per_image"] = seconds[name] / sum(len(a) for a in asked.values())
        results[name]["sample_forwards"] = config.sample_steps * (1 if distilled(out, name) else 2)
        if name != "teacher":
            # on held-out draws of real pairs where the experiment has them; a guided student against guided
            # targets, its own kind
            run = runs[name]
            plain = "plain" in labellings and labellings[run.labels].kind != GUIDED_LABELS
            store = STORE if plain else run.store
            agreement = evaluate(EvalConfig(run=str(out / name), store=str(out / store),
                                            labels="plain" if plain else run.labels,
                                            **({} if store == run.store else same_split(out / name))))
            results[name]["teacher_mse"] = agreement["teacher_agreement"]["mse"]
            results[name]["teacher_forwards"] = teacher_forwards(out / run.store, run)
    add_intervals(results, draws)
    write_grid(out / "grid.png", images, prompts, config.per_prompt)
    return results


def scoring_images(config: DistillConfig) -> int:
    """The samples `score_all` draws: every evaluation prompt `per_prompt` times, for the teacher and each run."""
    prompts = sum(map(len, samples.evaluation_prompts().values()))
    return prompts * config.per_prompt * (len(config.names) + 1)


def add_intervals(results: dict[str, dict], draws: dict[str, dict[str, np.ndarray]]) -> None:
    """Adds to each model's results the 95% intervals of its headline figures (`intervals`) and each held-out
    concept's standard error (`fair_se`); with a no-teacher run among them, each other student's gain over it
    (`gain`: the difference of each headline figure and its paired interval, both sampled from the same prompts
    and noise)."""
    for name, result in results.items():
        result["intervals"] = {key: interval(draws[name][key]) for key in HEADLINES}
        for concept, scored in result["heldout_concepts"].items():
            values = draws[name][f"fair:{concept}"]
            scored["fair_se"] = float(np.nanstd(values)) if (~np.isnan(values)).any() else None
    if "no_teacher" not in results:
        return
    for name, result in results.items():
        if name not in ("teacher", "no_teacher"):
            result["gain"] = {key: {"value": result[key] - results["no_teacher"][key],
                                    "interval": interval(draws[name][key] - draws["no_teacher"][key])}
                              for key in HEADLINES}


def teacher_samples(config: DistillConfig, out: Path, teacher, texts: dict[str, list[str]],
                    progress: Progress = no_progress) -> tuple[dict[str, list[np.ndarray]], float]:
    """The teacher's samples of `texts` and the seconds they took: read from `config.teacher_samples` (default
    OUT/teacher-samples.npz) when that file was made by the same teacher, prompts, noise and sampler, else
    made and kept there (`progress(n)` counts them, read or made). The substitution curve's sizes share one file:
    the teacher does not change with them."""
    path = Path(config.teacher_samples or out / "teacher-samples.npz")
    key = json.dumps({"teacher": teacher.identity.hashes, "texts": texts,
                      "steps": config.sample_steps, "guidance": config.guidance, "seed": config.seed}, sort_keys=True)
    if path.exists():
        with np.load(path) as kept:
            if str(kept["key"]) == key:
                progress(sum(map(len, texts.values())))
                return {split: list(kept[split]) for split in texts}, float(kept["seconds"])
    started = time.perf_counter()
    images = {split: _sample(config, None, teacher, t, progress=progress) for split, t in texts.items()}
    seconds = time.perf_counter() - started
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), seconds=np.array(seconds), **{s: np.stack(i) for s, i in images.items()})
    return images, seconds


def distilled(out: Path, name: str) -> bool:
    """Whether a model samples with one forward a step (a guidance-distilled student)."""
    return name != "teacher" and json.loads((out / name / "transformer" / "config.json").read_text())["guidance_embed"]


# --- learning curves ----------------------------------------------------------------------------------------------


def curve_prompts(config: DistillConfig) -> dict[str, list[world.Prompt]]:
    """The fixed subset the curves score: `curve_prompts` of each pair's six prompts, both splits."""
    keep = np.linspace(0, PROMPTS_PER_PAIR - 1, config.curve_prompts).round().astype(int)
    return {split: [p for i, p in enumerate(plist) if i % PROMPTS_PER_PAIR in keep]
            for split, plist in samples.evaluation_prompts().items()}


def add_curves(config: DistillConfig, out: Path, results: dict[str, dict], teacher, runs: dict[str, Run],
               progress: Progress = no_progress) -> None:
    """Score the EMA weights of every checkpoint of every run (and the shared initial weights at step 0) on the
    curve prompts, from the same noise each time (`progress(n)` counts the samples, `curve_images` in all); the
    teacher on them too, as the reference line. Adds `curves` and `speedup` to each run's results and writes
    curves.png."""
    prompts = curve_prompts(config)
    asked = samples.repeat(prompts, config.curve_per_prompt)
    texts = {split: [p.text for p in plist] for split, plist in asked.items()}

    def point(run: Path | None, ema: Path | None = None) -> dict:
        readings = {split: reader.read_batch(_sample(config, run, teacher, texts[split], ema=ema, progress=progress))
                    for split in texts}
        scored = figures(readings, asked)
        return {"heldout_acc": scored["heldout_acc"], "seen_acc": scored["seen_acc"]}

    starts = {}  # step 0 of every run that starts from the same weights
    for name in config.names:
        init = out / runs[name].init
        if init not in starts:
            starts[init] = {"step": 0} | point(init)
        results[name]["curves"] = [starts[init]] + [
            {"step": int(folder.name.removeprefix("step-"))} | point(out / name, folder / "ema.safetensors")
            for folder in checkpoint_dirs(out / name)]
    reference = point(None)
    for name in config.names:  # against the no-teacher run's final seen accuracy, when it is one of the runs
        baseline = results["no_teacher"]["curves"][-1] if "no_teacher" in config.runs else None
        needed = steps_to_reach(results[name]["curves"], baseline["seen_acc"]) \
            if baseline and name != "no_teacher" else None  # the yardstick has no speed-up over itself
        results[name]["speedup"] = baseline["step"] / needed if needed else None
    results["teacher"]["curve_reference"] = reference
    plot_curves(out / "curves.png", {name: results[name]["curves"] for name in config.names}, reference)


def curve_images(config: DistillConfig, out: Path, runs: dict[str, Run]) -> int:
    """The samples `add_curves` draws: each curve point's (every checkpoint of each trained run, each initial
    weights, the teacher's reference) on the curve prompts."""
    prompts = sum(map(len, curve_prompts(config).values())) * config.curve_per_prompt
    checkpoints = sum(len(checkpoint_dirs(out / name)) for name in config.names)
    return (checkpoints + len({runs[name].init for name in config.names}) + 1) * prompts


def steps_to_reach(curve: list[dict], target: float, key: str = "seen_acc") -> float | None:
    """The step at which `curve` first reaches `target`, interpolated linearly between its points; None if it
    never does (or the target is not above the first point, where no step count is meaningful)."""
    if not curve or target <= curve[0][key]:
        return None
    for before, after in zip(curve, curve[1:]):
        if after[key] >= target:
            share = (target - before[key]) / (after[key] - before[key])
            return before["step"] + share * (after["step"] - before["step"])
    return None


def same_split(run: Path) -> dict:
    """EvalConfig options naming the held-out records of `run` in another store with the same records (a
    trajectory store copies the main store's: the plain labels of its records sit in the main one)."""
    train = read_run(run)["train"]
    return {"holdout": train["holdout"], "split_seed": train["split_seed"]}


def teacher_forwards(store: Path, run: Run) -> int:
    """What a run's labels cost in teacher UNet forwards (0 without the teacher: its ε_T goes unused)."""
    if run.training["kd_weight"] == 0:
        return 0
    counts = json.loads((store / "labels" / run.labels / "manifest.json").read_text())["counts"]
    return int(counts["teacher_forwards"]["total"])


def student_pipeline(run: Path, ema: Path | None = None) -> SDiTPipeline:
    """A student run's pipeline, with the EMA weights of checkpoint file `ema` when given."""
    pipe = SDiTPipeline.from_pretrained(run)
    pipe.set_progress_bar_config(disable=True)
    if ema is not None:
        load_model(pipe.transformer, str(ema))
    return pipe


def _sample(config: DistillConfig, run: Path | None, teacher, prompts: list[str], batch: int = 64,
            ema: Path | None = None, pipe: SDiTPipeline | None = None, progress: Progress = no_progress) -> list:
    """(H, W, 3) uint8 images of a student run (its `pipe` when loaded already, else loaded with the EMA weights of
    checkpoint file `ema` when given), or of the teacher (run=None); image i starts from the noise of seed
    config.seed + i whichever model draws it. `progress(n)` counts them."""
    if run is None:
        return samples.sample_teacher(teacher, prompts, config.sample_steps, config.guidance, config.seed, batch,
                                      progress)
    pipe = pipe or student_pipeline(run, ema)
    made = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        noise = samples.seeded_noise(samples.latent_shape(teacher), config.seed, start, len(chunk))
        made += [np.asarray(i) for i in pipe(chunk, latents=noise, num_inference_steps=config.sample_steps,
                                              guidance_scale=config.guidance).images]
        progress(len(chunk))
    return made
