"""SDiTPipeline: loading a run folder, seeds per image, schedulers by name, guidance, sizes, errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import new_run
from sdit import sampling
from sdit.errors import SDiTError
from sdit.pipeline_sdit import SDiTPipeline
from sdit.run import load_student, save_student
from sdit.sampling import SCHEDULERS

PROMPTS = ["a red circle", "a blue square on a white background", "a green star", "a yellow triangle"]


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Stand-in for trained weights: an untrained student outputs exactly 0, whatever its input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def make_run(folder, teacher, **options):
    run = new_run(folder, teacher, "SDiT-Nano/2", **options)
    student = load_student(run)
    randomize(student)
    save_student(run, student)
    return run


@pytest.fixture(scope="module")
def run(tiny_teacher, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("pipe") / "run", tiny_teacher)


@pytest.fixture(scope="module")
def pipe(run):
    pipe = SDiTPipeline.from_pretrained(run)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeds(*values):
    return [torch.Generator().manual_seed(v) for v in values]


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    """The same image up to float rounding: CPU kernels (oneDNN convolutions, small matrix products) round
    differently for different batch shapes, about 1e-6 relative, which can move a rare pixel by one level."""
    a, b = (np.round(x * 255).astype(int) for x in (a, b))
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3


def test_image_i_is_the_same_for_batch_sizes_1_and_4(pipe, monkeypatch):
    pipe.use_scheduler("ddim")
    noise, denoise = [], sampling.denoise

    def spy(eps_model, scheduler, x, *args, **kwargs):
        noise.append(x)
        return denoise(eps_model, scheduler, x, *args, **kwargs)

    monkeypatch.setattr(sampling, "denoise", spy)
    four = pipe(PROMPTS, generator=seeds(10, 11, 12, 13), num_inference_steps=3, output_type="np").images
    for i, prompt in enumerate(PROMPTS):
        one = pipe(prompt, generator=seeds(10 + i), num_inference_steps=3, output_type="np").images
        assert torch.equal(noise[1 + i][0], noise[0][i])  # the randomness: bit for bit
        assert_same_image(one[0], four[i])
    assert len({float(x.std()) for x in four}) == 4
    # One generator for the batch: image i's seed is its i-th draw, whatever the batch size.
    noise.clear()
    four = pipe(PROMPTS[0], num_images_per_prompt=4, generator=torch.Generator().manual_seed(5),
                num_inference_steps=3, output_type="np").images
    one = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(5), num_inference_steps=3,
               output_type="np").images
    assert torch.equal(noise[1][0], noise[0][0]) and not torch.equal(noise[0][0], noise[0][1])
    assert_same_image(one[0], four[0])


def test_outputs_and_their_types(pipe):
    pil = pipe(PROMPTS[:2], generator=seeds(0, 1), num_inference_steps=2).images
    assert len(pil) == 2 and pil[0].size == (64, 64) and pil[0].mode == "RGB"
    arr = pipe(PROMPTS[:2], generator=seeds(0, 1), num_inference_steps=2, output_type="np").images
    assert arr.shape == (2, 64, 64, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    np.testing.assert_array_equal(np.asarray(pil[1]), (arr[1] * 255).round().astype(np.uint8))
    assert arr.std() > 0.01  # the perturbed student draws something
    latent = pipe(PROMPTS[:2], generator=seeds(0, 1), num_inference_steps=2, output_type="latent").images
    assert latent.shape == (2, 4, 8, 8)
    with pytest.raises(SDiTError, match="output_type"):
        pipe(PROMPTS[0], output_type="jpeg")


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedulers_by_name(pipe, name):
    pipe.use_scheduler(name)
    assert type(pipe.scheduler).__name__ == SCHEDULERS[name]
    assert pipe.config.scheduler[1] == SCHEDULERS[name]  # what save_pretrained would write
    out = pipe(PROMPTS[0], generator=seeds(0), num_inference_steps=3, output_type="latent").images
    assert torch.isfinite(out).all()


def test_unknown_scheduler(pipe):
    with pytest.raises(SDiTError, match="unknown scheduler 'heun'"):
        pipe.use_scheduler("heun")


def test_sizes_the_student_can_and_cannot_take(pipe):
    assert pipe.latent_size() == (8, 8)  # trained at 8x8 latents = 64 px
    assert pipe.latent_size(128, 32) == (16, 4)
    wide = pipe(PROMPTS[0], height=32, width=96, generator=seeds(0), num_inference_steps=2, output_type="np").images
    assert wide.shape == (1, 32, 96, 3)
    for height in (100, 8, 0):  # 16 = VAE factor 8 x patch 2
        with pytest.raises(SDiTError, match="multiple of 16"):
            pipe(PROMPTS[0], height=height, num_inference_steps=2)


def test_guidance_doubles_the_batch_and_negative_prompts_count(pipe):
    pipe.use_scheduler("ddim")
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        guided = pipe(PROMPTS[:3], generator=seeds(0, 1, 2), num_inference_steps=4, output_type="latent").images
        assert calls == [6] * 4  # one forward of text + null per step
        calls.clear()
        plain = pipe(PROMPTS[:3], generator=seeds(0, 1, 2), num_inference_steps=4, guidance_scale=1.0,
                     output_type="latent").images
        assert calls == [3] * 4
    finally:
        hook.remove()
    assert not torch.allclose(guided, plain)
    negative = pipe(PROMPTS[:3], negative_prompt="blurry", generator=seeds(0, 1, 2), num_inference_steps=4,
                    output_type="latent").images
    assert not torch.allclose(guided, negative)
    with pytest.raises(SDiTError, match="negative prompts for 3 prompts"):
        pipe(PROMPTS[:3], negative_prompt=["a", "b"], num_inference_steps=2)


def test_a_guidance_distilled_student_takes_w_in_one_forward(tiny_teacher, tmp_path):
    pipe = SDiTPipeline.from_pretrained(make_run(tmp_path / "g", tiny_teacher, guidance_embed=True))
    pipe.use_scheduler("ddim")
    seen = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((args[0].shape[0], kwargs["guidance"])), with_kwargs=True)
    out = {}
    for w in (2.0, 6.0):
        out[w] = pipe(PROMPTS[:2], generator=seeds(0, 1), num_inference_steps=3, guidance_scale=w,
                      output_type="latent").images
    hook.remove()
    assert [n for n, _ in seen] == [2] * 6
    assert all(torch.equal(g, torch.full((2,), w)) for (_, g), w in zip(seen, [2.0] * 3 + [6.0] * 3))
    assert not torch.allclose(out[2.0], out[6.0])
    with pytest.raises(SDiTError, match="guidance-distilled"):
        pipe(PROMPTS[0], negative_prompt="blurry", num_inference_steps=2)


def test_loading_errors(tiny_teacher, tmp_path):
    with pytest.raises(SDiTError, match="run folder not found"):
        SDiTPipeline.from_pretrained(tmp_path / "nope")
    with pytest.raises(SDiTError, match="holds a StableDiffusionPipeline, not an SDiTPipeline"):
        SDiTPipeline.from_pretrained(tiny_teacher)  # a Stable Diffusion folder, not a run
    with pytest.raises(SDiTError, match="not an SDiT run folder"):
        SDiTPipeline.from_pretrained(tiny_teacher / "vae")


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.use_scheduler("euler")
    pipe.save_pretrained(tmp_path / "saved")
    again = SDiTPipeline.from_pretrained(tmp_path / "saved")
    assert type(again.scheduler).__name__ == "EulerDiscreteScheduler"
    a, b = (p(PROMPTS[0], generator=seeds(1), num_inference_steps=2, output_type="latent").images
            for p in (pipe, again))
    assert torch.equal(a, b)


def test_it_loads_with_sdits_classes_never_the_folders_code(run, pipe, tmp_path):
    """The folder's code is for diffusers where sdit is not installed (tests/test_run.py): here it is never run,
    and a folder without it (model_index naming ("sdit", "SDiT"), a PNDM scheduler) loads the same."""
    plain = shutil.copytree(run, tmp_path / "plain")
    for code in [*plain.glob("*.py"), *plain.glob("transformer/*.py")]:
        code.write_text("raise RuntimeError('the run folder's code ran')\n")
    loaded = SDiTPipeline.from_pretrained(plain)
    assert type(loaded) is SDiTPipeline and type(loaded.transformer) is type(pipe.transformer)
    for code in [*plain.glob("*.py"), *plain.glob("transformer/*.py")]:
        code.unlink()
    index = json.loads((plain / "model_index.json").read_text())
    index |= {"_class_name": "SDiTPipeline", "transformer": ["sdit", "SDiT"],
              "scheduler": ["diffusers", "PNDMScheduler"]}
    (plain / "model_index.json").write_text(json.dumps(index))
    loaded = SDiTPipeline.from_pretrained(plain)
    loaded.use_scheduler("ddim")
    pipe.use_scheduler("ddim")
    a, b = (p(PROMPTS[0], generator=seeds(3), num_inference_steps=2, output_type="latent").images
            for p in (loaded, pipe))
    assert torch.equal(a, b)
