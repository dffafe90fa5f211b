"""Progress in logs: with stderr not a terminal, a plain line at a steady interval and one at the end."""

import io
import subprocess

import pytest

from conftest import child_env, cli_command
from sdit.progress import LogProgress, advance_to, duration


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_per_interval_with_rate_eta_and_what_the_command_adds():
    clock, log = Clock(), io.StringIO()
    with LogProgress("train", "step", total=100, interval=30, file=log, clock=clock) as bar:
        for _ in range(50):
            clock.now += 1
            bar.set_postfix_str("loss 0.1234")
            bar.update()
    lines = log.getvalue().splitlines()
    assert lines[0] == "train: 30/100 steps (30%), 1 steps/s, elapsed 30s, eta 1m10s, loss 0.1234"
    assert len(lines) == 2 and lines[1].startswith("train: 50/100 steps (50%)")  # and the last, at the end


def test_nothing_between_intervals_and_no_last_line_after_an_error():
    clock, log = Clock(), io.StringIO()
    try:
        with LogProgress("encode", "item", interval=30, file=log, clock=clock) as bar:
            clock.now, _ = 10, bar.update(5)
            raise RuntimeError("stop")
    except RuntimeError:
        pass
    assert log.getvalue() == ""  # the error's one-line message is what the log ends with


def test_reset_starts_a_new_stage():
    clock, log = Clock(), io.StringIO()
    bar = LogProgress("synthesize", "sample", total=4, interval=0, file=log, clock=clock)
    clock.now = 2
    bar.update(4)
    bar.reset(10)
    bar.set_description("label")
    bar.unit = "draw"
    clock.now = 3
    bar.update(5)
    assert log.getvalue().splitlines() == [
        "synthesize: 4/4 samples (100%), 2 samples/s, elapsed 2s",
        "label: 5/10 draws (50%), 5 draws/s, elapsed 1s, eta 1s"]


def test_a_resumed_run_starts_the_bar_where_it_stopped_and_its_rate_counts_only_new_steps():
    clock, log = Clock(), io.StringIO()
    with LogProgress("train", "step", total=1000, interval=30, file=log, clock=clock) as bar:
        for step in range(601, 661):  # resumed after step 600, one step a second
            clock.now += 1
            advance_to(bar, step)
    assert log.getvalue().splitlines()[0] == "train: 630/1,000 steps (63%), 1 steps/s, elapsed 30s, eta 6m10s"


def test_a_fresh_run_counts_every_step():
    clock, log = Clock(), io.StringIO()
    with LogProgress("train", "step", total=100, interval=10, file=log, clock=clock) as bar:
        for step in range(1, 11):
            clock.now += 1
            advance_to(bar, step)
    assert log.getvalue().splitlines()[0] == "train: 10/100 steps (10%), 1 steps/s, elapsed 10s, eta 1m30s"


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


@pytest.mark.slow
def test_training_writes_progress_lines_to_a_log_file(labelled_store, tmp_path):
    log = tmp_path / "train.log"
    with log.open("w") as stderr:
        subprocess.run(cli_command("train", labelled_store, "--out", tmp_path / "run", "--student", "SDiT-Nano/2",
                                   "--steps", "6", "--batch-size", "4", "--sample-prompts", "0"),
                       env=child_env() | {"SDIT_PROGRESS_INTERVAL": "0"}, stdout=subprocess.DEVNULL, stderr=stderr,
                       check=True)
    lines = [line for line in log.read_text().splitlines() if line.startswith("train: ")]
    assert [line.split(",")[0] for line in lines] == [f"train: {n}/6 steps ({n / 6:.0%})" for n in range(1, 7)]
    assert all("steps/s" in line and "loss " in line for line in lines)
    assert "eta" in lines[0] and "\r" not in log.read_text()
