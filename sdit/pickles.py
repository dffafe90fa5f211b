"""PyTorch pickles (`.ckpt`, `optimizer.pt`) read as data: `torch.load(weights_only=True)`, errors in one line.

A pickle can name any callable, which unpickling would run; weights_only=True refuses every one that is not a
tensor or plain container. torch's own messages for a refused or damaged file run to several lines and end by
suggesting weights_only=False; these name the file and what is wrong instead, and never suggest that.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from sdit.errors import SDiTError, brief


def load_pickle(path: str | Path, what: str = "a PyTorch checkpoint"):
    """The objects in the pickle at `path`, on the CPU, memory-mapped when it is a zip file (what torch.save
    writes); `what` names the file in errors ("a PyTorch checkpoint", "a checkpoint's optimiser state")."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses the file
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", str(err)):
            raise SDiTError(f"{path}: refused: the pickle would run code or build objects other than tensors "
                            f"({found.group(1)}); convert it to .safetensors from a trusted environment") from None
        raise SDiTError(f"{path}: not {what}, or a damaged one (its pickle does not read as tensors)") from None
    except FileNotFoundError:
        raise SDiTError(f"{path}: not found") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError, ... for bytes it cannot read
        raise SDiTError(f"{path}: not {what}, or a damaged one ({brief(err)})") from None
