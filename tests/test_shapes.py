"""Tests for the shapes world: scenes, renderer, caption grammar, parser and scores."""

import collections
import json
import random
import re

import numpy as np
import pytest

from nanocap.data import shapes
from nanocap.data.shapes import (COLOURS, EXTENT, SHAPES, SIZES, attribute_scores, caption, captions, corrupt,
                            make_split, parse, relations, render, sample_kind)

# a hand-made scene: a small red circle on the left, a large blue square on the right
TWO = {"objects": [{"shape": "circle", "colour": "red", "size": "small", "x": 0.2, "y": 0.5},
                   {"shape": "square", "colour": "blue", "size": "large", "x": 0.75, "y": 0.45}]}


@pytest.fixture(scope="module")
def scenes():
    return make_split(300, seed=0)


def test_same_seed_same_world_different_seed_different_world():
    a, b, c = make_split(30, seed=1), make_split(30, seed=1), make_split(30, seed=2)
    assert a == b and a != c
    caps = lambda seed: [captions(s, random.Random(seed)) for s in a]
    assert caps(7) == caps(7) and caps(7) != caps(8)
    assert all(render(x).tobytes() == render(y).tobytes() for x, y in zip(a, b))
    assert any(render(x).tobytes() != render(y).tobytes() for x, y in zip(a, c))


def test_scenes_are_json_and_well_formed(scenes):
    assert json.loads(json.dumps(scenes)) == scenes
    counts = collections.Counter(len(s["objects"]) for s in scenes)
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 60
    for s in scenes:
        for o in s["objects"]:
            assert o["shape"] in SHAPES and o["colour"] in COLOURS and o["size"] in SIZES
            assert 0 < o["x"] < 1 and 0 < o["y"] < 1
        assert len({(o["shape"], o["colour"]) for o in s["objects"]}) == len(s["objects"])


def test_relations_are_unambiguous_and_objects_do_not_overlap(scenes):
    for s in scenes:
        objs = s["objects"]
        rels = relations(s)
        assert len(rels) == len(objs) * (len(objs) - 1) // 2
        for i, rel, j in rels:
            a, b = objs[i], objs[j]
            dx, dy = b["x"] - a["x"], b["y"] - a["y"]
            major, minor = max(abs(dx), abs(dy)), min(abs(dx), abs(dy))
            assert minor <= 0.5 * major  # clearly one axis
            assert major >= EXTENT * (SIZES[a["size"]] + SIZES[b["size"]])  # bounding boxes apart
            expect = {"left of": dx > 0 and abs(dx) > abs(dy), "right of": dx < 0 and abs(dx) > abs(dy),
                      "above": dy > 0 and abs(dy) > abs(dx), "below": dy < 0 and abs(dy) > abs(dx)}
            assert expect[rel]
    assert relations(TWO) == [(0, "left of", 1)]


def test_render_size_mode_and_sizes_differ():
    img = render(TWO)
    assert img.size == (64, 64) and img.mode == "RGB"
    assert render(TWO, size=32).size == (32, 32)
    assert np.asarray(img)[0, 0].tolist() == [255, 255, 255]  # corner is background
    for shape in SHAPES:
        ink = {}
        for size in SIZES:
            scene = {"objects": [{"shape": shape, "colour": "blue", "size": size, "x": 0.5, "y": 0.5}]}
            ink[size] = (np.asarray(render(scene)).min(axis=2) < 200).sum()
        assert ink["small"] > 40, shape  # still visible
        assert ink["large"] > 2.2 * ink["small"], (shape, ink)


def test_reference_captions_are_true_and_vary_in_informativeness(scenes):
    rng = random.Random(0)
    recall = collections.defaultdict(list)
    for s in scenes:
        for kind in ("full", "partial", "generic"):
            text = caption(s, rng, kind)
            assert text == text.lower() and not text.endswith(".")
            score = attribute_scores(text, s)
            assert score["precision"] == 1.0, (kind, text, s)
            recall[kind].append(score["recall"])
    assert min(recall["full"]) == 1.0
    assert max(recall["partial"]) < 1.0
    mean = {k: sum(v) / len(v) for k, v in recall.items()}
    assert mean["generic"] < mean["partial"] < 0.6
    assert max(recall["generic"]) <= 0.25  # generic captions claim at most the count
    # and the five references of captions() are all true as well
    for s in scenes[:100]:
        assert all(attribute_scores(t, s)["precision"] == 1.0 for t in captions(s, rng))


def test_caption_wording_varies_and_uses_an():
    rng = random.Random(0)
    texts = [caption(s, rng, kind) for s in make_split(200, seed=3) for kind in ("full", "partial")]
    assert len(set(texts)) > 0.95 * len(texts)
    assert not any(re.search(r"\ba [aeiou]", t) or re.search(r"\ban [^aeiou]", t) for t in texts)
    star = {"objects": [{"shape": "star", "colour": "orange", "size": "small", "x": 0.5, "y": 0.5}]}
    texts = [caption(star, rng, "partial") for _ in range(50)]
    assert any("an orange" in t for t in texts)
    for word in ("there is", "an image of", "a picture showing", "to the left of", "left of", "two", "three"):
        assert any(word in t for t in [caption(s, rng, "full") for s in make_split(100, seed=4)]), word


def test_kind_proportions():
    rng = random.Random(0)
    counts = collections.Counter(sample_kind(rng) for _ in range(20000))
    for kind, p in shapes.KIND_PROBS.items():
        assert abs(counts[kind] / 20000 - p) < 0.015, counts
    # captions() draws kinds with these odds: only full captions have recall 1
    full = [attribute_scores(t, s)["recall"] == 1.0 for s in make_split(200, seed=5) for t in captions(s, rng)]
    assert abs(sum(full) / len(full) - 0.45) < 0.05


def test_parse():
    p = parse("a small red circle to the left of a large blue square")
    assert p["mentions"] == [{"size": "small", "colour": "red", "shape": "circle"},
                             {"size": "large", "colour": "blue", "shape": "square"}]
    assert p["relations"] == [(0, "left of", 1)] and p["count"] is None
    assert parse("a big blue square right of a little red circle")["relations"] == [(0, "right of", 1)]
    # a relation pointing back to an earlier mention is stored from the earlier one: (a, rel, b), a < b
    assert parse("a square and a circle left of the square")["relations"] == [(0, "right of", 1)]
    # chained and definite references
    p = parse("three shapes: a red circle left of a blue square, which is above a star, and the circle above the star")
    assert p["count"] == 3 and len(p["mentions"]) == 4  # "shapes" is an attribute-less mention
    assert set(p["relations"]) == {(1, "left of", 2), (2, "above", 3), (1, "above", 3)}


def test_scores_catch_wrong_captions():
    ok = lambda text: attribute_scores(text, TWO)["precision"] == 1.0
    assert ok("a red circle left of a blue square") and ok("a blue square to the right of a circle")
    assert ok("two shapes") and ok("a large shape") and ok("")
    for wrong in ("a green circle", "a red star", "a red circle right of a blue square", "a blue circle",
                  "a large red circle", "three shapes", "a red circle above a blue square",
                  "a blue square left of a red circle", "a red circle, a blue square and a green star"):
        assert not ok(wrong), wrong
    full = attribute_scores("two shapes: a small red circle to the left of a large blue square", TWO)
    assert full == {"precision": 1.0, "recall": 1.0, "claims": 8, "true": 8, "facts": 8, "covered": 8,
                    "checked": [("small", True), ("red", True), ("circle", True), ("large", True), ("blue", True),
                                ("square", True), ("circle left of square", True), ("2 in all", True)],
                    "rel_claims": 1, "rel_true": 1}
    wrong = attribute_scores("a big red circle above a blue star", TWO)["checked"]
    assert wrong == [("large", False), ("red", True), ("circle", True), ("blue", True), ("star", False),
                     ("circle above star", False)], wrong
    # "A left of B" and "B right of A" are the same fact: saying both covers it once
    twice = attribute_scores("a circle left of a square and the square right of the circle", TWO)
    assert twice["claims"] == 3 and twice["covered"] == 3 and twice["recall"] == 3 / 8
    # one-to-one matching: a second red circle is a hallucination
    assert attribute_scores("a red circle and a red circle", TWO)["precision"] == 0.5


@pytest.mark.parametrize("what", ["colour", "shape", "size", "relation", "binding"])
def test_corrupt_lowers_precision(scenes, what):
    rng, made = random.Random(0), 0
    for s in scenes:
        pair = corrupt(s, rng, what)
        if pair is None:
            assert what in ("relation", "binding") and (len(s["objects"]) == 1 or what == "binding")
            continue
        good, bad = pair
        made += 1
        assert good != bad
        if what != "shape":  # (a new shape may shorten "the red circle" to "the star")
            assert len(good.split()) == len(bad.split())  # same wording, one thing changed
        assert attribute_scores(good, s)["precision"] == 1.0 and attribute_scores(good, s)["recall"] == 1.0
        assert attribute_scores(bad, s)["precision"] < 1.0, (good, bad, s)
    assert made > 100


def test_parser_robustness():
    vocab = "a an the red blue circle square left right of above below two three shape and , : which is".split()
    rng = random.Random(0)
    texts = ["", "   ", ".", "a red red red circle circle", "zxq blorp !!", "the the the", "left of left of",
             "circle " * 200, "ONE Red CIRCLE", "a red"] + [" ".join(rng.choices(vocab, k=40)) for _ in range(50)]
    for text in texts:
        for s in (TWO, make_split(1, seed=0)[0]):
            score = attribute_scores(text, s)
            assert 0.0 <= score["precision"] <= 1.0 and 0.0 <= score["recall"] <= 1.0
    assert parse("a red red red circle circle")["mentions"] == [{"size": None, "colour": "red", "shape": "circle"}]
    assert parse("") == {"mentions": [], "relations": [], "count": None}
    assert attribute_scores("", TWO)["precision"] == 1.0 and attribute_scores("", TWO)["recall"] == 0.0
    assert parse("ONE Red CIRCLE")["count"] == 1
