"""The measured tables of README.md and docs/, rendered from the JSON files in docs/results/.

Each result file is what a command wrote with `--json`, with the command line under "command". A page marks
each table with a comment naming a view and the result files it reads (names without `.json`; a name that ends
in `-seedN` is seed N of its experiment):

    <!-- results: distill bench-distill-seed0 bench-distill-seed1 columns=fair,seen -->
    (the rendered table, then the commands that wrote its files)
    <!-- /results -->

`python docs/results.py` renders every marked table again in place (`make results`); with `--check` it changes
nothing and lists the tables that differ from what their files render (exit code 1). A table is plain markdown
between two comments, so the pages read the same on GitHub and in the site. Standard library only, no torch: it
runs wherever the docs build.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
BLOCK = re.compile(r"<!-- results: (?P<spec>[^>]*?) -->\n(?P<body>.*?)<!-- /results -->", re.S)
SEED = re.compile(r"-seed(\d+)$")


class ResultsError(Exception):
    """A marker names a view, a file or a run that does not exist."""


# --- pages --------------------------------------------------------------------------------------------------


def pages() -> list[Path]:
    """Every page that may hold a measured table: README.md and the docs' markdown."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def render_page(text: str) -> str:
    """The page with every marked table rendered from its files."""
    return BLOCK.sub(lambda m: f"<!-- results: {m['spec']} -->\n{render(m['spec'])}<!-- /results -->", text)


def blocks(text: str) -> list[tuple[str, str]]:
    """(spec, body) of each marked table."""
    return [(m["spec"], m["body"]) for m in BLOCK.finditer(text)]


def outside_blocks(text: str) -> str:
    """The page without its rendered tables."""
    return BLOCK.sub("", text)


def stale(page: Path) -> list[str]:
    """The specs of the page's tables that differ from what their files render."""
    return [spec for spec, body in blocks(page.read_text()) if body != render(spec)]


# --- one table ----------------------------------------------------------------------------------------------


def render(spec: str) -> str:
    """A marker's table and, under it, the commands that wrote its files."""
    view, names, options = parse(spec)
    if view not in VIEWS:
        raise ResultsError(f"results view {view!r}: choose one of {', '.join(VIEWS)}")
    files = [(name, load(name)) for name in names]
    commands = "\n".join(command(data, name) for name, data in files)
    return f"\n{VIEWS[view](files, options)}\n\n```bash\n{commands}\n```\n"


def parse(spec: str) -> tuple[str, list[str], dict[str, str]]:
    """`VIEW FILE... [key=value...]` -> (view, files, options)."""
    view, *words = spec.split()
    options = dict(w.split("=", 1) for w in words if "=" in w)
    return view, [w for w in words if "=" not in w], options


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        raise ResultsError(f"{path} does not exist: write it with the command that makes it (--json)")
    return json.loads(path.read_text())


def command(data: dict, name: str) -> str:
    line = data.get("command")
    if not line:
        raise ResultsError(f"docs/results/{name}.json has no \"command\": the table cannot say what made it")
    return line if isinstance(line, str) else shlex.join(line)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def num(value, spec: str = ".3f", suffix: str = "") -> str:
    """A figure, or "-" where the file has none."""
    return "-" if value is None else f"{format(value, spec)}{suffix}"


def seed_of(name: str) -> int | None:
    match = SEED.search(name)
    return int(match[1]) if match else None


# --- the shapes world: `sdit bench distill` -----------------------------------------------------------------


def share(run: dict, teacher: dict) -> str:
    """The run's fair held-out score as a share of the teacher's."""
    if run is teacher or run.get("heldout_acc") is None or not teacher.get("heldout_acc"):
        return ""
    return f"{run['heldout_acc'] / teacher['heldout_acc']:.0%}"


def with_interval(run: dict, key: str) -> str:
    """A figure and, where the file has one, its 95% interval."""
    low, high = run.get("intervals", {}).get(key, (None, None))
    return num(run.get(key)) + (f" [{low:.2f}, {high:.2f}]" if low is not None else "")


def gain(run: dict) -> str:
    """A student's paired gain in fair held-out score over the no-teacher run, with its 95% interval."""
    g = run.get("gain", {}).get("heldout_acc")
    return "-" if g is None else f"{g['value']:+.3f} [{g['interval'][0]:+.2f}, {g['interval'][1]:+.2f}]"


def concept(run: dict, name: str, key: str = "hit"):
    return run.get("heldout_concepts", {}).get(name, {}).get(key)


# key -> (header, cell(run, teacher), one column per seed)
DISTILL_COLUMNS = {
    "fair": ("held-out concepts (fair)", lambda r, t: with_interval(r, "heldout_acc"), True),
    "gain": ("gain over no_teacher (fair)", lambda r, t: gain(r), True),
    "share": ("of the teacher", share, True),
    "seen": ("seen shape+colour", lambda r, t: with_interval(r, "seen_acc"), True),
    "hits": ("held-out hits (raw)", lambda r, t: num(r.get("heldout_hit")), True),
    "pairs": ("held-out shape+colour", lambda r, t: num(r.get("heldout_pair_acc")), True),
    "speedup": ("speed-up", lambda r, t: num(r.get("speedup"), ".1f", "x"), True),
    "mse": ("teacher MSE", lambda r, t: num(r.get("teacher_mse"), ".4f"), True),
    "forwards": ("teacher forwards", lambda r, t: num(r.get("teacher_forwards"), ","), False),
    "sampling": ("forwards / image", lambda r, t: num(r.get("sample_forwards"), "d"), False),
    "speed": ("images / s", lambda r, t: num(1 / r["sample_s_per_image"] if r.get("sample_s_per_image") else None,
                                             ".1f"), True),
}


def distill_column(key: str) -> tuple[str, callable, bool]:
    if key.startswith("hit:"):
        name = key.removeprefix("hit:")
        return f"{name} (hit)", lambda r, t: num(concept(r, name), ".2f"), True
    if key not in DISTILL_COLUMNS:
        raise ResultsError(f"distill column {key!r}: choose {', '.join(DISTILL_COLUMNS)} or hit:CONCEPT")
    return DISTILL_COLUMNS[key]


def by_seed(files: list[tuple[str, dict]]) -> dict[int | None, dict]:
    """The files' runs merged per seed ({"runs", "teacher"}); within a seed the first file with a run wins."""
    seeds: dict[int | None, dict] = {}
    for name, data in files:
        merged = seeds.setdefault(seed_of(name), {"runs": {}, "teacher": None})
        for run, figures in data["runs"].items():
            merged["runs"].setdefault(run, figures)
        merged["teacher"] = merged["teacher"] or data.get("teacher")
    return seeds


def run_names(files: list[tuple[str, dict]], seeds: dict[int | None, dict], options: dict[str, str]) -> list[str]:
    """The runs a view shows: `runs=a,b` in that order, else every run of the files in their order; a named run
    that none of the files holds is refused."""
    names = options["runs"].split(",") if "runs" in options else list(
        dict.fromkeys(run for s in seeds.values() for run in s["runs"]))
    for run in names:
        if not any(run in s["runs"] for s in seeds.values()):
            raise ResultsError(f"run {run!r} is in none of {', '.join(n for n, _ in files)}")
    return names


def distill_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    """One row per run (then the teacher), the chosen columns, each once per seed."""
    seeds = by_seed(files)
    names = run_names(files, seeds, options)
    header, cells = ["run"], []
    for key in options.get("columns", "fair,seen").split(","):
        title, cell, per_seed = distill_column(key)
        shown = list(seeds.items()) if per_seed else list(seeds.items())[:1]
        for i, (seed, _) in enumerate(shown):
            header.append(title if len(seeds) == 1 or not per_seed else
                          f"{title}, seed {seed}" if i == 0 else f"seed {seed}")
        cells.append((cell, shown))
    rows = []
    for run in [*names, "teacher"]:
        row = [run]
        for cell, shown in cells:
            for _, s in shown:
                figures = s["teacher"] if run == "teacher" else s["runs"].get(run)
                row.append("-" if figures is None else cell(figures, s["teacher"]) or "")
        rows.append(row)
    return table(header, rows)


CURVE_METRICS = {"seen": "seen_acc", "fair": "heldout_acc"}


def curves_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    """Each run's learning curve, a row per run and seed: `metric` (seen accuracy or the fair held-out score) at
    every step its curve scored."""
    metric = options.get("metric", "seen")
    if metric not in CURVE_METRICS:
        raise ResultsError(f"curves metric {metric!r}: choose {' or '.join(CURVE_METRICS)}")
    seeds = by_seed(files)
    rows, steps = [], set()
    for run in run_names(files, seeds, options):
        curves = [(seed, s["runs"][run].get("curves")) for seed, s in seeds.items() if run in s["runs"]]
        if not all(curve for _, curve in curves):
            raise ResultsError(f"run {run!r} has no learning curve in {', '.join(n for n, _ in files)}")
        for seed, curve in curves:
            steps |= {point["step"] for point in curve}
            rows.append((run, seed, {point["step"]: point[CURVE_METRICS[metric]] for point in curve}))
    steps = sorted(steps)
    header = ["run", "seed", *(f"step {step:,}" for step in steps)]
    return table(header, [[run, num(seed, "d"), *(num(curve.get(step), ".2f") for step in steps)]
                          for run, seed, curve in rows])


def concepts_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    """Per held-out concept, hit / false positive of each run that has them all, then the teacher."""
    (_, data), = files
    names = list(data["teacher"]["heldout_concepts"])
    rows = []
    for run, r in [*data["runs"].items(), ("teacher", data["teacher"])]:
        if all(concept(r, c) is not None for c in names):
            rows.append([run, num(r.get("heldout_hit"))] +
                        [f"{concept(r, c):.2f} / {num(concept(r, c, 'false_positive'), '.2f')}" for c in names])
    return table(["run", "held-out hits (raw)", *names], rows)


def substitution_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    """Fair held-out score / seen accuracy per run, seed and size; then each seed's data multipliers."""
    rows, multipliers = [], []
    sizes = list(files[0][1]["sizes"])
    for name, data in files:
        seed = seed_of(name)
        for run in data["sizes"][sizes[0]]:
            rows.append([run, str(seed)] + [f"{data['sizes'][n][run]['heldout_acc']:.3f} / "
                                             f"{data['sizes'][n][run]['seen_acc']:.3f}" for n in sizes])
        multipliers.append([str(seed), multiplier(data, data["multiplier"], data["no_teacher_records_needed"]),
                            multiplier(data, data["heldout_multiplier"], data["no_teacher_records_needed_heldout"])])
    at = f"{files[0][1]['multiplier_at']:,}"
    return "\n".join([
        table(["run", "seed", *(f"{int(n):,} records" for n in sizes)], rows), "",
        "Each cell: fair held-out score / seen shape+colour accuracy.", "",
        table(["seed", f"data multiplier at {at} records (seen)", "held-out multiplier"], multipliers)])


def multiplier(data: dict, value: float | None, needed: float | None) -> str:
    if value is None:
        return f"more than {data['largest'] / data['multiplier_at']:g}x"
    return f"{value:.2f}x ({needed:,.0f} records)"


# --- the shapes world: the evaluator and the toy teacher -----------------------------------------------------


def evaluator_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    """Accuracy per attribute per condition; the share read as "none" on images that hold no single shape."""
    (_, data), = files
    conditions = {k: v for k, v in data.items() if k != "command" and "shape" in v}
    attributes = list(next(iter(conditions.values())))
    negatives = {k: v["shape none"] for k, v in data.items() if k != "command" and "shape none" in v}
    return "\n".join([
        table(["images", *attributes], [[k, *(f"{v[a]:.3f}" for a in attributes)] for k, v in conditions.items()]),
        "", table(["images with no single shape", "read as \"none\""],
                  [[k, f"{v:.3f}"] for k, v in negatives.items()]),
        "", f"The evaluator reads {data['speed']['images/s']:,.0f} images/s."])


PROMPT_SETS = {"heldout": "held-out concepts", "seen": "seen"}


def toy_eval_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    """Accuracy per attribute (± one standard error) of the teacher's samples, held-out and seen prompts."""
    (_, data), = files
    scores = {k: v for k, v in data.items() if k != "command"}
    attributes = list(next(iter(scores.values()))["accuracy"])
    rows = [[PROMPT_SETS.get(name, name), str(s["count"]), *(f"{a:.3f} ± {(a * (1 - a) / s['count']) ** 0.5:.3f}"
                                      for a in s["accuracy"].values())] for name, s in scores.items()]
    return table(["prompts", "images", *attributes], rows)


# --- benchmarks ---------------------------------------------------------------------------------------------


def encode_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    (_, r), = files
    (n0, n1), (m0, m1) = r["records"], r["peak_rss_mb"]
    rows = [["stage (read, decode, encode, write)", f"{r['stage_records_per_s']:.1f} records/s"],
            ["bare VAE + text encoder forward", f"{r['bare_records_per_s']:.1f} records/s"],
            ["stage / bare", f"{r['ratio']:.3f}"],
            [f"peak RSS, {n0:,} / {n1:,} records", f"{m0:.0f} MB / {m1:.0f} MB ({r['rss_growth']:+.1%})"]]
    if "checksum_share" in r:
        rows.append(["CRC32C checksums on writes", f"{r['checksum_share']:.2%} of the stage's time"])
    return table(["figure", "value"], rows)


def handoff_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    """Per seed and run: fair held-out score and seen accuracy alone and with the teacher at either end."""
    orders = (("alone", "alone"), ("student_first", "teacher below t = {at}"),
              ("teacher_first", "teacher above t = {at}"))
    ats = {data["at"] for _, data in files}
    if len(ats) != 1:
        raise ResultsError(f"handoff files at different timesteps {sorted(ats)}: one table takes one")
    at = ats.pop()
    rows = []
    for name, data in files:
        for run_name, run in [*data["runs"].items(), ("teacher", {"alone": data["teacher"]})]:
            rows.append([run_name, str(seed_of(name)),
                         *(f"{with_interval(run[o], 'heldout_acc')} / {num(run[o]['seen_acc'])}" if o in run else ""
                           for o, _ in orders)])
    return table(["run", "seed", *(f"{label.format(at=at)}: fair / seen" for _, label in orders)], rows)


def ray_encode_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    (_, r), = files
    rows = [["actor pool (`sdit encode --ray-address local`)", f"{r['pool_records_per_s']:.1f} records/s"],
            ["Ray Data pipeline", f"{r['ray_data_records_per_s']:.1f} records/s"],
            ["pool / Ray Data", f"{r['ratio']:.2f}"],
            ["bytes through the driver, Ray Data", f"{r['ray_data_driver_bytes_per_record']:,.0f} a record"],
            ["the same store", "yes" if r["same_records"] else "no"]]
    return table(["figure", "value"], rows)


def label_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    (_, r), = files
    c = r["config"]
    return table(["figure", "value"], [
        ["stage (draw, rebuild, UNet, write)", f"{r['stage_draws_per_s']:.1f} draws/s"],
        ["bare UNet forward", f"{r['bare_draws_per_s']:.1f} draws/s"],
        ["stage / bare", f"{r['ratio']:.3f}"],
        ["bytes per draw on disk", f"{r['bytes_per_draw']:,.0f}"],
        *reads_rows(r),
        ["UNet compute, achieved", f"{r['achieved_gflops']:.1f} GFLOP/s"],
        ["fp32 matmul ceiling", f"{r['matmul_gflops']:.1f} GFLOP/s"],
        [f"projected: {c['project_images']:,} images × {c['project_draws']} draws",
         f"{r['projected_hours']:.1f} hours"],
    ])


def train_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    (_, r), = files
    return table(["figure", "value"], [
        ["from the store (read, rebuild, step)", f"{r['store_steps_per_s']:.2f} steps/s"],
        ["from memory (the step alone)", f"{r['memory_steps_per_s']:.2f} steps/s"],
        ["store / memory", f"{r['loader_ratio']:.3f}"],
        ["CRC32C checksums on reads", f"{r['checksum_share']:.2%} of a store step"],
        ["online (+ the teacher UNet's forward)", f"{r['online_steps_per_s']:.2f} steps/s"],
        ["online / offline", f"{r['online_ratio']:.3f}"],
        *reads_rows(r),
        *([[f"draw stream start-up, {r['startup_shards']:,} shards", f"{r['stream_startup_s']:.2f} s "
            f"({r['stream_startup_unindexed_s']:.2f} s without the labels' index)"]]
          if "stream_startup_s" in r else []),
    ])


def supply_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    """The loader's supply per worker (bench train, SD 1.5-sized store) beside what a training step takes in."""
    (_, r), = files
    rows = [[f"loader, one worker, store {'on local disk' if where == 'local' else 'at ' + where}",
             f"{x['draws_per_s']:,.0f}", f"{x['records_per_s']:,.0f}", f"{x['mb_per_s']:,.0f}"]
            for where, x in r["supply"].items()]
    need, draws = r["need"], next(iter(r["supply"].values()))["draws"]
    rows.append([f"need: one SDiT-B/2 step at 512 px on an {need['gpu']} at {need['utilisation']:.0%} of bf16 peak",
                 f"{need['draws_per_s']:,.0f}", f"{need['draws_per_s'] / draws:,.0f}", num(need["mb_per_s"], ",.0f")])
    return table(["", "draws/s", "records/s", "MB/s"], rows)


def reads_rows(r: dict) -> list[list[str]]:
    """Bytes read per draw, and what caption swaps and mixes read of them (bench label and bench train)."""
    if "read_bytes_per_draw" not in r:
        return []
    own = r.get("label_bytes_per_draw", r.get("bytes_per_draw"))
    return [["bytes read per draw", f"{r['read_bytes_per_draw']:,.0f}"],
            ["of them, captions of swaps and mixes", f"{r['caption_bytes_per_draw']:,.0f} "
             f"({r['caption_reads_per_draw']:.2f} embeddings a draw; {r['caption_bytes_per_draw'] / own:.2f}× "
             "a draw's own labels)"]]


def flops_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    """FLOPs per forward, training step and online step at 64x64 latents."""
    (_, r), = files
    rows = []
    for name, forward in r["flops"].items():
        train, online = r["train_step_flops"].get(name), r["online_step_flops"].get(name)
        rows.append([name, f"{forward / 1e9:,.1f} G", num(train and train / 1e9, ",.1f", " G"),
                     "-" if online is None else f"{online / 1e9:,.1f} G ({online / train:.1f}×)"])
    return table(["model", "forward", "train step", "online step (+ SD 1.5 UNet)"], rows)


def sample_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    """Images/s of the student's and the teacher's pipelines; FLOPs per sampling step at 512 px."""
    (_, r), = files
    c, (h, w) = r["config"], r["resolution"]
    speed = table(["model", "images/s"], [
        [f"student ({c['run'] or c['student']})", f"{r['student_images_per_s']:.1f}"],
        [f"teacher ({c['teacher'] or 'tiny SD'})", f"{r['teacher_images_per_s']:.1f}"],
        ["student / teacher", f"{r['speedup']:.2f}×"],
    ])
    unet = r["flops_per_step"]["sd15_unet"]
    flops = table([f"model, {r['flops_latent']}×{r['flops_latent']} latents", "guided step (2 forwards)",
                   "distilled step (1 forward)", "guided, vs SD 1.5"],
                  [[name, f"{value / 1e9:,.0f} G", num((r["flops_per_step_distilled"].get(name) or 0) / 1e9 or None,
                                                      ",.0f", " G"), f"{value / unet:.2f}×"]
                   for name, value in r["flops_per_step"].items()])
    return "\n".join([f"{r['images']} images at {h}×{w} px, {r['steps']} {c['scheduler']} steps, guidance "
                      f"{c['guidance']:g}, best of {c['repeats']}:", "", speed, "", flops])


def sd15_stages_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    """Each stage's wall time, peak RSS and FLOPs; GFLOP/s over its compute seconds only."""
    (_, r), = files
    rows = [[s["stage"], f"{s['seconds']:.0f}", f"{s['peak_rss_mb'] / 1024:.1f} GB", f"{s['gflop']:,.0f}",
             num(s["outputs"].get("compute_seconds") if s["gflops"] else None, ".0f"), num(s["gflops"], ".1f"),
             num(s["of_matmul"], ".2f")] for s in r["stages"]]
    return "\n".join([table(["stage", "seconds", "peak RSS", "GFLOP", "compute s", "GFLOP/s", "of matmul"], rows), "",
                      f"fp32 matmul ceiling: {r['matmul_gflops']:.0f} GFLOP/s."])


def sd15_speed_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    """Whole sampling runs of the teacher and each student: the fastest of N alternating rounds."""
    (_, r), = files
    sp, flops = r["speed"], r["flops"]
    rows = []
    per_step = {name: m["forwards_per_step"] * flops["unet" if name == "sd15_unet" else name]
                for name, m in sp["models"].items()}
    for name, m in sp["models"].items():
        says = per_step["sd15_unet"] / per_step[name]
        rows.append([name, str(m["forwards_per_step"]), f"{m['seconds']:.2f}", f"{m['median_seconds']:.2f}",
                     f"{m['step_seconds']:.3f}", num(m["attention_share"], ".0%"), f"{m['images_per_s']:.4f}",
                     f"{m['speedup']:.2f}x", f"{m['loop_speedup']:.2f}x", f"{says:.2f}x"])
    header = ["model", "forwards / step", "s / run", "median s / run", "s / step", "attention", "images/s",
              "vs SD 1.5", "loop vs SD 1.5", "FLOPs say"]
    teacher = sp["models"]["sd15_unet"]
    return "\n".join([f"{sp['images']} image(s) at {sp['resolution']}×{sp['resolution']} px, {sp['steps']} "
                      f"{sp['scheduler']} steps, guidance {sp['guidance']:g}, {sp['dtype']} on {sp['device']}; "
                      f"fastest of {sp['repeats']} alternating rounds after a {sp['warmup_steps']}-step warm-up:",
                      "", table(header, rows), "",
                      f"In the teacher's fastest run the text encoder took {teacher['text_seconds']:.2f} s and the VAE "
                      f"decode {teacher['decode_seconds']:.2f} s; every pipeline runs the same text encoder and VAE."])


def sd15_throughput_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    """Labels/s and training steps/s at real batch sizes, TFLOP/s against a measured matmul and the data sheet."""
    (_, r), = files
    t = r["throughput"]
    sheet, matmul = t["peak_tflops_sheet"], t["peak_tflops_matmul"]
    rows = [[row["model"], str(row["resolution"]), str(row["batch"]), num(row["per_s"], ".2f"),
             num(row["peak_gb"], ".1f"), num(row["tflops"], ".1f"),
             num(row["tflops"] and row["tflops"] / matmul, ".0%"),
             num(row["tflops"] / sheet if row["tflops"] and sheet else None, ".0%")] for row in t["rows"]]
    return "\n".join([table(["model", "px", "batch", "labels or steps / s", "peak GB", "TFLOP/s", "of matmul",
                             "of peak"], rows), "",
                      f"{t['device']}: bf16 matmul {matmul:.0f} TFLOP/s measured; data sheet's dense bf16 peak "
                      f"{'-' if sheet is None else f'{sheet:g}'} TFLOP/s."])


def sd15_precision_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    (_, r), = files
    rows = [[name, f"{p['relative_error']:.1e}", f"{p['tolerance']:.0e}", f"{p['fp32_seconds']:.1f}",
             f"{p['low_seconds']:.1f}", "yes" if p["finite"] else "no"] for name, p in r["precision"]["paths"].items()]
    return table(["path", "relative error", "tolerance", "fp32 s", "low-precision s", "finite"], rows)


def memory_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    """Peak memory of a training step above the weights and EMA copy, per preset, mode and batch."""
    (_, r), = files
    batches = sorted({row["batch"] for row in r["rows"]})
    rows = []
    for name, fit in r["per_sample"].items():
        preset, checkpointing = name.split()[0], name.endswith(" ckpt")
        steps = {row["batch"]: row for row in r["rows"]
                 if row["preset"] == preset and row["checkpointing"] == checkpointing}
        cells = [f"{steps[b]['step_gb']:.2f} GB{'' if steps[b]['measured'] else '*'}" if b in steps else "-"
                 for b in batches]
        scaled = f" (scaled from {fit['scaled_from']})" if "scaled_from" in fit else ""
        rows.append([preset, f"{r['parameters'][preset] / 1e6:,.0f}M",
                     f"{8 * r['parameters'][preset] / 2**30:.2f} GB", "yes" if checkpointing else "no", *cells,
                     f"{fit['per_sample_gb']:.2f} GB{scaled}"])
    header = ["student", "parameters", "weights + EMA", "checkpointing", *(f"batch {b}" for b in batches),
              "activations per sample"]
    extrapolated = any(not row["measured"] for row in r["rows"])
    note = ["", "\\* extrapolated linearly in the batch from the measured ones."] if extrapolated else []
    return "\n".join([table(header, rows), *note])


def gpu_batches_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    """The largest per-GPU batch of each preset for each GPU size."""
    (_, r), = files
    sizes = list(next(iter(r["gpu_batches"].values())))
    rows = []
    for name, batches in r["gpu_batches"].items():
        preset, fit = name.split()[0], r["per_sample"][name]
        rows.append([preset + (" + checkpointing" if name.endswith(" ckpt") else ""),
                     f"{r['bytes_per_param'] * r['parameters'][preset] / 2**30:.1f} GB",
                     f"{fit['per_sample_gb']:.2f} GB", *(str(batches[g]) for g in sizes)])
    return table(["student", f"{r['bytes_per_param']} B/param", "activations per sample",
                  *(f"{g} GB GPU" for g in sizes)], rows)


def startup_view(files: list[tuple[str, dict]], options: dict[str, str]) -> str:
    """Seconds from each call to its answer in a fresh interpreter, beside Python's own start."""
    (_, r), = files
    rows = [["python -c pass", f"{r['python_s']['median']:.2f} s", f"{r['python_s']['min']:.2f} s"]]
    rows += [[name, f"{t['median']:.2f} s", f"{t['min']:.2f} s"] for name, t in r["calls_s"].items()]
    heavy = ", ".join(r["heavy_imports"]) or "none of torch, diffusers and transformers"
    return "\n".join([table(["call", f"median of {r['repeats']}", "fastest"], rows), "",
                      f"`import cli` loads {heavy}."])


VIEWS = {
    "distill": distill_view, "curves": curves_view, "concepts": concepts_view, "substitution": substitution_view,
    "evaluator": evaluator_view, "toy-eval": toy_eval_view,
    "handoff": handoff_view, "encode": encode_view, "ray-encode": ray_encode_view, "label": label_view,
    "train": train_view,
    "supply": supply_view, "flops": flops_view,
    "sample": sample_view,
    "sd15-stages": sd15_stages_view, "sd15-speed": sd15_speed_view, "sd15-precision": sd15_precision_view,
    "sd15-throughput": sd15_throughput_view,
    "memory": memory_view, "gpu-batches": gpu_batches_view, "startup": startup_view,
}


def main(argv: list[str]) -> int:
    check = "--check" in argv
    changed = []
    for page in pages():
        text = page.read_text()
        rendered = render_page(text)
        if rendered != text:
            changed.append(page.relative_to(ROOT))
            if not check:
                page.write_text(rendered)
    for page in changed:
        print(f"{page}: {'differs from' if check else 'rendered again from'} docs/results/", file=sys.stderr)
    return 1 if check and changed else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ResultsError as err:
        sys.exit(f"error: {err}")
