"""What every trainer here shares: the EMA of the weights, the learning-rate schedule, and atomic checkpoints.

The student trainer (pipeline/train.py) and the toy teacher's trainer (sdit/shapes/toy.py) both use them.

A checkpoint is a folder written whole (sdit.files.writing_folder), so a kill leaves the old one or the new one,
never half of one:

    NAME.safetensors   the weights of each module, by name (e.g. model, ema)
    optimizer.pt       optimiser and LR-schedule states and the torch RNG state (torch.load(weights_only=True))
    state.json         what the trainer needs besides (step, data position, ...)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from sdit.errors import SDiTError, brief
from sdit.files import writing_folder
from sdit.pickles import load_pickle

OPTIMIZER = "optimizer.pt"
STATE = "state.json"


def ema_decay(step: int, decay: float) -> float:
    """The EMA's decay after `step` updates: ramped as (1 + n) / (10 + n) early on, so the average is not
    dominated by the random initial weights, and at most `decay`."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model, parameter by parameter (buffers are not averaged)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def warmup_factor(step: int, warmup: int) -> float:
    """The learning rate's share at `step` (0-based) of a linear warm-up over `warmup` steps."""
    return min(1.0, (step + 1) / max(warmup, 1))


def lr_factor(step: int, warmup: int, steps: int, schedule: str = "constant") -> float:
    """The learning rate's share at `step` (0-based): the linear warm-up, then `constant`, or a decay to 0 at
    `steps` that is `linear` or half a `cosine`."""
    if step < warmup or schedule == "constant":
        return warmup_factor(step, warmup)
    done = min(1.0, (step - warmup) / max(steps - warmup, 1))
    if schedule == "linear":
        return 1.0 - done
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def save_checkpoint(folder: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                    state: dict, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> Path:
    """Write a checkpoint folder whole (see the module docstring); an existing one at `folder` is replaced."""
    with writing_folder(folder) as tmp:
        for name, module in modules.items():
            save_model(module, str(tmp / f"{name}.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                   tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps(state))
    return folder


def load_checkpoint(folder: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> dict:
    """Restore what `save_checkpoint` wrote into the given objects (the RNG states too); returns its state, with
    "reset": what could not be restored as it was (`restore_cuda_rng`). A file that does not read is refused in one
    line naming it, before anything is restored."""
    folder = Path(folder)
    state, extra = _read_state(folder), load_pickle(folder / OPTIMIZER, "a checkpoint's optimiser state")
    if not isinstance(extra, dict) or not {"optimizer", "scheduler", "torch_rng", "cuda_rng"} <= set(extra):
        raise SDiTError(f"{folder / OPTIMIZER}: not a checkpoint's optimiser state (damaged, or from elsewhere)")
    for name, module in modules.items():
        try:
            load_model(module, str(folder / f"{name}.safetensors"))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise SDiTError(f"{folder / name}.safetensors: the checkpoint's {name} weights do not load "
                            f"({brief(err)}); delete {folder} to resume from the checkpoint before it") from None
    optimizer.load_state_dict(extra["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["torch_rng"])
    return state | {"reset": restore_cuda_rng(extra["cuda_rng"])}


def restore_cuda_rng(states: list[torch.Tensor]) -> list[str]:
    """Set the saved CUDA generators on the devices there are (a checkpoint from more or fewer GPUs, or from a
    GPU machine resumed on a CPU, restores what fits); returns, in words, what kept a fresh state."""
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device, rng in enumerate(states[:here]):
        torch.cuda.set_rng_state(rng, device)
    if len(states) > here:
        return [f"the random state of {len(states) - here} of the checkpoint's {len(states)} CUDA devices was "
                f"not restored: {here} here"]
    if here > len(states):
        saved = f"{len(states)}" if states else "none (it was trained without CUDA)"
        return [f"CUDA devices {len(states)} to {here - 1} start from a fresh random state: the checkpoint saved "
                f"{saved}"]
    return []


def _read_state(folder: Path) -> dict:
    try:
        state = json.loads((folder / STATE).read_text())
    except (OSError, ValueError) as err:  # missing, cut short, or not UTF-8
        raise SDiTError(f"{folder / STATE}: the checkpoint's state does not read ({brief(err)}); delete "
                        f"{folder} to resume from the checkpoint before it") from None
    if not isinstance(state, dict):
        raise SDiTError(f"{folder / STATE}: not a checkpoint's state (a JSON object)")
    return state
