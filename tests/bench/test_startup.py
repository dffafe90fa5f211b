"""`sdit bench startup`: each call timed in a fresh interpreter, and what `import cli` loads."""

from pipeline.bench.startup import CALLS, bench_startup, format_startup_table


def test_every_call_is_timed_and_cli_loads_nothing_heavy():
    result = bench_startup(repeats=1)
    assert result["heavy_imports"] == []
    assert set(result["calls_s"]) == {f"sdit {' '.join(args)}" for args in CALLS}
    for seconds in (result["python_s"], *result["calls_s"].values()):
        assert 0 < seconds["min"] <= seconds["median"]
    # starting Python is part of every call, so no call can be faster than Python alone
    assert min(t["min"] for t in result["calls_s"].values()) > result["python_s"]["min"]
    assert "heavy libraries `import cli` loads: none" in format_startup_table(result)
