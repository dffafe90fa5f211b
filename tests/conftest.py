import os
from pathlib import Path

import pytest

# Nothing in the tests may reach a hub: every model loads from local disk.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data" / "samples"


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A tiny random-weight SD teacher in the diffusers layout."""
    from sdit.tiny import save_tiny_teacher

    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_single_file(tmp_path_factory) -> Path:
    """The same weights as `tiny_teacher`, as one original-layout .safetensors file (its folder holds the
    configs that --teacher-config points at)."""
    from sdit.tiny import save_tiny_teacher

    return save_tiny_teacher(tmp_path_factory.mktemp("single") / "tiny-sd", single_file=True)
