import math

import numpy as np
import pytest

from sdit.shapes import world
from sdit.shapes.reader import Reading
from sdit.shapes.scores import figures, headline_draws, interval, resample

PER_PROMPT = 2
PROMPTS = {"heldout": world.heldout_prompts(), "seen": world.seen_prompts()}
ASKED = {split: [p for p in plist for _ in range(PER_PROMPT)] for split, plist in PROMPTS.items()}


def truthful(prompt: world.Prompt) -> Reading:
    return Reading(*vars(prompt.attrs).values())


def model(rule) -> dict[str, list[Reading]]:
    """Readings of every sample: `rule(prompt, sample number)`."""
    return {split: [rule(p, i) for i, p in enumerate(asked)] for split, asked in ASKED.items()}


def test_draws_keep_every_prompt_and_its_number_of_samples():
    weights = resample(ASKED, draws=50, seed=1)
    sizes = [len(ASKED["heldout"]), len(ASKED["seen"])]
    assert weights.shape == (50, sum(sizes))
    per_prompt = weights.reshape(50, -1, PER_PROMPT).sum(axis=2)  # samples of one prompt sit side by side
    assert (per_prompt == PER_PROMPT).all()
    assert (weights == 0).any() and (weights == PER_PROMPT).any()  # a sample left out, or drawn twice
    assert np.array_equal(weights, resample(ASKED, draws=50, seed=1))


def test_a_row_of_ones_gives_the_figures_own_values():
    rng = np.random.default_rng(0)
    shapes, colours = world.SHAPES, list(world.COLOURS)
    readings = model(lambda p, i: truthful(p) if rng.random() < 0.6 else
                     Reading(rng.choice(shapes), rng.choice(colours), "white", None, None))
    own = figures(readings, ASKED)
    drawn = headline_draws(readings, ASKED, np.ones((1, sum(map(len, ASKED.values())))))
    for key in ("heldout_acc", "seen_acc", "heldout_hit"):
        assert drawn[key][0] == pytest.approx(own[key], abs=1e-12), key
    for name, concept in own["heldout_concepts"].items():
        assert drawn[f"fair:{name}"][0] == pytest.approx(concept["fair"], abs=1e-12), name


def test_a_perfect_model_scores_one_and_one_that_draws_every_concept_everywhere_scores_zero():
    weights = resample(ASKED, draws=200)
    perfect = headline_draws(model(lambda p, i: truthful(p)), ASKED, weights)
    assert interval(perfect["heldout_acc"]) == [1.0, 1.0] and interval(perfect["seen_acc"]) == [1.0, 1.0]
    # a yellow cross wherever asked: shows "cross" and "yellow" as often where asked as where not, no pair at all
    always = headline_draws(model(lambda p, i: Reading("cross", "yellow", "white", None, None)), ASKED, weights)
    assert interval(always["heldout_acc"]) == [0.0, 0.0] and interval(always["seen_acc"]) == [0.0, 0.0]


def test_the_interval_of_a_share_of_samples_matches_the_binomial_one_and_prompts_do_not_vary():
    # the first sample of each seen prompt right, the second wrong: half of every prompt's samples
    readings = model(lambda p, i: truthful(p) if i % 2 == 0 else Reading(None, None, None, None, None))
    low, high = interval(headline_draws(readings, ASKED, resample(ASKED, draws=4000, seed=2))["seen_acc"])
    half = 1.96 * math.sqrt(0.5 * 0.5 / len(ASKED["seen"]))  # 0.063 at 240 samples
    assert low < 0.5 < high and (high - low) / 2 == pytest.approx(half, rel=0.15)
    # every sample of half of the prompts right, of the rest wrong: the prompts are fixed, so the score is sure
    right = set(PROMPTS["seen"][::2])
    readings = model(lambda p, i: truthful(p) if p in right else Reading(None, None, None, None, None))
    assert interval(headline_draws(readings, ASKED, resample(ASKED, draws=500))["seen_acc"]) == [0.5, 0.5]


def test_two_models_on_the_same_draws_give_a_paired_difference():
    weights = resample(ASKED, draws=300)
    rng = np.random.default_rng(3)
    a = headline_draws(model(lambda p, i: truthful(p) if rng.random() < 0.5 else Reading(None, None, None, None,
                                                                                             None)), ASKED, weights)
    assert interval(a["seen_acc"] - a["seen_acc"]) == [0.0, 0.0]
    assert interval(a["seen_acc"])[1] - interval(a["seen_acc"])[0] > 0.05
    assert all(math.isnan(v) for v in interval(np.array([np.nan, np.nan])))  # no draw where it is defined
