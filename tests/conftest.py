import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

# Nothing in the tests may reach a hub: every model loads from local disk.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data" / "samples"


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A tiny random-weight SD teacher in the diffusers layout."""
    from sdit.tiny import save_tiny_teacher

    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_single_file(tmp_path_factory) -> Path:
    """The same weights as `tiny_teacher`, as one original-layout .safetensors file (its folder holds the
    configs that --teacher-config points at)."""
    from sdit.tiny import save_tiny_teacher

    return save_tiny_teacher(tmp_path_factory.mktemp("single") / "tiny-sd", single_file=True)


# Every perturbation kind, caption perturbations at every timestep, so a small store exercises them all.
ALL_KINDS = {"none": 0.2, "input": 0.2, "swap": 0.2, "mix": 0.2, "null": 0.2}


@pytest.fixture(scope="session")
def encoded_store(tiny_teacher, tmp_path_factory) -> Path:
    """The bundled samples (11 good records in 3 shards of 4 items) and a 3-prompt bank, encoded once by the
    tiny teacher. Shared: tests that write to a store take a copy (`shutil.copytree`)."""
    from pipeline.encode import EncodeConfig, encode

    out = tmp_path_factory.mktemp("encoded") / "store"
    prompts = out.parent / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green star\n")
    encode(EncodeConfig(source=str(SAMPLES), teacher=str(tiny_teacher), out=str(out), resolution=64, shard_size=4,
                        prompts=str(prompts)))
    return out


@pytest.fixture(scope="session")
def labelled_store(encoded_store, tiny_teacher, tmp_path_factory) -> Path:
    """`encoded_store`, labelled with 4 draws of every kind by the tiny teacher: what stage two reads."""
    from pipeline.label import LabelConfig, label
    from sdit.perturb import PerturbConfig

    out = shutil.copytree(encoded_store, tmp_path_factory.mktemp("labelled") / "store")
    label(LabelConfig(store=str(out), teacher=str(tiny_teacher), draws=4,
                      perturb=PerturbConfig(mix=ALL_KINDS, caption_min_t=0)))
    return out


@pytest.fixture(scope="session")
def fresh_guided_store(encoded_store, tiny_teacher, tmp_path_factory) -> Path:
    """`encoded_store`, labelled "fresh" with guided targets (w in 2:6, a quarter of draws at w = 1) whose ε_c and
    ε_u are both kept, 2 draws a record."""
    from pipeline.label import LabelConfig, label
    from sdit.perturb import PerturbConfig

    out = shutil.copytree(encoded_store, tmp_path_factory.mktemp("fresh") / "store")
    label(LabelConfig(store=str(out), teacher=str(tiny_teacher), name="fresh", draws=2, guidance=(2.0, 6.0),
                      guidance_conditional=0.25, guidance_fresh=True,
                      perturb=PerturbConfig(mix=ALL_KINDS, caption_min_t=0)))
    return out


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    """A tiny random CLIPModel folder, as save_pretrained writes one (tests never download one)."""
    import torch
    import transformers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from sdit.teacher import SD15_CONFIG_DIR

    out = tmp_path_factory.mktemp("clip") / "clip"
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=small | dict(max_position_embeddings=77, vocab_size=49408),
                        vision_config=small | dict(image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).save_pretrained(out)
    CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer").save_pretrained(out)
    processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def new_run(out, teacher, student: str = "SDiT-Nano/2", *, space=None, **options) -> Path:
    """An untrained run folder (`sdit init`): `student` beside `teacher`'s VAE and text encoder."""
    from pipeline.init import InitConfig, init

    options = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    return init(InitConfig(teacher=str(teacher), student=student, out=str(out), **options), space).run


# --- real kills -----------------------------------------------------------------------------------------------
# Crash tests run `sdit` in a child process and SIGKILL it: when a condition on its files holds (`kill_when`), or
# at an exact point of its code (`kill_paused_at`: the child sleeps just before the N-th call of a function, e.g.
# half-way through a shard's arrays or a checkpoint's files, and is killed there).

PAUSING_CLI = """
import importlib, pathlib, sys, time
target, call, marker = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
del sys.argv[1:4]
module, _, attribute = target.partition(":")
*path, name = attribute.split(".")
owner = importlib.import_module(module)
for part in path:
    owner = getattr(owner, part)
original, calls = getattr(owner, name), []
def paused(*args, **kwargs):
    calls.append(1)
    if len(calls) == call:
        marker.touch()
        time.sleep(3600)
    return original(*args, **kwargs)
setattr(owner, name, paused)
from cli import app
app()
"""


def cli_command(*args: str) -> list[str]:
    """`sdit ARGS` as a child process of this interpreter (the tests' environment, not an installed script)."""
    return [sys.executable, "-c", "from cli import app; app()", *map(str, args)]


def child_env() -> dict[str, str]:
    return os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def kill_when(args: list, ready: Callable[[], bool], timeout: float = 180) -> None:
    """Run `sdit ARGS`, SIGKILL it as soon as `ready()` holds (failing when it ends or times out first)."""
    _kill(cli_command(*args), ready, timeout)


def kill_paused_at(args: list, target: str, call: int, marker: Path, timeout: float = 180) -> None:
    """Run `sdit ARGS`, stop it just before the `call`-th call of `target` ("module:attr.path") and SIGKILL it."""
    _kill([sys.executable, "-c", PAUSING_CLI, target, str(call), str(marker), *map(str, args)], marker.exists,
          timeout)


def _kill(command: list[str], ready: Callable[[], bool], timeout: float) -> None:
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(command, env=child_env(), stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                stderr.seek(0)
                raise AssertionError(f"the child ended or timed out before the kill point:\n"
                                     f"{stderr.read().decode()[-2000:]}")
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def save_stand_in_inception(path, dim: int = 2048) -> Path:
    """A small TorchScript network with the interface of NVlabs' inception-2015-12-05.pt (sdit.fid): float or
    uint8 images (N, 3, H, W) in 0..255 at any size, resized inside to 299, normalised to [-1, 1];
    `return_features=True` gives (N, dim) features. Its features are linear in the pixels, so FID between an
    image set and an affine change of it has a closed form."""
    import torch

    class StandIn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("proj", torch.randn(3 * 8 * 8, dim, generator=torch.Generator().manual_seed(0)) / 8)

        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = torch.nn.functional.interpolate(img.to(torch.float32), size=(299, 299), mode="bilinear",
                                                align_corners=False)
            x = torch.nn.functional.adaptive_avg_pool2d((x - 128) / 128, 8).flatten(1)  # (N, 192)
            features = x @ self.proj  # (N, dim)
            return features if return_features else features.softmax(dim=1)

    torch.jit.script(StandIn()).save(str(path))
    return Path(path)
