"""`sdit eval RUN [STORE]`: how close the student is to its teacher, and how good its images are, in the field's units.

Teacher agreement (with STORE): the student's ε on the held-out split of the store's labelled draws (the
records that `sdit train --holdout F` kept out, chosen per record from the split seed), against the stored
teacher ε_T: MSE over the latent's elements, per draw, averaged overall, per timestep bucket and per
perturbation kind. The inputs are rebuilt exactly as the teacher saw them (sdit.agreement): no teacher is loaded.

The sampling protocol (with --prompts or --references; pipeline/eval_samples.py): the student, and with
--teacher the teacher beside it from the same prompts, seeds, noise, scheduler, steps and guidance, sampled
resumably into a folder; then per model the FID (sdit.fid: the standard Inception-v3 from a local file,
against --fid-stats or the statistics of --references, both sides under one named protocol, sdit.fid_protocols)
and the CLIP score (a local CLIP model, sdit.clip: BK-SDM's mean cosine or torchmetrics' 100 × the clamped mean,
of the images the protocol shows). Every setting that moves those figures is recorded with them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.config import EvalConfig
from sdit.agreement import agreement, check_fit
from sdit.clip import load_clip
from sdit.devices import resolve_device, resolve_dtype
from sdit.errors import SDiTError
from sdit.files import check_folder
from sdit.loader import LabelledStore, Split
from sdit.progress import Progress, no_progress
from sdit.run import read_run, same_location


@dataclass(frozen=True)
class HeldOut:
    """Which draws to evaluate on, and where that came from."""

    labels: str
    split: Split
    source: str  # "run" (sdit_run.json) or "options"


def held_out(config: EvalConfig, run: dict) -> HeldOut:
    """The run's held-out split (or the one the options name); a one-line error where there is none."""
    train = run.get("train") or {}
    holdout = config.holdout if config.holdout is not None else train.get("holdout")
    if holdout is None:
        raise SDiTError(f"{config.run} was not trained with --holdout (sdit_run.json has no training record): "
                        "retrain with --holdout F, or pass --holdout F --split-seed S to name held-out records")
    if holdout <= 0:
        raise SDiTError(f"{config.run} was trained on every record (--holdout 0): no draw is held out; retrain "
                        "with --holdout F, or pass --holdout F to evaluate on records it may have seen")
    if config.holdout is None and train.get("store") and not same_location(train["store"], config.store):
        raise SDiTError(f"{config.run} was trained on {train['store']}, not {config.store}: its held-out split "
                        "is only defined there (pass --holdout and --split-seed to evaluate on this store anyway)")
    seed = config.split_seed if config.split_seed is not None else int(train.get("split_seed", 0))
    labels = config.labels or train.get("labels") or "default"
    return HeldOut(labels, Split(float(holdout), seed), "options" if config.holdout is not None else "run")


# --- teacher agreement -----------------------------------------------------------------------------------
def teacher_agreement(config: EvalConfig, split: HeldOut, run: dict, device: torch.device, dtype: torch.dtype,
                      progress: Progress = no_progress, on_total: Callable[[int], None] | None = None) -> dict:
    """The run's student against the teacher on the held-out draws (sdit.agreement)."""
    from sdit.run import load_student

    data = LabelledStore(config.store, split.labels)
    student = load_student(config.run).to(device, dtype).eval()
    check_fit(data, student, run)
    return agreement(student, data, split.split, device, batch_size=config.batch_size, limit=config.limit,
                     buckets=config.buckets, dtype=dtype, progress=progress, on_total=on_total)


# --- the stage ---------------------------------------------------------------------------------------------
def evaluate(config: EvalConfig, progress: Progress = no_progress,
             on_stage: Callable[[str, int], None] | None = None) -> dict:
    """Teacher agreement on the held-out draws (with a store), then the sampling protocol (with prompts or
    references). `on_stage(name, total)` starts each stage, `progress(n)` counts its items."""
    config.check()
    if config.out:
        check_folder(config.out)
    if not Path(config.run).exists():
        raise SDiTError(f"run folder not found: {config.run}")
    run = read_run(config.run)
    split = held_out(config, run) if config.store else None
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    clip = load_clip(config.clip_model, device) if config.clip_model else None  # a missing file fails first
    extractor = _extractor(config, device)
    result: dict = {"run": str(config.run)}
    if split:
        result |= {"store": str(config.store), "labels": split.labels,
                   "split": {"holdout": split.split.holdout, "seed": split.split.seed, "from": split.source},
                   "teacher_agreement": teacher_agreement(config, split, run, device, dtype, progress,
                                                          (lambda n: on_stage("agreement", n)) if on_stage else None)}
    if config.sampling:
        from pipeline.eval_samples import run_protocol

        result |= run_protocol(config, clip, extractor, device, dtype, progress, on_stage)
    result["config"] = asdict(config)
    return result


def _extractor(config: EvalConfig, device: torch.device):
    if not config.fid_inception:
        return None
    from sdit.fid import load_extractor

    return load_extractor(config.fid_inception, device)


def format_eval(result: dict) -> str:
    """The figures as a terminal table: agreement, then the samples' settings and FID / CLIP per model."""
    lines = format_agreement(result) if "teacher_agreement" in result else []
    if "samples" in result:
        lines += format_samples(result)
    return "\n".join(lines)


def format_agreement(result: dict) -> list[str]:
    a, s = result["teacher_agreement"], result["split"]
    lines = [f"teacher agreement: MSE(student ε, teacher ε) on {a['draws']:,} held-out draws "
             f"(holdout {s['holdout']:g}, split seed {s['seed']}, labels {result['labels']!r})",
             f"  {'overall':<16}{a['draws']:>10,}  {_num(a['mse'])}",
             f"  {'timesteps':<16}{'draws':>10}  {'MSE':>10}"]
    for b in a["by_timestep"]:
        span = f"{b['from']}-{b['to']}"
        lines.append(f"  {span:<16}{b['draws']:>10,}  {_num(b['mse'])}")
    lines.append(f"  {'perturbation':<16}{'draws':>10}  {'MSE':>10}")
    lines += [f"  {kind:<16}{v['draws']:>10,}  {_num(v['mse'])}" for kind, v in a["by_kind"].items()]
    t = a["true_noise"]
    if t["draws"]:
        lines.append(f"MSE to the true noise on {t['draws']:,} draws where it is a target: student "
                     f"{_num(t['student_mse']).strip()}, teacher {_num(t['teacher_mse']).strip()}")
    return lines


def format_samples(result: dict) -> list[str]:
    s = result["samples"]
    models = s["models"]
    lines = [f"samples: {s['num']:,} per model ({s['sampled_now']:,} sampled now) at {s['height']}x{s['width']}, "
             f"{s['scheduler']} {s['steps']} steps, guidance {s['guidance']:g}, seeds {s['seeds'][0]}.."
             f"{s['seeds'][1]}, batch {s['batch_size']}, {s['dtype']}; {s['distinct_prompts']:,} prompts from "
             f"{s['prompts']}; in {s['out']}",
             f"  {'':<24}" + "".join(f"{m:>12}" for m in models)]
    if "fid" in result:
        f = result["fid"]
        ref = f["reference"]
        against = (f"{ref['stats']} (protocol {ref['protocol']}, said by the {ref['protocol_from']})" if "stats" in ref
                   else f"{ref['source']} ({ref['images']:,} images{', cached' if ref['cached'] else ''})")
        lines.append(f"  {'FID':<24}" + "".join(f"{f[m]:>12.3f}" for m in models))
        lines.append(f"    against {against}; protocol {f['protocol']} at {f['size']} px, both sides; extractor "
                     f"{Path(f['extractor']['path']).name} ({f['extractor']['sha256'][:12]})")
        if "student_vs_teacher" in f:
            lines.append(f"    FID between the student's and the teacher's samples: {f['student_vs_teacher']:.3f}")
    if "clip_score" in result:
        c = result["clip_score"]
        digits = 4 if c["convention"] == "bk-sdm" else 2
        lines.append(f"  {'CLIP score':<24}" + "".join(f"{c[m]:>12.{digits}f}" for m in models))
        lines.append(f"    {c['convention']} convention, images {c['images']}"
                     + (f" ({c['size']} px)" if c["size"] else "") + f"; model {Path(c['model']).name}")
        if "references" in c:
            lines.append(f"    reference images against their captions: {c['references']:.{digits}f}")
    return lines


def _num(value: float | None) -> str:
    return f"{value:>10.5f}" if value is not None else f"{'-':>10}"
