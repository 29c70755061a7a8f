"""Tests for nanocap.tools.metrics: pycocoevalcap called directly, hand-computed CLIP scores with a
fake CLIP, retrieval, shapes-world attributes, diversity, and the Java/SPICE fallbacks."""

import math
import random
import time

import pytest
import torch
import torch.nn.functional as F
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from nanocap.data import grammar, shapes
from nanocap.tools import metrics

JAVA = metrics.java_available()
needs_java = pytest.mark.skipif(not JAVA, reason="java not on PATH (METEOR and the PTB tokenizer need it)")

# five images, 3-5 references each; capitals and punctuation exercise the tokenizer
CANDIDATES = {
    1: "A red circle left of a blue square.",
    2: "a big green star",
    3: "Two shapes: a yellow triangle above a purple cross!",
    4: "an orange diamond",
    5: "a small circle on a white background",
}
REFERENCES = {
    1: ["a red circle to the left of a blue square", "two shapes", "A red circle and a blue square.",
        "a blue square right of a red circle"],
    2: ["a large green star", "one big green star on a white background", "a single shape"],
    3: ["a yellow triangle above a purple cross", "two objects on a white background",
        "a purple cross below a yellow triangle, two shapes in total", "a triangle and a cross",
        "a picture of two shapes"],
    4: ["a small orange diamond", "an orange shape", "a single small orange diamond and nothing else"],
    5: ["a small blue circle", "a little blue circle", "a simple shape", "one small circle"],
}


def direct(candidates, references, tokenize):
    """pycocoevalcap's own numbers (x1), computed the way COCOEvalCap does, without SPICE."""
    gts = tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenize({k: [{"caption": c}] for k, c in candidates.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"BLEU": bleu, "ROUGE-L": Rouge().compute_score(gts, res)[0], "CIDEr": Cider().compute_score(gts, res)[0],
            "METEOR": Meteor().compute_score(gts, res)[0]}  # METEOR is not symmetric: gts, res in that order


def simple(captions):
    return {k: [metrics.simple_tokenize(c["caption"]) for c in v] for k, v in captions.items()}


@pytest.fixture(scope="module")
def coco():
    # computed once: METEOR starts a JVM that takes ~5 s to load its paraphrase table
    return metrics.coco_scores(CANDIDATES, REFERENCES)

# -----------------------------------------------------------------------------
# BLEU, ROUGE-L, CIDEr, METEOR


@needs_java
@pytest.mark.slow
def test_coco_scores_match_pycocoevalcap(coco):
    want = direct(CANDIDATES, REFERENCES, PTBTokenizer().tokenize)
    for n in range(4):
        assert coco[f"BLEU-{n + 1}"] == pytest.approx(100 * want["BLEU"][n], rel=1e-9)
    assert coco["ROUGE-L"] == pytest.approx(100 * want["ROUGE-L"], rel=1e-9)
    assert coco["CIDEr"] == pytest.approx(100 * want["CIDEr"], rel=1e-9)
    assert coco["METEOR"] == pytest.approx(100 * want["METEOR"], rel=1e-9)
    assert 0 < coco["BLEU-4"] < coco["BLEU-1"] <= 100 and 0 < coco["CIDEr"]
    assert "SPICE" not in coco  # only when asked


def test_java_missing_falls_back(monkeypatch, capsys):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    scores = metrics.coco_scores(CANDIDATES, REFERENCES, spice=True)
    err = capsys.readouterr().err
    assert "java not found" in err and "METEOR" in err and "SPICE skipped" in err
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"}
    want = direct(CANDIDATES, REFERENCES, simple)  # the documented fallback tokenizer
    assert scores["BLEU-4"] == pytest.approx(100 * want["BLEU"][3], rel=1e-9)
    assert scores["CIDEr"] == pytest.approx(100 * want["CIDEr"], rel=1e-9)
    assert metrics.simple_tokenize("A man's  dog, black-and-white!") == "a man s dog black and white"


def test_spice_without_corenlp_is_skipped_quickly(monkeypatch, capsys, tmp_path):
    import pycocoevalcap.spice.spice as spice_module
    monkeypatch.setattr(metrics, "SPICE_LIB", str(tmp_path))  # an empty lib folder: no CoreNLP jars
    monkeypatch.setattr(metrics, "_meteor", lambda gts, res: 0.0)  # the JVM start is not what is timed
    def no_download():
        raise RuntimeError("tried to download CoreNLP")
    monkeypatch.setattr(spice_module, "get_stanford_models", no_download)
    start = time.time()
    scores = metrics.coco_scores(CANDIDATES, REFERENCES, spice=True)
    assert time.time() - start < 5
    err = capsys.readouterr().err
    assert "SPICE" not in scores and "CIDEr" in scores
    assert "SPICE skipped" in err and ("CoreNLP" in err if JAVA else "java" in err)
    assert "tried to download" not in err


def test_spice_downloads_corenlp_when_online(monkeypatch, capsys, tmp_path):
    import pycocoevalcap.spice.spice as spice_module
    monkeypatch.setattr(metrics, "SPICE_LIB", str(tmp_path))
    monkeypatch.setattr(metrics, "java_available", lambda: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []
    def fails():
        calls.append(1)
        raise OSError("network unreachable")
    monkeypatch.setattr(spice_module, "get_stanford_models", fails)
    assert "could not download Stanford CoreNLP" in metrics._spice_unavailable(java=True) and calls == [1]
    def installs():  # a download that puts the jars in place lets SPICE run
        for j in metrics.CORENLP_JARS:
            (tmp_path / j).write_bytes(b"")
    monkeypatch.setattr(spice_module, "get_stanford_models", installs)
    assert metrics._spice_unavailable(java=True) is None


def test_coco_scores_clear_errors():
    with pytest.raises(ValueError, match="same ids"):
        metrics.coco_scores({1: "a"}, {2: ["a"]})
    with pytest.raises(ValueError, match="non-empty list"):
        metrics.coco_scores({1: "a"}, {1: []})

# -----------------------------------------------------------------------------
# CLIP-S, RefCLIP-S, retrieval with a fake CLIP


class FakeCLIP:
    """encode_text from a table text -> vector; an unknown text (e.g. unprompted) is a KeyError."""

    def __init__(self, table):
        self.table = {t: F.normalize(torch.tensor(v, dtype=torch.float32), dim=0) for t, v in table.items()}
        self.seen = []

    def encode_text(self, texts):
        self.seen += list(texts)
        return torch.stack([self.table[t] for t in texts])  # (B, D)


def prompted(table, prompt="a photo depicts"):
    return {f"{prompt} {t}": v for t, v in table.items()}


def test_clip_scores_hand_computed():
    images = torch.eye(3)  # image i = e_i
    fake = FakeCLIP(prompted({
        "a red circle": [0.6, 0.8, 0.0],    # cos with image 0: 0.6 -> CLIP-S 1.5
        "a blue square": [0.0, 0.8, 0.6],   # cos with image 1: 0.8 -> CLIP-S 2.0
        "a green star": [0.0, 0.6, -0.8],   # cos with image 2: -0.8 -> CLIP-S 0
        "a circle": [-0.6, -0.8, 0.0],      # cos with candidate 0: -1 -> 0
        "red circle": [1.0, 0.0, 0.0],      # cos with candidate 0: 0.6 (the best reference)
        "blue square": [0.0, 0.0, 1.0],     # cos with candidate 1: 0.6
        "square": [0.0, 1.0, 0.0],          # cos with candidate 1: 0.8 (the best reference)
        "a star": [0.0, 0.6, -0.8],         # cos with candidate 2: 1, but CLIP-S is 0 -> H = 0
    }))
    cands = ["a red circle", "a blue square", "a green star"]
    refs = [["a circle", "red circle"], ["blue square", "square"], ["a star"]]
    scores = metrics.clip_scores(fake, images, cands, refs)
    h = lambda a, b: 2 * a * b / (a + b)
    assert scores["CLIP-S"] == pytest.approx(100 * (1.5 + 2.0 + 0.0) / 3, abs=1e-4)
    assert scores["RefCLIP-S"] == pytest.approx(100 * (h(1.5, 0.6) + h(2.0, 0.8) + 0.0) / 3, abs=1e-4)
    assert "a photo depicts a red circle" in fake.seen and "a photo depicts red circle" in fake.seen


def test_refclip_clamps_negative_reference_similarity():
    fake = FakeCLIP({"A photo of x": [1.0, 0.0], "A photo of y": [-1.0, 0.0]})
    scores = metrics.clip_scores(fake, torch.tensor([[0.6, 0.8]]), ["x"], [["y"]], prompt="A photo of")
    assert scores["CLIP-S"] == pytest.approx(150.0, abs=1e-4)  # 2.5 * 0.6 * 100
    assert scores["RefCLIP-S"] == 0.0  # refsim = max(-1, 0) = 0, so H = 0, not negative
    assert fake.seen == ["A photo of x", "A photo of y"]


def test_retrieval_one_swapped_pair():
    N = 12
    images = torch.eye(N)
    vectors = {f"caption {i}": images[i].tolist() for i in range(N)}
    # captions 3 and 7 each prefer the other's image (0.8) to their own (0.6): rank 2
    vectors["caption 3"] = (0.6 * images[3] + 0.8 * images[7]).tolist()
    vectors["caption 7"] = (0.6 * images[7] + 0.8 * images[3]).tolist()
    fake = FakeCLIP(prompted(vectors))
    scores = metrics.retrieval(fake, images, [f"caption {i}" for i in range(N)])
    assert scores["R@1"] == pytest.approx(100 * (N - 2) / N)
    assert scores["R@5"] == 100.0 and scores["R@10"] == 100.0


def test_retrieval_ties_count_against():
    fake = FakeCLIP(prompted({"same": [1.0, 0.0]}))
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # two identical images
    scores = metrics.retrieval(fake, images, ["same", "same"], ks=(1, 2))
    assert scores == {"R@1": 0.0, "R@2": 100.0}


def test_clip_metrics_clear_errors():
    fake = FakeCLIP(prompted({"x": [1.0, 0.0]}))
    with pytest.raises(ValueError, match="one row per caption"):
        metrics.retrieval(fake, torch.eye(2), ["x"])
    with pytest.raises(ValueError, match="non-empty lists"):
        metrics.clip_scores(fake, torch.eye(2)[:1], ["x"], [[]])

# -----------------------------------------------------------------------------
# shapes world, diversity, everything at once


def test_attribute_scores_on_shapes_scenes():
    attr = lambda captions, scenes: metrics.attribute_scores(captions, scenes, shapes.attribute_scores)
    rng = random.Random(0)
    scenes = [shapes.sample_scene(rng) for _ in range(4)]
    full = [shapes.caption(s, rng, "full") for s in scenes]
    assert attr(full, scenes) == {"attr_precision": 100.0, "no_claim": 0.0, "rel_precision": 100.0,
                                  "attr_recall": 100.0}
    good, bad = shapes.corrupt(scenes[0], rng, "colour")  # bad names a colour not in the scene
    assert attr([good], scenes[:1])["attr_precision"] == 100.0
    assert attr([bad], scenes[:1])["attr_precision"] < 100.0
    # a caption that claims nothing has no precision to judge: it is counted in no_claim instead
    assert attr(["hello"], scenes[:1]) == {"no_claim": 100.0, "attr_recall": 0.0}
    per = [shapes.attribute_scores(c, s) for c, s in zip([bad, "hello"], scenes[:2])]
    both = attr([bad, "hello"], scenes[:2])
    assert both["attr_precision"] == pytest.approx(100 * per[0]["true"] / per[0]["claims"])  # "hello" adds nothing
    assert both["no_claim"] == 50.0
    assert both["attr_recall"] == pytest.approx(50 * (per[0]["recall"] + per[1]["recall"]))


def test_precision_is_pooled_over_claims_and_relations_counted_apart():
    two = {"objects": [dict(size="small", colour="red", shape="circle", x=0.2, y=0.5),
                       dict(size="large", colour="blue", shape="square", x=0.7, y=0.5)]}
    long_wrong = "three shapes: a green star above a purple cross"  # 6 claims, all false
    short_true = "a red circle left of a blue square"  # 5 claims (2 colours, 2 shapes, 1 relation), all true
    s = metrics.attribute_scores([long_wrong, short_true], [two, two], shapes.attribute_scores)
    assert s["attr_precision"] == pytest.approx(100 * 5 / 11)  # per image it would be 50
    assert s["rel_precision"] == pytest.approx(50.0)  # "above" false, "left of" true
    assert s["no_claim"] == 0.0
    flu = metrics.attribute_scores([short_true, "a one little red circle"], [two, two], shapes.attribute_scores,
                                   fluent=grammar.fluent)
    assert flu["fluency"] == 50.0


def test_diversity_known_values():
    d = metrics.diversity(["a red circle", "a red circle", "two shapes", "a big green star"])
    assert d["distinct"] == 75.0 and d["mean_length"] == pytest.approx((3 + 3 + 2 + 4) / 4)


def test_evaluate_captions_and_table(monkeypatch, capsys):
    monkeypatch.setattr(metrics, "java_available", lambda: False)  # fast: no JVM
    cands = [CANDIDATES[k] for k in sorted(CANDIDATES)]
    refs = [REFERENCES[k] for k in sorted(REFERENCES)]
    vectors = {t: [math.cos(i), math.sin(i), 0.5] for i, t in enumerate(cands + sum(refs, []))}
    fake = FakeCLIP(prompted(vectors))
    rng = random.Random(1)
    scenes = [shapes.sample_scene(rng) for _ in cands]
    scores = metrics.evaluate_captions(cands, refs, clip=fake, image_features=torch.eye(5, 3), scenes=scenes,
                                       attribute_scorer=shapes.attribute_scores, fluent=grammar.fluent)
    assert list(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr", "CLIP-S", "RefCLIP-S",
                            "R@1", "R@5", "R@10", "attr_precision", "no_claim", "rel_precision", "attr_recall",
                            "fluency", "distinct", "mean_length"]
    assert scores["CIDEr"] == metrics.coco_scores(CANDIDATES, REFERENCES)["CIDEr"]
    table = metrics.format_table(scores)
    assert len(table.splitlines()) == 2 + len(scores) and "RefCLIP-S" in table and f"{scores['CIDEr']:.2f}" in table
    with pytest.raises(ValueError, match="both clip and image_features"):
        metrics.evaluate_captions(cands, refs, clip=fake)
    with pytest.raises(ValueError, match="attribute_scorer"):  # metrics knows no world: it is told how to score
        metrics.evaluate_captions(cands, refs, scenes=scenes)
