"""The one tokenizer path: SD's truncation and padding, token counts, fp16-rounded embeddings."""

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from sdit.teacher import SD15_CONFIG_DIR, load_tokenizer
from sdit.text import encode_text, tokenize


def test_tokenize_matches_the_tokenizers_own_truncation():
    tok = load_tokenizer(SD15_CONFIG_DIR)
    captions = ["a photo of a cat", "", " ".join(["word"] * 75), " ".join(["word"] * 76), " ".join(["long"] * 200)]
    ids, lengths = tokenize(tok, captions)
    expected = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, expected)
    assert list(lengths) == [7, 2, 77, 78, 202]


def test_text_embeddings_are_rounded_to_the_stores_float16():
    tok = load_tokenizer(SD15_CONFIG_DIR)
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, max_position_embeddings=77, vocab_size=49408))
    emb = encode_text(tok, model, ["a red circle", ""], torch.device("cpu"))
    assert emb.shape == (2, 77, 32) and emb.dtype == torch.float32
    assert torch.equal(emb, emb.to(torch.float16).float())
    raw = model(tokenize(tok, ["a red circle"])[0]).last_hidden_state
    assert torch.equal(emb[0], raw[0].to(torch.float16).float())
