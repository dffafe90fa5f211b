"""The student: a text-conditioned Diffusion Transformer that predicts the noise ε.

DiT (Peebles & Xie, 2023) with two additions for text: cross-attention to the projected
CLIP token embeddings in every block, and a pooled text vector added to the conditioning
vector c that drives the adaLN-Zero modulation. With `text_positions`, the cross-attention
reads only the first so many of the text encoder's positions (the pooled vector still
averages them all). With `guidance_embed`, the student also takes the classifier-free
guidance scale w, for students distilled from a guided teacher: through c (an embedding of w,
as LCM's), or, with `guidance_linear`, at the output, which then has two heads combined as
u + w·d, the form of the teacher's own ε_u + w·(ε_c − ε_u), so that w needs no learning at all.

The file reads from small parts to large: embedders, attention, the block, the final
layer, the model, positional helpers, size presets. The network is only ε(x_t, t, text, [w]);
the noise schedule and samplers live elsewhere (diffusers' schedulers).
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

# Relative imports, of modules that import only torch, diffusers, transformers, numpy and PIL: run folders carry
# a copy of this module and of what it imports (sdit.run), which loads where sdit is not installed.
from .errors import SDiTError
from .presets import PRESETS, Preset, check_text_positions

FREQUENCY_EMBEDDING_SIZE = 256  # sinusoid width fed to the timestep and guidance MLPs (DiT's value)
MAX_PERIOD = 10_000  # longest sinusoid period, for timesteps, guidance and positions alike
# The guidance embedding's sinusoids take 1000·w, as LCM's w-embedding does: a quarter of their
# frequencies turn by more than a radian when w moves by 0.01, and half of them when it moves by 0.1.
GUIDANCE_EMBED_SCALE = 1000.0


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (N, T, D) shifted and scaled per sample by (N, D) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ---- Embedders ---------------------------------------------------------------


def sinusoidal_embedding(values: torch.Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE) -> torch.Tensor:
    """Fixed sinusoids of scalar values: (N,) -> (N, dim) in float32, [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, device=values.device) / half)  # (dim/2,)
    args = values.float()[:, None] * freqs[None]  # (N, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)


class ScalarEmbedder(nn.Module):
    """A scalar per sample (the timestep t, or the guidance scale w) to a vector: sinusoids, then an MLP."""

    def __init__(self, hidden_size: int, input_scale: float = 1.0):
        super().__init__()
        self.input_scale = input_scale
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_EMBEDDING_SIZE, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        freq = sinusoidal_embedding(values * self.input_scale)  # (N, 256) float32
        return self.mlp(freq.to(self.mlp[0].weight.dtype))  # (N, D)


class TextProjection(nn.Module):
    """CLIP token embeddings to the model width: (N, L, text_dim) -> (N, L, D).

    The input LayerNorm makes the student indifferent to the scale of whichever text
    encoder produced the store (SD 1.5's CLIP or the toy teacher's).
    """

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(text_dim)
        self.mlp = nn.Sequential(
            nn.Linear(text_dim, hidden_size),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(text))  # (N, L, D)


class TextPooler(nn.Module):
    """The projected tokens to one vector for c: the mean over all L positions, then an MLP.

    The mean, not the end-of-text token: the store keeps embeddings, not token ids, so the
    EOS position is unknown; and SD 1.5 pads with EOS tokens that (CLIP being causal) have
    each seen the whole caption, so the mean over 77 positions is mostly caption summary.
    No mask is needed, the same as SD's UNet, which cross-attends to all 77.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens.mean(dim=1))  # (N, L, D) -> (N, D)


# ---- Attention ---------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention of x to a context: x itself (self-attention) or the text tokens."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(hidden_size, hidden_size)
        self.to_kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context  # (N, L, D)
        n, t, d = x.shape
        h = self.num_heads
        q = self.to_q(x).view(n, t, h, d // h).transpose(1, 2)  # (N, H, T, D/H)
        k, v = self.to_kv(context).view(n, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 × (N, H, L, D/H)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D/H)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_ratio: float):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (N, T, D)


# ---- Core blocks -------------------------------------------------------------


class SDiTBlock(nn.Module):
    """Self-attention, cross-attention to the text, MLP; each adaLN-Zero modulated by c."""

    # The nine chunks of adaLN_modulation's output, in order; the middle three serve the
    # cross-attention, which DiT does not have (count_parameters relies on this).
    MODULATIONS = (
        "shift_sa", "scale_sa", "gate_sa",
        "shift_ca", "scale_ca", "gate_ca",
        "shift_mlp", "scale_mlp", "gate_mlp",
    )  # fmt: skip

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(hidden_size, num_heads)
        self.norm3 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, len(self.MODULATIONS) * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        m = self.adaLN_modulation(c).chunk(len(self.MODULATIONS), dim=-1)  # 9 × (N, D)
        shift_sa, scale_sa, gate_sa, shift_ca, scale_ca, gate_ca, shift_mlp, scale_mlp, gate_mlp = m
        x = x + gate_sa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_sa, scale_sa))  # (N, T, D)
        x = x + gate_ca.unsqueeze(1) * self.cross_attn(modulate(self.norm2(x), shift_ca, scale_ca), text)  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from each token to its patch of ε."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 × (N, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (N, T, p*p*C)


# ---- The model ---------------------------------------------------------------


class SDiT(ModelMixin, ConfigMixin):
    """ε(x_t, t, text, [w]): a DiT conditioned on CLIP text embeddings.

    Built from a named preset with `build_student`; saved and loaded with diffusers'
    `save_pretrained` / `from_pretrained` (the `__init__` arguments are the config).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["SDiTBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        text_dim: int = 768,
        guidance_embed: bool = False,
        guidance_linear: bool = False,
        text_positions: int | None = None,
    ):
        super().__init__()
        check_sizes(sample_size=sample_size, patch_size=patch_size, hidden_size=hidden_size, num_heads=num_heads)
        check_text_positions(text_positions)
        if guidance_linear and not guidance_embed:
            raise SDiTError("guidance_linear is a way for a guidance-distilled student to take w: set guidance_embed")
        self.gradient_checkpointing = False  # switched by enable_gradient_checkpointing()

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        grid = sample_size // patch_size
        # Fixed, so not saved: rebuilt here, and in forward for other resolutions.
        self.register_buffer("pos_embed", sincos_2d_embedding(hidden_size, grid, grid), persistent=False)
        self.t_embedder = ScalarEmbedder(hidden_size)
        self.g_embedder = ScalarEmbedder(hidden_size, GUIDANCE_EMBED_SCALE) \
            if guidance_embed and not guidance_linear else None
        self.text_proj = TextProjection(text_dim, hidden_size)
        self.text_pool = TextPooler(hidden_size)
        self.blocks = nn.ModuleList(SDiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels * (2 if guidance_linear else 1))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, and every adaLN-Zero path and the output at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # The patch embedding is a linear map of each flattened patch.
        nn.init.xavier_uniform_(self.x_embedder.weight.view(self.x_embedder.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for embedder in (self.t_embedder, self.g_embedder):
            if embedder is not None:
                nn.init.normal_(embedder.mlp[0].weight, std=0.02)
                nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        # Each block starts as the identity; the output starts at exactly zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        guidance: torch.Tensor | float | None = None,
        return_dict: bool = False,
    ) -> torch.Tensor | Transformer2DModelOutput:
        """Predict ε for noisy latents.

        sample (N, C, H, W) with H and W multiples of patch_size; timestep (N,) or a scalar,
        on the teacher's scale (0..999 for SD); encoder_hidden_states (N, L, text_dim), of which
        a student built with text_positions cross-attends to the first text_positions only;
        guidance (N,) or a scalar, the CFG scale w, required if and only if the model was
        built with guidance_embed. Returns ε (N, C, H, W), or a Transformer2DModelOutput
        with return_dict=True; with guidance_linear, ε = u + w·d of the output's two heads.
        """
        n, _, h, w = sample.shape
        self._check_inputs(sample, encoder_hidden_states, guidance)
        p = self.config.patch_size
        x = self.x_embedder(sample).flatten(2).transpose(1, 2)  # (N, T, D), T = H*W/p²
        x = x + self._pos_embed(h // p, w // p).to(x.dtype)  # (N, T, D)
        text = self.text_proj(encoder_hidden_states)  # (N, L, D)
        c = self.t_embedder(per_sample(timestep, n, sample.device))  # (N, D)
        if self.g_embedder is not None:
            c = c + self.g_embedder(per_sample(guidance, n, sample.device))  # (N, D)
        c = c + self.text_pool(text)  # (N, D)
        text = text[:, : self.config.text_positions]  # (N, L', D): the keys and values of every cross-attention
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c, text)  # (N, T, D)
            else:
                x = block(x, c, text)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*C)
        eps = unpatchify(x, h // p, w // p, p)  # (N, C, H, W), or (N, 2C, H, W) with guidance_linear
        if self.config.guidance_linear:
            u, d = eps.chunk(2, dim=1)  # 2 × (N, C, H, W)
            eps = u + per_sample(guidance, n, sample.device).to(d.dtype).view(n, 1, 1, 1) * d
        return Transformer2DModelOutput(sample=eps) if return_dict else eps

    def _pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        grid = self.config.sample_size // self.config.patch_size
        if (grid_h, grid_w) == (grid, grid):
            return self.pos_embed  # (T, D)
        return sincos_2d_embedding(self.config.hidden_size, grid_h, grid_w, device=self.pos_embed.device)  # (T, D)

    def _check_inputs(self, sample: torch.Tensor, text: torch.Tensor, guidance) -> None:
        cfg = self.config
        if sample.shape[1] != cfg.in_channels or sample.shape[2] % cfg.patch_size or sample.shape[3] % cfg.patch_size:
            raise SDiTError(
                f"latents of shape {tuple(sample.shape)} do not fit this student: it takes {cfg.in_channels} channels "
                f"and a height and width that are multiples of patch size {cfg.patch_size}"
            )
        if text.ndim != 3 or text.shape[-1] != cfg.text_dim:
            raise SDiTError(
                f"text embeddings of shape {tuple(text.shape)} do not fit this student: it takes (N, L, {cfg.text_dim})"
            )
        if cfg.guidance_embed and guidance is None:
            raise SDiTError("this student is guidance-distilled: pass the guidance scale w")
        if not cfg.guidance_embed and guidance is not None:
            raise SDiTError("this student has no guidance embedding: pass guidance=None and apply CFG at sampling time")


# ---- Tensor helpers ----------------------------------------------------------


def per_sample(value: torch.Tensor | float, n: int, device: torch.device) -> torch.Tensor:
    """A scalar or an (N,) tensor of t or w as an (N,) float tensor on `device`."""
    value = torch.as_tensor(value, device=device)
    if value.ndim == 0:
        return value.expand(n)
    if value.shape != (n,):
        raise SDiTError(f"expected a scalar or one value per sample ({n}), got shape {tuple(value.shape)}")
    return value


def unpatchify(x: torch.Tensor, grid_h: int, grid_w: int, patch_size: int) -> torch.Tensor:
    """Tokens back to an image: (N, T, p*p*C) -> (N, C, grid_h*p, grid_w*p)."""
    n, p = x.shape[0], patch_size
    x = x.reshape(n, grid_h, grid_w, p, p, -1)  # (N, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, p)
    return x.reshape(n, x.shape[1], grid_h * p, grid_w * p)  # (N, C, H, W)


# ---- Positional embedding ----------------------------------------------------


def sincos_1d_embedding(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Fixed sinusoids of positions: (M,) -> (M, dim), [sin | cos]."""
    omega = 1.0 / MAX_PERIOD ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim // 2))
    args = positions.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (M, dim)


def sincos_2d_embedding(dim: int, grid_h: int, grid_w: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2D positions for a row-major grid of patches: (grid_h*grid_w, dim) in float32.

    Half the channels encode the row, half the column, at integer patch coordinates (as
    DiT): a grid smaller or larger than the training one keeps the positions it shares
    with it, so other resolutions extend the training grid rather than squeeze it.
    """
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)  # (T,)
    cols = torch.arange(grid_w, device=device).repeat(grid_h)  # (T,)
    emb = torch.cat([sincos_1d_embedding(dim // 2, rows), sincos_1d_embedding(dim // 2, cols)], dim=1)  # (T, D)
    return emb.float()


# ---- Sizes and presets -------------------------------------------------------


def check_sizes(*, sample_size: int, patch_size: int, hidden_size: int, num_heads: int) -> None:
    """Raise SDiTError, in one line, for a size the model cannot be built with."""
    if min(sample_size, patch_size, hidden_size, num_heads) < 1:
        raise SDiTError("sample_size, patch_size, hidden_size and num_heads must be positive")
    if sample_size % patch_size:
        raise SDiTError(
            f"sample_size {sample_size} is not a multiple of patch_size {patch_size}: pick another patch or latent size"
        )
    if hidden_size % num_heads:
        raise SDiTError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    if hidden_size % 4:
        raise SDiTError(f"hidden_size {hidden_size} must be a multiple of 4 for the 2D sin-cos positions")


def build_student(
    preset: str,
    *,
    sample_size: int,
    in_channels: int,
    text_dim: int,
    guidance_embed: bool = False,
    guidance_linear: bool = False,
    text_positions: int | None = None,
    **overrides,
) -> SDiT:
    """A fresh student of a named size; `overrides` replace any of the preset's fields."""
    if preset not in PRESETS:
        raise SDiTError(f"unknown student preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    allowed = {f.name for f in fields(Preset)}
    if unknown := sorted(set(overrides) - allowed):
        raise SDiTError(f"cannot override {', '.join(unknown)} of a preset; allowed: {', '.join(sorted(allowed))}")
    size = asdict(PRESETS[preset]) | overrides
    return SDiT(
        sample_size=sample_size, in_channels=in_channels, text_dim=text_dim, guidance_embed=guidance_embed,
        guidance_linear=guidance_linear, text_positions=text_positions, **size
    )


def count_parameters(model: SDiT) -> dict[str, int]:
    """Parameter counts: total; backbone (what DiT also has); text; guidance.

    The backbone leaves out the text projection and pooling, each block's cross-attention
    with its third of the adaLN modulation, and the guidance embedder, so it compares with
    DiT's published sizes (which also hold a class-label table and a learned-sigma output
    that SDiT does not have). Works on the meta device.
    """
    numel = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    text = numel(model.text_proj) + numel(model.text_pool)
    for block in model.blocks:
        modulation = numel(block.adaLN_modulation)
        text += numel(block.cross_attn) + modulation * 3 // len(SDiTBlock.MODULATIONS)
    guidance = numel(model.g_embedder) if model.g_embedder is not None else 0
    total = numel(model)
    return {"total": total, "backbone": total - text - guidance, "text": text, "guidance": guidance}
