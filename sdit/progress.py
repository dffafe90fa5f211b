"""How the CLI shows progress: a bar on a terminal, a plain line at a steady interval in a log.

The library reports progress through a `Progress` callback; the CLI renders it with `progress_bar`. With stderr attached
to a terminal that is tqdm's bar. Under SLURM, nohup or a pipe a bar would be one endless line of carriage
returns (or nothing at all), so `LogProgress` writes a line every `SDIT_PROGRESS_INTERVAL` seconds (default 30)
and one at the end: items done, rate, time left, and what the command shows beside the bar (the loss).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import IO

Progress = Callable[[int], None]
"""How long work reports progress: called with the number of units (images, steps, records) just finished."""


def no_progress(done: int) -> None:
    """A `Progress` for callers that show none."""

INTERVAL_ENV = "SDIT_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 30.0  # seconds between two lines of a log


def progress_bar(desc: str, unit: str, total: int | None = None):
    """A tqdm bar on a terminal, else a `LogProgress`; both are context managers with tqdm's interface."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(desc=desc, unit=unit, total=total, dynamic_ncols=True, smoothing=0.1, file=sys.stderr)
    return LogProgress(desc, unit, total, interval=float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL)))


def advance_to(bar, done: int) -> None:
    """Move `bar` (tqdm or `LogProgress`) to `done` units in all. A first report past the first unit is work that
    began before this process (a resumed run's steps): the bar starts there, so that its rate and time left count
    only what this process does."""
    if bar.n == 0 and done > 1:
        bar.n = bar.initial = done - 1
        if hasattr(bar, "last_print_n"):  # tqdm: its smoothed rate counts the units since this
            bar.last_print_n = done - 1
    bar.update(done - bar.n)


def duration(seconds: float) -> str:
    """12s, 7m05s, 3h02m."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class LogProgress:
    """The part of tqdm's interface the CLI uses, written as a line at most every `interval` seconds."""

    def __init__(self, desc: str, unit: str, total: int | None = None, *, interval: float = DEFAULT_INTERVAL,
                 file: IO[str] | None = None, clock=time.monotonic):
        self.desc, self.unit, self.total, self.interval = desc, unit, total, interval
        self.file, self.clock = file or sys.stderr, clock
        self.disable = False
        self.postfix = ""
        self.reset(total)

    def reset(self, total: int | None = None) -> None:
        self.n, self.initial, self.total = 0, 0, total  # initial: units done before this bar (tqdm's name)
        self.start = self.last = self.clock()
        self.written = 0  # n at the last line

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def set_postfix(self, values: dict, refresh: bool = True) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self.line()

    def line(self) -> None:
        if self.disable:
            return
        elapsed = self.clock() - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        done = (f"{self.n:,}" if self.total is None
                else f"{self.n:,}/{self.total:,} {self.unit}s ({self.n / max(self.total, 1):.0%})")
        parts = [f"{self.desc}: {done}", f"{rate:.3g} {self.unit}s/s", f"elapsed {duration(elapsed)}"]
        if self.total is not None and rate > 0 and self.n < self.total:
            parts.append(f"eta {duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        print(", ".join(parts), file=self.file, flush=True)
        self.written = self.n

    def write(self, text: str) -> None:
        print(text, file=self.file, flush=True)

    def close(self) -> None:
        if self.n and self.n != self.written:
            self.line()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:  # after an error its one-line message is the last word, not a progress line
            self.close()
