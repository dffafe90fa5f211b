"""SDiT: distil a Stable Diffusion teacher into a Diffusion Transformer from cached teacher targets."""

from sdit.errors import SDiTError

__version__ = "0.1.0"
__all__ = ["SDiTError", "__version__"]
