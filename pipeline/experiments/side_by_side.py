"""Training the experiment's runs side by side, each in a process of its own."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, wait
from pathlib import Path

import torch

from pipeline.experiments.config import Say
from pipeline.train import TrainConfig, train
from pipeline.train_monitor import METRICS, read_metrics


def train_side_by_side(runs: dict[str, TrainConfig], jobs: int, say: Say,
                       on_step: Callable[[dict], None] | None) -> None:
    """Train the runs, `jobs` at a time, each in a process of its own with the torch threads split among them
    (small students use many threads poorly, so side by side finishes sooner); one at a time in this process
    when `jobs` is 1. `on_step` hears each step of a run trained alone; side by side, the steps all runs have
    made together."""
    if jobs <= 1:
        for name, run in runs.items():
            say(f"train {name}")
            train(run, on_step)
        return
    say(f"train {', '.join(runs)} ({jobs} side by side)")
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch thread pool inherited
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_training_process,
                             initargs=(threads, os.getpid())) as pool:
        pending = {pool.submit(train, run) for run in runs.values()}
        while pending:
            done, pending = wait(pending, timeout=1.0)
            for future in done:
                future.result()  # a run's error stops the experiment here
            if on_step:
                on_step({"step": sum(len(read_metrics(Path(run.out) / METRICS)) for run in runs.values())})


def _training_process(threads: int, parent: int) -> None:
    """Set up a process that trains runs side by side: its torch threads, and a watch that ends it when the
    experiment's process is gone (killed, or stopped with Ctrl-C), so that no orphan goes on writing into a
    run folder that a rerun resumes."""
    torch.set_num_threads(threads)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()
