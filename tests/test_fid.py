"""sdit.fid and sdit.fid_protocols: the Fréchet distance against scipy's sqrtm route (rank-deficient included),
every protocol's steps against values computed here, channel order, statistics files and their protocol, the
cache, errors; with SDIT_INCEPTION naming the real network file, FID against clean-fid's algorithm."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import save_stand_in_inception
from sdit import fid
from sdit.errors import SDiTError
from sdit.fid_protocols import PROTOCOLS, fit, get_protocol, network_input

SIZE = 32
SCALE, SHIFT = 0.5, 10  # the second set: SCALE · (x − 128) + 128 + SHIFT, exact in uint8 for even x − 128
BK, CLEAN, TF = PROTOCOLS["bk-sdm"], PROTOCOLS["clean"], PROTOCOLS["tf"]
WEIGHTS = (1.0, -2.0, 5.0)  # the channel stand-in's weight per input channel, R G B


@pytest.fixture(scope="module")
def extractor(tmp_path_factory) -> fid.Extractor:
    path = save_stand_in_inception(tmp_path_factory.mktemp("inception") / fid.INCEPTION_FILE)
    return fid.load_extractor(path, torch.device("cpu"))


@pytest.fixture(scope="module")
def narrow(tmp_path_factory) -> fid.Extractor:
    """The same interface with 256 features: a 2048-d FID costs seconds of eigendecomposition on one core."""
    path = save_stand_in_inception(tmp_path_factory.mktemp("inception") / "narrow.pt", dim=256)
    return fid.load_extractor(path, torch.device("cpu"))


class ChannelLayers(torch.nn.Module):
    """The network part: (N, 3, 299, 299) in [-1, 1] -> (N, 12, 1, 1): each channel's mean over the four
    quadrants (rows and columns 0..148 and 149..298) times that channel's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.tensor(WEIGHTS).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        q = [x[:, :, :149, :149], x[:, :, :149, 149:], x[:, :, 149:, :149], x[:, :, 149:, 149:]]
        return torch.cat([(p * w).mean(dim=(2, 3)) for p in q], dim=1)[:, :, None, None]


class ChannelStandIn(torch.nn.Module):
    """Laid out as NVlabs' file is: a `layers` submodule, and a forward that resizes the pixel values to 299
    (here nearest: the tests give it constant images or 299-px ones) and maps (x - 128) / 128."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = ChannelLayers()

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img.to(torch.float32), size=(299, 299), mode="nearest")
        return self.layers((x - 128) / 128).reshape(-1, 12)


@pytest.fixture(scope="module")
def channels(tmp_path_factory) -> fid.Extractor:
    path = tmp_path_factory.mktemp("inception") / "channels.pt"
    torch.jit.script(ChannelStandIn()).save(str(path))
    return fid.load_extractor(path, torch.device("cpu"))


def expected_features(x: np.ndarray) -> np.ndarray:
    """ChannelLayers by hand on (299, 299, 3) network input: channel c is x[..., c] (RGB order)."""
    quads = [x[:149, :149], x[:149, 149:], x[149:, :149], x[149:, 149:]]
    return np.concatenate([q.mean(axis=(0, 1)) * np.array(WEIGHTS) for q in quads])


def image_sets(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, SIZE, SIZE, 3) uint8 images and their affine change: exact, so its features are too."""
    k = np.random.default_rng(seed).integers(-40, 41, size=(n, SIZE, SIZE, 3))
    return (128 + 2 * k).astype(np.uint8), (128 + k + SHIFT).astype(np.uint8)


def pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(im) for im in images]


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


def drawing(size: int = 256) -> np.ndarray:
    """Hard edges: one-pixel black lines and filled shapes on white, full-range colours."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for i in range(0, size, 7):
        draw.line([(i, 0), (size - 1 - i, size - 1)], fill=(0, 0, 0))
    draw.rectangle([20, 30, 90, 120], fill=(255, 0, 0))
    draw.ellipse([120, 140, 230, 250], fill=(0, 0, 255))
    return np.asarray(image)


# --- the distance ----------------------------------------------------------------------------------------
def sqrtm_distance(mu_a, sa, mu_b, sb) -> float:
    """pytorch-fid's and clean-fid's route: scipy's sqrtm of the product, its real part."""
    import scipy.linalg

    root = scipy.linalg.sqrtm(sa @ sb).real
    return float((mu_a - mu_b) @ (mu_a - mu_b) + np.trace(sa) + np.trace(sb) - 2 * np.trace(root))


@pytest.mark.parametrize("dim", [8, 64, 256])
def test_the_distance_matches_scipy_sqrtm(dim):
    rng = np.random.default_rng(dim)
    a, b = (rng.standard_normal((dim, 2 * dim)) for _ in range(2))
    sa, sb = a @ a.T / (2 * dim), b @ b.T / (2 * dim) + 0.1 * np.eye(dim)
    mu_a, mu_b = rng.standard_normal(dim), rng.standard_normal(dim)
    np.testing.assert_allclose(fid.frechet_distance(fid.Stats(mu_a, sa), fid.Stats(mu_b, sb)),
                               sqrtm_distance(mu_a, sa, mu_b, sb), rtol=1e-6)


@pytest.mark.parametrize("images", [20, 100])
def test_fewer_images_than_features_matches_scipy_sqrtm(images):
    """Statistics of N < D feature vectors (rank N - 1 covariances, as `--num 64` against 2,048 features)."""
    dim = 128
    rng = np.random.default_rng(images)
    mix = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    a, b = rng.standard_normal((images, dim)) @ mix, rng.standard_normal((images, dim)) @ mix + 0.3
    sums = [fid.FeatureSums(dim), fid.FeatureSums(dim)]
    sums[0].add(a)
    sums[1].add(b)
    ours = fid.frechet_distance(sums[0].stats(), sums[1].stats())
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    assert np.linalg.matrix_rank(sa) == images - 1
    np.testing.assert_allclose(ours, sqrtm_distance(a.mean(0), sa, b.mean(0), sb), rtol=1e-6)
    same = fid.frechet_distance(sums[0].stats(), sums[0].stats())  # a set against itself: zero, to rounding
    assert abs(same) < 1e-5 * np.trace(sa)


# --- the protocols' steps --------------------------------------------------------------------------------
def pil_float_bicubic(image: np.ndarray, side: int = 299) -> np.ndarray:
    """clean-fid's clean resize written out: each channel as a float32 image, PIL bicubic, clipped to 0..255."""
    out = np.zeros((side, side, 3), np.float32)
    for c in range(3):
        channel = Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32), mode="F")
        out[:, :, c] = np.clip(np.asarray(channel.resize((side, side), Image.Resampling.BICUBIC)), 0, 255)
    return out


@pytest.mark.parametrize("kind", ["drawing", "random"])
def test_clean_gives_the_network_what_clean_fid_gives_it(kind):
    image = drawing() if kind == "drawing" else np.random.default_rng(1).integers(0, 256, (256, 256, 3), np.uint8)
    expected = pil_float_bicubic(image)
    ours = network_input(image, CLEAN)
    assert ours.shape == (299, 299, 3) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, (expected - 128) / 128)
    unclipped = np.stack([np.asarray(Image.fromarray(image[:, :, c].astype(np.float32), mode="F")
                                     .resize((299, 299), Image.Resampling.BICUBIC)) for c in range(3)], axis=-1)
    assert np.abs(unclipped - expected).max() > 20  # bicubic overshoots past 0..255 here: the clip matters


def jpeg(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")  # PIL's default quality, as BK-SDM's `save("x.jpg")`
    return Image.open(io.BytesIO(buffer.getvalue()))


def torch_bilinear_by_hand(x: np.ndarray, side: int = 299) -> np.ndarray:
    """torch's bilinear interpolate (align_corners=False, no antialias) in numpy: source (j + ½)·in/out − ½,
    negative sources at 0, the far neighbour clamped to the edge."""
    def weights(n_in: int):
        src = np.maximum((np.arange(side) + 0.5) * n_in / side - 0.5, 0)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0

    r0, r1, fr = weights(x.shape[0])
    c0, c1, fc = weights(x.shape[1])
    rows = x[r0] * (1 - fr)[:, None, None] + x[r1] * fr[:, None, None]
    return rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]


def test_bk_sdm_every_step(channels):
    """A 512-px sample and a 4:3 reference through BK-SDM's steps, each step's output checked: the sample saved
    as JPEG, every image squashed to 256 by PIL's default resize (no crop), JPEG again, read as RGB; pytorch-fid's
    0..1 scaling, bilinear resize to 299 and 2x - 1; the network (channel order checked by its weights)."""
    rng = np.random.default_rng(2)
    sample = Image.fromarray(np.kron(rng.integers(0, 256, (64, 64, 3)), np.ones((8, 8, 1))).astype(np.uint8))
    reference = Image.fromarray(np.asarray(Image.fromarray(drawing(240)).resize((320, 240))))
    steps = {"sample": jpeg(jpeg(sample).resize((256, 256))).convert("RGB"),
             "reference": jpeg(reference.resize((256, 256))).convert("RGB")}
    assert steps["reference"].size == (256, 256)  # squashed: the 4:3 drawing's corners are still there
    for name, image, generated in (("sample", sample, True), ("reference", reference, False)):
        fitted = fit(image, BK, 256, generated)
        np.testing.assert_array_equal(np.asarray(fitted), np.asarray(steps[name]))
        x = network_input(np.asarray(fitted), BK)
        expected = 2 * torch_bilinear_by_hand(np.asarray(fitted, np.float64) / 255) - 1
        np.testing.assert_allclose(x, expected, atol=5e-5)  # torch's float32 against float64
        features = fid.image_features([image], channels, BK, 256, generated)[0]
        np.testing.assert_allclose(features, expected_features(expected), atol=5e-5)
    assert not np.array_equal(np.asarray(fit(sample, BK, 256, True)), np.asarray(fit(sample, BK, 256, False)))


def test_a_grey_reference_keeps_its_mode_through_bk_sdm():
    grey = Image.fromarray(drawing(300)[:, :, 0]).convert("L")
    expected = jpeg(grey.resize((256, 256))).convert("RGB")  # resized and saved as L, as BK-SDM does
    np.testing.assert_array_equal(np.asarray(fit(grey, BK, 256, False)), np.asarray(expected))


@pytest.mark.parametrize("protocol", ["tf", "clean", "bk-sdm"])
def test_the_channels_reach_the_network_in_rgb_order(channels, protocol):
    """Constant images stay constant through every resize; a channel swap would move each feature."""
    colour = np.array([250, 40, 120])
    image = Image.fromarray(np.full((64, 48, 3), colour, np.uint8))
    seen = np.asarray(fit(image, get_protocol(protocol), 32, False), np.float64).reshape(-1, 3)
    assert np.abs(seen - colour).max() < (4 if protocol == "bk-sdm" else 1)  # JPEG moves a colour a little
    seen = seen.mean(axis=0)
    features = fid.image_features([image], channels, get_protocol(protocol), 32, generated=False)[0]
    scale = (seen / 255 * 2 - 1) if protocol == "bk-sdm" else (seen - 128) / 128
    np.testing.assert_allclose(features, np.tile(scale * np.array(WEIGHTS), 4), atol=1e-4)
    swapped = np.tile(scale[::-1] * np.array(WEIGHTS), 4)
    assert np.abs(features - swapped).max() > 1


def test_clean_and_tf_fit_the_centre_square():
    image = Image.fromarray(drawing(96)).crop((0, 0, 96, 64))  # 96 x 64
    expected = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC, box=(16, 0, 80, 64)))
    for protocol in (CLEAN, TF):
        np.testing.assert_array_equal(np.asarray(fit(image, protocol, 32, True)), expected)
    np.testing.assert_array_equal(network_input(expected, TF), expected.astype(np.float32))  # the file resizes


def test_references_are_never_rotated_by_exif(tmp_path):
    folder = tmp_path / "ref"
    folder.mkdir()
    image = Image.fromarray(drawing(64)).crop((0, 0, 64, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° to display"
    image.save(folder / "a.jpg", exif=exif)
    (got,) = list(fid.reference_images(str(folder), None))
    assert got.size == (64, 40) and got.getexif().get(0x0112) == 6


# --- the whole path, statistics, the cache ---------------------------------------------------------------
@pytest.mark.parametrize("name, features", [pytest.param("tf", fid.FEATURES, marks=pytest.mark.slow),
                                             ("clean", 256)])
def test_the_whole_path_against_the_closed_form(extractor, narrow, name, features, tmp_path, monkeypatch):
    extractor, protocol = (extractor if features == fid.FEATURES else narrow), PROTOCOLS[name]
    images, changed = image_sets()
    cache = tmp_path / "cache"
    ref = fid.reference_stats(write_folder(tmp_path / "ref", images), extractor, protocol, SIZE, cache=cache)
    assert ref.stats.count == len(images) and not ref.info["cached"] and ref.stats.mu.shape == (features,)
    assert ref.info["protocol"] == name and (ref.stats.protocol, ref.stats.size) == (name, SIZE)
    same = fid.image_stats(pil(images), extractor, protocol, SIZE, generated=True, batch_size=7)
    assert abs(fid.frechet_distance(ref.stats, same)) < 1e-3
    other = fid.image_stats(pil(changed), extractor, protocol, SIZE, generated=True)
    expected = closed_form(ref.stats, extractor)
    assert expected > 1
    np.testing.assert_allclose(fid.frechet_distance(ref.stats, other), expected, rtol=1e-3)
    np.testing.assert_allclose(fid.frechet_distance(other, ref.stats), expected, rtol=1e-3)

    # the second run reads the cache, never an image
    def no_reading(self):
        raise AssertionError(f"read {self.path}")

    monkeypatch.setattr("sdit.sources.SourceItem.read", no_reading)
    again = fid.reference_stats(str(tmp_path / "ref"), extractor, protocol, SIZE, cache=cache)
    assert again.info["cached"] and again.info["key"] == ref.info["key"] and again.stats.protocol == name
    np.testing.assert_array_equal(again.stats.sigma, ref.stats.sigma)


def test_the_cache_key_follows_images_settings_and_extractor(extractor, narrow, tmp_path):
    images, _ = image_sets(6)
    folder = write_folder(tmp_path / "ref", images)
    key = fid.reference_key(folder, None, SIZE, TF, extractor)
    assert key == fid.reference_key(folder, None, SIZE, TF, extractor)
    assert key != fid.reference_key(folder, None, SIZE, CLEAN, extractor)
    assert key != fid.reference_key(folder, None, 16, TF, extractor)
    assert key != fid.reference_key(folder, 5, SIZE, TF, extractor)
    assert key != fid.reference_key(folder, None, SIZE, TF, narrow)
    Image.fromarray(images[0][::-1]).save(tmp_path / "ref" / "000.png", compress_level=0)  # an image changed
    assert key != fid.reference_key(folder, None, SIZE, TF, extractor)


def test_statistics_files_and_their_protocol(narrow, tmp_path):
    extractor = narrow
    images, _ = image_sets(12)
    ours = fid.image_stats(pil(images), extractor, BK, 256, generated=False)
    np.savez(tmp_path / "pytorch-fid.npz", mu=ours.mu.astype(np.float32), sigma=ours.sigma)  # as pytorch-fid saves
    unknown = str(tmp_path / "pytorch-fid.npz")
    with pytest.raises(SDiTError) as err:
        fid.published_stats(unknown, extractor, BK, 256)
    assert "does not say its protocol" in str(err.value) and "--fid-stats-protocol bk-sdm" in str(err.value)
    published = fid.published_stats(unknown, extractor, BK, 256, declared="bk-sdm")
    assert published.stats.count == 0 and abs(fid.frechet_distance(published.stats, ours)) < 1e-3
    assert (published.info["protocol"], published.info["protocol_from"]) == ("bk-sdm", "--fid-stats-protocol")
    with pytest.raises(SDiTError, match="holds protocol 'clean' statistics; the samples are measured with 'bk-sdm'"):
        fid.published_stats(unknown, extractor, BK, 256, declared="clean")

    ours.save(tmp_path / "ours.npz", {"note": "x"})
    with np.load(tmp_path / "ours.npz") as f:  # what pytorch-fid reads back
        np.testing.assert_array_equal(f["mu"], ours.mu)
        np.testing.assert_array_equal(f["sigma"], ours.sigma)
        assert str(f["protocol"]) == "bk-sdm" and int(f["size"]) == 256
    mine = fid.published_stats(str(tmp_path / "ours.npz"), extractor, BK, 256)
    assert (mine.info["protocol"], mine.info["protocol_from"], mine.stats.count) == ("bk-sdm", "file", 12)
    with pytest.raises(SDiTError) as err:
        fid.published_stats(str(tmp_path / "ours.npz"), extractor, CLEAN, 256)
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "'bk-sdm'" in message and "'clean'" in message
    with pytest.raises(SDiTError, match="declares protocol 'bk-sdm', --fid-stats-protocol says 'tf'"):
        fid.published_stats(str(tmp_path / "ours.npz"), extractor, BK, 256, declared="tf")
    with pytest.raises(SDiTError, match="at 256 px; the samples are measured at 512 px"):
        fid.published_stats(str(tmp_path / "ours.npz"), extractor, BK, 512)

    np.savez(tmp_path / "bad.npz", mean=ours.mu)
    with pytest.raises(SDiTError, match="no 'mu' array"):
        fid.Stats.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "narrow.npz", mu=ours.mu[:8], sigma=ours.sigma[:8, :8])
    with pytest.raises(SDiTError, match="holds 8 features; the extractor gives 256"):
        fid.published_stats(str(tmp_path / "narrow.npz"), extractor, BK, 256, declared="bk-sdm")
    with pytest.raises(SDiTError, match="no such file"):
        fid.Stats.load(tmp_path / "nope.npz")


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
    with pytest.raises(SDiTError, match="--fid-protocol 'legacy': choose one of bk-sdm, clean, tf"):
        get_protocol("legacy")


# --- the real network ------------------------------------------------------------------------------------
REAL = os.environ.get("SDIT_INCEPTION")


@pytest.mark.slow
@pytest.mark.skipif(not REAL or not os.path.isfile(REAL), reason="SDIT_INCEPTION names no inception-2015-12-05.pt")
@pytest.mark.parametrize("name", ["clean", "tf"])
def test_fid_equals_clean_fids_algorithm_on_the_real_network(name):
    """clean-fid's route written out on its own: clean mode feeds (resized - 128) / 128 to the file's `layers`,
    legacy_tensorflow the 0..255 values to the file itself; mean, np.cov, scipy's sqrtm."""
    module = torch.jit.load(REAL, map_location="cpu").eval()
    rng = np.random.default_rng(5)
    sets = [[drawing(64)] + [rng.integers(0, 256, (64, 64, 3), np.uint8) for _ in range(9)],
            [np.roll(drawing(64), 9, axis=1)] + [(rng.random((64, 64, 3)) ** 2 * 255).astype(np.uint8)
                                                  for _ in range(9)]]

    def features(images) -> np.ndarray:
        if name == "clean":
            x = np.stack([pil_float_bicubic(im) for im in images])
            x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
            with torch.no_grad():
                return module.layers((x - 128) / 128).reshape(len(images), -1).double().numpy()
        x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy()).float()
        with torch.no_grad():
            return module(x, return_features=True).double().numpy()

    extractor = fid.load_extractor(REAL, torch.device("cpu"))
    theirs = [features(s) for s in sets]
    ours = [fid.image_features(pil(np.stack(s)), extractor, PROTOCOLS[name], 64, generated=False) for s in sets]
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    (fa, fb) = theirs
    expected = sqrtm_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    sums = [fid.FeatureSums(extractor.dim), fid.FeatureSums(extractor.dim)]
    for total, f in zip(sums, ours):
        total.add(f)
    np.testing.assert_allclose(fid.frechet_distance(sums[0].stats(), sums[1].stats()), expected, rtol=1e-3)
