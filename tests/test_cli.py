import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
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


DAMAGED = 1  # the exit code of `sdit verify` on a store it finds damaged; every other refusal exits 2


def _bad_inputs(root, tiny_teacher, labelled_store) -> list[tuple]:
    """(case, arguments, what the one-line error must say[, exit code]) for every command; the code is 2 unless
    given."""
    import shutil

    from PIL import Image

    from conftest import new_run
    from pipeline.encode import EncodeConfig, encode
    from sdit.errors import SDiTError

    empty = root / "empty"
    empty.mkdir()
    a_file = root / "a.txt"
    a_file.write_text("not a folder")
    bad_text = root / "bad-text"
    bad_text.mkdir()
    Image.new("RGB", (64, 64), "red").save(bad_text / "x.png")
    (bad_text / "x.txt").write_bytes(b"a red \xff\xfe square")
    bomb = root / "bomb"
    bomb.mkdir()
    Image.new("1", (20_000, 20_000)).save(bomb / "big.png")  # 400 Mpixel: over Pillow's decompression-bomb limit
    (bomb / "big.txt").write_text("a very large image")
    old = shutil.copytree(labelled_store, root / "old-store")
    manifest = old / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"schema_version": 1}))
    cut = shutil.copytree(labelled_store, root / "cut-store")
    (cut / "manifest.json").write_text((cut / "manifest.json").read_text()[:200])  # a manifest cut short
    flipped = shutil.copytree(labelled_store, root / "flipped-store")
    metadata = flipped / "records" / "00000" / "latents" / "zarr.json"
    data = bytearray(metadata.read_bytes())
    data[10] ^= 0xFF  # one flipped byte: no longer UTF-8
    metadata.write_bytes(bytes(data))
    nothing = root / "nothing-store"
    try:  # at 512 px every bundled sample is under --min-size 128 or rejected for another reason
        encode(EncodeConfig(source=str(SAMPLES), teacher=str(tiny_teacher), out=str(nothing), resolution=512))
    except SDiTError:
        pass
    no_weights = root / "no-weights"
    no_weights.mkdir()
    (no_weights / "model_index.json").write_text("{}")
    (no_weights / "sdit_run.json").write_text(json.dumps({"schema_version": 1}))
    run = new_run(root / "run", tiny_teacher)
    cut_index = shutil.copytree(run, root / "cut-index")
    (cut_index / "model_index.json").write_text((run / "model_index.json").read_text()[:20])
    bad_ckpt = root / "bad.ckpt"
    bad_ckpt.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)  # a zip header, then nothing torch can read
    not_a_store = root / "documents"
    not_a_store.mkdir()
    (not_a_store / "thesis.txt").write_text("not a store: never written into, nor deleted")
    teacher = ["--teacher", str(tiny_teacher)]
    out = ["--out", str(root / "out")]
    student = ["--student", "SDiT-Nano/2"]
    return [
        ("encode: a missing source", ["encode", str(root / "missing"), *teacher, *out], "missing"),
        ("encode: an empty folder", ["encode", str(empty), *teacher, *out], "empty"),
        ("encode: a file where the store's folder goes", ["encode", str(SAMPLES), *teacher, "--out", str(a_file)],
         "a.txt"),
        ("encode: a folder that is not a store", ["encode", str(SAMPLES), *teacher, "--out", str(not_a_store)],
         "holds files but no SDiT store (thesis.txt)"),
        ("encode: non-UTF-8 captions", ["encode", str(bad_text), *teacher, *out, "--strict", "--resolution", "64"],
         "caption_not_utf8"),
        ("encode: a decompression bomb", ["encode", str(bomb), *teacher, *out, "--strict", "--resolution", "64"],
         "big"),
        ("encode: every image rejected", ["encode", str(SAMPLES), *teacher, *out, "--resolution", "512"],
         "all 16 images rejected: 11 smaller than --min-size 128, 2 unreadable"),
        ("encode: --resolution abc", ["encode", str(SAMPLES), *teacher, *out, "--resolution", "abc"], "--resolution"),
        ("encode: no --out", ["encode", str(SAMPLES), *teacher], "--out"),
        ("teacher-label: a missing store", ["teacher-label", str(root / "missing"), *teacher], "not an SDiT store"),
        ("teacher-label: a file for a store", ["teacher-label", str(a_file), *teacher], "not an SDiT store"),
        ("teacher-label: a store of another schema version", ["teacher-label", str(old), *teacher],
         "store schema version 1"),
        ("teacher-label: a store with no records", ["teacher-label", str(nothing), *teacher],
         "holds no records: `sdit encode` rejected every image"),
        ("teacher-label: --draws 0", ["teacher-label", str(labelled_store), *teacher, "--draws", "0"], "--draws"),
        ("teacher-label: a mix that does not sum to 1",
         ["teacher-label", str(labelled_store), *teacher, "--perturb", "none=0.5,swap=0.2"],
         "--perturb none=0.5,swap=0.2 sums to 0.7: probabilities must sum to 1"),
        ("init: a missing teacher", ["init", "--teacher", str(root / "missing"), *student, *out], "teacher not found"),
        ("init: a damaged .ckpt", ["init", "--teacher", str(bad_ckpt), *student, *out],
         "bad.ckpt: not a PyTorch checkpoint, or a damaged one"),
        ("init: a file for --out", ["init", *teacher, *student, "--out", str(a_file)], "a.txt is a file"),
        ("train: labels of another name", ["train", str(labelled_store), *out, *student, "--labels", "other"],
         "no labels 'other'"),
        ("train: an unknown --lr-schedule", ["train", str(labelled_store), *out, *student, "--lr-schedule", "step"],
         "--lr-schedule 'step': choose one of constant, cosine, linear"),
        ("train: a run folder without weights", ["train", str(labelled_store), *out, "--init", str(no_weights)],
         "no-weights"),
        ("train: a manifest cut short", ["train", str(cut), *out, *student], "manifest.json is damaged"),
        ("train: a store with no records", ["train", str(nothing), *out, *student], "holds no records"),
        ("train: --steps -5", ["train", str(labelled_store), *out, *student, "--steps", "-5"], "--steps"),
        ("train: --holdout 1.5", ["train", str(labelled_store), *out, *student, "--holdout", "1.5"], "--holdout"),
        ("train: a file for --out", ["train", str(labelled_store), "--out", str(a_file), "--init", str(run)],
         "a.txt is a file"),
        ("sample: a run folder without weights", ["sample", str(no_weights), *out, "-p", "a red circle"],
         "no-weights"),
        ("sample: a missing run", ["sample", str(root / "missing"), *out, "-p", "a red circle"], "missing"),
        ("sample: a model_index.json cut short", ["sample", str(cut_index), *out, "-p", "a red circle"],
         "model_index.json is damaged"),
        ("sample: a file for --out", ["sample", str(run), "--out", str(a_file), "-p", "a red circle"],
         "a.txt is a file"),
        ("inspect: a missing store", ["inspect", str(root / "missing"), *out], "not an SDiT store"),
        ("inspect: a file for --out", ["inspect", str(labelled_store), "--out", str(a_file)], "a.txt is a file"),
        ("eval: a store for a run", ["eval", str(labelled_store), str(labelled_store)], "not an SDiT run folder"),
        ("verify: not a store", ["verify", str(empty)], "not an SDiT store"),
        ("verify: a flipped byte in an array's zarr.json", ["verify", str(flipped)],
         "records/00000 latents: the array cannot be opened (its zarr.json is damaged", DAMAGED),
        ("verify: a manifest cut short", ["verify", str(cut)], "manifest.json: damaged (not valid JSON", DAMAGED),
        ("bench distill: an unknown student", ["bench", "distill", "--out", str(root / "d"), "--student", "SDiT-Q/2"],
         "unknown student preset"),
        ("bench label: a missing store", ["bench", "label", str(root / "missing"), *teacher], "not an SDiT store"),
        ("bench sample: an unknown preset", ["bench", "sample", "--preset", "SDiT-Q/2"], "unknown student presets"),
        ("toy eval: a missing teacher", ["toy", "eval", "--teacher", str(root / "missing")], "teacher not found"),
    ]


def _refused_in_one_line(result, fragment: str, code: int) -> bool:
    """Exit `code`, no traceback, nothing that tells the user to load pickles unsafely; an error (exit 2) is the
    one line printed, a damaged store (exit 1) is one problem line beside `sdit verify`'s summary."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    if result.exit_code != code or "Traceback" in result.output or "weights_only" in result.output:
        return False
    if code == DAMAGED:
        return len([line for line in lines if fragment in line]) == 1 and lines[-1].endswith(": 1 problem")
    return len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]


def test_every_command_refuses_bad_input_in_one_line(tiny_teacher, labelled_store, tmp_path):
    cases = _bad_inputs(tmp_path, tiny_teacher, labelled_store)
    every_command = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands} | {
        group.name for group in app.registered_groups}
    assert {args[0] for _, args, *_ in cases} >= every_command
    failures = []
    for k, (case, args, fragment, *code) in enumerate(cases):
        args = [str(tmp_path / f"out-{k}") if arg == str(tmp_path / "out") else arg for arg in args]
        result = runner.invoke(app, args)
        if not _refused_in_one_line(result, fragment, code[0] if code else 2):
            failures.append(f"{case}: exit {result.exit_code}: {result.output[-400:]!r} {result.exception!r}")
    assert not failures, "\n".join(failures)
    assert (tmp_path / "documents" / "thesis.txt").read_text().startswith("not a store")
    assert not (tmp_path / "nothing-store" / "manifest.json").read_text().count('"complete"')


# --- start-up, help, conventions -------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent


def _commands(group=None, path=()):
    """(path, click command) of every command of `sdit`, groups included."""
    group = group or typer.main.get_command(app)
    yield path, group
    for name, sub in getattr(group, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_import_cli_loads_no_torch_diffusers_or_transformers():
    heavy = subprocess.run([sys.executable, "-c", "import sys, cli; print(sorted({m.split('.')[0] for m in sys.modules}"
                            " & {'torch', 'diffusers', 'transformers'}))"], cwd=REPO, capture_output=True, text=True,
                           check=True)
    assert heavy.stdout.strip() == "[]"


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("path", [path for path, _ in _commands()], ids=lambda p: " ".join(p) or "sdit")
def test_help_renders_every_option_as_written_and_whole_at_80_columns(path):
    command = dict(_commands())[path]
    result = runner.invoke(app, [*path, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    assert max(map(len, result.output.splitlines())) <= 80
    help_text = _flat(result.output)
    for param in command.params:
        if getattr(param, "hidden", False):
            continue
        assert param.help, f"{' '.join(path)} {param.name}: no help"
        assert _flat(param.help) in help_text, f"{' '.join(path)} {param.name}: help not shown as written"
        for name in (*param.opts, *param.secondary_opts):
            if param.param_type_name == "option":
                assert re.search(rf"(^|[\s,]){re.escape(name)}([\s,]|$)", result.output, re.M), name
    assert "…" not in result.output


def test_version_and_python_m_sdit():
    import sdit

    assert runner.invoke(app, ["--version"]).output.strip() == f"sdit {sdit.__version__}"
    module = subprocess.run([sys.executable, "-m", "sdit", "--version"], cwd=REPO, capture_output=True, text=True)
    assert module.returncode == 0 and module.stdout.strip() == f"sdit {sdit.__version__}"


def test_shell_completion_is_offered():
    assert "--install-completion" in runner.invoke(app, ["--help"]).output


@pytest.mark.parametrize("args, fragment", [
    (["teacher-label", "s", "-t", "x", "--draws", "0"], "'--draws'"),
    (["encode", "s", "-t", "x"], "Missing option '--out'"),
    (["encode", "s", "-t", "x", "-o", "o", "--resolution", "abc"], "'--resolution'"),
    (["train", "s", "-o", "o", "--no-such-option"], "No such option"),
    (["sample", "r", "-o", "o", "--scheduler"], "requires an argument"),
])
def test_usage_errors_are_one_line_with_exit_code_2(args, fragment):
    result = runner.invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and fragment in lines[0] and f"sdit {args[0]} --help" in lines[0]


def test_no_command_prints_the_help():
    result = runner.invoke(app, ["bench"])
    assert "Commands:" in result.output and "distill" in result.output


def test_json_figures_name_the_command_that_wrote_them(tmp_path):
    out = tmp_path / "figures.json"
    result = runner.invoke(app, ["bench", "evaluator", "--images", "10", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["command"] == f"sdit bench evaluator --images 10 --json {out}"
