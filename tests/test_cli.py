import json

from typer.testing import CliRunner

from cli import app
from conftest import SAMPLES

runner = CliRunner()


def test_encode_command(tiny_teacher, tmp_path):
    result = runner.invoke(app, ["encode", str(SAMPLES), "--teacher", str(tiny_teacher), "--out", str(tmp_path / "s"),
                                 "--resolution", "64", "--shard-size", "4"])
    assert result.exit_code == 0, result.output
    assert "encoded 11 records into 4 shards" in result.output and "5 rejected" in result.output
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["status"] == "complete"
    again = runner.invoke(app, ["encode", str(SAMPLES), "--teacher", str(tiny_teacher), "--out", str(tmp_path / "s"),
                                "--resolution", "64", "--shard-size", "4"])
    assert again.exit_code == 0 and "4 shards already done" in again.output


def _one_line_error(args: list[str], fragment: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output
    assert "Traceback" not in result.output


def test_errors_are_one_line(tiny_teacher, tmp_path):
    _one_line_error(["encode", str(SAMPLES), "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "s")],
                    "teacher not found")
    _one_line_error(["encode", str(tmp_path / "missing"), "--teacher", str(tiny_teacher), "--out", str(tmp_path / "s")],
                    "missing")
    _one_line_error(["encode", str(SAMPLES), "--teacher", str(tiny_teacher), "--out", str(tmp_path / "s"),
                     "--resolution", "60"], "multiple of 8")
    _one_line_error(["encode", str(SAMPLES), "--teacher", str(tiny_teacher), "--out", str(tmp_path / "s"),
                     "--device", "cuda"], "no CUDA device")
    _one_line_error(["encode", str(SAMPLES), "--teacher", str(tiny_teacher), "--out", str(tmp_path / "s"),
                     "--dtype", "fp8"], "--dtype")


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "encode" in result.output and "bench" in result.output
