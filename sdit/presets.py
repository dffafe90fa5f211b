"""Student sizes: named presets, without torch, so the CLI can list them before it imports anything heavy."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SDiTError


@dataclass(frozen=True)
class Preset:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0


_DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # depth, width, heads

PRESETS: dict[str, Preset] = {
    **{
        f"SDiT-{size}/{patch}": Preset(depth, hidden, heads, patch)
        for size, (depth, hidden, heads) in _DIT_SIZES.items()
        for patch in (2, 4, 8)
    },
    # The shapes-world demo (8×8 latents), sized to train on a CPU; depth before width, for composition.
    "SDiT-T/2": Preset(depth=6, hidden_size=128, num_heads=4, patch_size=2),
    "SDiT-T/4": Preset(depth=6, hidden_size=128, num_heads=4, patch_size=4),
    # Unit tests only.
    "SDiT-Nano/2": Preset(depth=2, hidden_size=32, num_heads=2, patch_size=2),
}

# The sizes benchmarks compare at SD 1.5's scale, as DiT's paper does.
DEFAULT_PRESETS = ("SDiT-S/2", "SDiT-B/2", "SDiT-L/2", "SDiT-XL/2")


def check_text_positions(value: int | None, name: str = "text_positions") -> None:
    """A student's text positions (None: all), refused in one line below the two a caption takes."""
    if value is not None and value < 2:
        raise SDiTError(f"{name} {value}: give 2 or more (a caption's start and end tokens)")
