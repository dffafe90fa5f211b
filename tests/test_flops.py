"""FLOP counts: attention is counted, students match a hand count, SD 1.5's UNet matches its published size."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention as DiffusersAttention
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sdit.dit import FREQUENCY_EMBEDDING_SIZE as FREQ  # the timestep and guidance MLPs' input width
from sdit.dit import PRESETS, Attention, build_student
from sdit.flops import (
    TRAIN_STEP_FORWARDS,
    flops_table,
    forward_flops,
    student_flops,
    train_step_flops,
    unet_flops,
    unit_flops,
)
from sdit.teacher import SD15_CONFIG_DIR

# Published multiply-adds per forward: DiT-XL/2 at 32×32 latents (Peebles & Xie, counted with fvcore),
# and the widely quoted ~339 G of SD 1.x's UNet at 64×64 latents with 77 tokens (e.g. BK-SDM), which
# counts its layers only, so leaves out attention's two products, softmax(QKᵀ)·V, functional calls.
DIT_XL2_MACS = 118.6e9
SD15_UNET_LAYER_MACS = 339e9


def attention_macs(queries: int, keys: int, width: int) -> int:
    """QKᵀ and its product with V, summed over heads: 2 × queries × keys × width."""
    return 2 * queries * keys * width


def hand_macs(preset: str, sample_size: int, in_channels: int, text_dim: int, tokens: int, guidance: bool):
    """Multiply-adds of one SDiT forward at batch 1, from its architecture: (backbone, text, guidance).

    The backbone is what DiT also has, so it compares with DiT's published counts.
    """
    p = PRESETS[preset]
    d, depth, patch = p.hidden_size, p.depth, p.patch_size
    t, c, l = (sample_size // patch) ** 2, in_channels, tokens  # noqa: E741 (l: text tokens, as in the papers)
    backbone = (
        t * d * c * patch**2  # patch embedding (a strided conv)
        + FREQ * d + d * d  # timestep MLP
        + depth * (
            6 * d * d  # adaLN's 6 self-attention and MLP chunks
            + 4 * t * d * d + attention_macs(t, t, d)  # self-attention: q, k, v, out
            + 2 * t * d * int(d * p.mlp_ratio)  # MLP
        )
        + 2 * d * d + t * d * patch**2 * c  # final adaLN and linear
    )
    text = (
        l * text_dim * d + l * d * d  # token projection MLP
        + 2 * d * d  # pooled-text MLP
        + depth * (3 * d * d + 2 * t * d * d + 2 * l * d * d + attention_macs(t, l, d))  # adaLN chunks, q, out, k, v
    )
    return backbone, text, (FREQ * d + d * d if guidance else 0)


# ---- Attention ---------------------------------------------------------------


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_one_attention_layer_counts_its_projections_and_sdpa(device):
    """On CPU tensors SDPA's fused kernel would count 0; forward_flops forces a counted path."""
    d, heads, t, l = 64, 4, 48, 7  # noqa: E741
    with torch.device(device):
        layer = Attention(d, heads)
        x, context = torch.randn(1, t, d), torch.randn(1, l, d)
    projections = t * d * d + l * d * 2 * d + t * d * d  # q; k and v; out
    assert forward_flops(layer, x, context) == 2 * (projections + attention_macs(t, l, d))


def test_student_attention_grows_with_the_token_count_as_predicted():
    """Each extra text token adds its k, v projections and its column of attention in every block."""
    preset, size = "SDiT-T/2", 16
    p = PRESETS[preset]
    d, t = p.hidden_size, (size // p.patch_size) ** 2
    per_token = 768 * d + d * d + p.depth * (2 * d * d + attention_macs(t, 1, d))  # text MLP; k, v; attention
    extra = student_flops(preset, sample_size=size, tokens=154) - student_flops(preset, sample_size=size, tokens=77)
    assert extra == 2 * 77 * per_token


# ---- Students ----------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, size, channels, text_dim, tokens, guidance",
    [("SDiT-S/2", 32, 4, 768, 77, False), ("SDiT-T/4", 16, 3, 32, 5, True)],
)
def test_student_count_matches_the_architecture(preset, size, channels, text_dim, tokens, guidance):
    measured = student_flops(preset, sample_size=size, in_channels=channels, text_dim=text_dim, tokens=tokens,
                             guidance_embed=guidance)
    assert measured == 2 * sum(hand_macs(preset, size, channels, text_dim, tokens, guidance))


def test_student_backbone_matches_dit_xl2():
    """SDiT-XL/2 less its text parts is DiT-XL/2 (bar a label table and a learned-sigma head)."""
    backbone, text, _ = hand_macs("SDiT-XL/2", 32, 4, 768, 77, False)
    assert backbone == pytest.approx(DIT_XL2_MACS, rel=0.01)
    assert 0.15 < text / backbone < 0.3  # cross-attention to 77 tokens costs about a fifth more


def test_train_step_is_about_three_forwards():
    with torch.device("meta"):
        model = build_student("SDiT-Nano/2", sample_size=16, in_channels=4, text_dim=32)
        args = torch.empty(2, 4, 16, 16), torch.empty(2), torch.empty(2, 5, 32)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        model(*args).sum().backward()
    forward = forward_flops(model, *args)
    # A little under 3: the first layers need no gradient for their inputs.
    assert 0.95 * TRAIN_STEP_FORWARDS < counter.get_total_flops() / forward <= TRAIN_STEP_FORWARDS
    one = student_flops("SDiT-Nano/2", sample_size=16, text_dim=32, tokens=5)
    assert forward == 2 * one  # linear in the batch
    assert train_step_flops("SDiT-Nano/2", batch_size=8, sample_size=16, text_dim=32, tokens=5) == 3 * 8 * one


# ---- SD 1.5's UNet -----------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_unet():
    """FLOPs of SD 1.5's UNet at 64×64 with 77 tokens, and (queries, keys, width, cross_dim) per attention."""
    config = UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        args = torch.empty(1, 4, 64, 64), torch.empty(1), torch.empty(1, 77, 768)
    layers = []

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]  # (N, HW, C)
        context = kwargs.get("encoder_hidden_states")  # (N, L, 768) or None
        keys = hidden.shape[1] if context is None else context.shape[1]
        cross_dim = module.cross_attention_dim if context is not None else 0
        layers.append((hidden.shape[1], keys, module.inner_dim, cross_dim))

    for module in unet.modules():
        if isinstance(module, DiffusersAttention):
            module.register_forward_pre_hook(record, with_kwargs=True)
    return forward_flops(unet, *args), layers


def test_unet_matches_its_published_size_once_attention_is_added(sd15_unet):
    flops, layers = sd15_unet
    assert len(layers) == 32  # 16 transformer blocks, each self- and cross-attention
    attention = sum(attention_macs(q, k, w) for q, k, w, _ in layers)
    assert (flops / 2 - attention) == pytest.approx(SD15_UNET_LAYER_MACS, rel=0.01)
    assert attention > 0.15 * SD15_UNET_LAYER_MACS  # mostly the 4096-token self-attention at 64×64


def test_unet_attention_grows_with_the_token_count_as_predicted(sd15_unet):
    flops, layers = sd15_unet
    # Each extra token: its k and v projections (cross_dim → width) and its column of attention.
    per_token = sum(2 * cross_dim * w + attention_macs(q, 1, w) for q, _, w, cross_dim in layers if cross_dim)
    assert unet_flops(tokens=154) - flops == 2 * 77 * per_token


def test_flops_table(monkeypatch):
    # unet_flops is checked above; a stand-in keeps this test from counting the UNet a third time.
    monkeypatch.setattr("sdit.flops.unet_flops", lambda sample_size: sample_size * 1000)
    table = flops_table(presets=("SDiT-Nano/2", "SDiT-T/4"), sample_size=16)
    expected = {preset: student_flops(preset, sample_size=16) for preset in ("SDiT-Nano/2", "SDiT-T/4")}
    assert table == {**expected, "sd15_unet": 16_000}


def test_unit_flops_counts_each_stage_unit_at_the_latents_a_resolution_gives():
    units = unit_flops(SD15_CONFIG_DIR, 256, ("SDiT-S/2",))
    assert units["unet"] == unet_flops(sample_size=32)  # SD 1.5's VAE: 256 px -> 32x32 latents
    assert units["SDiT-S/2"] == student_flops("SDiT-S/2", sample_size=32)
    assert units["vae_encode"] > units["unet"] / 10 and units["vae_decode"] > units["vae_encode"]
    assert 0 < units["text_encoder"] < units["unet"]
