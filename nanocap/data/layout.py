"""
The on-disk dataset layout that every source shares: the shapes world, COCO, and your own folder.

    data/<name>/
      meta.json                        CLIP (name + weights) the features come from, whether they are
                                       L2-normalized, the GPT to start from, counts, summary figures
      <split>/captions.jsonl           one image per line: {"image": "images/000001.png",
                                       "captions": ["a red circle", ...], ...}  ("image" is relative
                                       to the split folder, or absolute)
      <split>/features.safetensors     {"features": (N, D) float16}, row i = line i of captions.jsonl,
                                       each image encoded once (ClipCap encoded each one 5 times)
      <split>/features_*.safetensors   the same images by other CLIPs: the evaluation CLIP's, a
                                       reward CLIP's (train.py --reward_clip), the compositional
                                       CLIP's; each file's header names its CLIP (find_features)

An unlabeled web pool (data_prep.py --dataset webdataset) has a layout of its own, features only:
nanocap/data/webpool.py. An image without captions (`"captions": []`) can only serve as unlabeled data. In train, such
images come after all captioned ones, and meta["train_captioned"] says how many captioned ones
there are (absent: all), so stage 2 knows its pool without reading a caption. Paths in meta.json
are relative to the dataset folder, absolute, or names (gpt2, ViT-B-32-quickgelu, openai).
Writes are atomic (nanocap/base/files.py): a temporary file, flushed to disk, then a rename, so a
killed run never leaves a half-written file behind.

Training reads a split as a Captioned set (stage 1: features and captions) or an Unlabeled one
(stage 2: features only); both, and stage 2's memory-mapped pool (pool.py), draw a batch with
.batch(B, generator, device) -> (features (B, D), what the stage scores them with).
"""

import json
import os
import random

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanocap.base.files import atomic_write


def parse_jsonl(path):
    """(records, problems) of a captions.jsonl: the well-formed records, and one "file:line: what is
    wrong" message per malformed line, which is left out."""
    records, problems = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{n}: not valid JSON ({e.msg})")
                continue
            captions = r.get("captions", []) if isinstance(r, dict) else None
            if not isinstance(r, dict) or not isinstance(r.get("image"), str):
                problems.append(f'{path}:{n}: expected {{"image": ..., "captions": [...]}}')
            elif not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
                problems.append(f'{path}:{n}: "captions" must be a list of strings')
            else:
                records.append(r)
    return records, problems


def read_jsonl(path):
    """Records of a captions.jsonl. Raises ValueError naming the line of the first malformed record."""
    records, problems = parse_jsonl(path)
    if problems:
        raise ValueError(problems[0])
    return records


def save_features(path, features, **meta):
    """features: (N, D) float tensor, stored as float16; meta: strings kept in the file header."""
    atomic_write(path, lambda tmp: save_file({"features": features.to(torch.float16).contiguous()}, tmp,
                                             metadata={k: str(v) for k, v in meta.items()}))


def load_features(path):
    """(N, D) float32 features of a split."""
    return load_file(path)["features"].float()


def same_clip(a, b):
    """Two CLIP names, tags or paths that mean the same thing."""
    if a is None or b is None:
        return a == b
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def find_features(data_dir, split, clip, weights):
    """The path of the split's features made by CLIP (clip, weights), as the header of each
    <split>/features*.safetensors records them (save_features), or None if there is none. Names
    match as written; paths relative to the dataset folder match the same file given otherwise."""
    folder = split_dir(data_dir, split)
    here = lambda p: in_data_dir(data_dir, p)  # headers name the dataset's own files relative to it
    names = sorted(f for f in os.listdir(folder) if f.startswith("features") and f.endswith(".safetensors")) \
        if os.path.isdir(folder) else []
    for name in names:  # features.safetensors first
        path = os.path.join(folder, name)
        with safe_open(path, "pt") as f:
            header = f.metadata() or {}
        if (same_clip(here(header.get("clip")), here(clip))
                and same_clip(here(header.get("clip_weights")), here(weights))):
            return path
    return None


def split_dir(data_dir, split):
    return os.path.join(data_dir, split)


def image_path(data_dir, split, record):
    p = record["image"]
    return p if os.path.isabs(p) else os.path.join(data_dir, split, p)


def in_data_dir(data_dir, p):
    """A path or name from meta.json, made usable: a path relative to the dataset folder is joined
    to it; absolute paths and names ('gpt2', 'ViT-B-32-quickgelu', 'openai') stay as they are."""
    if not p or os.path.isabs(p) or not os.path.exists(os.path.join(data_dir, p)):
        return p
    return os.path.join(data_dir, p)


def labeled_split(n, fraction, seed, n_captioned=None):
    """Choose round(fraction * n_captioned) of the first n_captioned of n images as the labeled set,
    by seed; images n_captioned..n-1 have no captions and are always unlabeled (default: all n are
    captioned). Returns (labeled, unlabeled) index lists, both sorted; the same arguments always
    give the same split."""
    m = n if n_captioned is None else n_captioned
    k = max(1, round(fraction * m)) if fraction > 0 and m > 0 else 0
    order = list(range(m))
    random.Random(seed).shuffle(order)
    return sorted(order[:k]), sorted(order[k:]) + list(range(m, n))


class Captioned:
    """Labeled training data: CLIP features and the captions of each image, and the reward CLIP's
    features of the same images (the same tensor unless train.py --reward_clip)."""

    def __init__(self, features, captions, reward_features=None):
        assert len(features) == len(captions)
        self.features = features  # (N, D)
        self.captions = captions  # N lists of strings
        self.reward_features = features if reward_features is None else reward_features  # (N, D_r)

    def __len__(self):
        return len(self.features)

    def batch(self, batch_size, generator, device="cpu"):
        """B = min(batch_size, N) distinct images drawn by generator (on `device`): their features
        (B, D) and one caption of each, drawn uniformly from its captions (what stage 1 learns)."""
        pick = draw(len(self), batch_size, generator, device)
        caps = self.captions
        return self.features[pick].to(device), [
            caps[i][int(torch.randint(len(caps[i]), (1,), generator=generator, device=device))] for i in pick.tolist()]


class Unlabeled:
    """Unlabeled images for stage 2: features only. The captions are not even kept, so stage 2
    cannot read them; any attempt raises, which a test uses to prove it."""

    def __init__(self, features, reward_features=None):
        self.features = features  # (N, D)
        self.reward_features = features if reward_features is None else reward_features  # (N, D_r)

    def __len__(self):
        return len(self.features)

    @property
    def captions(self):
        raise RuntimeError("stage 2 must never read the captions of unlabeled images")

    def batch(self, batch_size, generator, device="cpu"):
        """B = min(batch_size, N) distinct images drawn by generator (on `device`): their features
        (B, D) and the reward CLIP's features of the same images (B, D_r), what stage 2 scores."""
        pick = draw(len(self), batch_size, generator, device)
        return self.features[pick].to(device), self.reward_features[pick].to(device)


def draw(n, batch_size, generator, device):
    """min(batch_size, n) distinct indices of n, drawn by generator (on `device`), on the CPU."""
    return torch.randperm(n, generator=generator, device=device)[:min(batch_size, n)].cpu()
