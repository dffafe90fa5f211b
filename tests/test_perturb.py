import numpy as np
import pytest
import torch

from sdit.errors import SDiTError
from sdit.perturb import CaptionFrom, Kind, PerturbConfig, draw_generator, input_noise, perturbed_text, sample_draw

SHAPE = (4, 8, 8)


def _draw(config=PerturbConfig(), seed=0, shard=0, record=0, draw=0, **kw):
    options = dict(latent_shape=SHAPE, num_timesteps=1000, num_records=50, num_prompts=20) | kw
    return sample_draw(config, draw_generator(seed, shard, record, draw), **options)


def _same(a, b) -> bool:
    return (a.timestep, a.kind, a.caption_from, a.caption_index, a.weight) == \
        (b.timestep, b.kind, b.caption_from, b.caption_index, b.weight) and np.array_equal(a.noise, b.noise) \
        and ((a.xi is None and b.xi is None) or np.array_equal(a.xi, b.xi))


def test_a_draw_depends_only_on_its_coordinates():
    for coords in [(0, 0, 0, 0), (7, 3, 11, 2)]:
        assert _same(_draw(PerturbConfig(), *coords), _draw(PerturbConfig(), *coords))
    assert not _same(_draw(record=1), _draw(record=2))
    assert not _same(_draw(seed=1), _draw(seed=2))
    # Drawing other records first (another batch order or worker) changes nothing.
    first = _draw(record=5)
    for r in range(5):
        _draw(record=r)
    assert _same(first, _draw(record=5))


def test_caption_perturbations_stay_at_high_noise():
    config = PerturbConfig(mix={"swap": 0.5, "mix": 0.5, "none": 0.0}, caption_min_t=400)
    draws = [_draw(config, record=r, draw=d) for r in range(100) for d in range(4)]
    for d in draws:
        if d.kind in (Kind.SWAP, Kind.MIX):
            assert d.timestep >= 400
        else:
            assert d.kind == Kind.NONE and d.timestep < 400  # the fallback where no allowed kind remains
    assert {d.kind for d in draws} == {Kind.SWAP, Kind.MIX, Kind.NONE}


def test_the_mix_is_respected():
    config = PerturbConfig(mix={"none": 0.6, "input": 0.1, "swap": 0.1, "mix": 0.1, "null": 0.1}, caption_min_t=0,
                           prompt_share=0.5)
    kinds = np.array([_draw(config, record=r).kind for r in range(4000)])
    for kind, p in [(Kind.NONE, 0.6), (Kind.NULL, 0.1), (Kind.SWAP, 0.1)]:
        assert abs((kinds == kind).mean() - p) < 0.03
    swaps = [_draw(config, record=r) for r in range(4000)]
    sources = [d.caption_from[0] for d in swaps if d.kind == Kind.SWAP]
    assert 0.4 < np.mean([s == CaptionFrom.PROMPT for s in sources]) < 0.6
    assert all(0 <= d.caption_index[0] < (20 if d.caption_from[0] == CaptionFrom.PROMPT else 50)
               for d in swaps if d.kind == Kind.SWAP)
    by_default = [_draw(PerturbConfig(caption_min_t=0), record=r) for r in range(400)]
    assert {d.caption_from[0] for d in by_default if d.kind in (Kind.SWAP, Kind.MIX)} == {CaptionFrom.PROMPT}


def test_stratified_timesteps_cover_each_slice():
    ts = [_draw(record=r, draw=k, stratum=(k, 4)).timestep for r in range(20) for k in range(4)]
    for k in range(4):
        assert all(k * 250 <= t < (k + 1) * 250 for t in ts[k::4])


def test_input_draws_carry_xi_and_rebuild_exactly():
    draw = next(d for d in (_draw(record=r) for r in range(200)) if d.kind == Kind.INPUT)
    assert draw.xi.shape == SHAPE and draw.xi.dtype == np.float16 and draw.noise.dtype == np.float16
    rebuilt = input_noise(draw.noise, draw.xi, 0.1)
    assert rebuilt.dtype == torch.float16
    assert torch.equal(rebuilt, input_noise(draw.noise.copy(), draw.xi.copy(), 0.1))
    expected = torch.from_numpy(draw.noise).float() + 0.1 * torch.from_numpy(draw.xi).float()
    assert torch.allclose(rebuilt.float(), expected, atol=2e-3)


def test_perturbed_text():
    rng = np.random.default_rng(0)
    own, a, b, null = (rng.standard_normal((77, 8)).astype(np.float16) for _ in range(4))
    assert torch.equal(perturbed_text(Kind.NONE, own, None, None, 0, null), torch.from_numpy(own))
    assert torch.equal(perturbed_text(Kind.NULL, own, None, None, 0, null), torch.from_numpy(null))
    assert torch.equal(perturbed_text(Kind.SWAP, own, a, None, 0, null), torch.from_numpy(a))
    mixed = perturbed_text(Kind.MIX, own, a, b, 0.25, null)
    assert mixed.dtype == torch.float16
    assert torch.allclose(mixed.float(), 0.75 * torch.from_numpy(a).float() + 0.25 * torch.from_numpy(b).float(),
                          atol=1e-2)


def test_parse():
    config = PerturbConfig.parse("none=0.8, null=0.2")
    assert config.probabilities(True)[Kind.NULL] == pytest.approx(0.2)
    for bad in ("none", "none=x", "bogus=1", "none=0"):
        with pytest.raises(SDiTError):
            PerturbConfig.parse(bad)


def test_config_file(tmp_path):
    path = tmp_path / "mix.json"
    path.write_text('{"mix": {"none": 0.5, "swap": 0.5}, "caption_min_t": 600, "prompt_share": 1.0}')
    config = PerturbConfig.from_file(str(path))
    assert config.caption_min_t == 600 and config.prompt_share == 1.0 and config.mix == {"none": 0.5, "swap": 0.5}
    path.write_text('{"mixes": {}}')
    with pytest.raises(SDiTError, match="not a perturbation config"):
        PerturbConfig.from_file(str(path))


@pytest.mark.parametrize("text, message", [
    ("none=0.5,swap=0.2",
     r"--perturb none=0.5,swap=0.2 sums to 0.7: probabilities must sum to 1 \(e.g. none=0.8,swap=0.2\)"),
    ("swap=0.3,null=0.1", r"sums to 0.4: .* \(e.g. none=0.6,swap=0.3,null=0.1\)"),
    ("swap=0.7,mix=0.6", r"sums to 1.3: probabilities must sum to 1$"),
    ("none=1.5,swap=-0.5", "cannot be negative"),
])
def test_a_mix_that_does_not_sum_to_1_is_refused(text, message):
    with pytest.raises(SDiTError, match=message):
        PerturbConfig.parse(text)


def test_decimal_mixes_that_sum_to_1_pass():
    PerturbConfig.parse("none=0.2,input=0.1,swap=0.5,mix=0.1,null=0.1")  # 1.0000000000000002 in binary
    PerturbConfig.parse("none=0.9,null=0.1")  # 0.9999999999999999
    with pytest.raises(SDiTError, match="sums to 0.99"):
        PerturbConfig.parse("none=0.89,null=0.1")
