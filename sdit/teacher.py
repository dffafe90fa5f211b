"""Loading a Stable Diffusion teacher from local disk, with no hub access and no pickled code.

A teacher is a diffusers folder (`model_index.json`, `vae/`, `text_encoder/`, `tokenizer/`, `unet/`,
`scheduler/`) or one original-layout file (`.safetensors`, or a `.ckpt` read with
`torch.load(weights_only=True)`). Single files are described by a config folder in the diffusers layout:
SD 1.5's ships in `data/sd15`; `config_dir` overrides it for fine-tunes of other shapes and tiny models.

Each loaded component carries a content hash of its weights (float32 bytes, so the same weights hash
the same in either layout and any load dtype); stores record it as the teacher's identity.
"""

import hashlib
import json
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdit.config import SD15_CONFIG_DIR
from sdit.convert import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from sdit.errors import SDiTError
from sdit.pickles import load_pickle

COMPONENTS = ("vae", "text_encoder", "unet")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
OLD_TEXT_PREFIX = "cond_stage_model.transformer."  # older files lack the `text_model.` level
EMA_PREFIX = "model_ema."  # the UNet's EMA weights in files that hold both (v1-5-pruned.ckpt)
PREFIXES = {"vae": (VAE_PREFIX,), "text_encoder": (TEXT_PREFIX, OLD_TEXT_PREFIX), "unet": (UNET_PREFIX, EMA_PREFIX)}


@dataclass(frozen=True)
class TeacherIdentity:
    """What a store records about the teacher that made it."""

    path: str
    layout: str  # "diffusers" | "single_file"
    hashes: dict[str, str] = field(default_factory=dict)  # component -> "sha256:..."

    def to_json(self) -> dict:
        return {"path": self.path, "layout": self.layout, "hashes": dict(self.hashes)}


@dataclass
class Teacher:
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    identity: TeacherIdentity
    config_dir: Path  # where the component configs came from (the folder itself, or data/sd15)
    vae: AutoencoderKL | None = None
    text_encoder: CLIPTextModel | None = None
    unet: UNet2DConditionModel | None = None


def load_teacher(path: str | Path, *, components: Iterable[str] = COMPONENTS, config_dir: str | Path | None = None,
                 use_ema: bool = True, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Teacher:
    """Load the named components of a Stable Diffusion 1.x teacher; the tokenizer and scheduler always.

    `use_ema` picks the EMA weights of a single file that holds both (SD 1.5's `v1-5-pruned.ckpt`).
    """
    path = Path(path)
    components = tuple(components)
    if unknown := set(components) - set(COMPONENTS):
        raise SDiTError(f"unknown teacher components {sorted(unknown)}; choose from {list(COMPONENTS)}")
    if not path.exists():
        raise SDiTError(f"teacher not found: {path} (give a diffusers folder or a .safetensors/.ckpt file)")
    if path.is_dir():
        if config_dir is not None:
            raise SDiTError("--teacher-config only describes single-file checkpoints; a diffusers folder "
                            "carries its own configs")
        models = _load_diffusers_folder(path, components)
        cfg = path
    else:
        cfg = Path(config_dir) if config_dir is not None else SD15_CONFIG_DIR
        _check_config_dir(cfg, components)
        models = _load_single_file(path, cfg, components, use_ema)
    hashes = {name: weights_hash(model) for name, model in models.items()}
    for model in models.values():
        model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Teacher(tokenizer=load_tokenizer(cfg), scheduler_config=load_scheduler_config(cfg),
                   identity=TeacherIdentity(str(path.resolve()), "diffusers" if path.is_dir() else "single_file",
                                            hashes),
                   config_dir=cfg, **models)


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 of a module's weights as float32 bytes, in key order."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(f"{key}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def load_tokenizer(config_dir: Path) -> CLIPTokenizer:
    folder = config_dir / "tokenizer"
    if not (folder / "vocab.json").exists():
        folder = SD15_CONFIG_DIR / "tokenizer"  # every SD 1.x/2.x model uses the same CLIP BPE
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def load_scheduler_config(config_dir: Path) -> dict:
    file = config_dir / "scheduler" / "scheduler_config.json"
    if not file.exists():
        raise SDiTError(f"{file} is missing: the teacher's noise schedule must be known")
    return json.loads(file.read_text())


def _check_config_dir(cfg: Path, components: tuple[str, ...]) -> None:
    missing = [f"{c}/config.json" for c in components if not (cfg / c / "config.json").exists()]
    if missing:
        raise SDiTError(f"--teacher-config {cfg} lacks {', '.join(missing)} (it must be a diffusers folder)")


def _load_diffusers_folder(path: Path, components: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    index = path / "model_index.json"
    if not index.exists():
        raise SDiTError(f"{path} is not a diffusers folder (no model_index.json)")
    model_index = json.loads(index.read_text())
    if "text_encoder_2" in model_index or "transformer" in model_index:
        raise SDiTError(f"{path}: {model_index.get('_class_name', 'this pipeline')} is not supported yet; "
                        "SDiT distils Stable Diffusion 1.x/2.x (a UNet with one CLIP text encoder)")
    loaders = {"vae": AutoencoderKL, "unet": UNet2DConditionModel}
    models = {}
    for name in components:
        if not (path / name).is_dir():
            raise SDiTError(f"{path} has no {name}/ folder")
        try:
            if name == "text_encoder":
                models[name] = CLIPTextModel.from_pretrained(path / name, local_files_only=True)
            else:
                models[name] = loaders[name].from_pretrained(path, subfolder=name, local_files_only=True)
        except (OSError, ValueError, pickle.UnpicklingError) as err:
            raise SDiTError(f"cannot load {path / name}: {_first_line(err)}") from err
    return models


def read_state_dict(path: Path, prefixes: tuple[str, ...] | None = None,
                    check: Callable[[dict[str, tuple[int, ...]]], None] | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a single-file checkpoint whose keys start with one of `prefixes` (every tensor when None).

    A `.safetensors` file is read tensor by tensor, so the others are never read from disk (a student's init
    reads the VAE and text encoder of an SD file without its UNet). Pickles load with weights_only=True (no
    code runs), memory-mapped when they are zip files. `check` sees every tensor's shape before any is read.
    """
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise SDiTError(f"{path}: not a checkpoint (expected one of {', '.join(SINGLE_FILE_SUFFIXES)})")
    wanted = (lambda key: True) if prefixes is None else (lambda key: key.startswith(prefixes))
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                check_sd1_layout(path, shapes)
                if check is not None:
                    check(shapes)
                return {k: f.get_tensor(k) for k in shapes if wanted(k)}
        except SDiTError:
            raise
        except Exception as err:  # safetensors raises its own SafetensorError and OSError variants
            raise SDiTError(f"{path}: not a readable safetensors file ({_first_line(err)})") from err
    state = load_pickle(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SDiTError(f"{path}: not a state dict of tensors")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    check_sd1_layout(path, shapes)
    if check is not None:
        check(shapes)
    return {k: v for k, v in state.items() if wanted(k)}


def check_sd1_layout(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """One-line refusals for files that are not Stable Diffusion 1.x in the original layout (from the
    tensors' names and shapes alone)."""
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        raise SDiTError(f"{path}: an SDXL checkpoint; not supported yet (SDiT distils SD 1.x)")
    if any(k.startswith("cond_stage_model.model.") for k in shapes):
        raise SDiTError(f"{path}: an SD 2.x checkpoint (OpenCLIP text encoder); single-file SD 2.x is not "
                        "supported yet: convert it to a diffusers folder and pass that")
    if not any(k.startswith(UNET_PREFIX) for k in shapes):
        raise SDiTError(f"{path}: not a Stable Diffusion checkpoint (no {UNET_PREFIX}* weights)")
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in[1] != 4:
        raise SDiTError(f"{path}: the UNet takes {conv_in[1]} input channels (an inpainting or "
                        "depth model?); only text-to-image models with 4 latent channels are supported")


def expected_shapes(cfg: Path, components: tuple[str, ...]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per component, the original-layout shape of every tensor the configs in `cfg` describe (models built on
    the meta device: no memory, about a second for SD 1.5)."""
    from sdit.convert import text_encoder_to_original, unet_to_original, vae_to_original

    builders = {
        "unet": lambda: unet_to_original(UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(cfg / "unet"))),
        "vae": lambda: vae_to_original(AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae"))),
        "text_encoder": lambda: text_encoder_to_original(CLIPTextModel(
            CLIPTextConfig.from_pretrained(cfg / "text_encoder", local_files_only=True))),
    }
    with torch.device("meta"):
        return {name: {k: tuple(v.shape) for k, v in builders[name]().items() if not k.endswith("position_ids")}
                for name in components}


def check_shapes(path: Path, cfg: Path, expected: dict[str, dict[str, tuple[int, ...]]],
                 shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse, in one line naming the first tensor that differs, a file whose tensors do not fit the configs in
    `cfg`, before any is read. Trailing 1s are ignored (the VAE's attention projections are 1x1 convolutions in
    some files and matrices in others); a UNet kept only as EMA weights is checked when it loads."""
    for name, wanted in expected.items():
        if name == "text_encoder" and not any(k.startswith(TEXT_PREFIX) for k in shapes):
            continue  # an older file (cond_stage_model.transformer.*): checked as it loads
        if name == "unet" and not any(k.startswith(UNET_PREFIX) for k in shapes):
            continue
        for key, shape in wanted.items():
            found = shapes.get(key)
            if found is None:
                raise SDiTError(f"{path}: the {name} weights do not fit {cfg / name}/config.json (the file has no "
                                f"{key}); pass --teacher-config for other shapes")
            if _squeeze(found) != _squeeze(shape):
                raise SDiTError(f"{path}: the {name} weights do not fit {cfg / name}/config.json ({key} is "
                                f"{list(found)} in the file, {list(shape)} there); "
                                "pass --teacher-config for other shapes")


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _load_single_file(path: Path, cfg: Path, components: tuple[str, ...],
                      use_ema: bool) -> dict[str, torch.nn.Module]:
    expected = expected_shapes(cfg, components)
    state = read_state_dict(path, tuple(p for name in components for p in PREFIXES[name]),
                            check=lambda shapes: check_shapes(path, cfg, expected, shapes))
    models = {}
    for name in components:
        if name == "text_encoder":
            models[name] = _text_encoder_from_state(path, cfg, state)
            continue
        cls = UNet2DConditionModel if name == "unet" else AutoencoderKL
        prefix = UNET_PREFIX if name == "unet" else VAE_PREFIX
        if not any(k.startswith(prefix) for k in state):
            raise SDiTError(f"{path}: no {name} weights ({prefix}*) in this file")
        extra = {"extract_ema": use_ema} if name == "unet" else {}
        try:
            model = cls.from_single_file(state, config=str(cfg), subfolder=name, local_files_only=True,
                                         low_cpu_mem_usage=False, **extra)
        except (RuntimeError, ValueError, KeyError) as err:
            raise SDiTError(f"{path}: the {name} weights do not fit {cfg / name}/config.json "
                            f"({_first_line(err)}); pass --teacher-config for other shapes") from err
        models[name] = model
    return models


def _text_encoder_from_state(path: Path, cfg: Path, state: dict[str, torch.Tensor]) -> CLIPTextModel:
    weights = {}
    for key, value in state.items():
        if key.startswith(TEXT_PREFIX):
            weights[key[len(TEXT_PREFIX):]] = value
        elif key.startswith(OLD_TEXT_PREFIX):
            weights[key.removeprefix(OLD_TEXT_PREFIX)] = value
    if not weights:
        raise SDiTError(f"{path}: no text encoder weights ({TEXT_PREFIX}*) in this file")
    model = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder", local_files_only=True))
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights and not k.endswith("position_ids")]
    wrong = [k for k, v in weights.items() if k in expected and v.shape != expected[k].shape]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"shape mismatch at {wrong[:3]}"
        raise SDiTError(f"{path}: the text encoder weights do not fit {cfg / 'text_encoder'}/config.json "
                        f"({detail}); pass --teacher-config for other shapes")
    model.load_state_dict({k: v for k, v in weights.items() if k in expected}, strict=False)
    return model


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
