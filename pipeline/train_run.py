"""The run folder of `sdit train`: made or checked before training, its options recorded and read back on resume,
and its checkpoints.

    RUN/sdit_run.json          "train": the options (paths absolute), the store, labels and split, step, status
    RUN/checkpoints/step-N     weights, EMA, optimiser, step, data position, RNG states (sdit.training), written
                               whole; the newest `--keep-checkpoints` are kept

`--resume` reads the run's options back; only RESUMABLE ones may change, and it continues from the last
checkpoint.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import TrainConfig
from pipeline.train_monitor import LOSS_PLOT, METRICS, SAMPLES, TENSORBOARD
from sdit.dit import SDiT
from sdit.errors import SDiTError
from sdit.files import recover_folder
from sdit.loader import Position
from sdit.run import location, read_run, same_location, student_folder, update_run
from sdit.training import load_checkpoint, save_checkpoint

CHECKPOINTS = "checkpoints"

# Options a resumed run may change; any other change would make it another run. `out` is where the run folder
# is now, wherever it was trained, and `resume` says that it resumes: neither is compared.
RESUMABLE = ("steps", "checkpoint_every", "keep_checkpoints", "sample_every", "sample_prompts", "sample_steps",
             "sample_guidance", "sample_scheduler", "eval_every", "eval_draws", "eval_clip", "log", "device",
             "threads", "precision", "gradient_checkpointing", "grad_accum")
PATHS = ("store", "init", "out")  # recorded and compared as where they lead, not as written
FLAGS = {"precision": "--dtype", "threads": None}  # the CLI's names where they differ from the field's; None: none


@dataclass
class TrainState:
    """What a checkpoint holds besides the RNG states."""

    model: torch.nn.Module  # SDiT, or DDP around it
    ema: SDiT
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    position: Position = dataclasses.field(default_factory=Position)  # this worker's
    reset: list[str] = dataclasses.field(default_factory=list)  # what a resume could not restore, in words
    # from a checkpoint: every worker's position and the stream's window (sdit.loader.DrawStream.resumed)
    saved_positions: list[Position] = dataclasses.field(default_factory=list)
    saved_window_blocks: int | None = None


def plain(model: torch.nn.Module) -> SDiT:
    """The student inside DDP (or the student itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# --- the folder and its options ------------------------------------------------------------------------------


def prepare_run(config: TrainConfig, make_run: Callable[[], object] | None) -> None:
    """Rank 0: make (or check, when resuming) the run folder."""
    out = Path(config.out)
    if config.resume:
        train = read_run(out).get("train") or {}
        check_resumable(out, recorded_config(out), dataclasses.asdict(config))
        tidy_checkpoints(out)
        update_run(out, train=train | {"config": recorded(config)})  # a later --resume reads these options back
        return
    if out.exists() and any(out.iterdir()):
        raise SDiTError(f"{out} exists; pass --resume to continue its training, or choose a new --out")
    if config.init:
        student_folder(config.init)
        shutil.copytree(config.init, out, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(CHECKPOINTS, METRICS, SAMPLES, TENSORBOARD, LOSS_PLOT))
    elif make_run is not None:
        make_run()
    else:
        raise SDiTError("give --init RUN_FOLDER (from `sdit init`) or --student PRESET")
    update_run(out, train={"config": recorded(config), "store": location(config.store),
                           "labels": config.labels, "holdout": config.holdout, "split_seed": config.seed, "step": 0,
                           "status": "started"})


def resume_config(out: str | Path, given: dict) -> TrainConfig:
    """The config that resumes the run in `out`: the options its folder records (an option newer than the run at
    its default) with `given`, the options the user gave, on top. Only RESUMABLE options may differ from the
    record; another is refused in one line naming it. `given` may hold `student`, the preset a new run would
    start from, which must be the run's."""
    given = dict(given)
    if "student" in given:
        check_resumable(out, {"student": read_run(out).get("student", {}).get("preset")},
                        {"student": given.pop("student")})
    config = recorded_config(out)
    check_resumable(out, dataclasses.asdict(config), given)
    return dataclasses.replace(config, **given | {"out": str(out), "resume": True})


def recorded_config(out: str | Path) -> TrainConfig:
    """The options the run in `out` was trained with, as its sdit_run.json records them."""
    record = (read_run(out).get("train") or {}).get("config")
    if record is None:
        raise SDiTError(f"{out} has no training to resume; drop --resume")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in record.items() if k in names})


def recorded(config: TrainConfig) -> dict:
    """`config` as the run records it: its paths absolute, so the record means the same from any folder."""
    return dataclasses.asdict(config) | {k: location(getattr(config, k)) for k in PATHS if getattr(config, k)}


def check_resumable(out: str | Path, record: TrainConfig | dict, given: dict) -> None:
    """Refuse, in one line naming them, the options in `given` that differ from the run's `record` and may not
    change on resume."""
    record = dataclasses.asdict(record) if isinstance(record, TrainConfig) else record
    changed = [k for k, v in given.items() if k not in (*RESUMABLE, "out", "resume") and not same_option(
        k, v, record.get(k))]
    if changed:
        raise SDiTError(f"{' '.join(option(k, given[k]) for k in changed)}: {out} was trained with "
                        f"{' '.join(option(k, record.get(k)) for k in changed)}; only "
                        f"{', '.join(option(k) for k in RESUMABLE if FLAGS.get(k, k))} may change on resume (train "
                        "into a new --out to change the others)")


def same_option(name: str, a, b) -> bool:
    if name in PATHS and a is not None and b is not None:
        return same_location(a, b)
    return a == b


def option(name: str, value=...) -> str:
    """A field as its command-line option: `--batch-size 16`, `--init none`; a switch as `--flag` or `no --flag`."""
    flag = FLAGS.get(name) or f"--{name.replace('_', '-')}"
    if value is ...:
        return flag
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {'none' if value is None else value}"


# --- checkpoints -------------------------------------------------------------------------------------------------


def checkpoint_dirs(out: Path) -> list[Path]:
    folder = out / CHECKPOINTS
    if not folder.exists():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit())


def save_state(out: Path, state: TrainState, keep: int, positions: list[Position], window_blocks: int) -> Path:
    """A checkpoint folder `checkpoints/step-N` (sdit.training) with every worker's data position; then the oldest
    beyond `keep` go."""
    meta = {"step": state.step, "positions": [dataclasses.asdict(p) for p in positions],
            "window_blocks": window_blocks}
    final = save_checkpoint(out / CHECKPOINTS / f"step-{state.step:08d}", {"model": plain(state.model),
                                                                          "ema": state.ema},
                            state.optimizer, meta, state.scheduler)
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old)
    return final


def tidy_checkpoints(out: Path) -> None:
    """After a kill: a checkpoint whose replacement stopped between its renames is put back, and the folders of
    writes that did not finish are deleted."""
    folder = out / CHECKPOINTS
    for aside in folder.glob(".step-*.old"):
        recover_folder(folder / aside.name[1:-len(".old")])
    for tmp in folder.glob(".step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_state(folder: Path, state: TrainState) -> None:
    meta = load_checkpoint(folder, {"model": plain(state.model), "ema": state.ema}, state.optimizer,
                           state.scheduler)
    state.step, state.reset = meta["step"], meta["reset"]
    # checkpoints written before workers had positions of their own: one position, one worker's window
    state.saved_positions = [Position(**p) for p in meta.get("positions", [meta.get("position")])]
    state.saved_window_blocks = meta.get("window_blocks")


def resume(out: Path, state: TrainState) -> None:
    """Load the last checkpoint into `state`; none (killed before the first): the initial weights stay."""
    checkpoints = checkpoint_dirs(out)
    if checkpoints:
        load_state(checkpoints[-1], state)
