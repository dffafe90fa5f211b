"""`sdit bench startup`: how long the CLI takes to answer before any command runs.

Each measurement is a fresh interpreter running `python -m sdit ARGS` (what every command, subprocess and
torchrun worker pays before its work starts), timed from outside; the median of `repeats`. Beside it, what
`import cli` loads: no torch, diffusers or transformers is the design, and the benchmark says so if that breaks.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
HEAVY = ("torch", "diffusers", "transformers")
CALLS = (("--help",), ("train", "--help"), ("--version",))


def wall_seconds(args: tuple[str, ...], repeats: int, module: bool = True) -> list[float]:
    """Seconds of `python -m sdit ARGS` (or of `python ARGS` without `module`), each in a fresh interpreter."""
    command = [sys.executable, *(("-m", "sdit") if module else ()), *args]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def bench_startup(repeats: int = 5) -> dict:
    """Median and fastest wall time of each call, and the heavy libraries `import cli` loads."""
    check = "import sys, cli; print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:]))))"
    loaded = subprocess.run([sys.executable, "-c", check, *HEAVY], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout.split()
    python = wall_seconds(("-c", "pass"), repeats, module=False)  # the interpreter's own start, for scale
    calls = {f"sdit {' '.join(args)}": wall_seconds(args, repeats) for args in CALLS}
    return {"repeats": repeats, "heavy_imports": loaded,
            "python_s": {"median": statistics.median(python), "min": min(python)},
            "calls_s": {name: {"median": statistics.median(t), "min": min(t)} for name, t in calls.items()}}


def format_startup_table(result: dict) -> str:
    rows = [f"{'call':24s}  {'median':>8s}  {'fastest':>8s}",
            f"{'python -c pass':24s}  {result['python_s']['median']:7.3f}s  {result['python_s']['min']:7.3f}s"]
    rows += [f"{name:24s}  {t['median']:7.3f}s  {t['min']:7.3f}s" for name, t in result["calls_s"].items()]
    heavy = ", ".join(result["heavy_imports"]) or "none"
    return "\n".join(rows + [f"heavy libraries `import cli` loads: {heavy}"])
