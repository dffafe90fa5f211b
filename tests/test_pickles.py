"""PyTorch pickles read as data: refused or damaged files give one short line that never suggests
weights_only=False."""

import io
import pickle

import pytest
import torch

from sdit.errors import SDiTError
from sdit.pickles import load_pickle


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this runs `open(marker, "w")`
        return (open, (str(self.marker), "w"))


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_tensors_load(tmp_path):
    path = tmp_path / "ok.ckpt"
    path.write_bytes(_saved({"w": torch.arange(3.0)}))
    assert torch.equal(load_pickle(path)["w"], torch.arange(3.0))


def test_a_pickle_that_would_run_code_is_refused_and_named(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "evil.ckpt"
    path.write_bytes(_saved({"w": torch.zeros(1), "payload": _Payload(marker)}))
    with pytest.raises(SDiTError, match=r"refused: the pickle would run code .* \(.*open\)") as err:
        load_pickle(path)
    assert not marker.exists() and "weights_only" not in str(err.value)


good = _saved({"w": torch.zeros(64)})
start = good.index(b"\x80\x02")  # the pickle's first opcode, inside the zip file torch.save writes


@pytest.mark.parametrize("content", [
    good[:len(good) // 2],  # cut short
    good[:start + 2] + bytes([good[start + 2] ^ 0xFF]) + good[start + 3:],  # one flipped byte in the pickle
    b"",
    b"hello world",
    bytes(range(256)) * 4,
    pickle.dumps({"w": 1}, protocol=4),  # a plain pickle, not torch.save's
])
def test_damaged_or_foreign_files_give_one_short_line(tmp_path, content):
    path = tmp_path / "m.ckpt"
    path.write_bytes(content)
    with pytest.raises(SDiTError) as err:
        load_pickle(path)
    message = str(err.value)
    assert message.startswith(f"{path}: not a PyTorch checkpoint, or a damaged one (")
    assert "\n" not in message and "weights_only" not in message and len(message) < len(str(path)) + 160
