"""The benchmarks' clock: wall seconds that wait for CUDA's queued work, and the best of several alternating runs
(other processes only ever slow a run down, so the fastest run is the truest)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def _sync(device) -> None:
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device=None) -> tuple[Any, float]:
    """fn()'s value and its wall seconds; on a CUDA `device`, the queued work is waited for before and after."""
    _sync(device)
    start = time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.perf_counter() - start


def best_of(runs: dict[str, Callable[[], Any]], repeats: int, device=None) -> dict[str, float]:
    """Each run's fastest wall seconds over `repeats` rounds, the runs taking turns within each round."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            best[name] = min(best[name], timed(fn, device)[1])
    return best
