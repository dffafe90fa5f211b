"""The student network: shapes, initialisation, conditioning, serialisation, sizes, errors."""

import copy

import pytest
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from sdit.dit import PRESETS, SDiT, build_student, count_parameters, sincos_2d_embedding
from sdit.errors import SDiTError

TEXT_DIM = 16  # a stand-in for CLIP's 768, to keep the unit tests fast
TEXT_LEN = 5
# DiT's published sizes (class-conditional, 32×32 latents), Peebles & Xie table 1.
DIT_PARAMS = {"S": 33.0e6, "B": 130.5e6, "L": 458.1e6, "XL": 675.1e6}


def nano(**kwargs) -> SDiT:
    return build_student("SDiT-Nano/2", sample_size=8, in_channels=4, text_dim=TEXT_DIM, **kwargs)


def inputs(n: int, h: int = 8, w: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(n, 4, h, w, generator=g),
        "timestep": torch.randint(0, 1000, (n,), generator=g),
        "encoder_hidden_states": torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g),
    }


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Stand-in for trained weights: every parameter non-zero, so every path is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("preset", ["SDiT-Nano/2", "SDiT-T/4"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("hw", [(8, 8), (4, 12), (16, 8)])
def test_output_has_the_latent_shape_at_any_multiple_of_the_patch(preset, n, hw):
    model = build_student(preset, sample_size=8, in_channels=4, text_dim=TEXT_DIM)
    randomize(model)
    with torch.no_grad():
        eps = model(**inputs(n, *hw))
    assert isinstance(eps, torch.Tensor)
    assert eps.shape == (n, 4, *hw)
    assert torch.isfinite(eps).all()


def test_return_dict_and_scalar_timestep():
    model = nano()
    randomize(model)
    x = inputs(3)
    x["timestep"] = torch.full((3,), 500)
    with torch.no_grad():
        per_sample = model(**x)
        scalar = model(**{**x, "timestep": 500}, return_dict=True)
    assert isinstance(scalar, Transformer2DModelOutput)
    assert torch.equal(scalar.sample, per_sample)


def test_positions_are_a_fixed_unsaved_buffer_that_extends_to_other_grids():
    model = nano()
    assert "pos_embed" not in model.state_dict()
    assert torch.equal(model.pos_embed, sincos_2d_embedding(32, 4, 4))
    # A 2×4 grid is the top half of the 4×4 training grid: its positions are the same.
    assert torch.equal(sincos_2d_embedding(32, 2, 4), sincos_2d_embedding(32, 4, 4)[:8])


def test_output_is_exactly_zero_at_init_and_training_reaches_every_parameter():
    torch.manual_seed(0)
    model = nano(guidance_embed=True)
    x = {**inputs(4), "guidance": torch.tensor([1.0, 3.0, 5.0, 7.5])}
    assert torch.equal(model(**x), torch.zeros(4, 4, 8, 8))

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    # adaLN-Zero opens the network from the output inwards: step 1 trains the zero-init
    # output layer, step 2 the gates and modulations, step 3 reaches everything else.
    for step in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(**x), target).backward()
        if step == 0:
            assert model.final_layer.linear.weight.grad.abs().sum() > 0
        opt.step()
    silent = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []
    assert model(**x).abs().sum() > 0


def test_guidance_changes_the_output_and_is_required_exactly_when_embedded():
    model = nano(guidance_embed=True)
    with torch.no_grad():  # a trained output layer, so c shows in the output
        for p in model.final_layer.parameters():
            p.normal_(std=0.1)
        x = inputs(2)
        assert not torch.allclose(model(**x, guidance=1.0), model(**x, guidance=7.5))
        with pytest.raises(SDiTError, match="guidance-distilled"):
            model(**x)
        with pytest.raises(SDiTError, match="no guidance embedding"):
            nano()(**x, guidance=7.5)


def test_a_linear_guidance_student_is_exactly_affine_in_w():
    model = nano(guidance_embed=True, guidance_linear=True)
    randomize(model)
    assert model.g_embedder is None and model.final_layer.linear.out_features == 2 * 2 * 2 * 4  # p·p·2C
    with torch.no_grad():
        x = inputs(3)
        u, at_1 = model(**x, guidance=0.0), model(**x, guidance=1.0)
        w = torch.tensor([0.5, 3.0, 7.5])
        assert torch.allclose(model(**x, guidance=w), u + w.view(3, 1, 1, 1) * (at_1 - u), atol=1e-5)
    with pytest.raises(SDiTError, match="set guidance_embed"):
        nano(guidance_linear=True)


def test_a_student_of_fewer_text_positions_cross_attends_to_those_and_keeps_them_when_saved(tmp_path):
    model = nano(text_positions=3)
    randomize(model)
    x = inputs(2)
    whole = nano()
    whole.load_state_dict(model.state_dict())  # the same weights, cross-attending to every position
    with torch.no_grad():
        eps = model(**x)
        assert not torch.allclose(eps, whole(**x))
        for block in whole.blocks:  # what the cross-attention sees: the first 3 positions' keys and values
            attend = block.cross_attn.forward
            block.cross_attn.forward = lambda q, text, attend=attend: attend(q, text[:, :3])
        assert torch.allclose(eps, whole(**x), atol=1e-6)  # and the pooled vector, as ever, of them all
    model.save_pretrained(tmp_path)
    assert SDiT.from_pretrained(tmp_path).config.text_positions == 3
    with pytest.raises(SDiTError, match="text_positions 1: give 2 or more"):
        nano(text_positions=1)


def test_save_and_load_round_trip_exactly(tmp_path):
    model = nano(guidance_embed=True)
    randomize(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()

    loaded = SDiT.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(model(**inputs(2), guidance=4.0), loaded(**inputs(2), guidance=4.0))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = nano()
    randomize(model)
    checkpointed = copy.deepcopy(model)
    calls = []

    def checkpoint(block, *args):  # torch's checkpoint, as diffusers' default, counting calls
        calls.append(block)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    checkpointed.enable_gradient_checkpointing(checkpoint)
    assert checkpointed.is_gradient_checkpointing and not model.is_gradient_checkpointing

    for m in (model, checkpointed):
        m(**inputs(2)).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name
    assert calls == list(checkpointed.blocks)


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
def test_backbone_parameters_match_dit(size):
    with torch.device("meta"):
        model = build_student(f"SDiT-{size}/2", sample_size=64, in_channels=4, text_dim=768)
    counts = count_parameters(model)
    print(f"\nSDiT-{size}/2: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))
    assert counts["total"] == counts["backbone"] + counts["text"] + counts["guidance"]
    assert counts["guidance"] == 0 and counts["text"] > 0
    assert abs(counts["backbone"] / DIT_PARAMS[size] - 1) < 0.10


def test_guidance_embedder_is_counted_apart():
    counts = count_parameters(nano(guidance_embed=True))
    assert counts["guidance"] > 0
    assert counts["backbone"] == count_parameters(nano())["backbone"]


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(SDiTError, match="SDiT-XL/2") as err:
        build_student("DiT-XL/2", sample_size=64, in_channels=4, text_dim=768)
    assert "\n" not in str(err.value)
    assert all(name in str(err.value) for name in PRESETS)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sample_size": 9}, "not a multiple of patch_size"),
        ({"sample_size": 8, "num_heads": 3}, "not divisible by num_heads"),
        ({"sample_size": 8, "hidden_size": 30, "num_heads": 3}, "multiple of 4"),
        ({"sample_size": 8, "width": 64}, "cannot override width"),
    ],
)
def test_impossible_sizes_fail_in_one_line(kwargs, message):
    with pytest.raises(SDiTError, match=message) as err:
        build_student("SDiT-Nano/2", in_channels=4, text_dim=TEXT_DIM, **kwargs)
    assert "\n" not in str(err.value)


def test_inputs_that_do_not_fit_are_refused():
    model = nano()
    with pytest.raises(SDiTError, match="multiples of patch size 2"):
        model(**inputs(1, 7, 8))
    with pytest.raises(SDiTError, match=r"\(N, L, 16\)"):
        model(**{**inputs(1), "encoder_hidden_states": torch.randn(1, TEXT_LEN, 768)})
    with pytest.raises(SDiTError, match="one value per sample"):
        model(**{**inputs(2), "timestep": torch.tensor([1, 2, 3])})
