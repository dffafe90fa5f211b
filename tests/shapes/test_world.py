"""The shapes world: determinism, vocabularies, captions, the held-out split, prompts, files."""

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from sdit.errors import SDiTError
from sdit.shapes import files, world
from sdit.shapes.world import Attributes

SPLIT_SIZE = 1500  # what the demo gives the student: checked whole


def _same(a: world.Record, b: world.Record) -> bool:
    return a.attrs == b.attrs and a.caption == b.caption and a.image.tobytes() == b.image.tobytes()


def test_a_seed_gives_the_same_records():
    first, again = list(world.sample(20, seed=5)), list(world.sample(20, seed=5))
    assert all(_same(a, b) for a, b in zip(first, again))
    other = list(world.sample(20, seed=6))
    assert sum(_same(a, b) for a, b in zip(first, other)) == 0


def test_a_record_does_not_depend_on_how_many_are_drawn():
    for stream in (world.sample, world.limited_split):
        assert all(_same(a, b) for a, b in zip(stream(3, seed=2), list(stream(9, seed=2))[:3]))


def test_the_limited_split_draws_other_images_than_the_world():
    whole = {r.image.tobytes() for r in world.sample(50, seed=1)}
    assert not whole & {r.image.tobytes() for r in world.limited_split(50, seed=1)}


def test_vocabularies():
    assert len(world.SHAPES) >= 5 and len(world.COLOURS) >= 6 and len(world.BACKGROUNDS) >= 3
    assert len(world.POSITIONS) == 9 and set(world.SIZES) == {"small", "large"}
    assert len(world.all_attributes()) == 6 * 6 * 3 * 9 * 2
    assert not set(world.COLOURS) & set(world.BACKGROUNDS)  # no shape can vanish into its background


def test_unknown_values_are_refused():
    with pytest.raises(SDiTError, match="unknown colour 'mauve'"):
        Attributes("circle", "mauve", "white", "center", "small")
    with pytest.raises(SDiTError, match="unknown attribute"):
        world.vocabulary("texture")


@pytest.mark.parametrize("resolution", [32, 64])
def test_render_size_jitter_and_anti_aliasing(resolution):
    attrs = Attributes("star", "blue", "white", "top left", "large")
    canonical = np.asarray(world.render(attrs, resolution=resolution))
    assert canonical.shape == (resolution, resolution, 3)
    assert np.array_equal(canonical, np.asarray(world.render(attrs, resolution=resolution)))
    jittered = [np.asarray(world.render(attrs, np.random.default_rng(k), resolution)) for k in range(3)]
    assert not any(np.array_equal(canonical, j) for j in jittered)
    levels = {tuple(p) for p in canonical.reshape(-1, 3)}
    assert len(levels) > 4  # edge pixels are mixes, not just shape and background


def test_render_draws_where_and_how_large_it_says():
    for position, (col, row) in world.POSITIONS.items():
        for size in world.SIZES:
            image = np.asarray(world.render(Attributes("square", "red", "black", position, size)), dtype=float)
            ys, xs = np.nonzero(image[..., 0] > 100)
            side = (xs.max() - xs.min() + 1) / 64
            assert abs(side - world.SIZES[size]) <= 1.5 / 64
            centre = ((xs.min() + xs.max() + 1) / 2 / 64, (ys.min() + ys.max() + 1) / 2 / 64)
            assert np.allclose(centre, (world.GRID_CENTRES[col], world.GRID_CENTRES[row]), atol=1 / 64)


def test_every_template_names_shape_colour_and_background():
    attrs = Attributes("triangle", "purple", "grey", "bottom right", "small")
    for k, template in enumerate(world.TEMPLATES):
        text = world.caption(attrs, template=k)
        assert {"shape", "colour", "background"} <= set(template.names)
        for word in ("triangle", "purple", "grey"):
            assert word in text
        assert ("small" in text) == ("size" in template.names)
        assert ("bottom right" in text) == ("position" in template.names)
        assert "{" not in text and not re.search(r"\ba [aeiou]", text)


def test_captions_vary_with_the_seed():
    attrs = Attributes("ring", "green", "white", "center", "large")
    texts = {world.caption(attrs, np.random.default_rng(k)) for k in range(50)}
    assert len(texts) == len(world.TEMPLATES)
    assert world.caption(attrs) == "a large green ring in the center on a white background"


def test_the_limited_split_never_shows_a_heldout_concept():
    records = list(world.limited_split(SPLIT_SIZE, seed=0, resolution=32))
    assert len(records) == SPLIT_SIZE
    assert not any(world.is_heldout(r.attrs) for r in records)
    assert not {(r.attrs.shape, r.attrs.colour) for r in records} & set(world.HELDOUT_PAIRS)
    held_words = world.HELDOUT_SHAPES + world.HELDOUT_COLOURS
    assert not any(word in r.caption for r in records for word in held_words)
    # ... and shows everything else: all 20 seen pairs and every background, position and size
    assert len({(r.attrs.shape, r.attrs.colour) for r in records}) == 20
    for name in ("background", "position", "size"):
        assert {getattr(r.attrs, name) for r in records} == set(world.vocabulary(name))


def test_the_heldout_set_holds_a_whole_shape_a_whole_colour_and_pairs():
    kinds = {(c.shape is not None, c.colour is not None) for c in world.HELDOUT}
    assert kinds == {(True, False), (False, True), (True, True)}
    for shape, colour in world.HELDOUT_PAIRS:
        assert shape in world.SEEN_SHAPES and colour in world.SEEN_COLOURS


def test_evaluation_prompts():
    heldout, seen = world.heldout_prompts(), world.seen_prompts()
    assert all(p.concepts for p in heldout) and not any(p.concepts for p in seen)
    assert all(world.is_heldout(p.attrs) for p in heldout) and not any(world.is_heldout(p.attrs) for p in seen)
    for concept in world.HELDOUT:
        assert sum(concept.name in p.concepts for p in heldout) >= 6
    for prompts in (heldout, seen):
        assert {p.attrs.position for p in prompts} == set(world.POSITIONS)
        assert all(p.said == world.ATTRIBUTE_NAMES and p.text == world.caption(p.attrs) for p in prompts)
    assert len({p.text for p in heldout + seen}) == len(heldout + seen)


def test_the_prompt_bank_covers_every_value_heldout_included():
    bank = world.prompt_bank()
    assert len(bank) == len(world.all_attributes())
    assert bank == world.prompt_bank() and [p.text for p in bank] != [p.text for p in world.prompt_bank(seed=1)]
    for name in world.ATTRIBUTE_NAMES:
        for value in world.vocabulary(name):
            stated = [p for p in bank if getattr(p.attrs, name) == value and name in p.said]
            assert stated, f"no prompt states {name} {value}"
            assert all(value in p.text for p in stated)
    assert {c.name for c in world.HELDOUT} <= {name for p in bank for name in p.concepts}


def test_write_split_gives_matching_png_and_txt_pairs(tmp_path):
    records = list(world.limited_split(5, seed=3))
    assert files.write_split(records, tmp_path / "split", with_attributes=True) == 5
    names = sorted(p.name for p in (tmp_path / "split").iterdir())
    stems = [f"{i:06d}" for i in range(5)]
    assert names == sorted([f"{s}.png" for s in stems] + [f"{s}.txt" for s in stems] + [files.ATTRIBUTES_FILE])
    for stem, record in zip(stems, records):
        with Image.open(tmp_path / "split" / f"{stem}.png") as image:
            assert image.tobytes() == record.image.tobytes()
        assert (tmp_path / "split" / f"{stem}.txt").read_text().strip() == record.caption
    lines = [json.loads(line) for line in (tmp_path / "split" / files.ATTRIBUTES_FILE).read_text().splitlines()]
    assert [line.pop("name") for line in lines] == stems
    assert [Attributes(**line) for line in lines] == [r.attrs for r in records]
    with pytest.raises(SDiTError, match="not empty"):
        files.write_split(records, tmp_path / "split")


def test_write_prompts_one_a_line(tmp_path):
    prompts = world.heldout_prompts()
    assert files.write_prompts(prompts, tmp_path / "bank.txt") == len(prompts)
    assert (tmp_path / "bank.txt").read_text().splitlines() == [p.text for p in prompts]
    with pytest.raises(SDiTError, match="line break"):
        files.write_prompts(["a red\ncircle"], tmp_path / "bad.txt")


def test_a_smaller_prompt_bank_covers_every_shape_colour_pair_equally():
    whole, small = world.prompt_bank(3), world.prompt_bank(3, per_pair=4)
    assert len(whole) == 1944 and len(small) == 36 * 4
    counts = Counter((p.attrs.shape, p.attrs.colour) for p in small)
    assert len(counts) == 36 and set(counts.values()) == {4}
    assert set(small) <= set(whole) and small == world.prompt_bank(3, per_pair=4)  # a seeded subset, in bank order
    assert [whole.index(p) for p in small] == sorted(whole.index(p) for p in small)
