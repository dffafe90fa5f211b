import json

import pytest
import torch
from diffusers import AutoencoderKL

from conftest import new_run
from sdit.dit import SDiT
from sdit.errors import SDiTError
from sdit.run import load_student, read_run, save_student, update_run


@pytest.fixture(scope="module")
def run(tiny_teacher, tmp_path_factory):
    return new_run(tmp_path_factory.mktemp("init") / "run", tiny_teacher, "SDiT-Nano/2", seed=3)


def test_an_initial_run_is_a_pipeline_folder_with_the_teachers_parts(run, tiny_teacher):
    index = json.loads((run / "model_index.json").read_text())
    assert index["_class_name"] == "SDiTPipeline" and index["transformer"] == ["sdit", "SDiT"]
    assert sorted(k for k in index if not k.startswith("_")) == ["scheduler", "text_encoder", "tokenizer",
                                                                 "transformer", "vae"]
    student = load_student(run)
    assert (student.config.sample_size, student.config.in_channels, student.config.text_dim) == (8, 4, 32)
    vae = AutoencoderKL.from_pretrained(run / "vae")
    teacher_vae = AutoencoderKL.from_pretrained(tiny_teacher / "vae")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), teacher_vae.state_dict().values()))
    assert not (run / "unet").exists()
    meta = read_run(run)
    assert meta["student"] == {"preset": "SDiT-Nano/2", "seed": 3} and set(meta["teacher"]["hashes"]) == {
        "vae", "text_encoder"}


def test_saving_the_student_replaces_it_whole(run, tmp_path):
    student = load_student(run)
    with torch.no_grad():
        student.final_layer.linear.bias.fill_(0.5)
    save_student(run, student)
    assert torch.equal(load_student(run).final_layer.linear.bias, student.final_layer.linear.bias)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    update_run(run, note={"a": 1})
    assert read_run(run)["note"] == {"a": 1} and read_run(run)["student"]["preset"] == "SDiT-Nano/2"
    assert isinstance(load_student(run), SDiT)


def test_bad_folders_are_refused_in_one_line(run, tiny_teacher, tmp_path):
    with pytest.raises(SDiTError, match="not an SDiT run folder"):
        read_run(tmp_path)
    with pytest.raises(SDiTError, match="not empty"):
        new_run(run, tiny_teacher, "SDiT-Nano/2")
