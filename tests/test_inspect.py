import shutil

import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from pipeline.config import InspectConfig
from pipeline.inspect import inspect_store
from pipeline.label import LabelConfig, label
from sdit.config import SynthesisConfig
from sdit.tiny import save_tiny_teacher

runner = CliRunner()


@pytest.fixture
def store(encoded_store, tmp_path):
    """The bundled samples (11 records) and a 3-prompt bank, copied: tests label their own copy."""
    return shutil.copytree(encoded_store, tmp_path / "store")


def _one_line(args: list[str], fragment: str) -> None:
    result = runner.invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0], result.output


@pytest.mark.slow
def test_inspect_decodes_synthetic_records_with_their_provenance(store, tiny_teacher, tmp_path):
    label(LabelConfig(store=str(store), teacher=str(tiny_teacher), name="synth", draws=1, batch_size=3,
                      synthesis=SynthesisConfig(samples=2, steps=4, guidance=5.0)))
    result = runner.invoke(app, ["inspect", str(store), "--synthetic", "--out", str(tmp_path / "look"), "--limit",
                                 "5", "--vae", str(tiny_teacher)])
    assert result.exit_code == 0, result.output
    assert "wrote 5 images" in result.output
    png = Image.open(tmp_path / "look" / "0001.png")
    assert png.size == (64, 64)
    assert png.text["caption"] == "a red circle" and png.text["sample"] == "1" and png.text["steps"] == "4"
    assert png.text["scheduler"] == "PNDMScheduler" and png.text["id"] == "synth-0-1"
    assert Image.open(tmp_path / "look" / "grid.png").size[0] > 64
    records = inspect_store(InspectConfig(store=str(store), out=str(tmp_path / "records"), limit=3))
    assert records["images"] == 3  # the store's own teacher path decodes by default


def test_what_cannot_be_decoded_is_refused_in_one_line(store, tmp_path):
    _one_line(["inspect", str(store), "--synthetic", "--out", str(tmp_path / "x")], "no finished synthetic shards")
    other = save_tiny_teacher(tmp_path / "other-teacher", seed=1)
    _one_line(["inspect", str(store), "--out", str(tmp_path / "y"), "--vae", str(other)],
              "is not the one the store was encoded with")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
