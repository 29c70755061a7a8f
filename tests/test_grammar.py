"""Fluency: the recognizer accepts everything the shapes grammar writes, and nothing else we know of."""

import random

import pytest

from nanocap.data import grammar, shapes


def test_every_caption_the_grammar_writes_is_fluent():
    rng = random.Random(0)
    for scene in shapes.make_split(600, seed=3):
        for kind in ("full", "partial", "generic"):
            for _ in range(2):
                text = shapes.caption(scene, rng, kind)
                assert grammar.fluent(text), (kind, text)
    # the corrupted twins are worded by the same grammar: false, but fluent
    for scene in shapes.make_split(100, seed=4):
        pair = shapes.corrupt(scene, rng, "relation")
        assert pair is None or all(map(grammar.fluent, pair))


@pytest.mark.parametrize("text", [
    "a one little orange star",  # what stage 2 writes: two count words
    "a red red circle",  # a repeated word
    "an small circle", "a orange circle",  # the article does not fit the next word
    "a single small red",  # no noun
    "two shapes: a small red circle, a large blue square and a green star",  # three items after "two"
    "a big yellow diamond to the left of a large orange diamond two objects",  # the count's comma is missing
    "a small red circle left of",  # cut off
    "",
])
def test_what_the_grammar_cannot_write_is_not_fluent(text):
    assert not grammar.fluent(text)


def test_fluency_is_form_not_truth():
    assert grammar.fluent("a picture showing a single large purple cross")  # fluent whatever the image shows
    assert grammar.fluent("  two shapes  ")  # whitespace at the ends is ignored
    assert not grammar.fluent("a single  large purple cross")  # inside it is not


def test_a_caption_marked_with_its_false_claims():
    import sample
    scene = {"objects": [dict(size="small", colour="red", shape="circle", x=0.2, y=0.5),
                         dict(size="large", colour="blue", shape="square", x=0.7, y=0.5)]}
    assert sample.marked("a red circle left of a blue square", scene) == "a red circle left of a blue square  [5 true]"
    assert sample.marked("a red circle right of a green square", scene) == \
        "a red circle right of a green square  [3 true; false: green, circle right of square]"
