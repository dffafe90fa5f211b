"""The experiment's report in markdown: a row per run and the teacher, then each held-out concept."""

from __future__ import annotations


def with_interval(result: dict, key: str) -> str:
    """A figure with its 95% interval where the result has one: 0.290 [0.212, 0.371]."""
    low, high = result.get("intervals", {}).get(key, (None, None))
    return f"{result[key]:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None else "")


def gain(result: dict, key: str = "heldout_acc") -> str:
    """A student's paired gain over the no-teacher run with its 95% interval: +0.052 [-0.031, 0.130]."""
    if "gain" not in result:
        return "-"
    g = result["gain"][key]
    return f"{g['value']:+.3f} [{g['interval'][0]:+.3f}, {g['interval'][1]:+.3f}]"


def format_report(report: dict) -> str:
    """report.md: the figures of every run and the teacher, each held-out concept, and the settings."""
    lines = ["| run | held-out concepts (fair) | gain over no_teacher (fair) | seen shape+colour | speed-up | "
             "teacher forwards | held-out hits (raw) | held-out shape+colour | attributes: held-out / seen | "
             "teacher MSE (held-out draws) | sampling: forwards, ms / image |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = {**report["runs"], "teacher": report["teacher"]}
    for name, r in rows.items():
        mse = f"{r['teacher_mse']:.4f}" if "teacher_mse" in r else "-"
        forwards = f"{r['teacher_forwards']:,}" if "teacher_forwards" in r else "-"
        speedup = f"{r['speedup']:.1f}x" if r.get("speedup") else "-"
        lines.append(f"| {name} | {with_interval(r, 'heldout_acc')} | {gain(r)} | {with_interval(r, 'seen_acc')} | "
                     f"{speedup} | {forwards} | "
                     f"{r['heldout_hit']:.3f} | {r['heldout_pair_acc']:.3f} | {r['heldout_attr_acc']:.3f} / "
                     f"{r['seen_attr_acc']:.3f} | {mse} | {r['sample_forwards']}, "
                     f"{1000 * r['sample_s_per_image']:.0f} |")
    concepts = list(report["teacher"]["heldout_concepts"])
    lines += ["", "In brackets: 95% intervals from 2,000 bootstrap draws of each prompt's samples (the prompts are "
              "every pair with every background and size): how far the sampling noise of the evaluation moves a "
              "figure, not how far another training run would; a gain is paired (both runs sampled from the same "
              "prompts and noise).", "",
              "Held-out concepts, each: hit / false positive / fair ± its standard error (a sample shows a concept "
              "only when it is a recognisable object).", "", "| run | " + " | ".join(concepts) + " |",
              "|---" * (len(concepts) + 1) + "|"]
    for name, r in rows.items():
        cells = [r["heldout_concepts"][k] for k in concepts]
        lines.append(f"| {name} | " + " | ".join(f"{c['hit']:.2f} / {c['false_positive']:.2f} / {c['fair']:.2f}"
                                                 + (f" ± {c['fair_se']:.2f}" if c.get("fair_se") is not None else "")
                                                 for c in cells) + " |")
    c = report["config"]
    lines.append("")
    for name, options in c["variants"].items():
        changes = ", ".join(f"{k}={v}" for k, v in options.items() if k != "from")
        lines.append(f"{name}: {options['from']} with {changes}.")
    positions = f" cross-attending to {c['text_positions']} text positions" if c.get("text_positions") else ""
    lines.append(f"{c['student']}{positions}, {c['steps']} steps at batch {c['batch_size']}, {c['records']} records x "
                 f"{c['draws']} draws, {c['per_prompt']} samples per prompt (DDIM {c['sample_steps']}, guidance "
                 f"{c['guidance']}), high-noise weight {c['high_noise_weight']}; {report['seconds']:.0f} s in all"
                 + timing(report) + ".")
    return "\n".join(lines)


STAGE_NAMES = {"store": "split, encode and labels", "train": "training", "score": "sampling and scoring",
               "curves": "curves"}


def timing(report: dict) -> str:
    """Where the seconds went, and how fast each run trained: ` (split, encode and labels 113 s, ...; training at
    2.9 steps/s a run)`; empty for a report that kept no stages."""
    stages = report.get("stages")
    if not stages:
        return ""
    parts = ", ".join(f"{STAGE_NAMES.get(name, name)} {seconds:.0f} s" for name, seconds in stages.items())
    rates = [r["train_steps_per_s"] for r in report["runs"].values() if r.get("train_steps_per_s")]
    if not rates:
        return f" ({parts})"
    low, high = f"{min(rates):.1f}", f"{max(rates):.1f}"
    return f" ({parts}; training at {low if low == high else f'{low} to {high}'} steps/s a run)"
