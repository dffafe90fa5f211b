"""The shapes reader and its scores: accuracy on fresh renders, "none" where nothing fits, fair scores."""

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdit.errors import SDiTError
from sdit.shapes import probes, reader, world
from sdit.shapes import scores as shape_scores
from sdit.shapes.reader import Reading
from sdit.shapes.world import Attributes

FRESH_SEED = 31337  # never used while the reader's thresholds were chosen


@pytest.fixture(scope="module")
def fresh():
    records = list(world.sample(400, FRESH_SEED))
    return records, [r.attrs for r in records]


def test_reads_fresh_clean_renders(fresh):
    records, asked = fresh
    result = shape_scores.score(reader.read_batch([r.image for r in records]), asked)
    assert all(result.accuracy[name] >= 0.98 for name in world.ATTRIBUTE_NAMES), result.accuracy


def test_reads_noisy_and_blurred_renders(fresh):
    records, asked = fresh
    rng = np.random.default_rng(FRESH_SEED)
    for images in (
        [probes.with_noise(r.image, 0.05, rng) for r in records],
        [probes.with_blur(r.image, 0.7) for r in records],
    ):
        accuracy = shape_scores.score(reader.read_batch(images), asked).accuracy
        assert all(accuracy[name] >= 0.97 for name in world.ATTRIBUTE_NAMES), accuracy


@pytest.fixture(scope="module")
def independent():
    """Drawn without the world's rasteriser: aliased, scaled 0.8-1.25x, turned +-10 degrees, JPEG 75."""
    images, asked = probes.independent_set(360, np.random.default_rng(FRESH_SEED))
    return reader.read_batch(images), asked


def test_reads_independently_drawn_images(independent):
    readings, asked = independent
    accuracy = shape_scores.score(readings, asked).accuracy
    assert all(accuracy[name] >= 0.95 for name in ("shape", "colour", "background")), accuracy
    wrong = [(a.shape, r.shape) for r, a in zip(readings, asked) if r.shape not in (a.shape, None)]
    assert len(wrong) <= 2, wrong  # where it fails, it mostly says "none", not another shape


def test_independent_drawings_are_what_they_say():
    """The independent path draws each shape at its stated size: the drawn pixels cover the shape's
    true area (not ImageDraw's one pixel more), and a square stays square after JPEG."""
    attrs = Attributes("square", "red", "black", "center", "large")
    mask = np.asarray(probes.draw_shape(attrs, quality=None))[..., 0] > 100
    assert mask.sum() == round(world.SIZES["large"] * 64) ** 2
    assert reader.read(probes.draw_shape(attrs, scale=1.25, turn=10.0)) == Reading(*vars(attrs).values())


@pytest.mark.parametrize("draw", [probes.smooth_blob, probes.jagged_polygon, probes.scribble])
def test_blobs_and_scribbles_are_no_shape(draw):
    rng = np.random.default_rng(FRESH_SEED)
    readings = reader.read_batch([draw(rng) for _ in range(120)])
    assert sum(r.shape is None for r in readings) >= 0.9 * 120
    assert sum(r.colour is not None for r in readings) >= 0.9 * 120  # the colour is still plain to see


def test_nothing_to_read_in_noise():
    rng = np.random.default_rng(1)
    for reading in reader.read_batch([probes.noise_image(rng) for _ in range(20)]):
        assert reading == Reading(None, None, None, None, None)


@pytest.mark.parametrize("sigma", [0.0, 0.05])
def test_a_blank_image_has_a_background_and_no_shape(sigma):
    rng = np.random.default_rng(2)
    for background in world.BACKGROUNDS:
        reading = reader.read(probes.blank_image(background, rng, sigma))
        assert reading == Reading(None, None, background, None, None)


def test_two_shapes_are_no_shape():
    rng = np.random.default_rng(3)
    readings = reader.read_batch([probes.two_shapes_image(rng) for _ in range(60)])
    assert all(r.shape is None for r in readings)
    # Apart, they are two objects: no position or size either. Touching in one colour, they are
    # one blob of no shape, which still has a place and a size.
    assert sum(r.position is None and r.size is None for r in readings) >= 50


def test_ragged_blobs_are_mostly_no_shape():
    """Random jagged polygons: the kind of thing an undertrained model draws."""
    rng = np.random.default_rng(4)
    images = []
    for _ in range(40):
        k = rng.integers(6, 12)
        angles = np.sort(rng.uniform(0, 2 * np.pi, k))
        radii = rng.uniform(0.3, 1.0, k)
        points = [(128 + 45 * r * np.cos(a), 128 + 45 * r * np.sin(a)) for r, a in zip(radii, angles)]
        polygon = Image.new("L", (256, 256), 0)
        ImageDraw.Draw(polygon).polygon(points, fill=255)
        alpha = np.asarray(polygon.reduce(4), dtype=np.float32)[..., None] / 255
        images.append(alpha * np.array([0.85, 0.15, 0.15]) + (1 - alpha) * 0.96)
    readings = reader.read_batch([i.astype(np.float32) for i in images])
    assert sum(r.shape is None for r in readings) >= 36
    assert all(r.colour == "red" for r in readings)  # the colour is still plain to see


def test_colours_are_read_relative_to_the_image():
    attrs = Attributes("cross", "cyan", "white", "left", "large")
    image = np.asarray(world.render(attrs), dtype=np.float32) / 255
    tinted = np.clip(image + np.array([0.06, -0.03, -0.03], dtype=np.float32), 0, 1)  # the whole image drifts pink
    washed = image[0, 0] + 0.4 * (image - image[0, 0])  # the shape at 40% strength
    for drawn in (tinted, washed):
        assert reader.read(drawn) == Reading("cross", "cyan", "white", "left", "large")


def test_a_two_coloured_or_grey_object_has_no_colour():
    attrs = Attributes("square", "red", "black", "center", "large")
    image = np.asarray(world.render(attrs)).copy()
    image[:, 32:][image[:, 32:, 0] > 100] = world.COLOURS["blue"]
    assert reader.read(image).colour is None
    grey = np.asarray(world.render(attrs)).copy()
    grey[grey[..., 0] > 100] = (128, 128, 128)
    assert reader.read(grey).colour is None


def test_arrays_and_images_read_alike():
    image = world.render(Attributes("ring", "yellow", "grey", "top right", "small"), np.random.default_rng(0))
    as_uint8 = np.asarray(image)
    as_float = as_uint8.astype(np.float32) / 255
    assert reader.read(image) == reader.read(as_uint8) == reader.read(as_float)
    with pytest.raises(SDiTError, match=r"\[0, 1\]"):
        reader.read(as_float * 2 - 1)
    with pytest.raises(SDiTError, match="H x W x 3"):
        reader.read(as_float[..., 0])


def test_score_by_hand():
    cross = Attributes("cross", "red", "white", "center", "small")
    circle = Attributes("circle", "blue", "black", "top", "large")
    asked = [cross, cross, circle, circle, circle, circle]
    results = [
        Reading("cross", "red", "white", "center", "small"),  # right
        Reading(None, "red", "white", None, None),  # rejected: counts as wrong, never as a cross
        Reading("cross", "blue", "black", "top", "large"),  # a cross where a circle was asked
        Reading("circle", "blue", "black", "top", "large"),
        Reading("circle", "blue", "black", "top", "small"),
        Reading("circle", None, "black", "top", "large"),
    ]
    concepts = [world.Concept("cross", shape="cross"), world.Concept("red cross", shape="cross", colour="red")]
    result = shape_scores.score(results, asked, concepts)
    assert result.count == 6
    assert result.accuracy == {"shape": 4 / 6, "colour": 5 / 6, "background": 1.0, "position": 5 / 6, "size": 4 / 6}
    assert result.rejected == {"shape": 1 / 6, "colour": 1 / 6, "background": 0.0, "position": 1 / 6, "size": 1 / 6}
    c = result.concepts["cross"]
    assert (c.hit, c.false_positive, c.asked, c.others) == (1 / 2, 1 / 4, 2, 4)
    assert c.fair == pytest.approx(1 / 2 - 1 / 4)
    rc = result.concepts["red cross"]
    assert (rc.hit, rc.false_positive, rc.fair) == (1 / 2, 0.0, 1 / 2)


def test_concept_accuracy_asks_only_for_the_heldout_concepts_a_prompt_names():
    def prompt(shape, colour):
        return world._prompt(Attributes(shape, colour, "white", "center", "small"))

    asked = [prompt("cross", "red"), prompt("circle", "yellow"), prompt("cross", "yellow"), prompt("circle", "red"),
             prompt("square", "blue")]  # cross; yellow; both; the held-out pair "red circle"; seen: not counted
    assert [a.concepts for a in asked] == [("cross",), ("yellow",), ("cross", "yellow"), ("red circle",), ()]
    results = [
        Reading("cross", "blue", None, None, None),  # the cross was asked, its colour does not count
        Reading("circle", "orange", "white", "center", "small"),  # not yellow
        Reading("cross", "yellow", None, None, None),
        Reading("circle", "red", None, None, None),
        Reading(None, None, None, None, None),
    ]
    assert shape_scores.concept_accuracy(results, asked) == 3 / 4
    assert math.isnan(shape_scores.concept_accuracy(results[4:], asked[4:]))


def test_score_counts_accuracy_only_where_the_prompt_says_it():
    attrs = Attributes("star", "green", "grey", "left", "small")
    quiet = world.Prompt("a green star on a grey background", attrs, ("shape", "colour", "background"))
    loud = world.Prompt(world.caption(attrs), attrs)
    wrong_size = Reading("star", "green", "grey", "right", "large")
    result = shape_scores.score([wrong_size, wrong_size], [quiet, loud], concepts=[])
    assert result.accuracy["size"] == 0.0 and result.accuracy["position"] == 0.0  # only `loud` counts
    assert result.accuracy["shape"] == 1.0
    only_quiet = shape_scores.score([wrong_size], [quiet], concepts=[world.Concept("cross", shape="cross")])
    assert math.isnan(only_quiet.accuracy["size"]) and math.isnan(only_quiet.concepts["cross"].hit)
    with pytest.raises(SDiTError, match="one reading per prompt"):
        shape_scores.score([wrong_size], [quiet, loud])


# --- fair concept scores on hand-built readings ---------------------------------------------------------


def _asked_everything() -> list[world.Prompt]:
    """Every shape-colour pair once, on white, in the canonical wording (which states every attribute)."""
    return [world._prompt(Attributes(s, c, "white", "center", "small")) for s in world.SHAPES for c in world.COLOURS]


def _drawn(shape, colour):
    return Reading(shape, colour, "white", "center", "small")


def test_a_student_that_draws_what_is_asked_scores_one_on_every_concept():
    asked = _asked_everything()
    scores = shape_scores.fair_concepts([_drawn(p.attrs.shape, p.attrs.colour) for p in asked], asked)
    assert set(scores) == {c.name for c in world.HELDOUT}
    assert all((c.hit, c.false_positive, c.fair) == (1.0, 0.0, 1.0) for c in scores.values())
    assert (scores["cross"].asked, scores["cross"].others) == (6, 30)  # rivals: the 5 other shapes x 6 colours
    assert (scores["red circle"].asked, scores["red circle"].others) == (1, 35)
    assert shape_scores.mean_fair(scores) == 1.0


def test_a_student_that_shows_a_concept_everywhere_scores_zero_on_it():
    asked = _asked_everything()
    always_cross = shape_scores.fair_concepts([_drawn("cross", p.attrs.colour) for p in asked], asked)
    assert (always_cross["cross"].hit, always_cross["cross"].false_positive, always_cross["cross"].fair) == (1, 1, 0)
    assert always_cross["yellow"].fair == 1.0  # the colours are still right
    always_red_circle = shape_scores.fair_concepts([_drawn("circle", "red") for _ in asked], asked)
    assert always_red_circle["red circle"].fair == 0.0
    # The old score counts a concept read anywhere as a false positive: the same student scores 0 there too.
    assert shape_scores.score([_drawn("cross", p.attrs.colour) for p in asked], asked).concepts["cross"].fair == 0.0


def test_a_blob_never_shows_a_concept_even_in_the_right_colour():
    asked = _asked_everything()
    blobs = shape_scores.fair_concepts([_drawn(None, p.attrs.colour) for p in asked], asked)
    assert (blobs["yellow"].hit, blobs["yellow"].false_positive, blobs["yellow"].fair) == (0.0, 0.0, 0.0)
    assert all(c.hit == 0.0 for c in blobs.values())
    # score() still credits the colour: it reads attributes one at a time.
    assert shape_scores.score([_drawn(None, p.attrs.colour) for p in asked], asked).concepts["yellow"].hit == 1.0


def test_only_prompts_that_state_the_attribute_count():
    cross = Attributes("cross", "red", "white", "center", "small")
    circle = Attributes("circle", "red", "white", "center", "small")
    colour_only = world.Prompt("something red on white", cross, ("colour", "background"))
    asked = [world._prompt(cross), world._prompt(circle), colour_only]
    readings = [_drawn("cross", "red")] * 3  # a cross every time
    scores = shape_scores.fair_concepts(readings, asked, [world.Concept("cross", shape="cross"),
                                                        world.Concept("red", colour="red")])
    c = scores["cross"]
    assert (c.hit, c.false_positive, c.asked, c.others) == (1.0, 1.0, 1, 1)  # the colour-only prompt is left out
    assert (scores["red"].asked, scores["red"].others) == (3, 0) and math.isnan(scores["red"].fair)
    assert shape_scores.mean_fair(scores) == 0.0  # red, which no prompt asked against, is left out
    assert math.isnan(shape_scores.mean_fair({"red": scores["red"]}))
    with pytest.raises(SDiTError, match="one reading per prompt"):
        shape_scores.fair_concepts(readings[:2], asked)
