import json
import shutil

import numpy as np
import pytest
import torch

from conftest import ALL_KINDS
from sdit.errors import SDiTError
from sdit.labels import teacher_inputs
from sdit.loader import Batch, Block, DrawStream, LabelledStore, Position, Split


@pytest.fixture(scope="module")
def data(labelled_store) -> LabelledStore:
    return LabelledStore(str(labelled_store))


@pytest.fixture(scope="module")
def synthetic_data(labelled_store, tiny_teacher, tmp_path_factory) -> LabelledStore:
    """A copy of `labelled_store` also labelled with synthetic records: 3 prompts x 2 teacher samples, 4 draws
    each of every kind."""
    from pipeline.label import LabelConfig, label
    from sdit.config import SynthesisConfig
    from sdit.perturb import PerturbConfig

    store = shutil.copytree(labelled_store, tmp_path_factory.mktemp("synthetic") / "store")
    label(LabelConfig(store=str(store), teacher=str(tiny_teacher), name="synth", draws=4,
                      perturb=PerturbConfig(mix=ALL_KINDS, caption_min_t=0),
                      synthesis=SynthesisConfig(samples=2, steps=3)))
    return LabelledStore(str(store), "synth")


def _ids(batch: Batch) -> list[bytes]:
    """A draw's identity: its timestep and true noise (unique per draw)."""
    return [bytes(t.numpy().tobytes()) + n.numpy().tobytes() for t, n in zip(batch.timesteps, batch.noise)]


def _take(stream, n: int, start: Position = Position()) -> list[Batch]:
    out = []
    for batch in stream.batches(start):
        out.append(batch)
        if len(out) == n:
            return out


def _rebuilt_from_whole_shards(data: LabelledStore) -> dict[str, torch.Tensor]:
    """Every valid draw's teacher input and targets, rebuilt shard by shard (records, then synthetic)."""
    out = {"x_t": [], "text": [], "noise": [], "eps_teacher": [], "synthetic": []}
    shards = [Block(shard, 0, n, False) for shard, n in data.counts.items()] + \
        [Block(shard, 0, n, True) for shard, n in data.synthetic_counts.items()]
    for block in shards:
        records = data.store.shard_group(data.records_group(block), block.shard)
        labels = {k: v[:] for k, v in data.store.shard_group(data.labels_group(block), block.shard).arrays()}
        rows, draws = np.nonzero(labels["valid"])
        inputs = teacher_inputs(data.schedule, records["latents"][:], records["text_emb"][:], labels, rows, draws,
                                data.bank, data.null, data.input_gamma)
        out["x_t"].append(inputs.x_t)
        out["text"].append(inputs.text)
        out["noise"].append(torch.as_tensor(labels["noise"][rows, draws]))
        out["eps_teacher"].append(torch.as_tensor(labels["eps_teacher"][rows, draws]))
        out["synthetic"].append(torch.full((len(rows),), block.synthetic))
    return {k: torch.cat(v) for k, v in out.items()}


def test_inputs_equal_the_teachers_rebuilt_from_whole_shards(data, synthetic_data):
    """Blocks re-index the `xi` side table; what comes out must still be exactly the teacher's input, for real
    records and for synthetic ones."""
    for labelled, total in ((data, 44), (synthetic_data, 44 + 6 * 4)):
        stream = DrawStream(labelled, 7, shuffle=False, repeat=False)
        got = Batch.cat(list(stream), Position())
        want = _rebuilt_from_whole_shards(labelled)
        assert len(got) == stream.total == total
        for name, values in want.items():
            assert torch.equal(getattr(got, name), values), name
        assert set(got.kind.tolist()) == {0, 1, 2, 3, 4}
    assert set(got.kind[got.synthetic].tolist()) == {0, 1, 2, 3, 4}  # every kind on synthetic records too
    assert got.synthetic.sum() == 24


def _by_draw(batches: list[Batch]) -> dict[bytes, tuple[float, torch.Tensor]]:
    return {i: (float(w), eps) for b in batches for i, w, eps in zip(_ids(b), b.guidance, b.eps_teacher)}


def test_fresh_guidance_composes_each_target_at_a_w_drawn_anew_each_epoch(fresh_guided_store):
    data = LabelledStore(str(fresh_guided_store), "fresh")
    stored = Batch.cat(list(DrawStream(data, 4, shuffle=False, repeat=False)), Position())
    parts = {"eps_c": [], "eps_u": [], "w": []}
    for shard in data.counts:  # ε_c, ε_u and the draw's own w, as stored
        labels = {k: v[:] for k, v in data.store.shard_group(data.group, shard).arrays()}
        rows, draws = np.nonzero(labels["valid"])
        parts["eps_c"].append(labels["eps_teacher"][rows, draws].astype(np.float32))
        parts["eps_u"].append(labels["eps_uncond"][rows, draws].astype(np.float32))
        parts["w"].append(labels["guidance"][rows, draws])
    eps_c, eps_u, w = (torch.as_tensor(np.concatenate(v)) for v in parts.values())
    # evaluation (a stream read once) takes each draw at its own w
    assert torch.equal(stored.guidance, w) and len(stored) == 22
    torch.testing.assert_close(stored.eps_teacher.float(), eps_u + w.view(-1, 1, 1, 1) * (eps_c - eps_u),
                               atol=1e-2, rtol=1e-3)
    want = {i: (u, c) for i, u, c in zip(_ids(stored), eps_u, eps_c)}
    # training: each epoch every draw at a w of its own, from the labels' window, the target composed at that w
    stream = DrawStream(data, 2, seed=5, buffer_records=8)
    epochs = _take(stream, 22)
    first, second = _by_draw(epochs[:11]), _by_draw(epochs[11:])
    assert set(first) == set(second) == set(want)
    for seen in (first, second):
        for i, (w_i, eps) in seen.items():
            assert w_i == 1.0 or 2.0 <= w_i <= 6.0
            u, c = want[i]
            torch.testing.assert_close(eps.float(), u + w_i * (c - u), atol=1e-2, rtol=1e-3)
    ws = np.array([[first[i][0], second[i][0]] for i in want])
    assert 0 < (ws == 1.0).mean() < 0.6 and (ws[:, 0] != ws[:, 1]).mean() > 0.5  # drawn again, not the stored w
    assert not np.array_equal(ws[:, 0], stored.guidance.numpy())
    # ... and as deterministic as the order: the same seed or a resumed stream gives the same w
    again = _take(DrawStream(data, 2, seed=5, buffer_records=8), 22)
    assert [b.guidance.tolist() for b in again] == [b.guidance.tolist() for b in epochs]
    resumed = _take(stream, 10, epochs[11].position)
    assert [b.guidance.tolist() for b in resumed] == [b.guidance.tolist() for b in epochs[12:]]
    # training may draw w from a window of its own, the targets composed at those w
    narrow = _by_draw(_take(DrawStream(data, 2, seed=5, buffer_records=8, guidance_range=(3.0, 3.5)), 11))
    for i, (w_i, eps) in narrow.items():
        assert w_i == 1.0 or 3.0 <= w_i <= 3.5
        torch.testing.assert_close(eps.float(), want[i][0] + w_i * (want[i][1] - want[i][0]), atol=1e-2, rtol=1e-3)


def test_synthetic_records_are_never_held_out(synthetic_data):
    split = Split(holdout=0.5, seed=0)
    held = list(DrawStream(synthetic_data, 4, split=split, train=False, shuffle=False, repeat=False))
    train = list(DrawStream(synthetic_data, 4, split=split, shuffle=False, repeat=False))
    assert not any(b.synthetic.any() for b in held)
    assert sum(int(b.synthetic.sum()) for b in train) == 24


def test_an_epoch_sees_every_draw_once_in_a_seeded_order(data):
    stream = DrawStream(data, 4, seed=1, buffer_records=8)  # windows smaller than the store
    epoch = [i for b in _take(stream, 11) for i in _ids(b)]
    assert len(set(epoch)) == 44
    assert sorted(epoch) == sorted(i for b in DrawStream(data, 4, shuffle=False, repeat=False) for i in _ids(b))
    again = [i for b in _take(DrawStream(data, 4, seed=1, buffer_records=8), 11) for i in _ids(b)]
    other = [i for b in _take(DrawStream(data, 4, seed=2, buffer_records=8), 11) for i in _ids(b)]
    assert epoch == again and epoch != other


def test_a_stream_restarted_at_a_position_goes_on_exactly(data):
    stream = DrawStream(data, 6, seed=3)
    batches = _take(stream, 12)  # crosses windows and an epoch (44 draws)
    for k in (2, 7):
        resumed = _take(stream, 12 - k - 1, batches[k].position)
        assert [_ids(b) for b in resumed] == [_ids(b) for b in batches[k + 1:]]


def test_workers_share_every_epoch_and_each_reads_only_its_share(tmp_path):
    """4 workers: each takes 1/4 of every global batch from blocks no other worker reads, together every draw of
    an epoch once; each reads at most 0.3 of the blocks' bytes one worker reads for the same global batches."""
    from pipeline.bench import random_labelled_store

    url = random_labelled_store(str(tmp_path / "s"), shards=16, records=64, draws=2)  # 16 blocks, 2,048 draws
    one = DrawStream(LabelledStore(url), 32, buffer_records=256, seed=1)
    steps = one.total // 32  # an epoch
    whole = [i for b in _take(one, steps) for i in _ids(b)]
    workers = [DrawStream(LabelledStore(url), 32, buffer_records=256, seed=1, rank=r, world=4) for r in range(4)]
    shares = [_take(w, steps) for w in workers]
    assert all(len(b) == 8 for share in shares for b in share)
    drawn = [{i for b in share for i in _ids(b)} for share in shares]
    assert sum(map(len, drawn)) == len(set().union(*drawn)) == len(whole)  # disjoint
    assert set().union(*drawn) == set(whole)
    def blocks(stream):  # bytes of blocks read: captions of swaps apart (a worker's cache may hold this store whole)
        return stream.data.store.bytes_read - stream.data.bank.bytes_read

    assert all(blocks(w) <= 0.3 * blocks(one) for w in workers)
    with pytest.raises(SDiTError, match="not divisible"):
        DrawStream(one.data, 5, world=2)


def test_a_store_of_fewer_blocks_than_workers_is_shared_by_rows(data):
    epoch = {i for b in DrawStream(data, 4, shuffle=False, repeat=False) for i in _ids(b)}
    shares = [{i for b in DrawStream(data, 4, repeat=False, rank=r, world=4) for i in _ids(b)} for r in range(4)]
    assert all(shares) and sum(map(len, shares)) == len(epoch) and set().union(*shares) == epoch


def test_the_index_gives_what_reading_every_shard_gives(data, monkeypatch):
    """Counts and draws per split from the labels' index equal those read from the completion records and the
    `valid` arrays (labels made before indexes are read that way)."""
    assert data.index is not None
    split = Split(holdout=0.3, seed=0)
    indexed = [DrawStream(data, 4, split=split, train=train).total for train in (True, False)]
    monkeypatch.setattr("sdit.loader.read_index", lambda store, name: None)
    plain = LabelledStore(data.store.url)
    assert plain.counts == data.counts and plain.bank.offsets == data.bank.offsets
    assert [DrawStream(plain, 4, split=split, train=train).total for train in (True, False)] == indexed


def test_held_out_records_never_reach_training(data):
    split = Split(holdout=0.3, seed=0)
    train = {i for b in DrawStream(data, 4, split=split, shuffle=False, repeat=False) for i in _ids(b)}
    held = {i for b in DrawStream(data, 4, split=split, train=False, shuffle=False, repeat=False) for i in _ids(b)}
    assert train and held and not train & held and len(train | held) == 44
    assert len(held) % 4 == 0  # whole records: all their draws
    with pytest.raises(SDiTError, match="no training draws"):
        DrawStream(data, 4, split=Split(holdout=0.999999))


def test_stores_without_finished_labels_are_refused(labelled_store, tmp_path):
    with pytest.raises(SDiTError, match="no labels 'other'"):
        LabelledStore(str(labelled_store), "other")
    with pytest.raises(SDiTError, match="not an SDiT store"):
        LabelledStore(str(tmp_path))


def test_labels_of_another_manifest_version_are_refused_in_one_line(labelled_store, tmp_path):
    store = shutil.copytree(labelled_store, tmp_path / "store")
    manifest = store / "labels" / "default" / "manifest.json"
    meta = json.loads(manifest.read_text())
    assert meta["schema_version"] == 1  # version 2 is for labels with fresh guidance
    manifest.write_text(json.dumps(meta | {"schema_version": 3}))
    with pytest.raises(SDiTError) as err:
        LabelledStore(str(store))
    message = str(err.value)
    assert "\n" not in message and "labels manifest version 3, this SDiT reads version 2" in message


def test_prefetch_reads_ahead_in_order_raises_the_readers_error_and_stops_when_closed(data):
    import threading
    import time

    from sdit.loader import prefetch

    stream = DrawStream(data, 4, seed=5)
    expected = [_ids(b) for b in _take(stream, 6)]
    ahead = prefetch(stream.batches(Position()))
    assert [_ids(next(ahead)) for _ in range(6)] == expected
    ahead.close()
    deadline = time.monotonic() + 5
    while any(t.name == "sdit-prefetch" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the reading thread outlived its generator"
        time.sleep(0.01)

    def failing():
        yield from _take(stream, 2)
        raise SDiTError("a chunk fails its checksum")

    ahead = prefetch(failing())
    next(ahead), next(ahead)
    with pytest.raises(SDiTError, match="checksum"):
        next(ahead)
