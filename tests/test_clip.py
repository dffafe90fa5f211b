"""sdit.clip: each image's cosine against a hand-computed one, both score conventions (the clamp of the mean
included), an open_clip checkpoint checked against a forward written here, its preprocessing, one-line errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdit.clip import OpenClipPreprocess, clip_score, load_clip, open_clip_text
from sdit.config import SD15_CONFIG_DIR
from sdit.errors import SDiTError

# CLIP's pixel normalisation (OpenAI's mean and standard deviation per channel).
CLIP_MEAN, CLIP_STD = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
CAPTIONS = ["a red circle", "a blue square on a white background", "a green star"]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_clip_score_conventions():
    """torchmetrics: 100 × the mean cosine, clamped at 0 as a whole (not per image); BK-SDM: the mean raw cosine."""
    assert clip_score(np.array([0.3, -0.1]), "torchmetrics") == pytest.approx(10.0)
    assert clip_score(np.array([0.3, -0.1]), "bk-sdm") == pytest.approx(0.1)
    assert clip_score(np.array([-0.2, 0.1]), "torchmetrics") == 0.0
    assert clip_score(np.array([-0.2, 0.1]), "bk-sdm") == pytest.approx(-0.05)
    with pytest.raises(SDiTError, match="unknown CLIP score convention 'clean': choose one of torchmetrics, bk-sdm"):
        clip_score(np.array([0.1]), "clean")


def test_cosines_are_the_models_own_cosines(clip_folder):
    """Each image's cosine against its caption, from the model's embeddings computed here: pixels normalised by hand
    (32x32 images, which the processor's resize and crop leave as they are), each caption tokenised alone. Negating
    the text projection flips every cosine's sign, so one of the two means is negative: torchmetrics scores it 0,
    BK-SDM's convention keeps it."""
    from transformers import CLIPModel, CLIPTokenizer

    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    model = CLIPModel.from_pretrained(clip_folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(clip_folder)
    x = torch.from_numpy((pixels / 255 - CLIP_MEAN) / CLIP_STD).permute(0, 3, 1, 2).float()  # (3, 3, 32, 32)
    with torch.no_grad():
        img = [model.get_image_features(pixel_values=x[i:i + 1]) for i in range(3)]
        txt = [model.get_text_features(input_ids=torch.tensor([tokenizer(c)["input_ids"]])) for c in CAPTIONS]
    img, txt = ([getattr(f, "pooler_output", f)[0].double().numpy() for f in fs] for fs in (img, txt))
    cos = np.array([cosine(a, b) for a, b in zip(img, txt)])
    assert abs(cos.mean()) > 1e-3

    clip = load_clip(clip_folder, torch.device("cpu"))
    images = [Image.fromarray(p) for p in pixels]
    got = clip.cosines(images, CAPTIONS)
    assert got.dtype == np.float64 and got.shape == (3,)
    np.testing.assert_allclose(got, cos, atol=1e-5)
    with torch.no_grad():
        clip.model.text_projection.weight.neg_()
    flipped = clip.cosines(images, CAPTIONS)
    np.testing.assert_allclose(flipped, -cos, atol=1e-5)
    for c, hand in ((got, cos), (flipped, -cos)):
        assert clip_score(c, "torchmetrics") == pytest.approx(100 * max(hand.mean(), 0), abs=1e-3)
        assert clip_score(c, "bk-sdm") == pytest.approx(hand.mean(), abs=1e-5)
    assert min(clip_score(c, "torchmetrics") for c in (got, flipped)) == 0.0


def test_a_missing_clip_file_is_named(clip_folder, tmp_path):
    import shutil

    broken = tmp_path / "clip"
    shutil.copytree(clip_folder, broken)
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(SDiTError, match="lacks preprocessor_config.json"):
        load_clip(broken, torch.device("cpu"))
    with pytest.raises(SDiTError, match="CLIP model folder not found"):
        load_clip(tmp_path / "nope", torch.device("cpu"))


# --- open_clip checkpoints --------------------------------------------------------------------------------------
WIDTH, HEADS, LAYERS, EMBED, PATCH, SIZE, CONTEXT, VOCAB = 32, 2, 2, 16, 8, 32, 77, 49408
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def open_clip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in open_clip's layout (CLIP with a ViT and its own text tower)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def ln(name):
        return {f"{name}.weight": 1 + r(WIDTH, scale=0.1), f"{name}.bias": r(WIDTH, scale=0.1)}

    def blocks(prefix):
        out = {}
        for i in range(LAYERS):
            b = f"{prefix}transformer.resblocks.{i}."
            out |= ln(b + "ln_1") | ln(b + "ln_2")
            out |= {b + "attn.in_proj_weight": r(3 * WIDTH, WIDTH), b + "attn.in_proj_bias": r(3 * WIDTH),
                    b + "attn.out_proj.weight": r(WIDTH, WIDTH), b + "attn.out_proj.bias": r(WIDTH),
                    b + "mlp.c_fc.weight": r(4 * WIDTH, WIDTH), b + "mlp.c_fc.bias": r(4 * WIDTH),
                    b + "mlp.c_proj.weight": r(WIDTH, 4 * WIDTH), b + "mlp.c_proj.bias": r(WIDTH)}
        return out

    grid = (SIZE // PATCH) ** 2
    text = {"token_embedding.weight": r(VOCAB, WIDTH), "positional_embedding": r(CONTEXT, WIDTH),
            "text_projection": r(WIDTH, EMBED), "logit_scale": torch.tensor(4.6), "attn_mask": torch.zeros(1)}
    vision = {"visual.class_embedding": r(WIDTH), "visual.positional_embedding": r(grid + 1, WIDTH),
              "visual.conv1.weight": r(WIDTH, 3, PATCH, PATCH, scale=0.05), "visual.proj": r(WIDTH, EMBED)}
    return text | ln("ln_final") | blocks("") | vision | ln("visual.ln_pre") | ln("visual.ln_post") | blocks("visual.")


def open_clip_folder(folder, state: dict, **model_cfg) -> object:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"embed_dim": EMBED, "vision_cfg": {"image_size": SIZE, "layers": LAYERS, "width": WIDTH,
                                              "head_width": WIDTH // HEADS, "patch_size": PATCH},
           "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": WIDTH, "heads": HEADS,
                        "layers": LAYERS}} | model_cfg
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg,
                                                              "preprocess_cfg": {"mean": MEAN, "std": STD}}))
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    return folder


def reference_forward(s: dict, pixels: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's CLIP forward written out: pre-norm blocks with packed q/k/v, a causal text tower pooled at the
    highest token id (the end token), the class token's output for images; both projected by `x @ proj`."""

    def norm(x, name):
        return F.layer_norm(x, (WIDTH,), s[f"{name}.weight"], s[f"{name}.bias"], eps=1e-5)

    def tower(x, prefix, causal):
        for i in range(LAYERS):
            b = f"{prefix}transformer.resblocks.{i}."
            qkv = F.linear(norm(x, b + "ln_1"), s[b + "attn.in_proj_weight"], s[b + "attn.in_proj_bias"])
            q, k, v = qkv.chunk(3, -1)  # (N, T, D) each
            q, k, v = (t.unflatten(-1, (HEADS, WIDTH // HEADS)).transpose(1, 2) for t in (q, k, v))  # (N, H, T, d)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).flatten(2)  # (N, T, D)
            x = x + F.linear(a, s[b + "attn.out_proj.weight"], s[b + "attn.out_proj.bias"])
            h = F.gelu(F.linear(norm(x, b + "ln_2"), s[b + "mlp.c_fc.weight"], s[b + "mlp.c_fc.bias"]))
            x = x + F.linear(h, s[b + "mlp.c_proj.weight"], s[b + "mlp.c_proj.bias"])
        return x

    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)  # (N, grid, D)
    x = torch.cat([s["visual.class_embedding"].expand(len(x), 1, WIDTH), x], 1) + s["visual.positional_embedding"]
    x = tower(norm(x, "visual.ln_pre"), "visual.", causal=False)
    img = norm(x[:, 0], "visual.ln_post") @ s["visual.proj"]
    t = tower(s["token_embedding.weight"][ids] + s["positional_embedding"][: ids.shape[1]], "", causal=True)
    txt = norm(t, "ln_final")[torch.arange(len(ids)), ids.argmax(-1)] @ s["text_projection"]
    return img, txt


def test_an_open_clip_checkpoint_scores_as_open_clip_would(tmp_path):
    """The converted model's cosines equal those of open_clip's forward written here (pixels normalised by the
    config's mean and std, captions padded with 0 to 77 as open_clip's tokenizer does); one key per kind of mapping
    checked by name; the weights file itself loads the same."""
    from transformers import CLIPTokenizer

    state = open_clip_state()
    folder = open_clip_folder(tmp_path / "oc", state)
    pixels = np.random.default_rng(1).integers(0, 256, size=(3, SIZE, SIZE, 3), dtype=np.uint8)
    x = torch.from_numpy((pixels / 255 - np.array(MEAN)) / np.array(STD)).permute(0, 3, 1, 2).float()
    tokenizer = CLIPTokenizer.from_pretrained(SD15_CONFIG_DIR / "tokenizer")
    ids = torch.zeros(3, CONTEXT, dtype=torch.long)
    for i, c in enumerate(CAPTIONS):
        tokens = tokenizer(c)["input_ids"]
        ids[i, : len(tokens)] = torch.tensor(tokens)
    with torch.no_grad():
        img, txt = reference_forward(state, x, ids)
    expected = F.cosine_similarity(img.double(), txt.double(), dim=-1).numpy()

    clip = load_clip(folder, torch.device("cpu"))
    images = [Image.fromarray(p) for p in pixels]
    np.testing.assert_allclose(clip.cosines(images, CAPTIONS), expected, atol=1e-5)
    m = clip.model
    assert torch.equal(m.text_model.encoder.layers[1].self_attn.k_proj.weight,
                       state["transformer.resblocks.1.attn.in_proj_weight"][WIDTH:2 * WIDTH])
    assert torch.equal(m.vision_model.encoder.layers[0].self_attn.v_proj.bias,
                       state["visual.transformer.resblocks.0.attn.in_proj_bias"][2 * WIDTH:])
    assert torch.equal(m.vision_model.encoder.layers[1].mlp.fc2.weight,
                       state["visual.transformer.resblocks.1.mlp.c_proj.weight"])
    assert torch.equal(m.text_projection.weight, state["text_projection"].t())
    assert torch.equal(m.visual_projection.weight, state["visual.proj"].t())
    assert torch.equal(m.vision_model.pre_layrnorm.bias, state["visual.ln_pre.bias"])
    assert torch.equal(m.vision_model.embeddings.patch_embedding.weight, state["visual.conv1.weight"])
    assert m.logit_scale.item() == pytest.approx(4.6)
    by_file = load_clip(folder / "open_clip_pytorch_model.bin", torch.device("cpu"))
    np.testing.assert_allclose(by_file.cosines(images, CAPTIONS), expected, atol=1e-5)
    from safetensors.torch import save_file

    (folder / "open_clip_pytorch_model.bin").unlink()
    save_file({k: v.half() for k, v in state.items()}, folder / "open_clip_model.safetensors")  # read back as fp32
    half = load_clip(folder, torch.device("cpu"))
    assert half.model.dtype == torch.float32
    np.testing.assert_allclose(half.cosines(images, CAPTIONS), expected, atol=2e-2)


def test_open_clip_preprocessing():
    """Shortest side resized bicubic (long side truncated), centre crop with torchvision's rounded offsets, the
    config's mean and std: on a 48x75 image, 75 * 32 / 48 = 50 columns, 9 cut on the left (round(9.0))."""
    rgb = np.random.default_rng(2).integers(0, 256, size=(48, 75, 3), dtype=np.uint8)
    small = np.asarray(Image.fromarray(rgb).resize((50, 32), Image.BICUBIC), dtype=np.float64)[:, 9:41]
    expected = ((small / 255 - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)
    got = OpenClipPreprocess(SIZE, MEAN, STD)([Image.fromarray(rgb)])
    assert got.shape == (1, 3, SIZE, SIZE)
    np.testing.assert_allclose(got[0].numpy(), expected, atol=1e-5)
    tall = Image.fromarray(rgb.transpose(1, 0, 2).copy())  # 75x48, OpenAI's normalisation by default: rows 9..41
    small = np.asarray(tall.resize((32, 50), Image.BICUBIC), dtype=np.float64)[9:41]
    np.testing.assert_allclose(OpenClipPreprocess(SIZE)([tall])[0].numpy(),
                               ((small / 255 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1), atol=1e-5)


def test_open_clip_cleans_captions_as_its_tokenizer_does():
    """HTML entities unescaped twice (&amp;amp; -> &), whitespace runs made one space, the ends stripped."""
    assert open_clip_text(" a caf\u00e9 &amp;amp; bar\n\t two  &lt;dogs&gt; ") == "a caf\u00e9 & bar two <dogs>"


def test_open_clip_errors_are_one_line(tmp_path):
    state = open_clip_state()
    with pytest.raises(SDiTError, match="lacks open_clip_model.safetensors or open_clip_pytorch_model.bin"):
        folder = open_clip_folder(tmp_path / "no-weights", state)
        (folder / "open_clip_pytorch_model.bin").unlink()
        load_clip(folder, torch.device("cpu"))
    extra = open_clip_folder(tmp_path / "extra", state | {"visual.attn_pool.query": torch.zeros(4, WIDTH)})
    with pytest.raises(SDiTError, match="has visual.attn_pool.query, which a transformers CLIPModel has no place"):
        load_clip(extra, torch.device("cpu"))
    short = {k: v for k, v in state.items() if k != "visual.ln_post.bias"}
    with pytest.raises(SDiTError, match="lacks the weights for vision_model.post_layernorm.bias"):
        load_clip(open_clip_folder(tmp_path / "short", short), torch.device("cpu"))
    with pytest.raises(SDiTError, match="visual_projection.weight has shape \\(16, 32\\), its config says \\(8, 32\\)"):
        load_clip(open_clip_folder(tmp_path / "shape", state, embed_dim=8), torch.device("cpu"))
    odd = open_clip_folder(tmp_path / "odd", state)
    cfg = json.loads((odd / "open_clip_config.json").read_text())
    cfg["model_cfg"]["text_cfg"]["pool_type"] = "last"
    (odd / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SDiTError, match="sets pool_type: only plain ViT CLIP models"):
        load_clip(odd, torch.device("cpu"))
    (odd / "open_clip_config.json").write_text("{")
    with pytest.raises(SDiTError, match="is not valid JSON"):
        load_clip(odd, torch.device("cpu"))
    junk = tmp_path / "junk" / "model.bin"
    junk.parent.mkdir()
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SDiTError, match="lacks open_clip_config.json: copy open_clip's model config"):
        load_clip(junk, torch.device("cpu"))
    (junk.parent / "open_clip_config.json").write_text((tmp_path / "extra" / "open_clip_config.json").read_text())
    with pytest.raises(SDiTError, match="cannot read the open_clip checkpoint"):
        load_clip(junk, torch.device("cpu"))
