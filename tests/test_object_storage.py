"""Stage one and two with sources and the store on object storage: a local S3-compatible endpoint (moto's server,
started here), reached through fsspec's s3fs as a cluster would reach S3."""

import io
import socket
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from typer.testing import CliRunner

from cli import app
from pipeline.bench import generate_images

BUCKET = "sdit-test"


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on a free local port, its bucket, and the environment every AWS client reads."""
    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as env:
        for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
            env.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def _upload(fs, images, tmp_path) -> None:
    """The images as one Parquet file (Hugging Face layout) and as two webdataset tar shards."""
    files = sorted(images.glob("*.png"))
    rows = [{"image": {"bytes": f.read_bytes(), "path": None}, "text": f.with_suffix(".txt").read_text()}
            for f in files]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000.parquet", row_group_size=5)
    fs.put(str(tmp_path / "train-00000.parquet"), f"{BUCKET}/data/train-00000.parquet")
    for shard, part in enumerate((files[:7], files[7:])):
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as tar:
            for f in part:
                for member in (f, f.with_suffix(".txt")):
                    info = tarfile.TarInfo(member.name)
                    info.size = member.stat().st_size
                    tar.addfile(info, io.BytesIO(member.read_bytes()))
        fs.put(str(tmp_path / f"{shard:05d}.tar"), f"{BUCKET}/shards/{shard:05d}.tar")


def _cli(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_encode_label_train_and_verify_with_everything_on_s3(s3, tiny_teacher, tmp_path):
    images = generate_images(tmp_path / "images", 12, 64)
    _upload(s3, images, tmp_path)
    store = f"s3://{BUCKET}/store"
    common = ["--teacher", tiny_teacher, "--resolution", "64", "--shard-size", "4"]
    _cli("encode", f"s3://{BUCKET}/data/train-*.parquet", "--out", store, *common)
    _cli("encode", tmp_path / "train-00000.parquet", "--out", tmp_path / "local", *common)
    remote, local = zarr.open_group(store, mode="r"), zarr.open_group(str(tmp_path / "local"), mode="r")
    for shard in ("00000", "00001", "00002"):
        for column in ("latents", "text_emb", "ids", "captions"):
            assert np.array_equal(remote[f"records/{shard}/{column}"][:], local[f"records/{shard}/{column}"][:])

    out = _cli("encode", f"s3://{BUCKET}/shards/{{00000..00001}}.tar", "--out", f"s3://{BUCKET}/from-tar", *common)
    assert "12 records" in out

    _cli("teacher-label", store, "--teacher", tiny_teacher, "--draws", "2")
    assert s3.exists(f"{BUCKET}/store/labels/default/index/zarr.json")
    out = _cli("train", store, "--out", tmp_path / "run", "--student", "SDiT-Nano/2", "--steps", "2",
               "--batch-size", "4")
    assert "trained 2 steps" in out
    out = _cli("verify", store)
    assert "store" in out.lower()
    s3.pipe(f"{BUCKET}/store/records/00001/latents/c/0/0/0/0", b"damaged")  # a shard file replaced
    result = CliRunner().invoke(app, ["verify", store])
    assert result.exit_code == 1 and "records/00001" in result.output
