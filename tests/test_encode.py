import io
import json
import resource
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr

import pipeline.encode as encode_stage
import sdit.sources as sources
from conftest import SAMPLES, child_env, cli_command, kill_when
from pipeline.bench import generate_images
from pipeline.encode import EncodeConfig, EncodeSummary, encode
from sdit.errors import SDiTError
from sdit.store import SCHEMA_VERSION

# The bundled samples: what is accepted, and why the rest is rejected (data/samples/README.md).
EXPECTED_REJECTS = {"empty_caption": "empty_caption", "no_caption": "missing_caption",
                    "orphan_caption": "missing_image", "truncated": "unreadable_image",
                    "zero_byte": "unreadable_image"}


def _encode(source, teacher, out, **options) -> EncodeSummary:
    return encode(EncodeConfig(source=str(source), teacher=str(teacher), out=str(out), resolution=64, **options))


def _arrays(store: Path) -> dict:
    """Every array of every shard, for byte-for-byte comparisons."""
    root = zarr.open_group(str(store), mode="r")
    out = {"null_text_emb": root["null_text_emb"][:]}
    for group in ("records", "prompts"):
        for name, shard in sorted(root[group].groups()):
            for column, arr in shard.arrays():
                out[f"{group}/{name}/{column}"] = arr[:]
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def _accepted_samples() -> list[tuple[str, bytes, str]]:
    """(stem, image bytes, caption) for the bundled samples that encode cleanly."""
    out = []
    for txt in sorted(SAMPLES.rglob("*.txt")):
        stem = txt.with_suffix("")
        images = [p for p in stem.parent.glob(stem.name + ".*") if p.suffix != ".txt"]
        if txt.stem in EXPECTED_REJECTS or not images:
            continue
        out.append((str(stem.relative_to(SAMPLES)), images[0].read_bytes(), txt.read_text().strip()))
    return out


@pytest.fixture(scope="module")
def folder_store(tiny_teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "folder"
    _encode(SAMPLES, tiny_teacher, out, shard_size=4, batch_size=3)
    return out


def test_folder_store_layout(folder_store):
    root = zarr.open_group(str(folder_store), mode="r")
    manifest = json.loads((folder_store / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["schema_version"] == SCHEMA_VERSION == 2
    assert manifest["latent_shape"] == [4, 8, 8] and manifest["text_shape"] == [77, 32]
    assert set(manifest["teacher"]["hashes"]) == {"vae", "text_encoder"}
    n = 0
    for _, shard in root["records"].groups():
        k = shard["ids"].shape[0]
        n += k
        assert shard["latents"].shape == (k, 4, 8, 8) and shard["latents"].dtype == np.float16
        assert shard["text_emb"].shape == (k, 77, 32) and shard["text_emb"].dtype == np.float16
        assert shard["token_count"].dtype == np.int16 and shard["positions"].dtype == np.int64
        assert shard["captions"].shape == (k,)
        assert np.isfinite(shard["latents"][:].astype(np.float32)).all()
    assert n == manifest["counts"]["records"] == len(_accepted_samples())
    assert root["null_text_emb"].shape == (77, 32)


def test_rejects_are_listed_with_reasons(folder_store):
    lines = [json.loads(line) for line in (folder_store / "rejects.jsonl").read_text().splitlines()]
    assert {r["id"]: r["reason"] for r in lines} == EXPECTED_REJECTS
    manifest = json.loads((folder_store / "manifest.json").read_text())
    assert manifest["counts"]["rejects"] == len(EXPECTED_REJECTS)


def _write_parquet(path: Path) -> None:
    rows = _accepted_samples()
    table = pa.table({
        "image": [{"bytes": b, "path": s} for s, b, _ in rows],
        "caption": [c for _, _, c in rows],
        "key": [s for s, _, _ in rows],
    })
    pq.write_table(table, path, row_group_size=4)


def _write_tar(path: Path, samples: list[tuple[str, bytes, str]] | None = None) -> None:
    with tarfile.open(path, "w") as tar:
        for stem, data, caption in _accepted_samples() if samples is None else samples:
            for name, payload in ((f"{stem}.img", data), (f"{stem}.txt", caption.encode())):
                info = tarfile.TarInfo(name.replace(".img", _suffix(data)))
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _suffix(data: bytes) -> str:
    from PIL import Image

    return "." + {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[Image.open(io.BytesIO(data)).format]


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_every_source_format_gives_the_same_records(fmt, folder_store, tiny_teacher, tmp_path):
    if fmt == "parquet":
        source = tmp_path / "data.parquet"
        _write_parquet(source)
        options = {"caption_column": "caption", "id_column": "key"}
    else:
        source = tmp_path / "shard-000.tar"
        _write_tar(source)
        options = {}
    out = tmp_path / "store"
    summary = _encode(source, tiny_teacher, out, shard_size=64, **options)
    assert summary.records == len(_accepted_samples()) and summary.rejects == 0
    _assert_same_records(folder_store, out)


def _assert_same_records(store: Path, other: Path) -> None:
    """The same ids with the same latents, embeddings and captions, whatever the shards they sit in."""
    by_id = []
    for path in (store, other):
        root = zarr.open_group(str(path), mode="r")
        by_id.append({str(record_id): (shard["latents"][i], shard["text_emb"][i], str(shard["captions"][i]))
                      for _, shard in root["records"].groups() for i, record_id in enumerate(shard["ids"][:])})
    a, b = by_id
    assert a.keys() == b.keys()
    for key in a:  # same image bytes and caption -> same latent and embedding, whatever the format
        assert np.allclose(a[key][0], b[key][0], atol=1e-3), key
        assert np.allclose(a[key][1], b[key][1], atol=1e-3), key
        assert a[key][2] == b[key][2]


def test_parquet_images_are_read_by_the_workers(folder_store, tiny_teacher, tmp_path, monkeypatch):
    """The driver plans from ids and captions: its tasks name each image's file and row, and carry no bytes."""
    source = tmp_path / "data.parquet"
    _write_parquet(source)
    run, handed = encode_stage._run, []

    def spy(executor, tasks, config, progress):
        tasks = list(tasks)
        handed.extend(item for task in tasks for item in task.items)
        run(executor, tasks, config, progress)

    monkeypatch.setattr(encode_stage, "_run", spy)
    _encode(source, tiny_teacher, tmp_path / "store", shard_size=4, caption_column="caption", id_column="key")
    assert len(handed) == len(_accepted_samples())
    assert all(item.data is None and item.image_at[0] == str(source) for item in handed)
    _assert_same_records(folder_store, tmp_path / "store")


def test_a_tar_file_is_a_shard_its_worker_reads(folder_store, tiny_teacher, tmp_path, monkeypatch):
    """The driver hands out tar files, never an image; each worker checks its file's captions and ids; an id that
    an earlier file holds leaves the later shard once all are done; a rerun reads only the unfinished files."""
    samples = _accepted_samples()
    first, second = samples[:5], samples[5:] + [samples[1]]  # samples[1]'s id in both files
    _write_tar(tmp_path / "a.tar", first + [("no_text", samples[0][1], " ")])
    _write_tar(tmp_path / "b.tar", second)
    run, handed = encode_stage._run, []

    def spy(executor, tasks, config, progress):
        tasks = list(tasks)
        handed.extend(tasks)
        run(executor, tasks, config, progress)

    monkeypatch.setattr(encode_stage, "_run", spy)
    out = tmp_path / "store"
    summary = _encode(tmp_path / "{a,b}.tar", tiny_teacher, out, shard_size=4)
    assert [(t.index, Path(t.tar).name, t.items) for t in handed] == [(0, "a.tar", []), (1, "b.tar", [])]
    assert summary.shards == 2 and summary.records == len(samples)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"], r["position"]) for r in rejects] == [
        ("no_text", "empty_caption", 5), (samples[1][0], "duplicate_id", len(second) - 1)]
    root = zarr.open_group(str(out), mode="r")
    assert list(root["records/00001/ids"][:]) == [stem for stem, _, _ in samples[5:]]
    _assert_same_records(folder_store, out)
    before = _arrays(out)

    (out / "_done" / "records" / "00001.json").unlink()  # as if the run died rewriting shard 1
    read = []
    monkeypatch.setattr(encode_stage, "tar_items", lambda file, key: read.append(Path(file).name) or
                        sources.tar_items(file, key))
    assert _encode(tmp_path / "{a,b}.tar", tiny_teacher, out, shard_size=4).skipped_shards == 1
    assert read == ["b.tar"]
    _assert_same(before, _arrays(out))


def test_prompt_bank_and_truncation(tiny_teacher, tmp_path):
    prompts = tmp_path / "prompts.txt"
    long = " ".join(["a very long prompt"] * 40)
    prompts.write_text(f"a red circle\n\n{long}\na blue square\n")
    summary = _encode(SAMPLES, tiny_teacher, tmp_path / "s", prompts=prompts)
    assert summary.prompts == 3
    root = zarr.open_group(str(tmp_path / "s"), mode="r")
    shard = root["prompts/00000"]
    assert list(shard["captions"][:]) == ["a red circle", long, "a blue square"]
    assert list(shard["token_count"][:]) == [5, 77, 5]
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["counts"]["prompts_truncated"] == 1 and manifest["counts"]["prompt_rejects"] == 1
    parquet = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["a red circle", long, "a blue square"]}), parquet)
    _encode(SAMPLES, tiny_teacher, tmp_path / "p", prompts=parquet, prompt_column="prompt")
    assert np.array_equal(zarr.open_group(str(tmp_path / "p"), mode="r")["prompts/00000/text_emb"][:],
                          shard["text_emb"][:])


@pytest.mark.slow
def test_unfinished_shards_are_redone(folder_store, tiny_teacher, tmp_path):
    out = tmp_path / "s"
    _encode(SAMPLES, tiny_teacher, out, shard_size=4, batch_size=3)
    (out / "_done" / "records" / "00001.json").unlink()  # as if the run died while writing shard 1
    (out / "records" / "00002" / "latents" / "zarr.json").unlink()  # and mid-way through shard 2's arrays
    (out / "_done" / "records" / "00002.json").unlink()
    summary = _encode(SAMPLES, tiny_teacher, out, shard_size=4, batch_size=3)
    assert summary.skipped_shards == summary.shards - 2
    _assert_same(_arrays(folder_store), _arrays(out))


def test_shards_the_workers_wrote_where_the_driver_cannot_see_leave_the_store_unfinished(tiny_teacher, tmp_path,
                                                                                        monkeypatch):
    out = tmp_path / "s"
    run = encode_stage._run

    def workers_on_their_own_disks(executor, tasks, config, progress):  # shard 1 lands on a worker's local disk
        run(executor, tasks, config, progress)
        (out / "_done" / "records" / "00001.json").unlink()

    monkeypatch.setattr(encode_stage, "_run", workers_on_their_own_disks)
    with pytest.raises(SDiTError, match=r"1 of \d+ shards are not in .* \(records/00001\).*--out that the workers"):
        _encode(SAMPLES, tiny_teacher, out, shard_size=4)
    assert json.loads((out / "manifest.json").read_text())["status"] == "in_progress"
    monkeypatch.setattr(encode_stage, "_run", run)
    assert _encode(SAMPLES, tiny_teacher, out, shard_size=4).skipped_shards > 0  # a rerun finishes the store


def test_batch_size_does_not_change_the_records(folder_store, tiny_teacher, tmp_path):
    _encode(SAMPLES, tiny_teacher, tmp_path / "s", shard_size=4, batch_size=1)
    a, b = _arrays(folder_store), _arrays(tmp_path / "s")
    assert a.keys() == b.keys()
    for key in a:  # batched kernels may round differently: equal within fp16 rounding
        if a[key].dtype == np.float16:
            assert np.allclose(a[key], b[key], atol=2e-3, rtol=1e-3), key
        else:
            assert np.array_equal(a[key], b[key]), key


def test_rerun_with_other_options_is_refused(folder_store, tiny_teacher):
    with pytest.raises(SDiTError, match="another resolution"):
        encode(EncodeConfig(source=str(SAMPLES), teacher=str(tiny_teacher), out=str(folder_store), resolution=32,
                            shard_size=4))


def test_a_rerun_naming_the_same_source_another_way_resumes(tiny_teacher, tmp_path, monkeypatch):
    store = tmp_path / "store"
    _encode(SAMPLES, tiny_teacher, store, shard_size=4, batch_size=3)
    (tmp_path / "link").symlink_to(SAMPLES)
    monkeypatch.chdir(tmp_path)
    summary = encode(EncodeConfig(source="link", teacher=str(tiny_teacher), out="store", resolution=64, shard_size=4))
    assert (summary.records, summary.skipped_shards) == (11, summary.shards)  # resumed, every shard kept


def test_overwrite_and_limit(tiny_teacher, tmp_path):
    out = tmp_path / "s"
    _encode(SAMPLES, tiny_teacher, out, shard_size=4)
    (out / "labels" / "old").mkdir(parents=True)  # labels of the old records must not survive
    summary = _encode(SAMPLES, tiny_teacher, out, shard_size=4, limit=3, overwrite=True)
    assert not (out / "labels" / "old").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert summary.records == manifest["counts"]["records"] <= 3
    assert max(int(p) for s in zarr.open_group(str(out), mode="r")["records"].groups()
               for p in s[1]["positions"][:]) < 3


def test_strict_stops_at_the_first_reject(tiny_teacher, tmp_path):
    with pytest.raises(SDiTError, match="--strict: records item 'empty_caption'"):
        _encode(SAMPLES, tiny_teacher, tmp_path / "s", strict=True)


def test_single_file_teacher_gives_the_same_store(folder_store, tiny_single_file, tmp_path):
    encode(EncodeConfig(source=str(SAMPLES), teacher=str(tiny_single_file), out=str(tmp_path / "s"),
                        teacher_config=str(tiny_single_file.parent), resolution=64, shard_size=4, batch_size=3))
    _assert_same(_arrays(folder_store), _arrays(tmp_path / "s"))


@pytest.mark.slow
def test_sigkill_and_rerun_equals_an_uninterrupted_run(tiny_teacher, tmp_path):
    images = generate_images(tmp_path / "images", 240, 64)
    args = ["encode", str(images), "--teacher", str(tiny_teacher), "--resolution", "64", "--shard-size", "8",
            "--batch-size", "4"]
    env = child_env()  # the same thread count in every process: the same rounding
    subprocess.run(cli_command(*args, "--out", str(tmp_path / "whole")), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    done = killed / "_done" / "records"
    kill_when([*args, "--out", killed], lambda: len(list(done.glob("*.json"))) >= 3)
    finished = len(list(done.glob("*.json")))
    assert 3 <= finished < 30, "the kill should land mid-run"
    assert json.loads((killed / "manifest.json").read_text())["status"] == "in_progress"
    assert (killed / "writer.lock").exists()  # left behind by the dead writer
    subprocess.run(cli_command(*args, "--out", str(killed)), check=True, env=env, capture_output=True)  # takes it over
    assert not (killed / "writer.lock").exists()
    _assert_same(_arrays(tmp_path / "whole"), _arrays(killed))
    assert (killed / "rejects.jsonl").read_text() == (tmp_path / "whole" / "rejects.jsonl").read_text()


@pytest.mark.slow
def test_a_full_disk_stops_encode_in_one_line_and_a_rerun_finishes_the_same_store(tiny_teacher, tmp_path):
    images = generate_images(tmp_path / "images", 96, 64)
    args = ["encode", str(images), "--teacher", str(tiny_teacher), "--resolution", "64", "--shard-size", "8",
            "--batch-size", "4"]
    env = child_env()  # the same thread count in every process: the same rounding
    subprocess.run(cli_command(*args, "--out", str(tmp_path / "whole")), check=True, env=env, capture_output=True)

    def small_files():  # in the child: no file may grow past 20 kB (a shard's text_emb is 39 kB): EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    full = tmp_path / "full"
    done = subprocess.run(cli_command(*args, "--out", str(full)), env=env, capture_output=True, text=True,
                          preexec_fn=small_files)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: the disk is full or the file too large")
    for record in (full / "_done" / "records").glob("*.json"):  # every shard marked done is whole
        index = int(record.stem)
        assert zarr.open_group(str(full / "records" / f"{index:05d}"), mode="r")["latents"][:].shape[0] > 0
    subprocess.run(cli_command(*args, "--out", str(full)), check=True, env=env, capture_output=True)
    _assert_same(_arrays(tmp_path / "whole"), _arrays(full))


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_runs(tiny_teacher, tmp_path):
    # Enough images that the first writer outlasts the second one's start-up (imports, loading the teacher).
    images = generate_images(tmp_path / "images", 96, 64)
    args = ["encode", str(images), "--teacher", str(tiny_teacher), "--resolution", "64", "--shard-size", "8",
            "--batch-size", "4"]
    env = child_env()  # the same thread count in every process: the same rounding
    subprocess.run(cli_command(*args, "--out", str(tmp_path / "alone")), check=True, env=env, capture_output=True)
    shared = tmp_path / "shared"
    first = subprocess.Popen(cli_command(*args, "--out", str(shared)), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (shared / "writer.lock").exists():
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)  # held mid-run, however slow the second one's start-up
    second = subprocess.run(cli_command(*args, "--out", str(shared)), env=env, capture_output=True, text=True)
    first.send_signal(signal.SIGCONT)
    assert first.wait() == 0, first.stderr.read()[-2000:]
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"is being written by `sdit encode` (pid {first.pid} on" in second.stderr.strip().splitlines()[-1]
    _assert_same(_arrays(tmp_path / "alone"), _arrays(shared))


@pytest.mark.slow
def test_ray_writes_the_same_bytes(folder_store, tiny_teacher, tmp_path):
    import ray

    try:
        _encode(SAMPLES, tiny_teacher, tmp_path / "s", shard_size=4, batch_size=3, ray_address="local",
                num_workers=2)
    finally:
        ray.shutdown()
    assert not ray.is_initialized()
    _assert_same(_arrays(folder_store), _arrays(tmp_path / "s"))


def test_duplicate_ids_are_rejected_after_the_first(tiny_teacher, tmp_path):
    rows = _accepted_samples()[:3]
    table = pa.table({"image": [{"bytes": b, "path": s} for s, b, _ in rows] * 2,
                      "text": [c for _, _, c in rows] * 2, "key": ["a", "b", "c", "a", "d", "c"]})
    pq.write_table(table, tmp_path / "d.parquet")
    summary = _encode(tmp_path / "d.parquet", tiny_teacher, tmp_path / "s", id_column="key", shard_size=4)
    assert summary.records == 4 and summary.rejects == 2
    lines = [json.loads(line) for line in (tmp_path / "s" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["position"], r["reason"]) for r in lines] == [("a", 3, "duplicate_id"),
                                                                      ("c", 5, "duplicate_id")]


def test_resolution_defaults_to_the_teacher_vae_sample_size(folder_store, tiny_teacher, tmp_path):
    out = tmp_path / "s"
    summary = encode(EncodeConfig(source=str(SAMPLES), teacher=str(tiny_teacher), out=str(out), shard_size=4,
                                  batch_size=3))  # the tiny VAE's sample_size is 64
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolution"] == 64 and manifest["source"]["min_size"] == 16
    _assert_same(_arrays(folder_store), _arrays(out))
    again = _encode(SAMPLES, tiny_teacher, out, shard_size=4, batch_size=3)  # --resolution 64 said aloud: the same
    assert again.skipped_shards == summary.shards


def test_a_store_that_gets_no_records_fails_and_says_why(tiny_teacher, tmp_path):
    out = tmp_path / "s"
    reasons = "all 16 images rejected: 11 smaller than --min-size 128, 2 unreadable, 1 with an empty caption"
    for _ in range(2):  # a rerun says the same
        with pytest.raises(SDiTError, match=reasons):
            encode(EncodeConfig(source=str(SAMPLES), teacher=str(tiny_teacher), out=str(out), resolution=512))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "in_progress" and manifest["counts"]["records"] == 0
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 16
    with pytest.raises(SDiTError, match="no source items to encode"):
        _encode(SAMPLES, tiny_teacher, tmp_path / "none", limit=0)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_not_a_store_is_never_written_into(tiny_teacher, tmp_path, overwrite):
    out = tmp_path / "documents"
    out.mkdir()
    (out / "thesis.txt").write_text("mine")
    with pytest.raises(SDiTError, match=r"holds files but no SDiT store \(thesis.txt\)"):
        _encode(SAMPLES, tiny_teacher, out, overwrite=overwrite)
    assert [p.name for p in out.iterdir()] == ["thesis.txt"]
    with pytest.raises(SDiTError, match="is inside .*thesis.txt, a file"):
        _encode(SAMPLES, tiny_teacher, out / "thesis.txt" / "store")
