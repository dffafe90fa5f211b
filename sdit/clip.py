"""The CLIP score of images against their captions, from a local model: a transformers CLIPModel folder, or an
open_clip checkpoint (BK-SDM's ViT-g-14 among them) whose weights are mapped onto a transformers CLIPModel, so
open_clip itself (which needs torchvision) is never imported.

`Clip.cosines` gives each image's raw cosine; `clip_score` averages them by a named convention (CLIP_SCORES):
torchmetrics' CLIPScore, 100 × max(mean cosine, 0), or BK-SDM's evaluation script, the mean raw cosine.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdit.config import CLIP_SCORES, SD15_CONFIG_DIR
from sdit.errors import SDiTError

CLIP_FILES = ("config.json", "preprocessor_config.json")
CLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
CLIP_TOKENIZER = (("vocab.json", "merges.txt"), ("tokenizer.json",))
OPENCLIP_CONFIG = "open_clip_config.json"  # as the Hugging Face hub holds open_clip models, or a bare model config
OPENCLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's default pixel normalisation, per channel
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Model-config settings that change open_clip's forward without adding weights; none maps onto a CLIPModel.
OPENCLIP_UNSUPPORTED = ("timm_model_name", "hf_model_name", "pool_type", "attentional_pool", "no_causal_mask",
                        "act_kwargs", "norm_kwargs", "pos_embed_type", "final_ln_after_pool", "ls_init_value",
                        "no_ln_pre", "embed_cls", "proj_bias")


@dataclass
class Clip:
    """A CLIP model with its tokenizer and its image preprocessing (PIL images -> (N, 3, H, W) pixels), on `device`."""

    model: torch.nn.Module
    tokenizer: object
    processor: Callable[[list[Image.Image]], torch.Tensor]
    device: torch.device
    clean: Callable[[str], str] = str  # a caption before the tokenizer

    @torch.no_grad()
    def cosines(self, images: list[Image.Image], captions: list[str]) -> np.ndarray:
        """(N,) float64: the cosine of each image's embedding with its caption's, in [-1, 1]."""
        pixels = self.processor([im.convert("RGB") for im in images])
        ids = self.tokenizer([self.clean(c) for c in captions], padding=True, truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt").to(self.device)
        dtype = next(self.model.parameters()).dtype
        img = self.model.get_image_features(pixel_values=pixels.to(self.device, dtype))
        txt = self.model.get_text_features(**ids)
        img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))  # transformers 5 may return an output
        cos = torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1)
        return cos.clamp(-1, 1).cpu().numpy()


def clip_score(cosines: np.ndarray, convention: str) -> float:
    """The CLIP score of these cosines: "torchmetrics" 100 × max(mean, 0), "bk-sdm" the mean raw cosine."""
    if convention not in CLIP_SCORES:
        raise SDiTError(f"unknown CLIP score convention {convention!r}: choose one of {', '.join(CLIP_SCORES)}")
    mean = float(np.mean(np.asarray(cosines, dtype=np.float64)))
    return 100 * max(mean, 0.0) if convention == "torchmetrics" else mean


def load_clip(path: str | Path, device: torch.device) -> Clip:
    """A CLIP model on local disk, never downloaded: a transformers CLIPModel folder (save_pretrained's files), or
    an open_clip model (a folder with open_clip_config.json and its weights, or the weights file in such a folder).
    A one-line error names what is missing."""
    path = Path(path)
    if path.is_file() or (path / OPENCLIP_CONFIG).is_file():
        return load_open_clip(path, device)
    if not path.is_dir():
        raise SDiTError(f"CLIP model folder not found: {path} (a transformers CLIPModel saved with save_pretrained, "
                        f"or an open_clip model: {OPENCLIP_CONFIG} beside {' or '.join(OPENCLIP_WEIGHTS)})")
    missing = [name for name in CLIP_FILES if not (path / name).is_file()]
    if not any((path / name).is_file() for name in CLIP_WEIGHTS):
        missing.append(" or ".join(CLIP_WEIGHTS))
    if not any(all((path / n).is_file() for n in names) for names in CLIP_TOKENIZER):
        missing.append("tokenizer files (vocab.json + merges.txt, or tokenizer.json)")
    if missing:
        raise SDiTError(f"{path} lacks {', '.join(missing)}: it must be a CLIPModel folder as save_pretrained "
                        f"writes it, or an open_clip model with {OPENCLIP_CONFIG}")
    from transformers import AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        processor = _processor_class().from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise SDiTError(f"cannot load the CLIP model in {path}: {str(err).strip().splitlines()[0]}") from err
    return Clip(model, tokenizer, lambda images: processor(images=images, return_tensors="pt")["pixel_values"], device)


def _processor_class():
    """transformers' PIL-only CLIP image processor (transformers 5 names it apart: its default needs torchvision)."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


@dataclass(frozen=True)
class OpenClipPreprocess:
    """open_clip's evaluation transform: the shortest side resized to `size` (bicubic, the long side truncated),
    a centre crop (offsets rounded as torchvision rounds them), pixels / 255 normalised by `mean` and `std`."""

    size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, 3, size, size) float32."""
        return torch.stack([self.one(im) for im in images])

    def one(self, image: Image.Image) -> torch.Tensor:
        w, h = image.size
        s = self.size
        new = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
        if new != (w, h):
            image = image.resize(new, Image.BICUBIC)
        top, left = int(round((new[1] - s) / 2)), int(round((new[0] - s) / 2))
        image = image.crop((left, top, left + s, top + s))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, s, s)
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]


def load_open_clip(path: Path, device: torch.device) -> Clip:
    """An open_clip ViT CLIP as a transformers CLIPModel, with open_clip's eval preprocessing (shortest side resized
    bicubic to the model's size, centre crop, mean and std from the config or OpenAI's) and its tokenizer: the folder's
    tokenizer files when it has them, else the OpenAI BPE that open_clip's default tokenizer uses."""
    from transformers import AutoTokenizer, CLIPModel

    folder, weights = (path.parent, path) if path.is_file() else (path, _open_clip_weights(path))
    if not (folder / OPENCLIP_CONFIG).is_file():
        raise SDiTError(f"{folder} lacks {OPENCLIP_CONFIG}: copy open_clip's model config (e.g. "
                        f"model_configs/ViT-g-14.json) there under that name")
    try:
        raw = json.loads((folder / OPENCLIP_CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise SDiTError(f"{folder / OPENCLIP_CONFIG} is not valid JSON ({err.msg}, line {err.lineno})") from err
    model_cfg, preprocess = raw.get("model_cfg", raw), raw.get("preprocess_cfg", {})
    config = open_clip_config(model_cfg)
    state = convert_open_clip(_read_state(weights), config)
    model = CLIPModel.from_pretrained(None, config=config, state_dict=state).float().to(device).eval()  # as open_clip
    has_tokenizer = any(all((folder / n).is_file() for n in names) for names in CLIP_TOKENIZER)
    tokenizer = AutoTokenizer.from_pretrained(folder if has_tokenizer else SD15_CONFIG_DIR / "tokenizer",
                                              local_files_only=True)
    tokenizer.model_max_length = config.text_config.max_position_embeddings
    resize = (preprocess.get("resize_mode", "shortest"), preprocess.get("interpolation", "bicubic"))
    if resize != ("shortest", "bicubic"):
        raise SDiTError(f"{folder / OPENCLIP_CONFIG} asks for {' '.join(resize)} resizing: only open_clip's default "
                        "(shortest side, bicubic) is supported")
    processor = OpenClipPreprocess(config.vision_config.image_size, tuple(preprocess.get("mean", OPENAI_MEAN)),
                                   tuple(preprocess.get("std", OPENAI_STD)))
    return Clip(model, tokenizer, processor, device, clean=open_clip_text)


def open_clip_text(caption: str) -> str:
    """A caption cleaned as open_clip's tokenizer cleans it before its BPE: HTML entities unescaped (twice),
    whitespace runs made one space."""
    return " ".join(html.unescape(html.unescape(caption)).split())


def _open_clip_weights(folder: Path) -> Path:
    """The weights file of an open_clip folder (the hub's names)."""
    for name in OPENCLIP_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    raise SDiTError(f"{folder} lacks {' or '.join(OPENCLIP_WEIGHTS)}: put the open_clip checkpoint there, or pass "
                    "the checkpoint file itself")


def _read_state(weights: Path) -> dict[str, torch.Tensor]:
    """An open_clip state dict from a .safetensors or torch file (a training checkpoint's "state_dict" unwrapped)."""
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as err:  # every reader's failure on a damaged or foreign file
        raise SDiTError(f"cannot read the open_clip checkpoint {weights}: {str(err).strip().splitlines()[0]}") from err
    state = state.get("state_dict", state)
    return {k.removeprefix("module."): v for k, v in state.items()}


def open_clip_config(cfg: dict):
    """transformers' CLIPConfig for an open_clip model config (its ViT vision tower and its own text tower)."""
    from transformers import CLIPConfig

    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if "embed_dim" not in cfg or not isinstance(vision.get("layers"), int):
        raise SDiTError("the open_clip config needs embed_dim and vision_cfg with an integer layers (a ViT): only "
                        "ViT CLIP models with open_clip's own text tower map onto a transformers CLIPModel")
    odd = sorted(k for part in (vision, text) for k in part if k in OPENCLIP_UNSUPPORTED)
    if odd:
        raise SDiTError(f"the open_clip config sets {', '.join(odd)}: only plain ViT CLIP models (class token, "
                        "argmax text pooling) map onto a transformers CLIPModel")
    act = "quick_gelu" if cfg.get("quick_gelu") else "gelu"
    v_width, t_width = vision.get("width", 768), text.get("width", 512)
    return CLIPConfig(
        projection_dim=cfg["embed_dim"],
        vision_config=dict(hidden_size=v_width, num_hidden_layers=vision["layers"],
                           num_attention_heads=v_width // vision.get("head_width", 64),
                           intermediate_size=int(v_width * vision.get("mlp_ratio", 4.0)),
                           image_size=vision.get("image_size", 224), patch_size=vision.get("patch_size", 16),
                           hidden_act=act, layer_norm_eps=1e-5),
        text_config=dict(hidden_size=t_width, num_hidden_layers=text.get("layers", 12),
                         num_attention_heads=text.get("heads", 8),
                         intermediate_size=int(t_width * text.get("mlp_ratio", 4.0)),
                         max_position_embeddings=text.get("context_length", 77),
                         vocab_size=text.get("vocab_size", 49408), hidden_act=act, layer_norm_eps=1e-5,
                         eos_token_id=49407))


# open_clip's names -> CLIPModel's, per tower: (source prefix, target prefix).
TOWERS = {"text": ("", "text_model."), "vision": ("visual.", "vision_model.")}
BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
         "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
SINGLE = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
          "positional_embedding": "text_model.embeddings.position_embedding.weight",
          "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
          "visual.class_embedding": "vision_model.embeddings.class_embedding",
          "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
          "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
          "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
          "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
          "visual.ln_post.weight": "vision_model.post_layernorm.weight",
          "visual.ln_post.bias": "vision_model.post_layernorm.bias", "logit_scale": "logit_scale"}
TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+?)[._](weight|bias)$")  # attn.in_proj_weight


def convert_open_clip(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """An open_clip state dict renamed (and its packed q/k/v split, its projections transposed) into a CLIPModel's;
    a key with no place, a missing one or a wrong shape is refused in one line."""
    from transformers import CLIPModel

    state = {k.removeprefix("text."): v for k, v in state.items() if k != "attn_mask"}  # CustomTextCLIP's prefix
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in SINGLE:
            out[SINGLE[key]] = value.reshape(()) if key == "logit_scale" else value
        elif key in TRANSPOSED:
            out[TRANSPOSED[key]] = value.t().contiguous()
        elif (m := RESBLOCK.match(key)) and (m[3] in BLOCK or m[3] == "attn.in_proj"):
            head = f"{TOWERS['vision' if m[1] else 'text'][1]}encoder.layers.{m[2]}."
            if m[3] == "attn.in_proj":
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{head}self_attn.{name}.{m[4]}"] = part.contiguous()
            else:
                out[f"{head}{BLOCK[m[3]]}.{m[4]}"] = value
        else:
            raise SDiTError(f"the open_clip checkpoint has {key}, which a transformers CLIPModel has no place for: "
                            "only plain ViT CLIP models convert")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in CLIPModel(config).state_dict().items()}
    missing = sorted(set(expected) - set(out))
    if missing:
        raise SDiTError(f"the open_clip checkpoint lacks the weights for {missing[0]} ({len(missing)} missing): "
                        "does it match its open_clip_config.json?")
    wrong = next((k for k in expected if out[k].shape != expected[k]), None)
    if wrong:
        raise SDiTError(f"the open_clip checkpoint's {wrong} has shape {tuple(out[wrong].shape)}, its config says "
                        f"{tuple(expected[wrong])}: does it match its open_clip_config.json?")
    return out
