import numpy as np
import pytest
import torch

from sdit.errors import SDiTError
from sdit.labels import teacher_inputs
from sdit.loader import Batch, DrawStream, LabelledStore, Position, Split


@pytest.fixture(scope="module")
def data(labelled_store) -> LabelledStore:
    return LabelledStore(str(labelled_store))


def _ids(batch: Batch) -> list[bytes]:
    """A draw's identity: its timestep and true noise (unique per draw)."""
    return [bytes(t.numpy().tobytes()) + n.numpy().tobytes() for t, n in zip(batch.timesteps, batch.noise)]


def _take(stream, n: int, start: Position = Position()) -> list[Batch]:
    out = []
    for batch in stream.batches(start):
        out.append(batch)
        if len(out) == n:
            return out


def test_inputs_equal_the_teachers_rebuilt_from_whole_shards(data):
    """Blocks re-index the `xi` side table; what comes out must still be exactly the teacher's input."""
    stream = DrawStream(data, 7, shuffle=False, repeat=False)
    got = Batch.cat(list(stream), Position())
    x_t, text, noise, eps = [], [], [], []
    for shard in data.counts:
        records = data.store.shard_group("records", shard)
        labels = {k: v[:] for k, v in data.store.shard_group(data.group, shard).arrays()}
        rows, draws = np.nonzero(labels["valid"])
        inputs = teacher_inputs(data.schedule, records["latents"][:], records["text_emb"][:], labels, rows, draws,
                                data.bank, data.null, data.input_gamma)
        x_t.append(inputs.x_t)
        text.append(inputs.text)
        noise.append(torch.as_tensor(labels["noise"][rows, draws]))
        eps.append(torch.as_tensor(labels["eps_teacher"][rows, draws]))
    assert len(got) == stream.total == 44
    assert torch.equal(got.x_t, torch.cat(x_t)) and torch.equal(got.text, torch.cat(text))
    assert torch.equal(got.noise, torch.cat(noise)) and torch.equal(got.eps_teacher, torch.cat(eps))
    assert set(got.kind.tolist()) == {0, 1, 2, 3, 4}


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


def test_workers_split_each_batch_between_them(data):
    whole = _take(DrawStream(data, 6, seed=0), 9)
    halves = [_take(DrawStream(data, 6, seed=0, rank=r, world=2), 9) for r in (0, 1)]
    for b, h0, h1 in zip(whole, *halves):
        assert len(h0) == len(h1) == 3
        assert sorted(_ids(h0) + _ids(h1)) == sorted(_ids(b))
    with pytest.raises(SDiTError, match="not divisible"):
        DrawStream(data, 5, world=2)


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
