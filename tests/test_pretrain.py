"""Tests for nanocap/data/pretrain.py: the shapes world's toy CLIPs and GPT train, save in the real
formats and load back through CLIPEncoder and GPT.from_pretrained. Offline, tiny, a few seconds."""

import json
import random
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanocap import decode, losses
from nanocap.clip_encoder import CLIPEncoder
from nanocap.data import pretrain, shapes
from nanocap.gpt import GPT, GPTConfig
from nanocap.losses import info_nce
from nanocap.tokenizer import build_vocab, get_tokenizer

CFG = pretrain.REWARD_CLIP_CFG
TINY_CFG = pretrain.SMALL_REWARD_CLIP_CFG  # the notebooks' world's reward CLIP: the same code, a quarter of the time


def make_data(n, seed):
    scenes = shapes.make_split(n, seed=seed)
    rng = random.Random(seed)
    images = np.stack([np.asarray(shapes.render(s)) for s in scenes])  # (n, 64, 64, 3) uint8
    return scenes, images, [shapes.captions(s, rng) for s in scenes]


@pytest.fixture(scope="module")
def data():
    return make_data(64, seed=0)


@pytest.fixture(scope="module")
def tiny_clip(data, tmp_path_factory):
    """A small CLIP trained for 100 steps on 64 images (lr 2e-3: at the real runs' 5e-4, or with
    fewer steps, it stays near chance, log 64 = 4.16), saved, and loaded back by path."""
    _, images, captions = data
    model = pretrain.train_clip(TINY_CFG, images, captions, steps=100, batch_size=32, lr=2e-3, seed=0, progress=False)
    folder = tmp_path_factory.mktemp("clip")
    pretrain.save_clip(model, TINY_CFG, folder / "toy_clip.json", folder / "toy_clip.safetensors")
    encoder = CLIPEncoder(folder / "toy_clip.json", folder / "toy_clip.safetensors")
    return model, encoder


@torch.no_grad()
def clip_loss(model, images, texts):
    image = F.normalize(model.encode_image(pretrain.to_clip_input(images)), dim=-1)
    text = F.normalize(model.encode_text(pretrain.clip_tokenizer(TINY_CFG)(texts)), dim=-1)
    return info_nce(image, text, model.logit_scale.exp()).item()


def test_clip_loss_falls(data, tiny_clip):
    _, images, captions = data
    untrained = pretrain.train_clip(TINY_CFG, images, captions, steps=0, seed=0, progress=False)
    texts = [c[0] for c in captions]
    before, after = clip_loss(untrained, images, texts), clip_loss(tiny_clip[0], images, texts)
    assert after < before - 0.3, (before, after)


def test_saved_clip_loads_with_identical_features(data, tiny_clip):
    _, images, captions = data
    model, encoder = tiny_clip
    texts = losses.prompted([c[1] for c in captions[:8]]) + ["", "a red circle " * 20]  # empty, truncated
    with torch.no_grad():
        image_ref = F.normalize(model.encode_image(pretrain.to_clip_input(images[:8])), dim=-1)
        text_ref = F.normalize(model.encode_text(pretrain.clip_tokenizer(TINY_CFG)(texts)), dim=-1)
    torch.testing.assert_close(encoder.encode_image(pretrain.to_clip_input(images[:8])), image_ref, rtol=0, atol=0)
    torch.testing.assert_close(encoder.encode_text(texts), text_ref, rtol=0, atol=0)
    # and the PIL path through open_clip's own preprocess gives the same image features
    pil = [shapes.render(s) for s in data[0][:8]]
    torch.testing.assert_close(encoder.encode_image(pil), image_ref, rtol=0, atol=0)


def test_comp_clip_fixed_2d_positions_stay_fixed_and_load_back(data, tmp_path):
    """--comp_clip_pos sin_cos_2d: open_clip's fixed sine-cosine table is in the saved JSON config,
    training leaves it untouched (the rest moves), and CLIPEncoder rebuilds the same model."""
    scenes, images, captions = data
    cfg = pretrain.comp_clip_cfg("sin_cos_2d")
    assert pretrain.comp_clip_cfg("learnable") is pretrain.COMP_CLIP_CFG
    with pytest.raises(ValueError, match="sin_cos_2d"):
        pretrain.comp_clip_cfg("rope")
    start = pretrain.train_clip(cfg, images[:16], captions[:16], steps=0, seed=0, progress=False)
    model = pretrain.train_clip(cfg, images[:16], captions[:16], steps=1, batch_size=16, seed=0, progress=False,
                                scenes=scenes[:16], hard_negatives=0.5)
    pos = model.visual.positional_embedding
    assert not pos.requires_grad and torch.equal(pos, start.visual.positional_embedding) and pos.abs().max() == 1
    assert not torch.equal(model.visual.conv1.weight, start.visual.conv1.weight)
    pretrain.save_clip(model, cfg, tmp_path / "c.json", tmp_path / "c.safetensors")
    assert json.load(open(tmp_path / "c.json"))["vision_cfg"]["pos_embed_type"] == "sin_cos_2d"
    encoder = CLIPEncoder(tmp_path / "c.json", tmp_path / "c.safetensors")
    with torch.no_grad():
        ref = F.normalize(model.encode_image(pretrain.to_clip_input(images[:4])), dim=-1)
    torch.testing.assert_close(encoder.encode_image(pretrain.to_clip_input(images[:4])), ref, rtol=0, atol=0)


def test_relation_probe_reads_a_relation_only_where_the_features_hold_it():
    """Features that hold where the first-coloured object stands ((dx, dy) to the other: the relation is
    the argmax of dx, -dx, dy, -dy, which is linear) are read almost perfectly; noise is not."""
    scenes = shapes.make_split(600, seed=3)
    g = torch.Generator().manual_seed(0)

    def features(scene):
        objs = scene["objects"]
        if len(objs) != 2:
            return torch.randn(6, generator=g)
        first, other = sorted(objs, key=lambda o: o["colour"])
        where = torch.tensor([other["x"] - first["x"], other["y"] - first["y"], 0, 0, 0, 0.0])
        return where + 0.01 * torch.randn(6, generator=g)
    holds = torch.stack([features(s) for s in scenes])  # (600, 6)
    accuracy, chance = pretrain.relation_probe(holds[:400], scenes[:400], holds[400:], scenes[400:])
    assert accuracy > 0.95 and 0.25 <= chance < 0.5
    noise = torch.randn(600, 6, generator=g)
    assert pretrain.relation_probe(noise[:400], scenes[:400], noise[400:], scenes[400:])[0] < chance + 0.15
    one = [s for s in scenes if len(s["objects"]) == 1][:3]
    assert pretrain.relation_probe(noise[:3], one, noise[:3], one) is None  # no two-object scene


def test_to_clip_input_matches_open_clip_preprocess(data, tiny_clip):
    _, encoder = tiny_clip
    scenes, images, _ = data
    ours = pretrain.to_clip_input(images[:4])  # (4, 3, 64, 64)
    theirs = torch.stack([encoder.preprocess(shapes.render(s)) for s in scenes[:4]])
    assert ours.dtype == torch.float32 and ours.shape == (4, 3, 64, 64)
    assert torch.equal(ours, theirs)
    assert torch.equal(pretrain.to_clip_input(torch.from_numpy(images[:4])), theirs)  # tensors too


def test_trimmed_text_encoder_matches_open_clip(data, tiny_clip):
    model, _ = tiny_clip
    texts = [random.Random(i).choice(c) for i, c in enumerate(data[2][:16])]
    tokens = pretrain.clip_tokenizer(TINY_CFG)(texts)
    with torch.no_grad():
        torch.testing.assert_close(pretrain.encode_text(model, tokens), model.encode_text(tokens), rtol=1e-4, atol=1e-5)


def test_clip_training_is_deterministic(data):
    _, images, captions = data
    a, b, c = (pretrain.train_clip(CFG, images, captions, steps=3, batch_size=16, seed=s, progress=False)
               for s in (1, 1, 2))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_hard_negatives_are_minimal_pairs_on_the_text_side(data, monkeypatch):
    scenes, images, captions = data
    seen = []
    def spy(a, b, scale, b_negatives=None):
        seen.append((len(a), len(b), None if b_negatives is None else len(b_negatives)))
        return info_nce(a, b, scale, b_negatives)
    monkeypatch.setattr(pretrain, "info_nce", spy)
    calls = []
    corrupt = shapes.corrupt
    monkeypatch.setattr(shapes, "corrupt", lambda s, rng, what: calls.append(what) or corrupt(s, rng, what))
    pretrain.train_clip(CFG, images, captions, steps=1, batch_size=32, seed=0, progress=False,
                        scenes=scenes, hard_negatives=1.0, corruptions=("relation",))
    several = sum(len(s["objects"]) > 1 for s in scenes)  # the one-object scenes have no relation to reverse
    assert calls == ["relation"] * 32 and seen[0][:2] == (32, 32) and 0 < seen[0][2] <= min(32, several)
    seen.clear()
    pretrain.train_clip(CFG, images, captions, steps=1, batch_size=32, seed=0, progress=False)
    assert seen == [(32, 32, None)]  # by default no near misses: the reward CLIP's recipe is unchanged


class BagOfWordsCLIP:
    """An oracle with CLIPEncoder's two methods that sees exactly an image's colours, shapes and sizes
    (read off its scene) and a text's colour, shape and size words, as counts: a bag of words."""
    def __init__(self, images, scenes):
        self.pixels, self.scenes = pretrain.to_clip_input(images).flatten(1), scenes  # (N, 3*64*64)
        self.size_of = {w: size for size, words in shapes.SIZE_WORDS.items() for w in words}
        self.vocab = list(shapes.COLOURS) + shapes.SHAPES + list(shapes.SIZE_WORDS)

    def bag(self, words):  # (len(vocab) + 1,) unit norm; the constant keeps a text of no such word off 0
        v = torch.zeros(len(self.vocab) + 1)
        v[-1] = 1.0
        for w in words:
            if w in self.vocab:
                v[self.vocab.index(w)] += 1
        return F.normalize(v, dim=0)

    def encode_text(self, texts):
        words = [re.findall(r"[a-z]+", t.lower()) for t in texts]  # "big" -> large, "circles" -> circle
        return torch.stack([self.bag([self.size_of.get(w, shapes.SHAPE_WORDS.get(w, w)) for w in ws]) for ws in words])

    def encode_image(self, pixels):  # which of the N images each row is, then its scene's words
        rows = (pixels.flatten(1)[:, None] == self.pixels[None]).all(-1).float().argmax(1)
        return torch.stack([self.bag([w for o in self.scenes[i]["objects"] for w in (o["colour"], o["shape"], o["size"])])
                            for i in rows.tolist()])


def test_clip_report_measures_what_the_clip_sees():
    scenes, images, _ = make_data(40, seed=1)
    report = pretrain.clip_report(BagOfWordsCLIP(images, scenes), images, scenes, seed=0)
    assert set(report) == {"R@1", *pretrain.CORRUPTIONS, "clip_s_full", "clip_s_partial", "clip_s_generic"}
    # a caption that says more of the image scores higher ...
    assert report["clip_s_full"] > report["clip_s_partial"] > report["clip_s_generic"], report
    # ... a wrong colour, shape or size word always costs, and a bag of words cannot see the rest:
    # a reversed relation or swapped colours have the same words, a tie, and a tie is not a win
    assert report["colour"] == report["shape"] == report["size"] == 1.0, report
    assert report["relation"] == report["binding"] == 0.0, report
    assert report["R@1"] > 0.5, report  # most scenes' words are their own


def test_lm_overfits_saves_and_writes_a_training_caption(tmp_path):
    texts = [shapes.caption(s, random.Random(i), kind) for i, (s, kind) in
             enumerate(zip(shapes.make_split(6, seed=2), ["full", "partial", "generic"] * 2))]
    tokenizer = get_tokenizer("gpt2", build_vocab(texts))
    config = GPTConfig(block_size=64, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=64)
    untrained = pretrain.train_lm(texts, tokenizer, config, steps=0, progress=False)
    model = pretrain.train_lm(texts, tokenizer, config, steps=150, batch_size=16, lr=3e-3, seed=0, progress=False)
    before, after = pretrain.lm_perplexity(untrained, tokenizer, texts), pretrain.lm_perplexity(model, tokenizer, texts)
    assert before > 0.5 * tokenizer.vocab_size and after < 2.0, (before, after)  # ~V at init

    pretrain.save_lm(model, tokenizer, tmp_path / "lm")
    loaded = GPT.from_pretrained(str(tmp_path / "lm")).eval()
    vocab = json.loads((tmp_path / "lm" / "nanocap_vocab.json").read_text())
    tokenizer2 = get_tokenizer("gpt2", vocab)
    assert tokenizer2.encode(texts[0]) == tokenizer.encode(texts[0])
    assert pretrain.lm_perplexity(loaded, tokenizer2, texts) == pytest.approx(after, rel=1e-5)

    with torch.no_grad():  # greedy continuation of [eos] (the BOS) is one of the training captions
        bos = loaded.embed(torch.tensor([[tokenizer2.eos_id]]))  # (1, 1, n_embd)
        out = decode.greedy(loaded, bos, max_new_tokens=60, eos_id=tokenizer2.eos_id)
    assert tokenizer2.decode(out.tokens[0].tolist()) in texts


def test_bfloat16_pretraining_is_another_world(data):
    """--pretrain_dtype does what it says: a step in bfloat16 autocast gives other weights than in float32
    (so the two worlds differ), and each is deterministic."""
    _, images, captions = data
    state = {dt: [pretrain.train_clip(CFG, images[:16], captions[:16], steps=2, batch_size=16, seed=0, progress=False,
                                      dtype=dt).state_dict() for _ in range(2)] for dt in ("float32", "bfloat16")}
    for dt in state:
        assert all(torch.equal(state[dt][0][k], state[dt][1][k]) for k in state[dt][0])
    assert not all(torch.equal(state["float32"][0][k], state["bfloat16"][0][k]) for k in state["float32"][0])
    assert pretrain.resolve_dtype("auto") == ("bfloat16" if pretrain.cpu_has_bf16() else "float32")
