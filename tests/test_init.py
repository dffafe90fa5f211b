"""The init stage: a fresh student, seeded, sized from the teacher's configs or the store, beside the teacher's
VAE and text encoder."""

import pytest
import torch

from conftest import new_run
from pipeline.init import init_for_store, teacher_latent_space
from sdit.errors import SDiTError
from sdit.run import load_student, read_run


@pytest.fixture(scope="module")
def run(tiny_teacher, tmp_path_factory):
    return new_run(tmp_path_factory.mktemp("init") / "run", tiny_teacher, "SDiT-Nano/2", seed=3)


def test_the_same_seed_gives_the_same_student(run, tiny_teacher, tmp_path):
    again = load_student(new_run(tmp_path / "again", tiny_teacher, "SDiT-Nano/2", seed=3))
    other = load_student(new_run(tmp_path / "other", tiny_teacher, "SDiT-Nano/2", seed=4))
    first = load_student(run)
    same = [torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values())]
    differ = [torch.equal(a, b) for a, b in zip(first.state_dict().values(), other.state_dict().values())]
    assert all(same) and not all(differ)


def test_single_file_teachers_take_their_shapes_from_the_config_folder(tiny_single_file, tmp_path):
    space = teacher_latent_space(tiny_single_file, tiny_single_file.parent)
    assert (space.sample_size, space.in_channels, space.text_dim) == (8, 4, 32)
    sd15 = teacher_latent_space(tmp_path / "v1-5-pruned.ckpt")  # configs only: SD 1.5's shipped ones
    assert (sd15.sample_size, sd15.in_channels, sd15.text_dim) == (64, 4, 768)
    run = new_run(tmp_path / "run", tiny_single_file, "SDiT-Nano/2", teacher_config=tiny_single_file.parent)
    assert read_run(run)["teacher"]["layout"] == "single_file"


def test_a_student_for_a_store_takes_the_stores_shapes(labelled_store, tiny_teacher, tmp_path):
    summary = init_for_store(str(labelled_store), "default", str(tmp_path / "run"), "SDiT-Nano/2", seed=1)
    student = load_student(summary.run)
    assert (student.config.sample_size, student.config.in_channels, student.config.text_dim) == (8, 4, 32)
    assert not student.config.guidance_embed
    assert read_run(summary.run)["student"] == {"preset": "SDiT-Nano/2", "seed": 1}
    assert "SDiT-Nano/2" in summary.line() and "latents 4x8x8, text width 32" in summary.line()


def test_unknown_presets_are_refused(tiny_teacher, tmp_path):
    with pytest.raises(SDiTError, match="unknown student preset"):
        new_run(tmp_path / "x", tiny_teacher, "SDiT-Q/2")
