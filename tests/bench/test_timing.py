"""The benchmarks' one harness: warm-up untimed, runs taking turns, fastest and median rounds, compute-only clock."""

import itertools
import time
from types import SimpleNamespace

import pytest
import torch

from pipeline.bench import timing
from pipeline.bench.timing import alternate, best_of, compute_clock


def scripted_clock(monkeypatch, seconds: list[float]):
    """perf_counter that makes the k-th timed call last seconds[k]: it is read once before and once after."""
    ticks = itertools.accumulate(itertools.chain.from_iterable((0.0, s) for s in seconds))
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    return ticks


def test_runs_take_turns_after_untimed_warm_ups_and_keep_each_rounds_value(monkeypatch):
    calls = []
    runs = {name: (lambda n=name: calls.append(n) or f"{n}{len(calls)}") for name in ("a", "b")}
    warm = {"a": lambda: calls.append("a-warm")}
    # timed calls in order a, b, a, b, a, b
    ticks = scripted_clock(monkeypatch, [3.0, 5.0, 1.0, 6.0, 2.0, 4.0])
    rounds = alternate(runs, repeats=3, warmup=1, warm_ups=warm)
    assert next(ticks, None) is None  # the warm-ups were not timed
    assert calls == ["a-warm", "b", "a", "b", "a", "b", "a", "b"]  # b has no stand-in: it warms up on itself
    assert rounds["a"].seconds == (3.0, 1.0, 2.0) and rounds["b"].seconds == (5.0, 6.0, 4.0)
    assert rounds["a"].best == 1.0 and rounds["a"].median == 2.0
    assert rounds["b"].best == 4.0 and rounds["b"].median == 5.0
    assert rounds["a"].best_value == "a5" and rounds["b"].best_value == "b8"  # the value of the fastest round


def test_best_of_is_the_fastest_round_of_each(monkeypatch):
    scripted_clock(monkeypatch, [2.0, 1.0, 0.5, 3.0])
    assert best_of({"x": lambda: None, "y": lambda: None}, repeats=2, warmup=0) == {"x": 0.5, "y": 1.0}


class Sleeper(torch.nn.Module):
    def __init__(self, seconds: float, inner: torch.nn.Module | None = None):
        super().__init__()
        self.seconds, self.inner = seconds, inner

    def forward(self, x):
        time.sleep(self.seconds)
        return self.inner(x) if self.inner is not None else x


def test_the_compute_clock_counts_forwards_once_and_nothing_between_them():
    model = Sleeper(0.05, Sleeper(0.05))  # a nested module is inside its parent's time, not added to it
    with compute_clock() as clock:
        model(torch.zeros(1))
        time.sleep(0.3)  # loading, decoding, writing: not compute
        Sleeper(0.05)(torch.zeros(1))
    model(torch.zeros(1))  # after the block: not counted
    assert 0.15 <= clock.seconds < 0.25


def test_a_forward_that_raises_still_stops_the_clock():
    class Fails(torch.nn.Module):
        def forward(self, x):
            raise ValueError("no")

    with compute_clock() as clock:
        with pytest.raises(ValueError):
            Fails()(torch.zeros(1))
        Sleeper(0.05)(torch.zeros(1))
    assert 0.05 <= clock.seconds < 0.1


def test_no_forward_no_compute():
    with compute_clock() as clock:
        time.sleep(0.02)
    assert clock.seconds == 0.0
