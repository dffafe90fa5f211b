import pickle
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from sdit.convert import to_original_layout
from sdit.errors import SDiTError
from sdit.teacher import SD15_CONFIG_DIR, load_teacher, load_tokenizer, read_state_dict
from sdit.tiny import build_tiny_components


def test_tokenizer_is_real_clip_bpe():
    tok = load_tokenizer(SD15_CONFIG_DIR)
    assert len(tok) == 49408
    assert (tok.bos_token_id, tok.eos_token_id, tok.model_max_length) == (49406, 49407, 77)
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70  # SD 1.5 pads with the end token


def test_sd15_configs_build_the_published_sizes():
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 859_520_964
    assert count(vae) == 83_653_863
    assert count(text) == 123_060_480


def _outputs(teacher, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    ids = teacher.tokenizer(["a red circle", "a photo of a cat"], padding="max_length", max_length=77,
                            return_tensors="pt").input_ids
    text = teacher.text_encoder(ids).last_hidden_state
    latents = teacher.vae.encode(pixels).latent_dist.mean
    eps = teacher.unet(latents, torch.tensor([10, 900]), encoder_hidden_states=text).sample
    return text, latents, eps


def test_both_layouts_load_the_same_teacher(tiny_teacher, tiny_single_file):
    folder = load_teacher(tiny_teacher)
    single = load_teacher(tiny_single_file, config_dir=tiny_single_file.parent)
    assert folder.identity.layout == "diffusers" and single.identity.layout == "single_file"
    assert folder.identity.hashes == single.identity.hashes  # identity is the weights, not the layout
    with torch.no_grad():
        for a, b in zip(_outputs(folder), _outputs(single)):
            assert torch.equal(a, b)


def test_ckpt_with_ema_and_state_dict_wrapper(tmp_path, tiny_single_file):
    """SD 1.5's v1-5-pruned.ckpt: {"state_dict": ...} with both weights and `model_ema.*` copies."""
    state = read_state_dict(tiny_single_file)
    ema = {}
    for key, value in state.items():
        if key.startswith("model.diffusion_model."):
            ema["model_ema." + "".join(key.split(".")[1:])] = value + 1.0  # the original's flattened EMA names
    ckpt = tmp_path / "pruned.ckpt"
    torch.save({"state_dict": state | ema, "global_step": 470000}, ckpt)
    plain = load_teacher(tiny_single_file, config_dir=tiny_single_file.parent, components=["unet"])
    with_ema = load_teacher(ckpt, config_dir=tiny_single_file.parent, components=["unet"])
    no_ema = load_teacher(ckpt, config_dir=tiny_single_file.parent, components=["unet"], use_ema=False)
    assert no_ema.identity.hashes == plain.identity.hashes
    w = "conv_in.weight"
    assert torch.equal(with_ema.unet.state_dict()[w], plain.unet.state_dict()[w] + 1.0)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling this runs `open(marker, "w")`
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Payload(marker)}, bad)
    with pytest.raises(SDiTError, match="refused"):
        load_teacher(bad)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # sanity: a plain pickle.load would have run it
        torch.load(bad, weights_only=True)
    torch.load(bad, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name, content, message", [
    ("missing.ckpt", None, "not found"),
    ("notes.txt", b"hello", "not a checkpoint"),
    ("garbage.ckpt", b"\x00\x01 not a pickle", "not a PyTorch checkpoint"),
    ("garbage.safetensors", b"\x00\x01", "not a readable safetensors"),
])
def test_bad_paths_give_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SDiTError, match=message) as err:
        load_teacher(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("keys, message", [
    ({"conditioner.embedders.0.transformer.text_model.x": torch.zeros(1),
      "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, "SDXL"),
    ({"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(1),
      "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, "SD 2.x"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)}, "inpainting"),
    ({"some.other.model": torch.zeros(1)}, "not a Stable Diffusion checkpoint"),
])
def test_unsupported_checkpoints_are_named(tmp_path, keys, message):
    path = tmp_path / "model.safetensors"
    save_file(keys, path)
    with pytest.raises(SDiTError, match=message):
        load_teacher(path)


def test_weights_that_do_not_fit_the_config(tiny_single_file):
    with pytest.raises(SDiTError, match="do not fit"):
        load_teacher(tiny_single_file)  # the shipped SD 1.5 configs do not describe the tiny model


def test_teacher_config_rejected_for_folders(tiny_teacher):
    with pytest.raises(SDiTError, match="single-file"):
        load_teacher(tiny_teacher, config_dir=tiny_teacher)


def test_original_layout_round_trips_through_diffusers(tmp_path):
    models = build_tiny_components(seed=3)
    state = to_original_layout(models["unet"], models["vae"], models["text_encoder"])
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in state)
    from sdit.tiny import save_configs

    save_configs(models, tmp_path)
    save_file(state, tmp_path / "m.safetensors")
    loaded = load_teacher(tmp_path / "m.safetensors", config_dir=tmp_path)
    for name, model in models.items():
        expected, got = model.state_dict(), getattr(loaded, name).state_dict()
        assert set(expected) == set(got)
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
