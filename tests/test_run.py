import ast
import json
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from conftest import REPO, new_run
from pipeline.config import SampleConfig
from sdit.dit import SDiT
from sdit.errors import SDiTError
from sdit.pipeline_sdit import relative_imports
from sdit.run import load_student, read_run, save_student, update_run
from sdit.sampling import SCHEDULERS


@pytest.fixture(scope="module")
def run(tiny_teacher, tmp_path_factory):
    return new_run(tmp_path_factory.mktemp("init") / "run", tiny_teacher, "SDiT-Nano/2", seed=3)


def test_an_initial_run_is_a_pipeline_folder_with_the_teachers_parts(run, tiny_teacher):
    index = json.loads((run / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_sdit", "SDiTPipeline"] and index["transformer"] == ["modeling_sdit",
                                                                                                 "SDiT"]
    assert sorted(k for k in index if not k.startswith("_")) == ["scheduler", "text_encoder", "tokenizer",
                                                                 "transformer", "vae"]
    student = load_student(run)
    assert (student.config.sample_size, student.config.in_channels, student.config.text_dim) == (8, 4, 32)
    vae = AutoencoderKL.from_pretrained(run / "vae")
    teacher_vae = AutoencoderKL.from_pretrained(tiny_teacher / "vae")
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), teacher_vae.state_dict().values()))
    assert not (run / "unet").exists()
    # The sampler `sdit sample` uses by default, on the teacher's noise schedule.
    assert index["scheduler"] == ["diffusers", SCHEDULERS[SampleConfig.scheduler]]
    scheduler = json.loads((run / "scheduler" / "scheduler_config.json").read_text())
    teacher = json.loads((tiny_teacher / "scheduler" / "scheduler_config.json").read_text())
    assert all(scheduler[k] == v for k, v in teacher.items() if not k.startswith("_"))
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
    assert (run / "transformer" / "modeling_sdit.py").read_text() == (REPO / "sdit" / "dit.py").read_text()


def test_bad_folders_are_refused_in_one_line(run, tiny_teacher, tmp_path):
    with pytest.raises(SDiTError, match="not an SDiT run folder"):
        read_run(tmp_path)
    with pytest.raises(SDiTError, match="not empty"):
        new_run(run, tiny_teacher, "SDiT-Nano/2")


# The standard library's modules and these are all the folder's code may import, besides its own modules.
LOADING_ENVIRONMENT = {"torch", "diffusers", "transformers", "numpy", "PIL"}


@pytest.mark.parametrize("entry, source", [("pipeline_sdit.py", "pipeline_sdit.py"),
                                           ("transformer/modeling_sdit.py", "dit.py")])
def test_the_folder_carries_code_that_needs_no_sdit(run, entry, source):
    """What diffusers runs with trust_remote_code: the entry file, a copy of sdit's, and the modules it imports;
    diffusers copies only those the entry imports itself, so they import nothing else of sdit."""
    entry = run / entry
    carried = {entry.stem: source} | {name: f"{name}.py" for name in relative_imports(entry)}
    for name, source in carried.items():
        module = entry.with_name(f"{name}.py")
        assert module.read_text() == (REPO / "sdit" / source).read_text()
        assert set(relative_imports(module)) <= set(carried), f"{name}.py imports what diffusers does not copy"
        tree = ast.parse(module.read_text())
        absolute = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        absolute |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.level == 0}
        assert absolute <= LOADING_ENVIRONMENT | set(sys.stdlib_module_names), f"{name}.py imports {absolute}"


LOAD_WITHOUT_SDIT = """
import sys
import numpy as np
import torch
from diffusers import DiffusionPipeline
try:
    import sdit
    sys.exit("sdit is importable here")
except ImportError:
    pass


def sample(folder):
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", generator=torch.Generator().manual_seed(3), num_inference_steps=2,
                  output_type="np").images
    return pipe, images[0]


run, saved, resaved, out = sys.argv[1:]
pipe, image = sample(run)
pipe.save_pretrained(resaved)  # saved again where sdit is not installed
np.save(out, np.stack([image, sample(saved)[1], sample(resaved)[1]]))
print(type(pipe).__module__, type(pipe.transformer).__module__, type(pipe.scheduler).__name__)
"""


@pytest.mark.slow
def test_a_run_folder_loads_with_diffusers_where_sdit_is_not_installed(tiny_teacher, tmp_path):
    """A virtual environment with torch, diffusers and transformers (this one's packages, without the editable
    install of sdit, whose .pth file is not read there) samples the folder as sdit does, from the same seed; so it
    does a folder the pipeline's save_pretrained wrote, here or there."""
    from sdit.pipeline_sdit import SDiTPipeline
    from test_pipeline_sdit import assert_same_image, make_run

    run = make_run(tmp_path / "run", tiny_teacher)
    pipe = SDiTPipeline.from_pretrained(run)
    pipe.save_pretrained(tmp_path / "saved")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {"PATH": os.environ["PATH"], "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", LOAD_WITHOUT_SDIT, str(run),
                           str(tmp_path / "saved"), str(tmp_path / "resaved"), str(tmp_path / "images.npy")],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    pipeline_module, model_module, scheduler = done.stdout.split()
    assert pipeline_module.startswith("diffusers_modules") and model_module.startswith("diffusers_modules")
    assert scheduler == SCHEDULERS[SampleConfig.scheduler]
    pipe.set_progress_bar_config(disable=True)
    ours = pipe("a red circle", generator=torch.Generator().manual_seed(3), num_inference_steps=2,
                output_type="np").images
    for image in np.load(tmp_path / "images.npy"):  # the run folder, saved here, saved there
        assert_same_image(image, ours[0])
    carried = (tmp_path / "resaved" / "transformer" / "modeling_sdit.py").read_text()
    assert carried == (REPO / "sdit" / "dit.py").read_text()
