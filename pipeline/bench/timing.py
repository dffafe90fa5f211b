"""The benchmarks' clock, one harness for every speed figure.

`timed` is wall seconds that wait for CUDA's queued work before and after. `alternate` times several runs against
each other: first untimed warm-up calls, then `repeats` rounds in which the runs take turns, so that a slow spell of
the machine falls on every run alike; each run's fastest and median round are kept (other processes only ever slow
a run down, so the fastest is the truest). `compute_clock` counts only the seconds spent inside models' forwards,
for FLOP rates that leave out loading, data and checkpoint I/O.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Rounds:
    """One run's timed rounds: the wall seconds and the value of each."""

    seconds: tuple[float, ...]
    values: tuple[Any, ...] = field(repr=False)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best_value(self) -> Any:
        """The value returned by the fastest round."""
        return self.values[self.seconds.index(self.best)]


def alternate(runs: dict[str, Callable[[], Any]], repeats: int, device=None, warmup: int = 1,
              warm_ups: dict[str, Callable[[], Any]] | None = None) -> dict[str, Rounds]:
    """Each run's `repeats` timed rounds, the runs taking turns within each round, after untimed warm-up calls:
    `warmup` calls of each run, or of its stand-in in `warm_ups` (a shorter call through the same code, e.g. one
    sampling step instead of 25) where given."""
    for _ in range(warmup):
        for name, fn in runs.items():
            (warm_ups or {}).get(name, fn)()
    times: dict[str, list[float]] = {name: [] for name in runs}
    values: dict[str, list[Any]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            value, seconds = timed(fn, device)
            times[name].append(seconds)
            values[name].append(value)
    return {name: Rounds(tuple(times[name]), tuple(values[name])) for name in runs}


def best_of(runs: dict[str, Callable[[], Any]], repeats: int, device=None, warmup: int = 1) -> dict[str, float]:
    """Each run's fastest wall seconds over `repeats` alternating rounds, after `warmup` untimed calls of each."""
    return {name: r.best for name, r in alternate(runs, repeats, device, warmup).items()}


class ComputeClock:
    """Seconds spent inside `torch.nn.Module` forwards while it runs (see `compute_clock`)."""

    def __init__(self, device=None):
        self.device = device
        self.seconds = 0.0
        self._local = threading.local()
        self._lock = threading.Lock()

    def enter(self, module, args) -> None:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            _sync(self.device)
            self._local.start = time.perf_counter()
        self._local.depth = depth + 1

    def leave(self, module, args, output) -> None:
        self._local.depth -= 1
        if self._local.depth == 0:
            _sync(self.device)
            with self._lock:
                self.seconds += time.perf_counter() - self._local.start


@contextmanager
def compute_clock(device=None) -> Iterator[ComputeClock]:
    """A clock of the seconds spent inside models' forwards within the block: any `torch.nn.Module` called from
    outside another starts it and its return stops it (on CUDA, after the queued work), so model loading, data
    decoding, store reads and writes between forwards are left out. Backward passes are not forwards: time
    training steps whole."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    clock = ComputeClock(device)
    handles = (register_module_forward_pre_hook(clock.enter),
               register_module_forward_hook(clock.leave, always_call=True))  # a forward that raises still stops it
    try:
        yield clock
    finally:
        for handle in handles:
            handle.remove()
