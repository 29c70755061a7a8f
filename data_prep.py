"""
Make a dataset in nanocap's layout (nanocap/data.py): captions, CLIP features, and for the
shapes world its toy foundation models.

    python data_prep.py                       # the shapes world, the default: offline, CPU, minutes

The shapes world replicates the setting of Jin (arXiv 2306.15111) at CPU size: foundation models
pretrained on lots of *other* data (a "web" split the captioner never sees), few labels, many
unlabeled images, and reference captions whose informativeness varies. It writes, under data/shapes/:

    web/, train/, val/, test/     images/*.png + captions.jsonl (with each image's scene)
    models/clip_reward.{json,safetensors}   the CLIP that embeds images and gives the reward
    models/clip_eval.{json,safetensors}     a second CLIP (other seed and width) that judges
    models/gpt/                   the toy GPT in Hugging Face GPT-2 format (+ nanocap_vocab.json)
    <split>/features.safetensors  reward-CLIP image features, each image encoded once
    <split>/features_eval.safetensors   eval-CLIP features (val, test)
    meta.json, summary.json       what the captioner needs to know, and the figures printed at the end

Each step is skipped when its output exists, so a second run reuses everything.
"""

import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from nanocap import data, pretrain, shapes
from nanocap.cli import parse_config, print_config
from nanocap.clip_encoder import CLIPEncoder
from nanocap.gpt import GPT, GPTConfig
from nanocap.tokenizer import build_vocab, get_tokenizer


@dataclass
class Config:
    """Make a dataset: the shapes world (default)."""
    dataset: str = field(default="shapes", metadata={"help": "shapes (offline toy world)"})
    data_dir: str = field(default="", metadata={"help": "output folder; default data/<dataset>"})
    seed: int = field(default=1337, metadata={"help": "everything below is a function of this seed"})
    n_web: int = field(default=20000, metadata={"help": "shapes: web images, for the toy CLIPs and GPT only"})
    n_train: int = field(default=10000, metadata={"help": "shapes: train images (labeled fraction + unlabeled pool)"})
    n_val: int = field(default=500, metadata={"help": "shapes: validation images"})
    n_test: int = field(default=1000, metadata={"help": "shapes: test images"})
    clip_steps: int = field(default=460, metadata={"help": "shapes: reward-CLIP training steps (batch 256)"})
    eval_clip_steps: int = field(default=370, metadata={"help": "shapes: eval-CLIP training steps (batch 256)"})
    clip_lr: float = field(default=5e-4, metadata={"help": "shapes: peak learning rate of both CLIPs"})
    lm_steps: int = field(default=600, metadata={"help": "shapes: toy GPT training steps"})
    batch_size: int = field(default=256, metadata={"help": "images per batch when encoding features"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers for reading images"})
    grid: str = field(default="", metadata={"help": "instead: draw 8 train images and their captions to this PNG"})


SPLITS = ("web", "train", "val", "test")


def render_split(cfg, split, n, seed):
    """Render n scenes as PNGs and write captions.jsonl with 5 captions and the scene of each."""
    folder = data.split_dir(cfg.data_dir, split)
    index = os.path.join(folder, "captions.jsonl")
    if os.path.exists(index):
        return
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    scenes = shapes.make_split(n, seed)
    rng = random.Random(seed + 1)  # captions have their own stream, so scenes don't depend on them
    records = []
    for i, scene in enumerate(tqdm(scenes, desc=f"render {split}", leave=False)):
        name = f"images/{i:06d}.png"
        shapes.render(scene, size=64).save(os.path.join(folder, name))
        records.append({"image": name, "captions": shapes.captions(scene, rng, n=5), "scene": scene})
    data.write_jsonl(index, records)  # written last: its presence means the split is complete


def load_split(cfg, split):
    """(records, images as a (N, 64, 64, 3) uint8 array)."""
    records = data.read_jsonl(os.path.join(data.split_dir(cfg.data_dir, split), "captions.jsonl"))
    images = np.stack([np.asarray(Image.open(data.image_path(cfg.data_dir, split, r)).convert("RGB"))
                       for r in tqdm(records, desc=f"load {split}", leave=False)])
    return records, images


class ImageFiles(torch.utils.data.Dataset):
    """Reads and preprocesses images for feature encoding; an unreadable file yields None."""

    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            with Image.open(self.paths[i]) as im:
                return i, self.preprocess(im.convert("RGB"))
        except Exception:
            return i, None


def _collate(batch):
    ok = [(i, x) for i, x in batch if x is not None]
    bad = [i for i, x in batch if x is None]
    idx = torch.tensor([i for i, _ in ok], dtype=torch.long)
    return idx, (torch.stack([x for _, x in ok]) if ok else None), bad


def encode_images(encoder, paths, batch_size, num_workers, desc):
    """CLIP features (N, D) of image files, each read and encoded once; rows of unreadable files
    stay zero and their indices are returned, so the caller can report and drop them."""
    loader = torch.utils.data.DataLoader(ImageFiles(paths, encoder.preprocess), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate)
    features = torch.zeros(len(paths), encoder.embed_dim)
    bad = []
    for idx, x, bad_idx in tqdm(loader, desc=desc, leave=False):
        bad += bad_idx
        if x is not None:
            features[idx] = encoder.encode_image(x).cpu()
    return features, bad


def write_features(cfg, split, encoder, filename, clip_name, clip_weights):
    path = os.path.join(data.split_dir(cfg.data_dir, split), filename)
    if os.path.exists(path):
        return
    records = data.read_jsonl(os.path.join(data.split_dir(cfg.data_dir, split), "captions.jsonl"))
    paths = [data.image_path(cfg.data_dir, split, r) for r in records]
    feats, bad = encode_images(encoder, paths, cfg.batch_size, cfg.num_workers, f"encode {split}")
    assert not bad, f"unreadable rendered images: {bad[:5]}"
    data.save_features(path, feats, clip=clip_name, clip_weights=clip_weights, normalized=True)


def prepare_shapes(cfg):
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    models = os.path.join(cfg.data_dir, "models")
    os.makedirs(models, exist_ok=True)
    sizes = dict(web=cfg.n_web, train=cfg.n_train, val=cfg.n_val, test=cfg.n_test)
    for k, split in enumerate(SPLITS):  # disjoint splits: each has its own seed stream
        render_split(cfg, split, sizes[split], cfg.seed * 10 + k)

    clips = {"reward": (pretrain.REWARD_CLIP_CFG, cfg.clip_steps, cfg.seed),
             "eval": (pretrain.EVAL_CLIP_CFG, cfg.eval_clip_steps, cfg.seed + 1)}
    web = None
    for role, (clip_cfg, steps, seed) in clips.items():
        json_path, weights = os.path.join(models, f"clip_{role}.json"), os.path.join(models, f"clip_{role}.safetensors")
        if not os.path.exists(weights):
            web = web or load_split(cfg, "web")
            print(f"pretraining the {role} CLIP on {len(web[0])} web images ({steps} steps)")
            model = pretrain.train_clip(clip_cfg, web[1], [r["captions"] for r in web[0]], steps, lr=cfg.clip_lr, seed=seed)
            pretrain.save_clip(model, clip_cfg, json_path, weights)

    gpt_dir = os.path.join(models, "gpt")
    if not os.path.exists(os.path.join(gpt_dir, "model.safetensors")):
        web_records = web[0] if web else data.read_jsonl(os.path.join(cfg.data_dir, "web", "captions.jsonl"))
        texts = [c for r in web_records for c in r["captions"]]
        vocab = build_vocab(texts)
        tok = get_tokenizer("gpt2", vocab)
        print(f"pretraining the toy GPT on {len(texts)} web captions (vocab {len(vocab)}, {cfg.lm_steps} steps)")
        lm = pretrain.train_lm(texts, tok, GPTConfig(**pretrain.LM_CFG, vocab_size=len(vocab)), cfg.lm_steps, seed=cfg.seed)
        pretrain.save_lm(lm, tok, gpt_dir)

    encoders = {}
    for role in ("reward", "eval"):
        encoders[role] = CLIPEncoder(os.path.join(models, f"clip_{role}.json"), os.path.join(models, f"clip_{role}.safetensors"))
    for split in ("train", "val", "test"):
        write_features(cfg, split, encoders["reward"], "features.safetensors", "models/clip_reward.json", "models/clip_reward.safetensors")
    for split in ("val", "test"):
        write_features(cfg, split, encoders["eval"], "features_eval.safetensors", "models/clip_eval.json", "models/clip_eval.safetensors")

    meta = dict(dataset="shapes", seed=cfg.seed, splits=sizes,
                clip="models/clip_reward.json", clip_weights="models/clip_reward.safetensors",
                eval_clip="models/clip_eval.json", eval_clip_weights="models/clip_eval.safetensors",
                gpt="models/gpt", features_normalized=True, clip_prompt="a photo depicts")
    data.write_json(os.path.join(cfg.data_dir, "meta.json"), meta)
    summarize(cfg, encoders, gpt_dir, t0)


def summarize(cfg, encoders, gpt_dir, t0):
    """Counts, sizes, each CLIP's quality on test, the GPT's validation perplexity, wall time."""
    test_records, test_images = load_split(cfg, "test")
    scenes = [r["scene"] for r in test_records]
    reports = {role: pretrain.clip_report(enc, test_images, scenes, seed=cfg.seed) for role, enc in encoders.items()}
    vocab = data.read_json(os.path.join(gpt_dir, "nanocap_vocab.json"))
    lm = GPT.from_pretrained(gpt_dir)
    val_texts = [c for r in data.read_jsonl(os.path.join(cfg.data_dir, "val", "captions.jsonl")) for c in r["captions"]]
    ppl = pretrain.lm_perplexity(lm, get_tokenizer("gpt2", vocab), val_texts)
    size_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cfg.data_dir) for f in fs) / 2**20
    summary = dict(counts={s: len(data.read_jsonl(os.path.join(cfg.data_dir, s, "captions.jsonl"))) for s in SPLITS},
                   size_mb=round(size_mb, 1), clip=reports, gpt_val_perplexity=round(ppl, 3),
                   gpt_params=lm.num_params(), wall_time_s=round(time.time() - t0, 1))
    data.write_json(os.path.join(cfg.data_dir, "summary.json"), summary)
    print(f"\nshapes world in {cfg.data_dir}: " + ", ".join(f"{s} {n}" for s, n in summary["counts"].items())
          + f" images, {summary['size_mb']} MB")
    keys = list(reports["reward"])
    print(f"{f'test ({len(scenes)} images)':<20}" + "".join(f"{k:>{len(k) + 2}}" for k in keys))
    for role, rep in reports.items():
        print(f"{role + ' CLIP':<20}" + "".join(f"{rep[k]:>{len(k) + 2}.3f}" for k in keys))
    print(f"toy GPT ({lm.num_params() / 1e6:.2f}M params): validation perplexity {ppl:.2f}")
    print(f"wall time: {summary['wall_time_s']:.0f} s (steps already done were skipped)")


def draw_grid(cfg):
    """A PNG of the first 8 train images of a prepared dataset, each with its 5 reference captions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = data.read_jsonl(os.path.join(cfg.data_dir, "train", "captions.jsonl"))[:8]
    fig, axes = plt.subplots(2, 4, figsize=(16, 10), gridspec_kw=dict(hspace=0.7, wspace=0.15))
    for ax, r in zip(axes.flat, records):
        ax.imshow(Image.open(data.image_path(cfg.data_dir, "train", r)), interpolation="lanczos")
        ax.set_xticks([])
        ax.set_yticks([])  # keep the frame: the white background would vanish into the page
        ax.text(0, -0.04, "\n".join(_wrap("- " + c, 48) for c in r["captions"]), transform=ax.transAxes,
                va="top", fontsize=8.5, family="monospace")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.grid)), exist_ok=True)
    fig.savefig(cfg.grid, dpi=80, bbox_inches="tight")
    print(f"wrote {cfg.grid}")


def _wrap(text, width):
    import textwrap
    return "\n".join(textwrap.wrap(text, width))


def main():
    cfg = parse_config(Config)
    if not cfg.data_dir:
        cfg.data_dir = os.path.join("data", cfg.dataset)
    print_config(cfg)
    if cfg.grid:
        draw_grid(cfg)
    elif cfg.dataset == "shapes":
        prepare_shapes(cfg)
    else:
        raise SystemExit(f"error: unknown --dataset {cfg.dataset!r}; use shapes")


if __name__ == "__main__":
    main()
