"""The CLIP score: 100 · max(cos(image, caption), 0) with a local transformers CLIPModel, torchmetrics' CLIPScore
convention. `sdit eval` scores samples and reference images with it, `sdit train --eval-clip` the sample grids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdit.errors import SDiTError

CLIP_FILES = ("config.json", "preprocessor_config.json")
CLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
CLIP_TOKENIZER = (("vocab.json", "merges.txt"), ("tokenizer.json",))


@dataclass
class Clip:
    """A CLIP model with its tokenizer and image processor, on `device`."""

    model: torch.nn.Module
    tokenizer: object
    processor: object
    device: torch.device

    @torch.no_grad()
    def score(self, images: list[Image.Image], captions: list[str]) -> np.ndarray:
        """(N,) 100 · max(cos(image, caption), 0)."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        ids = self.tokenizer(captions, padding=True, truncation=True, max_length=self.tokenizer.model_max_length,
                             return_tensors="pt").to(self.device)
        img = self.model.get_image_features(pixel_values=pixels)
        txt = self.model.get_text_features(**ids)
        img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))  # transformers 5 may return an output
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        return (100 * cos.clamp(min=0)).cpu().double().numpy()


def load_clip(folder: str | Path, device: torch.device) -> Clip:
    """A transformers CLIPModel folder on local disk; a one-line error naming what is missing. Never downloads."""
    import transformers
    from transformers import AutoTokenizer, CLIPModel

    folder = Path(folder)
    if not folder.is_dir():
        raise SDiTError(f"CLIP model folder not found: {folder} (a transformers CLIPModel saved with "
                        "save_pretrained: config.json, model.safetensors, tokenizer files, preprocessor_config.json)")
    missing = [name for name in CLIP_FILES if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in CLIP_WEIGHTS):
        missing.append(" or ".join(CLIP_WEIGHTS))
    if not any(all((folder / n).is_file() for n in names) for names in CLIP_TOKENIZER):
        missing.append("tokenizer files (vocab.json + merges.txt, or tokenizer.json)")
    if missing:
        raise SDiTError(f"{folder} lacks {', '.join(missing)}: it must be a CLIPModel folder as save_pretrained "
                        "writes it")
    # transformers 5 names the PIL-only processor apart; its default one needs torchvision.
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        processor = processor_cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise SDiTError(f"cannot load the CLIP model in {folder}: {str(err).strip().splitlines()[0]}") from err
    return Clip(model, tokenizer, processor, device)
