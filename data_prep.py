"""
Make a dataset in nanocap's layout (nanocap/data.py): captions, CLIP features, and for the
shapes world its toy foundation models.

    python data_prep.py                       # the shapes world, the default: offline, CPU, minutes
    python data_prep.py --dataset coco --coco_root coco --karpathy_json coco/dataset_coco.json
    python data_prep.py --dataset folder --images photos/ --captions captions.jsonl

COCO (Karpathy split) and your own folder are nanocap/real_data.py: CLIP ViT-B-32-quickgelu with
the openai weights by default (--clip, --clip_weights), each image encoded once, shard by shard.

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

from nanocap import data, pretrain, real_data, shapes
from nanocap.cli import parse_config, print_config
from nanocap.clip_encoder import CLIPEncoder
from nanocap.gpt import GPT, GPTConfig
from nanocap.real_data import encode_images
from nanocap.tokenizer import build_vocab, get_tokenizer


@dataclass
class Config:
    """Make a dataset: the shapes world (default), COCO's Karpathy split, or your own folder."""
    dataset: str = field(default="shapes", metadata={"help": "shapes (offline toy world), coco (Karpathy split) or folder (your images)"})
    data_dir: str = field(default="", metadata={"help": "output folder; default data/<dataset>"})
    seed: int = field(default=1337, metadata={"help": "everything below is a function of this seed"})
    # coco and folder (nanocap/real_data.py)
    coco_root: str = field(default="", metadata={"help": "coco: the folder holding train2014/ and val2014/"})
    karpathy_json: str = field(default="", metadata={"help": "coco: Karpathy's dataset_coco.json (113,287 / 5,000 / 5,000 images)"})
    images: str = field(default="", metadata={"help": "folder: your images (searched recursively)"})
    captions: str = field(default="", metadata={"help": 'folder: captions.jsonl, one {"image": ..., "captions": [...]} per line'})
    val_fraction: float = field(default=0.05, metadata={"help": "folder: share of the captioned images for validation (at least 1)"})
    test_fraction: float = field(default=0.05, metadata={"help": "folder: share of the captioned images for test (at least 1)"})
    clip: str = field(default="", metadata={"help": "coco/folder: CLIP that embeds the images ('' = ViT-B-32-quickgelu)"})
    clip_weights: str = field(default="", metadata={"help": "coco/folder: open_clip tag or weights file ('' = openai)"})
    eval_clip: str = field(default="", metadata={"help": "coco/folder: CLIP that scores captions in sample.py --eval ('' = --clip)"})
    eval_clip_weights: str = field(default="", metadata={"help": "coco/folder: its tag or file ('' = --clip_weights if --eval_clip is --clip, else openai)"})
    gpt: str = field(default="", metadata={"help": "coco/folder: GPT train.py starts from: gpt2, gpt2-medium, a HF folder, none ('' = gpt2)"})
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"], metadata={"help": "coco/folder: the splits to write"})
    max_images: int = field(default=0, metadata={"help": "coco/folder: at most this many images per split, for a trial (0: all)"})
    shard_size: int = field(default=5000, metadata={"help": "coco/folder: images per feature shard; a rerun reuses finished shards"})
    device: str = field(default="auto", metadata={"help": "coco/folder: where CLIP runs: auto, cpu, cuda, mps"})
    # the shapes world
    n_web: int = field(default=20000, metadata={"help": "shapes: web images, for the toy CLIPs and GPT only"})
    n_train: int = field(default=10000, metadata={"help": "shapes: train images (labeled fraction + unlabeled pool)"})
    n_val: int = field(default=500, metadata={"help": "shapes: validation images"})
    n_test: int = field(default=1000, metadata={"help": "shapes: test images"})
    clip_steps: int = field(default=460, metadata={"help": "shapes: reward-CLIP training steps (batch 256)"})
    eval_clip_steps: int = field(default=370, metadata={"help": "shapes: eval-CLIP training steps (batch 256)"})
    clip_lr: float = field(default=5e-4, metadata={"help": "shapes: peak learning rate of both CLIPs"})
    lm_steps: int = field(default=600, metadata={"help": "shapes: toy GPT training steps"})
    batch_size: int = field(default=256, metadata={"help": "images per batch when encoding features"})
    num_workers: int = field(default=-1, metadata={"help": "DataLoader workers reading images (-1: 0 for shapes, else min(8, CPUs))"})
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


def write_features(cfg, split, encoder, filename, clip_name, clip_weights):
    path = os.path.join(data.split_dir(cfg.data_dir, split), filename)
    if os.path.exists(path):
        return
    records = data.read_jsonl(os.path.join(data.split_dir(cfg.data_dir, split), "captions.jsonl"))
    paths = [data.image_path(cfg.data_dir, split, r) for r in records]
    feats, bad = encode_images(encoder, paths, cfg.batch_size, max(cfg.num_workers, 0), f"encode {split}")
    assert not bad, f"unreadable rendered images: {bad[:5]}"  # [(index, reason)]
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
    print(f"wall time: {summary['wall_time_s']:.0f} s")


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


def main(argv=None):
    cfg = parse_config(Config, argv)
    if not cfg.data_dir:
        cfg.data_dir = os.path.join("data", cfg.dataset)
    if cfg.dataset in ("coco", "folder"):  # the real recipe: CLIP ViT-B/32 (OpenAI) and GPT-2 124M
        cfg.clip = cfg.clip or "ViT-B-32-quickgelu"
        cfg.clip_weights = cfg.clip_weights or "openai"
        cfg.eval_clip = cfg.eval_clip or cfg.clip
        cfg.eval_clip_weights = cfg.eval_clip_weights or (cfg.clip_weights if cfg.eval_clip == cfg.clip else "openai")
        cfg.gpt = cfg.gpt or "gpt2"
    elif cfg.clip or cfg.clip_weights or cfg.eval_clip or cfg.eval_clip_weights or cfg.gpt:
        raise SystemExit("error: the shapes world trains its own toy CLIPs and GPT; --clip, --clip_weights, "
                         "--eval_clip, --eval_clip_weights and --gpt are for --dataset coco or folder")
    print_config(cfg)
    if cfg.grid:
        draw_grid(cfg)
    elif cfg.dataset == "shapes":
        prepare_shapes(cfg)
    elif cfg.dataset in ("coco", "folder"):
        real_data.prepare(cfg)
    else:
        raise SystemExit(f"error: unknown --dataset {cfg.dataset!r}; use shapes, coco or folder")


if __name__ == "__main__":
    main()
