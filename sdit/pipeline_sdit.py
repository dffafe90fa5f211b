"""SDiTPipeline: prompt -> CLIP embedding -> student ε with classifier-free guidance -> scheduler -> VAE -> images.

A run folder is a diffusers pipeline folder. With sdit installed:

    pipe = SDiTPipeline.from_pretrained("runs/my-run")      # offline: a local folder
    pipe.use_scheduler("dpm++")                             # any name of sdit.config.SCHEDULERS
    images = pipe(["a red circle"], num_images_per_prompt=4, generator=torch.Generator().manual_seed(0)).images

Where sdit is not installed (torch, diffusers and transformers suffice), the folder's own copy of this module and
of the model loads it, as diffusers' custom components load:

    pipe = DiffusionPipeline.from_pretrained("runs/my-run", trust_remote_code=True)

This module is that copy's source (sdit.run writes it into run folders), so it imports only torch, diffusers,
transformers, numpy, PIL and, with relative imports, the sdit modules that do the same. diffusers copies only the
modules this file imports itself, so it imports each one those import as well (tests/test_run.py checks it).

Randomness: each image draws its initial noise from its own generator (on the CPU), so image i is the same
whatever the batch it is sampled in, and on whatever device the network runs.
"""

from __future__ import annotations

import ast
import inspect
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image

from . import sampling
from .config import DEFAULT_GUIDANCE, vae_scale_factor
from .dit import SDiT
from .errors import SDiTError, read_json_object

# What the modules above import in turn, imported here only so that diffusers copies them too.
from .latents import from_latent_space  # noqa: F401
from .presets import PRESETS  # noqa: F401
from .sampling import EpsModel  # `from .sampling import`: the form diffusers follows, so it copies sampling.py
from .text import encode_text

MODEL_INDEX = "model_index.json"
TRANSFORMER = "transformer"
# The module files of a folder's code: diffusers looks for a component's code in its own folder, under the name
# model_index.json gives; "dit" would name diffusers' own DiT pipeline module instead.
PIPELINE_MODULE = "pipeline_sdit"
MODEL_MODULE = "modeling_sdit"
OUTPUT_TYPES = ("pil", "np", "latent")
SEED_RANGE = 2**62  # per-image seeds drawn from one generator lie in [0, SEED_RANGE)


def per_image_generators(generator: torch.Generator | list[torch.Generator] | None, n: int) -> list[torch.Generator]:
    """One CPU generator per image. A list is used as given; a single generator yields image i's seed as its
    i-th draw (so image i does not depend on n); None draws fresh seeds."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise SDiTError(f"{len(generator)} generators for {n} images: pass one per image, or a single one")
        return list(generator)
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    seeds = [int(torch.randint(SEED_RANGE, (1,), generator=generator)) for _ in range(n)]
    return [torch.Generator().manual_seed(s) for s in seeds]


def expand(values: str | list[str] | None, n_prompts: int, per_prompt: int, what: str) -> list[str] | None:
    """A prompt (or a list, one per prompt) repeated for each image of its prompt."""
    if values is None:
        return None
    values = [values] * n_prompts if isinstance(values, str) else list(values)
    if len(values) != n_prompts:
        raise SDiTError(f"{len(values)} {what}s for {n_prompts} prompts: give one, or one per prompt")
    return [v for v in values for _ in range(per_prompt)]


def copy_code(module: Path, target: Path) -> list[Path]:
    """`module` (a file of sdit, or of a folder's copy of it) as `target`, and beside it the modules it imports
    relatively: what diffusers copies when it loads `target` with trust_remote_code. Returns the files written."""
    written = [Path(shutil.copyfile(module, target))]
    for name in relative_imports(module):
        written.append(Path(shutil.copyfile(module.with_name(f"{name}.py"), target.with_name(f"{name}.py"))))
    return written


def relative_imports(module: Path) -> list[str]:
    """The modules `module` imports as `from .name import ...` (the form diffusers follows)."""
    tree = ast.parse(Path(module).read_text())
    return [node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module]


def read_index(run: Path, pipeline_class: str) -> dict:
    """A run folder's model_index.json; a one-line SDiTError where `run` holds no `pipeline_class`."""
    if not run.exists():
        raise SDiTError(f"run folder not found: {run}")
    if not (run / MODEL_INDEX).is_file():
        raise SDiTError(f"{run} is not an SDiT run folder (no {MODEL_INDEX}); make one with `sdit init` or "
                        "`sdit train`")
    index = read_json_object(run / MODEL_INDEX, "restore the run folder from a copy")
    name = index.get("_class_name")
    name = name[-1] if isinstance(name, list) else name  # [module file, class] where the folder carries its code
    if name != pipeline_class:
        raise SDiTError(f"{run} holds a {name}, not an {pipeline_class}: give a run folder from `sdit init` or "
                        "`sdit train`")
    return index


def load_part(folder: Path, library: str, class_name: str):
    """One part of a run folder: the student with this module's SDiT, whatever module the folder names for it;
    any other part with its diffusers or transformers class."""
    if folder.name == TRANSFORMER:
        return SDiT.from_pretrained(folder)
    libraries = {"diffusers": diffusers, "transformers": transformers}
    part = getattr(libraries[library], class_name, None) if library in libraries else None
    if part is None:
        raise SDiTError(f"{folder.parent}: {MODEL_INDEX} names {library}.{class_name} for {folder.name}; an SDiT "
                        "run folder holds diffusers and transformers parts besides its student")
    return part.from_pretrained(folder)


class SDiTPipeline(DiffusionPipeline):
    """Text-to-image with an SDiT student and the teacher's VAE, text encoder, tokenizer and scheduler."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)

    @classmethod
    def from_pretrained(cls, run: str | Path, torch_dtype: torch.dtype | None = None) -> SDiTPipeline:
        """Load a run folder (or a folder this pipeline's save_pretrained wrote) from local disk, each part with
        the classes this module imports: the folder's own code never runs here. A one-line SDiTError if it is
        no such folder."""
        run = Path(run)
        index = read_index(run, cls.__name__)
        try:
            parts = {name: load_part(run / name, *entry) for name, entry in index.items() if not name.startswith("_")}
        except (OSError, ValueError) as err:
            raise SDiTError(f"cannot load run folder {run}: {str(err).strip().splitlines()[0]}") from err
        pipe = cls(**parts)
        return pipe if torch_dtype is None else pipe.to(torch_dtype)

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """diffusers' save_pretrained, plus what loads the folder where sdit is not installed, as in a run folder:
        this module's code at the top, the student's in transformer/, both named in model_index.json."""
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        copy_code(Path(__file__), folder / f"{PIPELINE_MODULE}.py")
        model = type(self.transformer)
        copy_code(Path(inspect.getfile(model)), folder / TRANSFORMER / f"{MODEL_MODULE}.py")
        index = read_json_object(folder / MODEL_INDEX, "save the pipeline again")
        index |= {"_class_name": [PIPELINE_MODULE, type(self).__name__], TRANSFORMER: [MODEL_MODULE, model.__name__]}
        (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    # --- sizes -----------------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae.config.block_out_channels)

    @property
    def guidance_distilled(self) -> bool:
        return bool(self.transformer.config.guidance_embed)

    def latent_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """(h, w) of the latents for an image of height x width pixels (default: the student's training size);
        a one-line error where the student cannot take it."""
        cfg, f = self.transformer.config, self.vae_scale_factor
        step = f * cfg.patch_size
        default = cfg.sample_size * f
        height = default if height is None else height
        width = default if width is None else width
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % step:
                raise SDiTError(f"{name} {value} does not fit this student: use a positive multiple of {step} "
                                f"(VAE factor {f} x patch size {cfg.patch_size}); it was trained at {default}")
        return height // f, width // f

    def use_scheduler(self, name: str) -> None:
        """Swap the sampler by name (sdit.config.SCHEDULERS), built from the run's noise schedule."""
        self.scheduler = sampling.make_scheduler(name, dict(self.scheduler.config))

    # --- the steps ---------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        return encode_text(self.tokenizer, self.text_encoder, prompts, self._execution_device)

    def eps_model(self, guidance_scale: float) -> EpsModel:
        """ε(x, t, text) in float32 from the student in its own dtype; a guidance-distilled student takes w."""
        return sampling.student_eps(self.transformer, guidance_scale if self.guidance_distilled else None)

    def initial_noise(self, n: int, latent_size: tuple[int, int], generator) -> torch.Tensor:
        """(n, C, h, w) float32 on the CPU: image i from its own generator."""
        shape = (self.transformer.config.in_channels, *latent_size)
        return sampling.initial_noise(shape, per_image_generators(generator, n), torch.device("cpu"))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = DEFAULT_GUIDANCE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        latents: torch.Tensor | None = None,
        return_dict: bool = True,
        progress: Callable[[int], None] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Images for `prompt` (image i shows prompt i // num_images_per_prompt).

        generator: one CPU generator per image, or one for all (image i's seed is its i-th draw). latents:
        initial noise (N, C, h, w) of unit variance, instead of drawing it. guidance_scale: the CFG scale w;
        1 runs one forward per step without guidance; a guidance-distilled student always runs one, taking w.
        output_type: "pil" (a list of images), "np" ((N, H, W, 3) float32 in [0, 1]) or "latent" (N, C, h, w).
        progress(step) is called after each denoising step.
        """
        if output_type not in OUTPUT_TYPES:
            raise SDiTError(f"output_type {output_type!r}: choose one of {', '.join(OUTPUT_TYPES)}")
        if num_inference_steps < 1 or num_images_per_prompt < 1:
            raise SDiTError("num_inference_steps and num_images_per_prompt must be at least 1")
        prompts = expand(prompt, 1 if isinstance(prompt, str) else len(prompt), num_images_per_prompt, "prompt")
        if not prompts:
            raise SDiTError("no prompts to sample")
        n_prompts = len(prompts) // num_images_per_prompt
        negatives = expand(negative_prompt, n_prompts, num_images_per_prompt, "negative prompt")
        if negatives is not None and self.guidance_distilled:
            raise SDiTError("this student is guidance-distilled (one forward per step, with w): it has no "
                            "unconditional branch for a negative prompt to replace")
        size = self.latent_size(height, width)
        device = self._execution_device
        if latents is None:
            latents = self.initial_noise(len(prompts), size, generator)
        elif tuple(latents.shape) != (len(prompts), self.transformer.config.in_channels, *size):
            raise SDiTError(f"latents of shape {tuple(latents.shape)}; expected "
                            f"{(len(prompts), self.transformer.config.in_channels, *size)}")
        text = self.encode_prompt(prompts)
        guided = not self.guidance_distilled and guidance_scale != 1.0
        null = self.encode_prompt(negatives or [""] * len(prompts)) if guided else None
        out = sampling.denoise(self.eps_model(guidance_scale), self.scheduler, latents.to(device, torch.float32),
                               text, null, num_inference_steps, 1.0 if self.guidance_distilled else guidance_scale,
                               progress)
        images = out if output_type == "latent" else self.to_images(out, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def to_images(self, latents: torch.Tensor, output_type: str) -> list[Image.Image] | np.ndarray:
        pixels = sampling.decode(self.vae, latents)  # (N, H, W, 3) uint8
        if output_type == "np":
            return pixels.astype(np.float32) / 255.0
        return [Image.fromarray(p) for p in pixels]


def load_pipeline(run: str | Path, device: torch.device, dtype: torch.dtype) -> SDiTPipeline:
    """A run folder's pipeline on `device` in `dtype`, quiet (no progress bar)."""
    pipe = SDiTPipeline.from_pretrained(run)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)
