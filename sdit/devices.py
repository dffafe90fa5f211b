"""Device and dtype choices shared by every stage."""

import torch

from sdit.errors import SDiTError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when there is one; asking for CUDA without one is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SDiTError(f"--device {name}: no CUDA device is visible here; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise SDiTError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from err


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is fp32 on CPU (half precision is slow there) and fp16 on GPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise SDiTError(f"--dtype {name!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def setup_worker(device: str, dtype: str, threads: int | None) -> tuple[torch.device, torch.dtype]:
    """A stage worker's device and dtype. On CPU it also pins torch's thread count: convolutions round
    differently with another count, and every executor must write the same bytes."""
    dev = resolve_device(device)
    if dev.type == "cpu" and threads:
        torch.set_num_threads(threads)
    return dev, resolve_dtype(dtype, dev)
