"""Scores of shapes-world readings against what the prompts asked for.

`score(readings, asked)` gives per-attribute accuracy and, per concept, P(x | asked x) - P(x | asked other);
`fair_concepts` scores each held-out concept as shown only by a recognisable object, against prompts that ask for
a rival value, and `mean_fair` averages it into one headline; `figures` gathers every figure the experiment
reports for one model.

How sure a figure is comes from a bootstrap of the samples (`resample`): each draw keeps every prompt (they are
every pair of a split with every background and size, not a sample of prompts) and picks each prompt's samples from
its own with replacement, and `headline_draws` recomputes the headline figures under it. Models sampled from the
same prompts and noise share the draws, so the spread of a difference between two models is the spread of their
paired difference (`interval`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sdit.errors import SDiTError
from sdit.shapes import world
from sdit.shapes.reader import Reading


@dataclass(frozen=True)
class ConceptScore:
    """How often a concept is read where it was asked for, and where something else was.

    `fair` = hit - false_positive: a reader or model that sees the concept everywhere scores 0,
    not 1.
    `score` reads x attribute by attribute against every prompt that did not ask for x;
    `fair_concepts` counts x only on a recognisable object, against prompts that asked for a rival value.
    """

    hit: float  # P(read x | asked x); nan when nothing asked for x
    false_positive: float  # P(read x | asked something else); nan when everything asked for x
    fair: float
    asked: int  # prompts that asked for x
    others: int  # prompts that did not


@dataclass(frozen=True)
class Score:
    count: int
    accuracy: dict[str, float]  # per attribute: read == asked, over the prompts whose wording states it
    rejected: dict[str, float]  # per attribute: the share of readings that said "none of these"
    concepts: dict[str, ConceptScore]  # per concept, by name


def score(
    results: Sequence[Reading],
    asked: Sequence[world.Attributes | world.Prompt],
    concepts: Sequence[world.Concept] = world.HELDOUT,
) -> Score:
    """Compare readings with what was asked for (Attributes, or Prompts, whose `said` limits which
    attributes count toward accuracy), and score each concept fairly against false positives."""
    if len(results) != len(asked):
        raise SDiTError(f"{len(results)} readings for {len(asked)} prompts; pass one reading per prompt")
    wanted = [a.attrs if isinstance(a, world.Prompt) else a for a in asked]
    said = [a.said if isinstance(a, world.Prompt) else world.ATTRIBUTE_NAMES for a in asked]
    accuracy, rejected = {}, {}
    for name in world.ATTRIBUTE_NAMES:
        pairs = [(getattr(r, name), getattr(w, name)) for r, w, s in zip(results, wanted, said) if name in s]
        accuracy[name] = _mean([read == want for read, want in pairs])
        rejected[name] = _mean([getattr(r, name) is None for r in results])
    return Score(len(results), accuracy, rejected, {c.name: _concept_score(c, results, wanted) for c in concepts})


def concept_accuracy(results: Sequence[Reading], asked: Sequence[world.Prompt]) -> float:
    """The share of readings showing every held-out concept their prompt names ("cross", "yellow", "red
    circle"), over the prompts that name one: what a student can only have learnt from its teacher."""
    named = {c.name: c for c in world.HELDOUT}
    hits = [all(named[n].matches(r) for n in a.concepts) for r, a in zip(results, asked, strict=True) if a.concepts]
    return _mean(hits)


def fair_concepts(
    results: Sequence[Reading],
    asked: Sequence[world.Attributes | world.Prompt],
    concepts: Sequence[world.Concept] = world.HELDOUT,
) -> dict[str, ConceptScore]:
    """Per concept, how often a sample SHOWS it where asked, less how often where a rival was asked.

    A sample shows a concept when the reader saw one recognisable object (shape not None) that
    carries the concept's value(s): a blob in yellow shows no "yellow". `hit` = P(shown | the prompt
    asks for the concept); `false_positive` = P(shown | the prompt asks for another value of the same
    attribute: another shape for a shape concept, another colour for a colour concept, another
    shape-colour pair for a pair). A prompt whose wording does not state the attribute (`Prompt.said`)
    counts on neither side; Attributes count as stating everything. `fair` = hit - false_positive:
    1 for a student that shows the concept exactly when asked, 0 for one that shows it always or
    never, nan where either side has no prompts (`asked` and `others` give the counts).
    """
    if len(results) != len(asked):
        raise SDiTError(f"{len(results)} readings for {len(asked)} prompts; pass one reading per prompt")
    out = {}
    for concept in concepts:
        named = tuple(name for name in ("shape", "colour") if getattr(concept, name) is not None)
        hits, false_positives = [], []
        for reading, prompt in zip(results, asked):
            attrs, said = (prompt.attrs, prompt.said) if isinstance(prompt, world.Prompt) else (prompt, named)
            if not all(name in said for name in named):
                continue
            shown = reading.shape is not None and concept.matches(reading)
            (hits if concept.matches(attrs) else false_positives).append(shown)
        hit, false_positive = _mean(hits), _mean(false_positives)
        out[concept.name] = ConceptScore(hit, false_positive, hit - false_positive, len(hits), len(false_positives))
    return out


def mean_fair(scores: dict[str, ConceptScore]) -> float:
    """The headline: the mean `fair` over concepts, leaving out those with a nan `fair` (a concept no
    prompt asked for, or one every prompt asked for); nan when none is left."""
    return _mean([c.fair for c in scores.values() if not math.isnan(c.fair)])


def _concept_score(
    concept: world.Concept, results: Sequence[Reading], wanted: Sequence[world.Attributes]
) -> ConceptScore:
    asked = [concept.matches(w) for w in wanted]
    read = [concept.matches(r) for r in results]
    hit = _mean([r for r, a in zip(read, asked) if a])
    false_positive = _mean([r for r, a in zip(read, asked) if not a])
    return ConceptScore(hit, false_positive, hit - false_positive, sum(asked), len(asked) - sum(asked))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def pair_accuracy(readings: Sequence[Reading], asked: Sequence[world.Prompt]) -> float:
    """Share of readings whose shape and colour are both the ones asked for."""
    return _mean([r.shape == a.attrs.shape and r.colour == a.attrs.colour for r, a in zip(readings, asked)])


def figures(readings: dict[str, Sequence[Reading]], asked: dict[str, Sequence[world.Prompt]]) -> dict:
    """Every figure of one model from its readings of the held-out and seen prompts' samples (keys "heldout" and
    "seen"): the fair held-out score over both sets, the raw held-out hit rate, and per set the pair accuracy and
    each attribute's accuracy (with their mean)."""
    every_reading = [r for split in readings for r in readings[split]]
    every_prompt = [a for split in asked for a in asked[split]]
    concepts = fair_concepts(every_reading, every_prompt)
    result = {"heldout_acc": mean_fair(concepts),
              "heldout_hit": concept_accuracy(readings["heldout"], asked["heldout"]),
              "heldout_concepts": {c: {"hit": s.hit, "false_positive": s.false_positive, "fair": s.fair}
                                   for c, s in concepts.items()}}
    for split in readings:
        scored = score(readings[split], asked[split])
        result |= {f"{split}_pair_acc": pair_accuracy(readings[split], asked[split]),
                   f"{split}_attr_acc": _mean(list(scored.accuracy.values())),
                   f"{split}_attributes": dict(scored.accuracy)}
    result["seen_acc"] = result["seen_pair_acc"]
    return result


# --- how sure a figure is ---------------------------------------------------------------------------------------

HEADLINES = ("heldout_acc", "seen_acc", "heldout_hit")  # the figures `headline_draws` recomputes
LEVEL = 0.95


def resample(asked: dict[str, Sequence[world.Prompt]], draws: int = 2000, seed: int = 0) -> np.ndarray:
    """(draws, N) how often each of the N samples (the splits' samples in `asked`'s order, as `figures` takes
    them) appears in each bootstrap draw: every prompt keeps its place and its number of samples, drawn with
    replacement from its own samples. The evaluation prompts are every pair of a split with every background and
    size, not a sample of prompts, so what varies between draws is the noise of each sample alone."""
    rng = np.random.default_rng(seed)
    columns = []
    for split in asked:
        groups: dict[world.Prompt, list[int]] = {}
        for i, prompt in enumerate(asked[split]):
            groups.setdefault(prompt, []).append(i)
        counts = np.zeros((draws, len(asked[split])))
        for members in groups.values():
            picks = rng.integers(len(members), size=(draws, len(members)))  # (draw, sample): which of its own
            flat = (picks + len(members) * np.arange(draws)[:, None]).ravel()
            counts[:, members] = np.bincount(flat, minlength=draws * len(members)).reshape(draws, len(members))
        columns.append(counts)
    return np.concatenate(columns, axis=1)


def headline_draws(readings: dict[str, Sequence[Reading]], asked: dict[str, Sequence[world.Prompt]],
                   weights: np.ndarray) -> dict[str, np.ndarray]:
    """The headline figures (`HEADLINES`, as `figures` defines them) and each held-out concept's fair score
    ("fair:<name>") under each row of `weights` (from `resample`; a row of ones gives `figures`' own values)."""
    flat = [(r, a, split) for split in readings for r, a in zip(readings[split], asked[split], strict=True)]
    seen = np.array([split == "seen" for _, _, split in flat])
    heldout = np.array([split == "heldout" for _, _, split in flat])

    def rate(events: np.ndarray, where: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return (weights @ (events & where)) / (weights @ where)

    named = {c.name: c for c in world.HELDOUT}
    out: dict[str, np.ndarray] = {}
    fairs = []
    for concept in world.HELDOUT:
        names = tuple(n for n in ("shape", "colour") if getattr(concept, n) is not None)
        counted = np.array([all(n in a.said for n in names) for _, a, _ in flat])
        wanted = np.array([concept.matches(a.attrs) for _, a, _ in flat])
        shown = np.array([r.shape is not None and concept.matches(r) for r, _, _ in flat])
        out[f"fair:{concept.name}"] = rate(shown, counted & wanted) - rate(shown, counted & ~wanted)
        fairs.append(out[f"fair:{concept.name}"])
    with warnings.catch_warnings():  # a draw where no concept is defined is nan, as `mean_fair` says
        warnings.simplefilter("ignore", RuntimeWarning)
        out["heldout_acc"] = np.nanmean(np.stack(fairs), axis=0)
    pair = np.array([r.shape == a.attrs.shape and r.colour == a.attrs.colour for r, a, _ in flat])
    out["seen_acc"] = rate(pair, seen)
    names_some = np.array([bool(a.concepts) for _, a, _ in flat])
    hit_all = np.array([bool(a.concepts) and all(named[n].matches(r) for n in a.concepts) for r, a, _ in flat])
    out["heldout_hit"] = rate(hit_all, heldout & names_some)
    return out


def interval(values: np.ndarray, level: float = LEVEL) -> list[float]:
    """The central `level` interval of bootstrap values (percentiles), draws with an undefined figure left out."""
    kept = values[~np.isnan(values)]
    if not len(kept):
        return [math.nan, math.nan]
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(kept, tail)), float(np.percentile(kept, 100 - tail))]
