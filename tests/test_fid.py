"""sdit.fid: the Fréchet distance, the whole FID path with a stand-in extractor, cached statistics, errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_stand_in_inception
from sdit import fid
from sdit.errors import SDiTError

SIZE = 32
SCALE, SHIFT = 0.5, 10  # the second set: SCALE · (x − 128) + 128 + SHIFT, exact in uint8 for even x − 128


@pytest.fixture(scope="module")
def extractor(tmp_path_factory) -> fid.Extractor:
    path = save_stand_in_inception(tmp_path_factory.mktemp("inception") / fid.INCEPTION_FILE)
    return fid.load_extractor(path, torch.device("cpu"))


@pytest.fixture(scope="module")
def narrow(tmp_path_factory) -> fid.Extractor:
    """The same interface with 256 features: a 2048-d FID costs seconds of eigendecomposition on one core."""
    path = save_stand_in_inception(tmp_path_factory.mktemp("inception") / "narrow.pt", dim=256)
    return fid.load_extractor(path, torch.device("cpu"))


def image_sets(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, SIZE, SIZE, 3) uint8 images and their affine change: exact, so its features are too."""
    k = np.random.default_rng(seed).integers(-40, 41, size=(n, SIZE, SIZE, 3))
    return (128 + 2 * k).astype(np.uint8), (128 + k + SHIFT).astype(np.uint8)


def write_folder(folder, images) -> str:
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text("a caption")
    return str(folder)


def closed_form(a: fid.Stats, extractor: fid.Extractor) -> float:
    """FID of features f and SCALE·f + c: |Δmu|² + (1 − SCALE)² tr(S), since S' = SCALE²·S."""
    proj = extractor.module.proj.double().numpy()
    c = SHIFT / 128 * proj.sum(axis=0)  # the shift's features: every pooled value moves by SHIFT/128
    delta = (SCALE - 1) * a.mu + c
    return float(delta @ delta + (1 - SCALE) ** 2 * np.trace(a.sigma))


@pytest.mark.parametrize("resize, features", [pytest.param("legacy", fid.FEATURES, marks=pytest.mark.slow),
                                               ("clean", 256)])
def test_the_whole_path_against_the_closed_form(extractor, narrow, resize, features, tmp_path, monkeypatch):
    extractor = extractor if features == fid.FEATURES else narrow
    images, changed = image_sets()
    cache = tmp_path / "cache"
    ref = fid.reference_stats(write_folder(tmp_path / "ref", images), extractor, SIZE, resize, cache=cache)
    assert ref.stats.count == len(images) and not ref.info["cached"] and ref.stats.mu.shape == (features,)
    same = fid.image_stats(iter(images), extractor, SIZE, resize, batch_size=7)
    assert abs(fid.frechet_distance(ref.stats, same)) < 1e-3
    other = fid.image_stats(iter(changed), extractor, SIZE, resize)
    expected = closed_form(ref.stats, extractor)
    assert expected > 1
    np.testing.assert_allclose(fid.frechet_distance(ref.stats, other), expected, rtol=1e-3)
    np.testing.assert_allclose(fid.frechet_distance(other, ref.stats), expected, rtol=1e-3)

    # the second run reads the cache, never an image
    def no_reading(self):
        raise AssertionError(f"read {self.path}")

    monkeypatch.setattr("sdit.sources.SourceItem.read", no_reading)
    again = fid.reference_stats(str(tmp_path / "ref"), extractor, SIZE, resize, cache=cache)
    assert again.info["cached"] and again.info["key"] == ref.info["key"]
    np.testing.assert_array_equal(again.stats.sigma, ref.stats.sigma)


def test_the_cache_key_follows_images_settings_and_extractor(extractor, narrow, tmp_path):
    images, _ = image_sets(6)
    folder = write_folder(tmp_path / "ref", images)
    key = fid.reference_key(folder, None, SIZE, "legacy", extractor)
    assert key == fid.reference_key(folder, None, SIZE, "legacy", extractor)
    assert key != fid.reference_key(folder, None, SIZE, "clean", extractor)
    assert key != fid.reference_key(folder, None, 16, "legacy", extractor)
    assert key != fid.reference_key(folder, 5, SIZE, "legacy", extractor)
    assert key != fid.reference_key(folder, None, SIZE, "legacy", narrow)
    Image.fromarray(images[0][::-1]).save(tmp_path / "ref" / "000.png", compress_level=0)  # an image changed
    assert key != fid.reference_key(folder, None, SIZE, "legacy", extractor)


def test_a_pytorch_fid_npz_is_accepted(narrow, tmp_path):
    extractor = narrow
    images, _ = image_sets(12)
    ours = fid.image_stats(iter(images), extractor, SIZE, "legacy")
    np.savez(tmp_path / "pytorch-fid.npz", mu=ours.mu.astype(np.float32), sigma=ours.sigma)  # as pytorch-fid saves
    published = fid.published_stats(str(tmp_path / "pytorch-fid.npz"), extractor)
    assert published.stats.count == 0 and abs(fid.frechet_distance(published.stats, ours)) < 1e-3
    ours.save(tmp_path / "ours.npz", {"note": "x"})
    with np.load(tmp_path / "ours.npz") as f:  # what pytorch-fid reads back
        np.testing.assert_array_equal(f["mu"], ours.mu)
        np.testing.assert_array_equal(f["sigma"], ours.sigma)
    np.savez(tmp_path / "bad.npz", mean=ours.mu)
    with pytest.raises(SDiTError, match="no 'mu' array"):
        fid.Stats.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "narrow.npz", mu=ours.mu[:8], sigma=ours.sigma[:8, :8])
    with pytest.raises(SDiTError, match="holds 8 features; the extractor gives 256"):
        fid.published_stats(str(tmp_path / "narrow.npz"), extractor)
    with pytest.raises(SDiTError, match="no such file"):
        fid.Stats.load(tmp_path / "nope.npz")


@pytest.mark.parametrize("dim", [8, 64, 256])
def test_the_distance_matches_scipy_sqrtm(dim):
    import scipy.linalg

    rng = np.random.default_rng(dim)
    a, b = (rng.standard_normal((dim, 2 * dim)) for _ in range(2))
    sa, sb = a @ a.T / (2 * dim), b @ b.T / (2 * dim) + 0.1 * np.eye(dim)
    mu_a, mu_b = rng.standard_normal(dim), rng.standard_normal(dim)
    root = scipy.linalg.sqrtm(sa @ sb).real  # pytorch-fid's path
    expected = (mu_a - mu_b) @ (mu_a - mu_b) + np.trace(sa) + np.trace(sb) - 2 * np.trace(root)
    np.testing.assert_allclose(fid.frechet_distance(fid.Stats(mu_a, sa), fid.Stats(mu_b, sb)), expected, rtol=1e-6)


def test_a_missing_or_wrong_extractor_is_named(tmp_path):
    cpu = torch.device("cpu")
    with pytest.raises(SDiTError, match=f"no such file; FID needs .*{fid.INCEPTION_FILE}.*{fid.INCEPTION_URL}"):
        fid.load_extractor(tmp_path / "nope.pt", cpu)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(SDiTError, match=f"not a TorchScript file .*{fid.INCEPTION_URL}"):
        fid.load_extractor(tmp_path / "junk.pt", cpu)

    class Plain(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    torch.jit.script(Plain()).save(str(tmp_path / "plain.pt"))
    with pytest.raises(SDiTError, match="does not take \\(images, return_features=True\\)"):
        fid.load_extractor(tmp_path / "plain.pt", cpu)

    class Maps(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return x

    torch.jit.script(Maps()).save(str(tmp_path / "maps.pt"))
    with pytest.raises(SDiTError, match="returned \\(1, 3, 64, 64\\) for one image"):
        fid.load_extractor(tmp_path / "maps.pt", cpu)
    with pytest.raises(SDiTError, match="--fid-resize 'bicubic'"):
        fid.check_resize("bicubic")
