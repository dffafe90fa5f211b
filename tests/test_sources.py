"""Sources (folder, imagefolder metadata, Parquet, webdataset tar) and image decoding, on real formats."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sdit.decode import load_image
from sdit.errors import RejectedInput, SDiTError
from sdit.sources import SourceItem, open_source, parquet_images
from test_decode import centre_and_corner, encode

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def test_item_read(tmp_path: Path) -> None:
    assert SourceItem(0, "a", "c", data=b"xy").read() == b"xy"
    (tmp_path / "a.png").write_bytes(b"abc")
    assert SourceItem(0, "a", "c", path=str(tmp_path / "a.png")).read() == b"abc"
    for item in (SourceItem(0, "a", "c"), SourceItem(0, "a", "c", path=str(tmp_path / "gone.png"))):
        with pytest.raises(RejectedInput) as info:
            item.read()
        assert info.value.reason == "missing_image"
    assert "data=" not in repr(SourceItem(0, "a", "c", data=b"x" * 10_000))  # logs stay readable


# ---- sources ----------------------------------------------------------------------------------

PNG = encode(Image.new("RGB", (8, 8), "red"))
RECORDS = [("cat", "a cat"), ("dog", "  a dog \n"), ("owl", None), ("sub/fox", "a fox")]  # fox in a subfolder


def write_folder(root: Path) -> Path:
    for key, caption in RECORDS:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / f"{key}.png").write_bytes(PNG)
        if caption is not None:
            (root / f"{key}.txt").write_text(caption)
    (root / "ghost.TXT").write_text("no image")  # extension case is ignored
    (root / "empty.JPG").write_bytes(PNG)
    (root / "empty.txt").write_text(" \t\n")
    (root / "notes.md").write_text("ignored")
    (root / ".hidden.png").write_bytes(PNG)
    return root


def test_folder_with_txt_captions(tmp_path: Path) -> None:
    source = open_source(str(write_folder(tmp_path)))
    assert source.format == "folder" and source.location == str(tmp_path)
    items = list(source)
    assert [i.position for i in items] == list(range(len(items)))
    got = {i.id: (i.caption, i.path is not None) for i in items}
    assert got == {
        "cat": ("a cat", True),
        "dog": ("a dog", True),
        "empty": ("", True),
        "ghost": ("no image", False),
        "owl": (None, True),
        "sub/fox": ("a fox", True),
    }
    assert [i.id for i in items] == ["cat", "dog", "empty", "ghost", "owl", "sub/fox"]
    assert items[0].read() == PNG


def test_folder_same_stem_images_keep_unique_ids(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "a.jpg").write_bytes(PNG)
    (tmp_path / "a.txt").write_text("shared")
    assert [(i.id, i.caption) for i in open_source(str(tmp_path))] == [("a.jpg", "shared"), ("a.png", "shared")]


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_imagefolder_metadata(tmp_path: Path, kind: str) -> None:
    pairs = [("b.png", " b "), ("sub/a.png", "a"), ("gone.png", "c")]
    rows = [{"file_name": name, "text": text} for name, text in pairs]
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "sub/a.png", "unlisted.png"):
        (tmp_path / name).write_bytes(PNG)
    if kind == "jsonl":
        (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    elif kind == "csv":
        lines = [f"{r['file_name']},{r['text']}\n" for r in rows]
        (tmp_path / "metadata.csv").write_text("file_name,text\n" + "".join(lines))
    else:
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "metadata.parquet")
    items = list(open_source(str(tmp_path)))
    assert [(i.position, i.id, i.caption) for i in items] == [(0, "b", "b"), (1, "sub/a", "a"), (2, "gone", "c")]
    assert items[1].read() == PNG
    with pytest.raises(RejectedInput, match="missing_image"):
        items[2].read()
    with pytest.raises(SDiTError, match=r"no column 'caption'.*file_name, text"):
        open_source(str(tmp_path), caption_column="caption")


def hf_rows(n: int) -> list[dict[str, object]]:
    return [{"image": {"bytes": PNG, "path": f"{i}.png"}, "text": f" caption {i} ", "key": f"k{i}"} for i in range(n)]


def test_parquet_hf_layout(tmp_path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(hf_rows(3)), tmp_path / "train.parquet")
    source = open_source(str(tmp_path / "train.parquet"))
    items = list(source)
    assert source.format == "parquet"
    expected = [(p, f"train.parquet:{p}", f"caption {p}") for p in range(3)]
    assert [(i.position, i.id, i.caption) for i in items] == expected
    assert all(i.read() == PNG and i.path == f"{i.position}.png" for i in items)
    assert [i.id for i in open_source(str(tmp_path), id_column="key")] == ["k0", "k1", "k2"]


def test_parquet_custom_columns_binary_and_by_reference(tmp_path: Path) -> None:
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "x.png").write_bytes(PNG)
    table = pa.table({
        "jpg": pa.array([{"bytes": None, "path": "pics/x.png"}, {"bytes": PNG, "path": None}]),
        "prompt": ["x", None],
    })
    pq.write_table(table, tmp_path / "a.parquet")
    pq.write_table(pa.table({"jpg": pa.array([PNG], pa.binary()), "prompt": ["raw"]}), tmp_path / "b.parquet")
    items = list(open_source(str(tmp_path / "*.parquet"), image_column="jpg", caption_column="prompt"))
    assert [(i.id, i.caption) for i in items] == [("a.parquet:0", "x"), ("a.parquet:1", None), ("b.parquet:0", "raw")]
    assert [i.read() for i in items] == [PNG] * 3


def test_parquet_images_read_apart_from_ids_and_captions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without images, items name their image's file, column and row, and the image column is never read;
    parquet_images reads those of many items with one read of each row group that holds some."""
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "x.png").write_bytes(PNG)
    rows = hf_rows(7) + [{"image": {"bytes": None, "path": "pics/x.png"}, "text": "by reference", "key": "r"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet", row_group_size=3)
    source = open_source(str(tmp_path / "a.parquet"))
    with_images = list(source)
    source.images = False
    columns: list[object] = []
    original = pq.ParquetFile.iter_batches
    monkeypatch.setattr(pq.ParquetFile, "iter_batches",
                        lambda self, **kw: columns.append(kw["columns"]) or original(self, **kw))
    items = list(source)
    assert columns == [["text"]] and all(i.data is None and i.path is None for i in items)
    assert [(i.position, i.id, i.caption) for i in items] == [(i.position, i.id, i.caption) for i in with_images]
    groups: list[int] = []
    read_group = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, g, **kw: groups.append(g) or read_group(self, g, **kw))
    wanted = [items[i] for i in (0, 2, 4, 7)]
    filled = parquet_images(wanted)
    assert sorted(groups) == [0, 1, 2]  # rows 0 and 2 share a row group: read once
    assert [(i.read(), i.image_at) for i in filled] == [(PNG, None)] * 4
    assert filled[-1].path == str(tmp_path / "pics" / "x.png")
    assert items[5].read() == PNG  # one item alone reads its own


@pytest.mark.parametrize(
    "options, message",
    [
        ({"caption_column": "caption"}, r"no column 'caption' in .*train.parquet \(columns: image, text, key\); "
                                        "choose one with --caption-column"),
        ({"image_column": "img"}, r"no column 'img'.*columns: image, text, key"),
        ({"id_column": "uid"}, r"no column 'uid'"),
        ({"image_column": "text"}, r"column 'text' .* is string, not image bytes"),
    ],
)
def test_parquet_column_errors(tmp_path: Path, options: dict[str, str], message: str) -> None:
    pq.write_table(pa.Table.from_pylist(hf_rows(1)), tmp_path / "train.parquet")
    with pytest.raises(SDiTError, match=message):
        open_source(str(tmp_path / "train.parquet"), **options)


def test_parquet_streams_in_bounded_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read_table; iter_from skips whole row groups from the footer and reads only what it yields."""
    pq.write_table(pa.Table.from_pylist(hf_rows(200)), tmp_path / "big.parquet", row_group_size=20)
    calls: list[dict[str, object]] = []
    original = pq.ParquetFile.iter_batches

    def spy(self: pq.ParquetFile, **kwargs: object):  # type: ignore[no-untyped-def]
        calls.append(kwargs)
        for batch in original(self, **kwargs):
            assert batch.num_rows <= 64
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read_table loads the whole file"))
    stream = iter(open_source(str(tmp_path / "big.parquet")))
    assert next(stream).position == 0
    items = list(open_source(str(tmp_path / "big.parquet")).iter_from(185))
    assert [i.position for i in items] == list(range(185, 200))
    assert calls[-1]["row_groups"] == [9] and set(calls[-1]["columns"]) == {"image", "text"}  # type: ignore[arg-type]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, start: int, n: int, captions: str = "txt") -> None:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        for i in range(start, start + n):
            key = f"{i:06d}"
            add_member(tar, f"{key}.jpg", PNG)
            if captions == "txt":
                add_member(tar, f"{key}.txt", f" tar {i} ".encode())
            else:
                meta = {"caption": f"cap {i}", "text": f"text {i}", "alt": f"alt {i}"}
                add_member(tar, f"{key}.json", json.dumps(meta).encode())
            add_member(tar, f"{key}.cls", b"3")  # other members are skipped


def test_webdataset_txt_and_gz_shards(tmp_path: Path) -> None:
    write_shard(tmp_path / "00000.tar", 0, 3)
    write_shard(tmp_path / "00001.tar.gz", 3, 2)
    with tarfile.open(tmp_path / "00002.tar", "w") as tar:
        add_member(tar, "./000005.txt", b"caption without image")
        add_member(tar, "000006.webp", PNG)
    source = open_source(str(tmp_path))
    items = list(source)
    assert source.format == "webdataset"
    assert [(i.position, i.id, i.caption) for i in items[:5]] == [(p, f"{p:06d}", f"tar {p}") for p in range(5)]
    assert all(i.read() == PNG for i in items[:5])
    assert (items[5].id, items[5].caption, items[5].data) == ("000005", "caption without image", None)
    assert (items[6].id, items[6].caption, items[6].data) == ("000006", None, PNG)
    assert [i.id for i in open_source(str(tmp_path / "00001.tar.gz"))] == ["000003", "000004"]


@pytest.mark.parametrize("caption_key, expected", [(None, "cap 1"), ("alt", "alt 1"), ("missing", None)])
def test_webdataset_json_captions(tmp_path: Path, caption_key: str | None, expected: str | None) -> None:
    write_shard(tmp_path / "s.tar", 0, 2, captions="json")
    assert list(open_source(str(tmp_path / "s.tar"), caption_key=caption_key))[1].caption == expected


@pytest.mark.parametrize("cut", [0.5, 0.5 + 100 / 163840, 0.5 + 600 / 163840], ids=["on_block", "in_header", "in_data"])
@pytest.mark.parametrize("name", ["s.tar", "s.tar.gz"])
def test_webdataset_cut_shard_fails_in_one_line(tmp_path: Path, name: str, cut: float) -> None:
    """tarfile alone reads a shard cut at a header as a shorter, valid archive: records would vanish."""
    write_shard(tmp_path / name, 0, 50)  # 163840 bytes uncompressed
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(SDiTError, match=f"{name} is not a readable tar shard") as info:
        list(open_source(str(tmp_path / name)))
    assert "\n" not in str(info.value)


def make_each_format(root: Path) -> dict[str, Path]:
    (root / "folder").mkdir()
    write_folder(root / "folder")
    (root / "pq").mkdir()
    for name, rows in (("a", 7), ("b", 5)):
        pq.write_table(pa.Table.from_pylist(hf_rows(rows)), root / "pq" / f"{name}.parquet", row_group_size=3)
    (root / "tar").mkdir()
    write_shard(root / "tar" / "a.tar", 0, 4)
    write_shard(root / "tar" / "b.tar.gz", 4, 3, captions="json")
    meta = root / "meta"
    meta.mkdir()
    rows = [json.dumps({"file_name": f"{i}.png", "text": str(i)}) + "\n" for i in range(5)]
    (meta / "metadata.jsonl").write_text("".join(rows))
    return {"folder": root / "folder", "parquet": root / "pq", "webdataset": root / "tar" / "*", "metadata": meta}


def test_iter_from_matches_slicing_for_every_format(tmp_path: Path) -> None:
    for kind, location in make_each_format(tmp_path).items():
        source = open_source(str(location))
        everything = list(source)
        assert [i.position for i in everything] == list(range(len(everything))), kind
        for start in range(len(everything) + 2):
            assert list(source.iter_from(start)) == everything[start:], (kind, start)
        assert list(source) == everything, kind  # stable across runs


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "nope"), "does not exist"),
        (lambda p: str(p / "nope*.parquet"), "no files match"),
        (lambda p: (p / "x.zip").write_bytes(b"PK") and str(p / "x.zip"), r"cannot tell the format .*\.zip"),
        (lambda p: str(p), "has no images, .parquet or .tar files"),
        (lambda p: (p / "bad.parquet").write_bytes(b"junk") and str(p / "bad.parquet"), "not a readable Parquet file"),
        (lambda p: [(p / f"metadata.{e}").write_text("{}") for e in ("csv", "jsonl")] and str(p), "several metadata"),
    ],
    ids=["missing", "glob_no_match", "unknown_suffix", "empty_folder", "bad_parquet", "two_metadata"],
)
def test_open_source_errors_are_one_line(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SDiTError, match=message) as info:
        open_source(make(tmp_path))
    assert "\n" not in str(info.value)


# ---- the bundled sample set -------------------------------------------------------------------


def outcome(item: SourceItem) -> str:
    """What the encode pipeline decides for a record: accepted or the reject reason."""
    try:
        load_image(item.read(), 32)
    except RejectedInput as e:
        return e.reason
    if item.caption is None:
        return "missing_caption"
    return "empty_caption" if not item.caption else "accepted"


def test_bundled_samples_split() -> None:
    expected_rejects = {
        "zero_byte": "unreadable_image",
        "truncated": "unreadable_image",
        "orphan_caption": "missing_image",
        "empty_caption": "empty_caption",
        "no_caption": "missing_caption",
    }
    got = {item.id: outcome(item) for item in open_source(str(SAMPLES))}
    assert {k: v for k, v in got.items() if v != "accepted"} == expected_rejects
    assert len(got) - len(expected_rejects) == 11 and "nested/cyan_circle" in got
    readme = (SAMPLES / "README.md").read_text()
    assert all(f"`{reason}`" in readme for reason in expected_rejects.values())


@pytest.mark.parametrize(
    "name, mode, background",
    [
        ("red_circle.jpg", "RGB", 255),
        ("blue_square.png", "RGB", 255),
        ("gray_triangle.png", "L", 230),
        ("green_star_palette.png", "P", 255),
        ("yellow_circle_rgba.png", "RGBA", 255),
        ("magenta_square_cmyk.jpg", "CMYK", 255),
        ("gray_circle_16bit.png", "I;16", 255),
        ("orange_triangle.webp", "RGB", 255),
        ("purple_rectangle_wide.png", "RGB", 255),
        ("green_triangle_exif.jpg", "RGB", 255),
        ("nested/cyan_circle.png", "RGB", 255),
    ],
)
def test_bundled_samples_cover_the_modes(name: str, mode: str, background: int) -> None:
    """Each good sample is stored in the mode it claims, and its background decodes as drawn."""
    data = (SAMPLES / name).read_bytes()
    assert Image.open(io.BytesIO(data)).mode == mode
    centre, corner = centre_and_corner(load_image(data, 64))
    np.testing.assert_allclose(corner, background / 127.5 - 1, atol=0.02)
    if mode == "I;16":
        np.testing.assert_allclose(centre, 0.0, atol=0.01)  # 32768 of 65535


def test_num_items_where_cheap(tmp_path):
    """Folder and parquet sources know their size without reading images (the progress bar's ETA);
    tar shards would have to be read through, so they say None."""
    from conftest import SAMPLES

    folder = open_source(str(SAMPLES))
    assert folder.num_items() == len(list(folder))
    table = pa.table({"image": [{"bytes": b"x", "path": "a"}] * 5, "text": ["c"] * 5})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)
    assert open_source(str(tmp_path / "a.parquet")).num_items() == 5
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        info = tarfile.TarInfo("k.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"c"))
    assert open_source(str(tmp_path / "s.tar")).num_items() is None


def test_parquet_and_tar_on_a_url_and_brace_lists_read_as_local_files(tmp_path):
    """Object storage through fsspec (memory:// here; s3:// in test_object_storage.py): the same items as the
    local files, by folder, glob, brace list or file; a folder of images there is refused in one line."""
    import fsspec

    formats = make_each_format(tmp_path)
    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "pq"), "/data/pq", recursive=True)
    fs.put(str(tmp_path / "tar"), "/data/tar", recursive=True)
    fs.put(str(tmp_path / "folder"), "/data/folder", recursive=True)
    try:
        local = {kind: [outcome(i) for i in open_source(str(formats[kind]))] for kind in ("parquet", "webdataset")}
        for kind, url in (("parquet", "memory://data/pq"), ("parquet", "memory://data/pq/*.parquet"),
                          ("parquet", "memory://data/pq/{a,b}.parquet"), ("webdataset", "memory://data/tar"),
                          ("webdataset", "memory://data/tar/{a.tar,b.tar.gz}")):
            source = open_source(url)
            assert source.format == kind and [outcome(i) for i in source] == local[kind], url
            assert [outcome(i) for i in source.iter_from(3)] == local[kind][3:], url
        ids = [i.id for i in open_source("memory://data/pq")]
        assert ids == [i.id for i in open_source(str(formats["parquet"]))]  # "a.parquet:0", ...
        braces = open_source(str(tmp_path / "tar" / "{a.tar,b.tar.gz}"))
        assert [outcome(i) for i in braces] == local["webdataset"]
        with pytest.raises(SDiTError, match="Parquet or webdataset tar shards"):
            open_source("memory://data/folder")
        with pytest.raises(SDiTError, match="does not exist"):
            open_source("memory://data/nothing")
    finally:
        fs.rm("/data", recursive=True)
