"""SDiT: distil a Stable Diffusion teacher into a Diffusion Transformer from cached teacher targets."""

from sdit.errors import SDiTError

__version__ = "0.1.0"
__all__ = ["SDiT", "SDiTError", "SDiTPipeline", "__version__"]


def __getattr__(name: str):
    # Imported lazily, so `import sdit` stays cheap for the CLI and library users that need no torch model. A run
    # folder that carries no code names its student ("sdit", "SDiT") in model_index.json: diffusers finds it here
    # once sdit is imported (`SDiTPipeline.from_pretrained` needs none of this).
    if name == "SDiT":
        from sdit.dit import SDiT

        return SDiT
    if name == "SDiTPipeline":
        from sdit.pipeline_sdit import SDiTPipeline

        return SDiTPipeline
    if name == "ModelMixin":
        # diffusers picks a component's loader by checking its class against `<library>.ModelMixin`, and the
        # library of such a run folder's transformer is "sdit": without this it cannot load through diffusers.
        from diffusers import ModelMixin

        return ModelMixin
    raise AttributeError(f"module 'sdit' has no attribute {name!r}")
