"""The experiments' shared fixture: one small `bench distill` with variants, run once a session."""

import subprocess
from pathlib import Path

import pytest

from conftest import child_env, cli_command

VARIANTS = '''
[swaps]  # another labelling: more swaps, at every timestep, fewer draws
from = "kd_perturb"
perturb = "none=0.5,swap=0.5"
caption_min_t = 0
draws = 3

[longer]  # kd_perturb's own labelling, trained longer
from = "kd_perturb"
steps = 3
'''


def variants_args(tiny_teacher, tmp_path, out) -> list:
    variants = tmp_path / "variants.toml"
    variants.write_text(VARIANTS)
    return ["bench", "distill", "--out", out, "--teacher", tiny_teacher, "--runs", "no_teacher",
            "--variants", variants, "--records", "24", "--draws", "2", "--steps", "2", "--batch-size", "8",
            "--per-prompt", "2", "--sample-steps", "2", "--curve-points", "2", "--curve-prompts", "1",
            "--bank-per-pair", "1", "--jobs", "1"]


def run_variants(tiny_teacher, folder: Path, out: Path) -> None:
    """The variants experiment into `out`, in a child process with one thread, as every run here compares."""
    done = subprocess.run(cli_command(*variants_args(tiny_teacher, folder, out)), env=child_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="session")
def variants(tiny_teacher, tmp_path_factory) -> Path:
    """One uninterrupted variants experiment, shared: the variants test reruns into it, the kill test compares
    with it."""
    folder = tmp_path_factory.mktemp("variants")
    run_variants(tiny_teacher, folder, folder / "distill")
    return folder / "distill"
