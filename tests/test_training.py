"""sdit.training: checkpoints (a round trip, and one-line refusals of files that do not read) and the learning-rate
schedule."""

import json

import pytest
import torch

from sdit.errors import SDiTError
from sdit.training import OPTIMIZER, STATE, load_checkpoint, lr_factor, restore_cuda_rng, save_checkpoint


def _parts(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_a_checkpoint_round_trips(tmp_path):
    model, optimizer = _parts(0)
    folder = save_checkpoint(tmp_path / "step-1", {"model": model}, optimizer, {"step": 1})
    other, other_optimizer = _parts(1)
    assert load_checkpoint(folder, {"model": other}, other_optimizer) == {"step": 1, "reset": []}
    assert torch.equal(other.weight, model.weight)
    assert other_optimizer.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


@pytest.mark.parametrize("saved, here, restored, note", [
    (2, 0, [], "the random state of 2 of the checkpoint's 2 CUDA devices was not restored: 0 here"),
    (4, 2, [0, 1], "the random state of 2 of the checkpoint's 4 CUDA devices was not restored: 2 here"),
    (2, 4, [0, 1], "CUDA devices 2 to 3 start from a fresh random state: the checkpoint saved 2"),
    (2, 2, [0, 1], None),
])
def test_a_resume_on_another_number_of_gpus_restores_what_fits_and_says_what_it_reset(
        tmp_path, monkeypatch, saved, here, restored, note):
    model, optimizer = _parts(0)
    folder = save_checkpoint(tmp_path / "step-1", {"model": model}, optimizer, {"step": 1})
    extra = torch.load(folder / OPTIMIZER, weights_only=True)
    states = [torch.full((16,), device, dtype=torch.uint8) for device in range(saved)]  # one marked state a device
    torch.save(extra | {"cuda_rng": states}, folder / OPTIMIZER)
    set_on = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: here > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: here)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: set_on.append((int(state[0]), device)))
    reset = load_checkpoint(folder, {"model": model}, optimizer)["reset"]
    assert set_on == [(device, device) for device in restored]  # each device gets its own saved state
    assert reset == ([note] if note else [])


@pytest.mark.parametrize("file, damage, message", [
    (OPTIMIZER, lambda b: b[:len(b) // 2], "optimizer.pt: not a checkpoint's optimiser state, or a damaged one"),
    (OPTIMIZER, lambda b: b"x" * 100, "optimizer.pt: not a checkpoint's optimiser state, or a damaged one"),
    (STATE, lambda b: b[:5], "state.json: the checkpoint's state does not read"),
    ("model.safetensors", lambda b: b[:len(b) // 2], "model.safetensors: the checkpoint's model weights do not load"),
])
def test_a_damaged_checkpoint_is_refused_in_one_line_naming_the_file(tmp_path, file, damage, message):
    model, optimizer = _parts(0)
    folder = save_checkpoint(tmp_path / "step-1", {"model": model}, optimizer, {"step": 1})
    (folder / file).write_bytes(damage((folder / file).read_bytes()))
    other, other_optimizer = _parts(1)
    before = other.weight.detach().clone()
    with pytest.raises(SDiTError, match=message) as err:
        load_checkpoint(folder, {"model": other}, other_optimizer)
    assert "\n" not in str(err.value) and "weights_only" not in str(err.value)
    if file != "model.safetensors":
        assert torch.equal(other.weight, before)  # refused before anything was restored


def test_an_optimizer_file_of_another_shape_is_refused(tmp_path):
    model, optimizer = _parts(0)
    folder = save_checkpoint(tmp_path / "step-1", {"model": model}, optimizer, {"step": 1})
    torch.save({"something": torch.zeros(1)}, folder / OPTIMIZER)
    (folder / STATE).write_text(json.dumps({"step": 1}))
    with pytest.raises(SDiTError, match="not a checkpoint's optimiser state"):
        load_checkpoint(folder, {"model": model}, optimizer)


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    # after the 4 warm-up steps the decay runs over the remaining 6, reaching 0 after the last (step 10)
    ("linear", [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]),
    ("cosine", [0.25, 0.5, 0.75, 1.0, 1.0, 0.9330127, 0.75, 0.5, 0.25, 0.0669873]),
])
def test_the_learning_rate_warms_up_then_follows_its_schedule(schedule, expected):
    assert [lr_factor(step, 4, 10, schedule) for step in range(4, 10)] == pytest.approx(expected[4:], abs=1e-6)
    assert [lr_factor(step, 4, 10, schedule) for step in range(4)] == pytest.approx(expected[:4])
    assert lr_factor(12, 4, 10, schedule) == (1.0 if schedule == "constant" else 0.0)  # past the end


@pytest.mark.parametrize("saved, here, restored, note", [
    (2, 2, [0, 1], None),
    (2, 1, [0], "the random state of 1 of the checkpoint's 2 CUDA devices was not restored: 1 here"),
    (1, 2, [0], "CUDA devices 1 to 1 start from a fresh random state: the checkpoint saved 1"),
    (0, 2, [], "CUDA devices 0 to 1 start from a fresh random state: the checkpoint saved none (it was trained "
               "without CUDA)"),
    (0, 0, [], None),
])
def test_cuda_random_states_restore_what_fits_and_say_what_did_not(monkeypatch, saved, here, restored, note):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: here > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: here)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.append(device))
    notes = restore_cuda_rng([torch.zeros(8, dtype=torch.uint8)] * saved)
    assert calls == restored and notes == ([note] if note else [])
