"""`sdit bench substitution`: how many real records the teacher is worth.

The shapes-world experiment of `sdit bench distill` (same student, steps, seed and scoring) at several sizes
of the limited split: the no-teacher run and the teacher runs at each size. Its headline is the data
multiplier at N records: the records the no-teacher run needs to reach what kd_perturb reaches with N (its
seen accuracy), divided by N, interpolated in log records between the measured sizes; None when the
no-teacher run never gets there within the largest size. The same on the fair held-out score is the held-out
multiplier: what records of the seen concepts are worth against a teacher that knows the others.

Each size is a `bench distill` run of its own under OUT/n<records> (its store, runs, grid and report), without
learning curves; a size whose report was written with the same options and a teacher of the same weights is
read back, not run again.
substitution.json, substitution.md and substitution.png (records on a log axis, the fair held-out score and the
seen accuracy, a line per run, the teacher dashed) go in OUT.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path

from pipeline.experiments.config import DistillConfig, Say, SubstitutionConfig
from pipeline.experiments.distill import distill
from pipeline.experiments.plots import plot_scores
from sdit.files import check_folder, replace_text
from sdit.progress import Progress, no_progress
from sdit.teacher import load_teacher


def substitution(config: SubstitutionConfig, say: Say = lambda _: None,
                 on_step: Callable[[dict], None] | None = None, progress: Progress = no_progress,
                 on_total: Callable[[int], None] = lambda _: None) -> dict:
    """Every size's experiment, then the figures per size and run, the multiplier and the plot (`say`, `on_step`,
    `progress` and `on_total` as `distill`'s)."""
    config.check()
    out = check_folder(config.distill.out)
    hashes = load_teacher(config.distill.teacher).identity.hashes
    per_size = {}
    for records in config.sizes:
        sized = dataclasses.replace(config.distill, out=str(out / f"n{records}"), records=records, curve_points=0,
                                    teacher_samples=config.distill.teacher_samples or str(out / "teacher-samples.npz"))
        report = finished(sized, hashes) or distill(sized, lambda stage, n=records: say(f"{n} records: {stage}"),
                                                    on_step, progress, on_total)
        per_size[records] = {name: _figures(run) for name, run in report["runs"].items()}
        per_size[records]["teacher"] = _figures(report["teacher"])
    curves = {name: [(n, per_size[n][name]) for n in config.sizes] for name in config.distill.names}
    reference = per_size[config.multiplier_at][config.reference]
    needed = {key: records_to_reach([(n, f[key]) for n, f in curves["no_teacher"]], reference[key])
              for key in ("seen_acc", "heldout_acc")}
    result = {
        "sizes": {str(n): figures for n, figures in per_size.items()},
        "multiplier": needed["seen_acc"] / config.multiplier_at if needed["seen_acc"] else None,
        "heldout_multiplier": needed["heldout_acc"] / config.multiplier_at if needed["heldout_acc"] else None,
        "multiplier_at": config.multiplier_at, "reference": config.reference,
        "reference_seen_acc": reference["seen_acc"], "reference_heldout_acc": reference["heldout_acc"],
        "no_teacher_records_needed": needed["seen_acc"], "no_teacher_records_needed_heldout": needed["heldout_acc"],
        "largest": config.sizes[-1], "config": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
    }
    plot_scores(out / "substitution.png", curves, per_size[config.sizes[-1]]["teacher"],
                "records in the limited split", log_x=True)
    replace_text(out / "substitution.json", json.dumps(result, indent=2) + "\n")
    replace_text(out / "substitution.md", format_substitution(result) + "\n")
    return result


# Options that name where the files are, not what is measured: a folder moved, or the same teacher at another
# path (compared by its weights instead), reads back as the same measurement; so does another count of runs side
# by side.
WHERE = ("out", "teacher", "teacher_samples", "jobs")


def finished(config: DistillConfig, teacher_hashes: dict[str, str]) -> dict | None:
    """The report of a size already measured with these options and a teacher of these weights (a rerun after
    a crash, or to redraw the curve), else None."""
    path = Path(config.out) / "report.json"
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    options = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    same = ({k: v for k, v in report["config"].items() if k not in WHERE}
            == {k: v for k, v in options.items() if k not in WHERE})
    return report if same and report.get("teacher_hashes") == teacher_hashes else None


def _figures(run: dict) -> dict:
    return {"heldout_acc": run["heldout_acc"], "seen_acc": run["seen_acc"], "heldout_hit": run["heldout_hit"]}


def records_to_reach(points: list[tuple[int, float]], target: float) -> float | None:
    """The record count at which (records, accuracy) points first reach `target`, interpolated linearly in log
    records between the two sizes around the crossing; None when no size reaches it."""
    for (n0, a0), (n1, a1) in zip(points, points[1:]):
        if a0 >= target:
            return float(n0)
        if a1 >= target:
            share = (target - a0) / (a1 - a0)
            return math.exp(math.log(n0) + share * (math.log(n1) - math.log(n0)))
    return None


def format_substitution(result: dict) -> str:
    sizes = list(result["sizes"])
    runs = list(result["sizes"][sizes[0]])
    lines = ["| run | " + " | ".join(f"{n} records" for n in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for name in runs:
        cells = [result["sizes"][n][name] for n in sizes]
        lines.append(f"| {name} | " + " | ".join(f"{c['heldout_acc']:.3f} / {c['seen_acc']:.3f}" for c in cells)
                     + " |")
    n = result["multiplier_at"]

    def verdict(multiplier: float | None, needed: float | None) -> str:
        if multiplier is None:
            return f"more than {result['largest'] / n:g}x (not reached within {result['largest']:,} records)"
        return f"{multiplier:.2f}x ({needed:,.0f} records)"

    lines += ["", "Each cell: fair held-out score / seen shape+colour accuracy.", "",
              f"Data multiplier at {n:,} records: no_teacher needs "
              f"{verdict(result['multiplier'], result['no_teacher_records_needed'])} to reach {result['reference']}'s "
              f"seen accuracy {result['reference_seen_acc']:.3f}; on held-out concepts it needs "
              f"{verdict(result['heldout_multiplier'], result['no_teacher_records_needed_heldout'])} to reach its "
              f"fair score {result['reference_heldout_acc']:.3f}."]
    return "\n".join(lines)
