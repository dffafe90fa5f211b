"""`sdit verify`, and checksums in every reader: a flipped byte is named, never trained on."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from pipeline.verify import count_shards, verify
from sdit.errors import SDiTError
from sdit.store import Store


def _chunk_files(array: Path) -> list[Path]:
    return sorted(p for p in array.rglob("*") if p.is_file() and p.name != "zarr.json")


def _flip(file: Path, offset: int = 100) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.fixture
def store(labelled_store, tmp_path) -> Path:
    return shutil.copytree(labelled_store, tmp_path / "store")


def test_an_intact_store_verifies(store):
    report = verify(str(store))
    assert report.ok and report.problems == []
    finished = Store(str(store)).finished
    assert report.shards == len(finished("records")) + len(finished("prompts")) + len(finished("labels/default"))
    assert report.chunks >= report.shards * 5  # every array of every shard, read chunk by chunk
    result = CliRunner().invoke(app, ["verify", str(store)])
    assert result.exit_code == 0 and "intact" in result.output


@pytest.mark.parametrize("array", ["labels/default/00001/eps_teacher", "records/00002/latents",
                                   "records/00000/captions"])
def test_a_flipped_byte_is_named_by_verify_and_stops_training(store, array, tmp_path):
    _flip(_chunk_files(store / array)[0])
    shard = "/".join(array.split("/")[:-1])
    report = verify(str(store))
    assert len(report.problems) == 1 and report.problems[0].startswith(f"{shard} {array.split('/')[-1]}")
    assert "checksum" in report.problems[0]
    result = CliRunner().invoke(app, ["verify", str(store)])
    assert result.exit_code == 1 and shard in result.output and result.output.rstrip().endswith(": 1 problem")
    if array.endswith("captions"):
        return  # training reads latents, embeddings and labels, not captions
    result = CliRunner().invoke(app, ["train", str(store), "--out", str(tmp_path / "run"), "--student", "SDiT-Nano/2",
                                      "--steps", "2", "--batch-size", "4"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("error: ") and shard in message and "fails its checksum" in message


def test_a_flipped_byte_in_the_labels_index_is_named_by_verify_and_stops_training(store, tmp_path):
    _flip(_chunk_files(store / "labels/default/index/records_valid")[0], offset=2)
    report = verify(str(store))
    assert report.problems == ["labels/default/index: damaged (a chunk fails its checksum)"]
    result = CliRunner().invoke(app, ["train", str(store), "--out", str(tmp_path / "run"), "--student", "SDiT-Nano/2",
                                      "--steps", "2", "--batch-size", "4"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "labels/default/index is damaged" in result.output


def test_stores_written_before_checksums_are_refused_with_how_to_upgrade(store):
    manifest = store / "manifest.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"schema_version": 1}))
    with pytest.raises(SDiTError, match="written before chunks carried checksums.*--overwrite"):
        Store(str(store)).manifest()


def _train(store: Path, tmp_path: Path):
    return CliRunner().invoke(app, ["train", str(store), "--out", str(tmp_path / "run"), "--student", "SDiT-Nano/2",
                                    "--steps", "2", "--batch-size", "4"])


@pytest.mark.parametrize("file, problem", [
    ("records/00000/latents/zarr.json", "records/00000 latents: the array cannot be opened (its zarr.json is damaged"),
    ("labels/default/00001/noise/zarr.json", "labels/default/00001 noise: the array cannot be opened"),
    ("records/00002/zarr.json", "records/00002: the shard cannot be opened (its zarr.json is damaged"),
    ("zarr.json", "zarr.json: damaged (not JSON: bytes that are not UTF-8 text)"),
    ("null_text_emb/zarr.json", "null_text_emb/zarr.json: damaged"),
])
def test_a_flipped_byte_in_zarr_metadata_is_a_problem_of_the_store(store, file, problem, tmp_path):
    _flip(store / file, offset=10)  # 0x7B ^ 0xFF and friends: no longer UTF-8
    report = verify(str(store))
    assert len(report.problems) == 1 and report.problems[0].startswith(problem), report.problems
    result = CliRunner().invoke(app, ["verify", str(store)])
    assert result.exit_code == 1 and "Traceback" not in result.output and result.output.rstrip().endswith(": 1 problem")
    result = _train(store, tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("error: ") and "is damaged" in message and "sdit verify" in message


@pytest.mark.parametrize("file", ["manifest.json", "labels/default/manifest.json", "_done/records/00001.json",
                                  "_done/labels/default/00000.json"])
def test_json_cut_short_is_a_problem_of_the_store(store, file, tmp_path):
    path = store / file
    path.write_text(path.read_text()[:40])
    shards = count_shards(str(store))
    report = verify(str(store))
    assert len(report.problems) == 1 and report.problems[0].startswith(f"{file}: damaged (not valid JSON: ")
    assert report.shards == shards  # every other shard is still read
    result = _train(store, tmp_path)
    if file.startswith("_done/labels/"):  # training reads the labels' index, which holds what these records held
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith(f"error: {store}: {file} is damaged")


@pytest.mark.slow
def test_a_trajectory_set_without_its_states_is_a_problem(encoded_store, tiny_teacher, tmp_path):
    from pipeline.label import LabelConfig, label
    from sdit.config import SynthesisConfig

    store = shutil.copytree(encoded_store, tmp_path / "store")
    label(LabelConfig(store=str(store), teacher=str(tiny_teacher), name="traj", draws=2,
                      synthesis=SynthesisConfig(samples=1, steps=4, trajectory=2)))
    assert verify(str(store)).ok
    shutil.rmtree(store / "synthetic" / "00000" / "states")
    assert verify(str(store)).problems == ["synthetic/00000 states: missing"]


def test_labels_with_fresh_guidance_without_their_unconditional_eps_are_a_problem(fresh_guided_store, tmp_path):
    store = shutil.copytree(fresh_guided_store, tmp_path / "store")
    assert verify(str(store)).ok
    shutil.rmtree(store / "labels" / "fresh" / "00001" / "eps_uncond")
    assert verify(str(store)).problems == ["labels/fresh/00001 eps_uncond: missing"]
