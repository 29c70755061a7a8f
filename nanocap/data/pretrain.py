"""
The shapes world's toy foundation models: a reward CLIP, an evaluation CLIP and a small GPT.

Jin, "Semi-Supervised Image Captioning with CLIP" (arXiv 2306.15111), builds on models
pretrained on the web: a frozen CLIP embeds the image for the captioner's prefix and, in
stage 2, scores sampled captions (CLIP-S, Hessel et al. 2021, arXiv 2104.08718); GPT-2
writes the captions. Nothing can be downloaded here, so the shapes world pretrains its own,
once, on a large "web" split of scenes that the captioner never sees:

  1. the reward CLIP: open_clip's own CLIP class (ModifiedResNet image tower, transformer
     text tower) built from a JSON model config and trained with CLIP's symmetric InfoNCE,
  2. the evaluation CLIP: a second, smaller one with another seed, so that stage 2 is never
     judged by the very model whose score it maximises,
  3. a small GPT (nanocap.gpt) trained as a language model on web captions, in GPT-2's BPE
     renumbered to the ~100 ids the captions use.

They are saved in the formats real weights come in (an open_clip JSON config + safetensors
state dict, a Hugging Face GPT-2 folder), so the rest of nanocap loads them like real ones:
CLIPEncoder("clip.json", "clip.safetensors") and GPT.from_pretrained(folder).
"""

import json
import math
import os
import random

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from nanocap.base.files import atomic_write
from nanocap.base.optim import lr_at, param_groups
from nanocap.data import shapes
from nanocap.gpt import GPT
from nanocap.losses import clip_s, embed_captions, info_nce, prompted
from nanocap.tokenizer import caption_batch


# -----------------------------------------------------------------------------
# configs

# open_clip JSON model configs. The image tower is CLIP's ModifiedResNet (a ResNet with an
# attention-pooling head): on 64x64 shapes it learns far faster than a ViT with 8x8 patches.
# context_length 48 holds the longest full caption with the CLIP-S prompt (45 tokens).
REWARD_CLIP_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32},
    "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
EVAL_CLIP_CFG = {  # narrower image tower, shallower text tower; trained with another seed
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 24, "head_width": 32},
    "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
# the toy GPT-2: GPTConfig(vocab_size=tokenizer.vocab_size, **LM_CFG)
LM_CFG = {"block_size": 96, "n_layer": 4, "n_head": 4, "n_embd": 128}
# `data_prep.py --small_models`: the same three models, smaller, for a world made in about two minutes
# (the notebooks' world, configs/shapes_small_data.json). A quarter of the image tower's width is
# most of the saving: at 64x64 the ResNet stem costs ~3/4 of a CLIP step.
SMALL_REWARD_CLIP_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
    "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SMALL_EVAL_CLIP_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16},
    "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}
SMALL_LM_CFG = {"block_size": 96, "n_layer": 2, "n_head": 2, "n_embd": 64}

# the compositional CLIP (data_prep.py --compositional): a ViT image tower on 8-pixel patches keeps
# an 8x8 grid of positions, where the ResNet pools a 2x2 map; trained with hard negatives
COMP_CLIP_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 48, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
HARD_NEGATIVES = ("relation", "binding")  # the near misses the compositional CLIP is trained against


def comp_clip_cfg(positions="learnable"):
    """COMP_CLIP_CFG with its patch positions: "learnable" (CLIP's own), or "sin_cos_2d", open_clip's
    fixed 2-D sine-cosine table (MAE's), an explicit x and y signal that is not trained."""
    if positions not in ("learnable", "sin_cos_2d"):
        raise ValueError(f"patch positions {positions!r}: use learnable or sin_cos_2d")
    if positions == "learnable":
        return COMP_CLIP_CFG  # the JSON config stays as it was
    return {**COMP_CLIP_CFG, "vision_cfg": {**COMP_CLIP_CFG["vision_cfg"], "pos_embed_type": positions}}


PROMPT_PROB = 0.5  # training captions carry the prompt half of the time, so CLIP-S's texts are familiar
MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN)  # open_clip's default normalisation
STD = torch.tensor(open_clip.OPENAI_DATASET_STD)
CORRUPTIONS = ("colour", "shape", "size", "relation", "binding")


def cpu_has_bf16():
    # torch only exposes these checks privately; where they are missing we say no
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


DTYPES = ("auto", "float32", "bfloat16")


def resolve_dtype(name):
    """The dtype the toy models pretrain in (data_prep.py --pretrain_dtype): float32, or bfloat16
    autocast (~1.5x faster where the CPU has native bf16, AVX512-BF16 or AMX; it runs, more slowly,
    on any CPU). "auto" is bfloat16 where the CPU has it, float32 elsewhere. The two give different
    worlds: every model trained on one differs from its twin on the other."""
    if name not in DTYPES:
        raise ValueError(f"pretrain dtype {name!r}: use auto, float32 or bfloat16")
    return ("bfloat16" if cpu_has_bf16() else "float32") if name == "auto" else name


# -----------------------------------------------------------------------------
# training helpers


def autocast(dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")


def epochs(n, batch_size, generator):
    """Yield batches of indices (batch_size,) forever: each epoch a fresh permutation of range(n),
    so no image appears twice in a batch (a duplicate would be its own false negative)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]

# -----------------------------------------------------------------------------
# CLIP


def to_clip_input(images_uint8):
    """(N, H, W, 3) uint8 numpy array or tensor -> (N, 3, H, W) float32, normalised exactly as
    CLIPEncoder.preprocess (open_clip's eval transform) normalises an image of the model's size:
    ToTensor (x / 255), then Normalize with OpenAI's mean and std, in the same float32 ops."""
    x = torch.as_tensor(np.asarray(images_uint8)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    x = x.to(torch.float32).div(255)
    return x.sub(MEAN.view(1, 3, 1, 1)).div(STD.view(1, 3, 1, 1))


def clip_tokenizer(cfg):
    """The tokenizer open_clip (and so CLIPEncoder) uses for this config: CLIP's BPE, padded or
    truncated to the context length. Returns (B, context_length) int64 from a list of strings."""
    return open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])


def encode_text(model, tokens, chunks=4):
    """model.encode_text(tokens), (B, context_length) -> (B, embed_dim), without most of the
    padding: CLIP's text tower is causal and reads its feature off the EOT token, so nothing after
    EOT can change it. Captions are sorted by length, and each of `chunks` groups is run only up
    to its longest caption: the same features for ~2.3x less text compute on shapes captions."""
    lengths = tokens.argmax(dim=-1) + 1  # EOT has the largest id in CLIP's vocab: its position + 1
    order = lengths.argsort()
    parts = []
    for idx in order.chunk(chunks):
        L = int(lengths[idx].max())
        t = tokens[idx, :L]  # (b, L)
        x = model.token_embedding(t) + model.positional_embedding[:L]  # (b, L, width)
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:L, :L]))
        x = x[torch.arange(len(idx)), t.argmax(dim=-1)]  # (b, width) the EOT token's output
        parts.append(x @ model.text_projection)  # (b, embed_dim)
    return torch.cat(parts)[order.argsort()]  # back in the batch's order


def train_clip(cfg, images, captions, steps, batch_size=256, lr=5e-4, seed=0, progress=True,
               scenes=None, hard_negatives=0.0, corruptions=HARD_NEGATIVES, dtype="float32"):
    """Train a CLIP from scratch with symmetric InfoNCE (Radford et al. 2021).

    cfg: an open_clip model config (REWARD_CLIP_CFG, EVAL_CLIP_CFG, COMP_CLIP_CFG).
    images: (N, 64, 64, 3) uint8. captions: N lists of reference captions.
    Each step takes batch_size images (each epoch a permutation) and one of each image's
    captions drawn uniformly, prompted as CLIP-S prompts it with probability PROMPT_PROB.
    hard_negatives (NegCLIP, Yuksekgonul et al. 2023; needs the images' scenes): that share of
    the images take a minimal pair from shapes.corrupt instead, one of `corruptions` drawn
    uniformly: the full caption is the positive and its near miss (relation reversed, colours
    swapped, ...) joins the text side of the image -> text loss (losses.info_nce).
    dtype: "float32" or "bfloat16" (autocast; resolve_dtype). Deterministic on CPU given the seed
    and dtype. Returns the model in eval mode."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)  # what open_clip.create_model builds from the JSON config
    model.train().to(memory_format=torch.channels_last)  # NHWC convolutions: ~1.5x faster on CPU
    tokenize = clip_tokenizer(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    batch_size = min(batch_size, len(images))
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    batches = epochs(len(images), batch_size, g)
    warmup = max(1, steps // 20)
    bar = tqdm(range(steps), desc="train clip", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup, floor=0.0)
        idx = next(batches)  # (B,)
        texts, near_misses = [], []
        for i in idx.tolist():
            with_prompt = rng.random() < PROMPT_PROB  # drawn before the caption, as the data was made
            prompt = (lambda c: prompted([c])[0]) if with_prompt else (lambda c: c)
            pair = None
            if hard_negatives and rng.random() < hard_negatives:
                pair = shapes.corrupt(scenes[i], rng, corruptions[int(rng.random() * len(corruptions))])
            if pair is None:  # no hard negative for this image (or none possible: one object)
                texts.append(prompt(rng.choice(captions[i])))
            else:
                texts.append(prompt(pair[0]))
                near_misses.append(prompt(pair[1]))
        pixels = to_clip_input(images[idx.numpy()]).contiguous(memory_format=torch.channels_last)  # (B, 3, 64, 64)
        tokens = tokenize(texts + near_misses)  # (B + M, context_length)
        with autocast(dtype):
            image_features = model.encode_image(pixels)  # (B, embed_dim)
            text_features = F.normalize(encode_text(model, tokens).float(), dim=-1)  # (B + M, embed_dim)
        B = len(texts)
        loss = info_nce(F.normalize(image_features.float(), dim=-1), text_features[:B], model.logit_scale.exp(),
                        b_negatives=text_features[B:] if near_misses else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():  # CLIP caps the temperature at 1/100
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval().to(memory_format=torch.contiguous_format)  # laid out as it loads back


def save_clip(model, cfg, json_path, weights_path):
    """Write the open_clip model config (JSON) and the state dict (safetensors): load them back
    with CLIPEncoder(json_path, weights_path)."""
    for path in (json_path, weights_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(cfg, f, indent=2)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights_path, lambda tmp: save_file(state, tmp))  # last and whole: data_prep skips what exists


@torch.no_grad()
def clip_report(encoder, images, scenes, seed=0):
    """How good a CLIP is on a test set, with texts worded as CLIP-S words them (losses.prompted).

    encoder: a CLIPEncoder. images: (N, 64, 64, 3) uint8; scenes: their N scenes.
    R@1:        text->image retrieval: each image's full caption ranks it first among all N images
    colour, shape, size, relation, binding:
                the fraction of images whose full caption scores higher than the same caption
                with that one thing wrong (shapes.corrupt; scenes where it is impossible are skipped)
    clip_s_full, clip_s_partial, clip_s_generic:
                mean CLIP-S, 2.5 * max(cos, 0), of one caption of that kind per image.
    Fractions are in [0, 1]; CLIP-S in [0, 2.5]. A good CLIP ranks full > partial > generic."""
    rng = random.Random(seed)
    image_emb = torch.cat([encoder.encode_image(to_clip_input(images[i:i + 500]))
                           for i in range(0, len(images), 500)])  # (N, D)

    def embed(texts):  # (M, D)
        return embed_captions(encoder, texts, batch=500)

    report = {}
    full = embed([shapes.caption(s, rng, "full") for s in scenes])  # (N, D)
    ranks = (full @ image_emb.T).argmax(dim=1)  # (N,) the image each caption retrieves
    report["R@1"] = (ranks == torch.arange(len(scenes))).float().mean().item()
    for what in CORRUPTIONS:
        pairs = [(i, shapes.corrupt(s, rng, what)) for i, s in enumerate(scenes)]
        pairs = [(i, p) for i, p in pairs if p is not None]
        rows = torch.tensor([i for i, _ in pairs])
        good, bad = embed([p[0] for _, p in pairs]), embed([p[1] for _, p in pairs])  # (M, D)
        img = image_emb[rows]
        report[what] = ((img * good).sum(-1) > (img * bad).sum(-1)).float().mean().item()
    for kind in ("full", "partial", "generic"):
        text = embed([shapes.caption(s, rng, kind) for s in scenes])
        report[f"clip_s_{kind}"] = clip_s(image_emb, text).mean().item()
    return report


def relation_probe(train_features, train_scenes, test_features, test_scenes, l2=1e-3):
    """Does an image embedding hold a relation? A linear probe (logistic regression on standardised
    features, L-BFGS) learns, on the train split's scenes of two objects of different colours,
    where the object whose colour comes first alphabetically stands relative to the other (left of,
    right of, above, below). Features: (N, D), a row per scene. Returns the probe's accuracy on the
    test split's such scenes, and the share of their commonest relation (a constant guess's);
    None when a split has too few such scenes."""
    kinds = list(shapes.INVERSE)  # left of, right of, above, below: the probe's classes

    def pairs(features, scenes):  # (n, D) rows of the two-object scenes, (n,) relation indices
        rows, labels = [], []
        for k, scene in enumerate(scenes):
            objs = scene["objects"]
            if len(objs) == 2 and objs[0]["colour"] != objs[1]["colour"]:
                (i, rel, _), = shapes.relations(scene)  # object i is `rel` the other
                first = min(range(2), key=lambda t: objs[t]["colour"])
                rows.append(k)
                labels.append(kinds.index(rel if i == first else shapes.INVERSE[rel]))
        return features[rows].float(), torch.tensor(labels)
    (x, y), (x_test, y_test) = pairs(train_features, train_scenes), pairs(test_features, test_scenes)
    if len(y) < 2 or len(y_test) == 0:
        return None
    mean, std = x.mean(0), x.std(0) + 1e-6
    w, b = torch.zeros(x.shape[1], len(kinds), requires_grad=True), torch.zeros(len(kinds), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy((x - mean) / std @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        accuracy = (((x_test - mean) / std @ w + b).argmax(1) == y_test).float().mean().item()
    return accuracy, torch.bincount(y_test, minlength=len(kinds)).max().item() / len(y_test)

# -----------------------------------------------------------------------------
# the language model


def train_lm(texts, tokenizer, config, steps, batch_size=32, lr=1e-3, seed=0, progress=True, dtype="float32"):
    """Pretrain a GPT (config: nanocap.gpt.GPTConfig) as a language model of captions.

    As GPT-2 packs documents, the shuffled captions are joined into one stream
    [eos] c_1 [eos] c_2 ... [eos] c_N, read as a circle (after c_N comes [eos] c_1 again); the
    eos before each caption acts as its BOS. A training window is block_size tokens from a
    random caption's eos, every token predicting the next, so each caption and its final eos
    are predicted, and every position of the model is trained (a captioner's prefix pushes the
    caption to later positions). dtype as train_clip's. Returns the model in eval mode."""
    torch.manual_seed(seed)
    model = GPT(config)
    model.train()
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    encoded = tokenizer.encode_batch(list(texts))
    stream, starts = [], []
    for i in order:
        starts.append(len(stream))  # where this caption's [eos] sits
        stream += [tokenizer.eos_id] + encoded[i]
    data, starts = torch.tensor(stream), torch.tensor(starts)  # (L,), (N,)
    offsets = torch.arange(config.block_size)  # (T,)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    bar = tqdm(range(steps), desc="train lm", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup, floor=0.0)
        pos = starts[torch.randint(len(starts), (batch_size,), generator=g)][:, None] + offsets  # (B, T)
        x, y = data[pos % len(data)], data[(pos + 1) % len(data)]  # inputs, next tokens (B, T)
        with autocast(dtype):
            _, loss = model(x, targets=y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def lm_batch(tokenizer, texts):
    """[eos] caption [eos] for each text: inputs (B, L) and next-token targets (B, L), the caption
    and its final eos, -100 at padding."""
    inputs, targets = caption_batch(tokenizer, texts)  # caption + eos
    bos = torch.full((len(texts), 1), tokenizer.eos_id)
    return torch.cat([bos, inputs[:, :-1]], dim=1), targets


@torch.no_grad()
def lm_perplexity(model, tokenizer, texts, batch_size=256):
    """Per-token perplexity of the captions (each read alone as [eos] caption [eos]):
    exp(mean negative log-likelihood of every caption token and its final eos)."""
    nll, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        x, y = lm_batch(tokenizer, texts[i:i + batch_size])  # (B, L), (B, L)
        logits = model(x).float()  # (B, L, V)
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100,
                               reduction="sum").item()
        count += (y != -100).sum().item()
    return math.exp(nll / count)


def save_lm(model, tokenizer, folder):
    """GPT-2 format (config.json + model.safetensors) plus nanocap_vocab.json, the reduced vocab:
    load with GPT.from_pretrained(folder) and get_tokenizer("gpt2", json.load(vocab file))."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "nanocap_vocab.json"), "w") as f:
        json.dump(tokenizer.vocab, f)
    model.save_pretrained(folder)  # model.safetensors last, atomically: data_prep skips the GPT once it exists
