"""Captions to CLIP token ids and text embeddings: the one tokenizer path of every stage.

Token ids are made as Stable Diffusion's pipelines make them: the start token, at most 75 tokens, the end token,
then padding to the tokenizer's context (77 for CLIP). `sdit encode`, the samplers and the toy teacher's trainer
all use `tokenize`, so a caption means the same ids everywhere.
"""

from __future__ import annotations

import numpy as np
import torch


def tokenize(tokenizer, captions: list[str]) -> tuple[torch.Tensor, np.ndarray]:
    """(N, L) token ids (L = the tokenizer's context; truncated to start + L − 2 tokens + end, padded with the
    pad token), and (N,) each caption's untruncated token count: one tokenizer pass for both."""
    limit = tokenizer.model_max_length
    full = tokenizer(captions, truncation=False).input_ids
    ids = torch.full((len(full), limit), tokenizer.pad_token_id, dtype=torch.long)
    for row, tokens in enumerate(full):
        if len(tokens) > limit:
            tokens = tokens[:limit - 1] + [tokenizer.eos_token_id]
        ids[row, :len(tokens)] = torch.tensor(tokens)
    return ids, np.array([len(t) for t in full])


@torch.no_grad()
def encode_text(tokenizer, text_encoder, prompts: list[str], device: torch.device) -> torch.Tensor:
    """(N, L, D) float32 CLIP last hidden states, rounded to float16 as the store keeps them: the student
    trained, and the teacher was labelled, on fp16-rounded text."""
    emb = text_encoder(tokenize(tokenizer, prompts)[0].to(device)).last_hidden_state  # (N, L, D)
    return emb.to(torch.float16).float()
