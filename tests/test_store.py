import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import zarr

from sdit.errors import SDiTError
from sdit.store import MANIFEST, SCHEMA_VERSION, Manifest, Store, write_shard


def _manifest(**changes) -> Manifest:
    base = dict(source={"location": "x", "format": "folder"}, teacher={"hashes": {}}, resolution=64,
                latent_scale=0.18215, latent_shape=(4, 8, 8), text_shape=(77, 32), shard_size=4)
    return Manifest(**base | changes)


def _columns(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "latents": rng.standard_normal((n, 4, 8, 8)).astype(np.float16),
        "text_emb": rng.standard_normal((n, 77, 32)).astype(np.float16),
        "token_count": np.full(n, 7, np.int16),
        "ids": np.array([f"id{i}" for i in range(n)], dtype=str),
        "captions": np.array([f"caption {i} é" for i in range(n)], dtype=str),
        "positions": np.arange(n, dtype=np.int64),
    }


def test_manifest_round_trip_and_version_check(tmp_path):
    store = Store(str(tmp_path / "s"))
    with pytest.raises(SDiTError, match="not an SDiT store"):
        store.manifest()
    store.write_manifest(_manifest())
    assert store.manifest() == _manifest(created=store.manifest().created)
    data = json.loads((tmp_path / "s" / MANIFEST).read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(SDiTError, match=f"schema version {SCHEMA_VERSION + 1}"):
        store.manifest()


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 200])
def test_shard_round_trip_with_plain_zarr(tmp_path, n):
    store = Store(str(tmp_path / "s"))
    zarr.open_group(store.url, mode="w").require_group("records")
    cols = _columns(n)
    write_shard(store, "records", 3, cols, {"rejects": [], "truncated": 0})
    assert store.finished("records")[3]["count"] == n
    group = zarr.open_group(str(tmp_path / "s"), mode="r")["records/00003"]
    for name, values in cols.items():
        assert group[name].shape == values.shape
        assert np.array_equal(group[name][:], values), name
    assert group["latents"].dtype == np.float16 and group["token_count"].dtype == np.int16


def test_unfinished_shards_are_invisible_and_removed(tmp_path):
    store = Store(str(tmp_path / "s"))
    zarr.open_group(store.url, mode="w").require_group("records")
    write_shard(store, "records", 0, _columns(5), {"rejects": []})
    write_shard(store, "records", 1, _columns(5), {"rejects": []})
    (tmp_path / "s" / "_done" / "records" / "00001.json").unlink()  # as if killed before the record
    assert list(store.finished("records")) == [0]
    assert [i for i, _ in store.iter_shards("records")] == [0]
    assert store.remove_unfinished("records") == [1]
    assert not (tmp_path / "s" / "records" / "00001").exists()


def test_json_writes_are_atomic(tmp_path, monkeypatch):
    store = Store(str(tmp_path / "s"))
    store.write_json({"a": 1}, "x.json")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", crash)
    with pytest.raises(OSError):
        store.write_json({"a": 2}, "x.json")
    assert store.read_json("x.json") == {"a": 1}


def test_store_on_an_fsspec_url():
    store = Store("memory://sdit-test-store")
    zarr.open_group(store.url, mode="w").require_group("records")
    write_shard(store, "records", 0, _columns(3), {"rejects": []})
    store.write_manifest(_manifest())
    assert store.manifest().shard_size == 4
    shard = store.shard_group("records", 0)
    assert np.array_equal(shard["ids"][:], _columns(3)["ids"])


def test_one_writer_at_a_time_and_a_dead_writers_lock_is_taken_over(tmp_path):
    store = Store(str(tmp_path / "s"))
    with store.writer("encode"):
        lock = json.loads((tmp_path / "s" / "writer.lock").read_text())
        assert lock["pid"] == os.getpid() and lock["stage"] == "encode"
        with pytest.raises(SDiTError, match=rf"is being written by `sdit encode` \(pid {os.getpid()} on"):
            with store.writer("teacher-label"):
                pass
    assert not (tmp_path / "s" / "writer.lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "s" / "writer.lock").write_text(json.dumps(lock | {"pid": dead.pid}))
    with store.writer("teacher-label"):  # its process is gone: the rerun goes on
        assert json.loads((tmp_path / "s" / "writer.lock").read_text())["stage"] == "teacher-label"


@pytest.mark.parametrize("damage, reason", [
    (lambda text: text[:len(text) // 2], "not valid JSON: .* \\(line [0-9]+, column [0-9]+\\)"),  # cut short
    (lambda text: "\xff" + text[1:], "not JSON: bytes that are not UTF-8 text"),
    (lambda text: "[1, 2]", "a JSON list, not an object"),
])
def test_a_damaged_manifest_is_refused_in_one_line_naming_it(tmp_path, damage, reason):
    from sdit.store import Damaged

    store = Store(str(tmp_path / "s"))
    store.write_manifest(_manifest())
    path = tmp_path / "s" / MANIFEST
    path.write_bytes(damage(path.read_text()).encode("latin-1"))
    with pytest.raises(Damaged, match=reason) as err:
        store.manifest()
    assert err.value.name == MANIFEST and "\n" not in str(err.value) and "sdit verify" in str(err.value)


def test_a_manifest_missing_a_field_is_refused_in_one_line(tmp_path):
    store = Store(str(tmp_path / "s"))
    store.write_manifest(_manifest())
    data = json.loads((tmp_path / "s" / MANIFEST).read_text())
    del data["latent_shape"]
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(SDiTError, match="lacks latent_shape"):
        store.manifest()


def test_a_damaged_completion_record_is_refused_or_listed(tmp_path):
    from sdit.store import Damaged

    store = Store(str(tmp_path / "s"))
    for index in range(2):
        write_shard(store, "records", index, _columns(3, seed=index), {"rejects": []})
    (tmp_path / "s" / "_done" / "records" / "00001.json").write_text('{"count": 3, "rej')
    with pytest.raises(Damaged, match="_done/records/00001.json is damaged"):
        store.finished("records")
    damaged: list = []
    assert list(store.finished("records", damaged)) == [0]
    assert [err.name for err in damaged] == ["_done/records/00001.json"]


def test_damaged_zarr_metadata_stops_a_reader_in_one_line(tmp_path):
    from sdit.store import Damaged

    store = Store(str(tmp_path / "s"))
    write_shard(store, "records", 0, _columns(3), {"rejects": []})
    metadata = tmp_path / "s" / "records" / "00000" / "latents" / "zarr.json"
    metadata.write_bytes(b"\xff" + metadata.read_bytes()[1:])
    with pytest.raises(Damaged, match="records/00000 .*a zarr.json is damaged"):
        store.read("records", 0, ("latents",))
    assert store.read("records", 0, ("ids",))["ids"].tolist() == ["id0", "id1", "id2"]


def test_the_null_embedding_names_its_damaged_file(tmp_path):
    from sdit.store import Damaged

    store = Store(str(tmp_path / "s"))
    root = store.root_group(mode="a")
    root.create_array("null_text_emb", shape=(77, 32), dtype="float16", compressors=None)[:] = 1
    assert store.null_embedding().shape == (77, 32)
    metadata = tmp_path / "s" / "null_text_emb" / "zarr.json"
    metadata.write_text(metadata.read_text()[:30])
    with pytest.raises(Damaged, match="null_text_emb/zarr.json is damaged"):
        store.null_embedding()


def test_stages_read_only_stores_with_records(tmp_path):
    store = Store(str(tmp_path / "s"))
    store.write_manifest(_manifest())
    with pytest.raises(SDiTError, match="not finished encoding"):
        store.encoded()
    store.write_manifest(_manifest(counts={"records": 0, "rejects": 5}))  # what an encode that kept nothing leaves
    with pytest.raises(SDiTError, match="holds no records: `sdit encode` rejected every image"):
        store.encoded()
    store.write_manifest(_manifest(counts={"records": 0}, status="complete"))
    with pytest.raises(SDiTError, match="holds no records"):
        store.encoded()
    store.write_manifest(_manifest(counts={"records": 3}, status="complete"))
    assert store.encoded().counts["records"] == 3


@pytest.mark.parametrize("url", ["local", "memory://reads"])
def test_a_row_of_text_reads_about_its_own_bytes_and_reads_are_counted(tmp_path, url):
    """Text embeddings are chunked by the row, so one caption costs its own bytes (a caption swap), not its
    chunk's 63 neighbours; a shard's chunk index is read once; every byte read through Zarr is counted."""
    store = Store(str(tmp_path / "s") if url == "local" else url)
    cols = _columns(200)
    write_shard(store, "records", 0, cols, {})
    text = store.shard_group("records", 0)["text_emb"]
    assert text.chunks == (1, 77, 32) and store.shard_group("records", 0)["latents"].chunks == (64, 4, 8, 8)
    row = 77 * 32 * 2
    before = store.bytes_read
    assert np.array_equal(text[5], cols["text_emb"][5])
    first = store.bytes_read - before
    assert row < first <= row + 200 * 16 + 4 + 4  # the row (its checksum too) and the shard's chunk index
    before = store.bytes_read
    assert np.array_equal(text[77], cols["text_emb"][77])
    assert row <= store.bytes_read - before <= row + 4  # the index is kept: a finished shard never changes
    before = store.bytes_read
    assert np.array_equal(store.read("records", 0, ("latents",), 64, 128)["latents"], cols["latents"][64:128])
    assert store.bytes_read - before >= 64 * 4 * 8 * 8 * 2
    assert pickle.loads(pickle.dumps(store)).bytes_read == store.bytes_read  # Ray ships stores to its workers
    if url != "local":
        store.remove()


def test_a_url_whose_filesystem_is_not_installed_is_refused_in_one_line():
    with pytest.raises(SDiTError, match=r"gs://bucket/store: .*gcsfs.*sdit\[gcs\]"):
        Store("gs://bucket/store")


def test_reads_of_object_storage_run_at_once_and_local_ones_in_turn(tmp_path):
    import threading

    together = threading.Barrier(8, timeout=10)  # broken unless all eight reads are in flight at once

    def read(i, wait=True):
        def run():
            if wait:
                together.wait()
            return i, threading.current_thread().name
        return run

    remote = Store("memory://concurrent").concurrently([read(i) for i in range(8)])
    assert [i for i, _ in remote] == list(range(8)) and all(name.startswith("sdit-read") for _, name in remote)
    local = Store(str(tmp_path / "s")).concurrently([read(i, wait=False) for i in range(3)])
    assert local == [(i, threading.current_thread().name) for i in range(3)]
