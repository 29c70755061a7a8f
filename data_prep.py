"""
Make a dataset in nanocap's layout (nanocap/data/layout.py): captions, CLIP features, and for the
shapes world its toy foundation models.

    python data_prep.py                       # the shapes world, the default: offline, CPU, minutes
    python data_prep.py --dataset coco --coco_root coco --karpathy_json coco/dataset_coco.json
    python data_prep.py --dataset folder --images photos/ --captions captions.jsonl
    python data_prep.py --dataset webdataset --shards "cc3m/{00000..00331}.tar" --data_dir data/cc3m
    torchrun --nproc_per_node 8 data_prep.py --dataset webdataset ...   # the tars split between 8 ranks

COCO (Karpathy split) and your own folder are nanocap/data/real.py: CLIP ViT-B-32-quickgelu with
the openai weights by default (--clip, --clip_weights), each image encoded once, shard by shard.
Each dataset has its own flags (one dataclass each, below): `--dataset coco -h` lists COCO's.
A webdataset pool (nanocap/data/webpool.py) is unlabeled images only, their features for stage 2's
train.py --unlabeled_pool; it runs under torchrun, each rank encoding its share of the tars.

The shapes world replicates the setting of Jin (arXiv 2306.15111) at CPU size: foundation models
pretrained on lots of *other* data (a "web" split the captioner never sees), few labels, many
unlabeled images, and reference captions whose informativeness varies. It writes, under data/shapes/:

    web/, train/, val/, test/     images/*.png + captions.jsonl (with each image's scene)
    models/clip_reward.{json,safetensors}   the CLIP that embeds images and gives the reward
    models/clip_eval.{json,safetensors}     a second CLIP (other seed and width) that judges
    models/clip_comp.{json,safetensors}     with --compositional: a CLIP trained against near misses
    models/gpt/                   the toy GPT in Hugging Face GPT-2 format (+ nanocap_vocab.json)
    <split>/features.safetensors  reward-CLIP image features, each image encoded once
    <split>/features_eval.safetensors   eval-CLIP features (val, test)
    <split>/features_comp.safetensors   with --compositional: its features (train, val, test)
    meta.json, summary.json       what the captioner needs to know, and the figures printed at the end

Each step is skipped when its output exists, so a second run reuses everything.
"""

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from nanocap.base.files import read_json, write_json, write_jsonl
from nanocap.clip_encoder import CLIPEncoder
from nanocap.data import layout, pretrain, real, shapes, webpool
from nanocap.data.images import load_image
from nanocap.data.real import encode_images
from nanocap.gpt import GPT, GPTConfig
from nanocap.tokenizer import build_vocab, get_tokenizer
from nanocap.tools import timing
from nanocap.tools.cli import parse_config, print_config
from nanocap.tools.report import draw_grid


@dataclass
class Config:
    """Make a dataset: the shapes world (default), COCO's Karpathy split, or your own folder.
    Each dataset has its own flags: `python data_prep.py --dataset coco -h` lists COCO's."""
    dataset: str = field(default="shapes", metadata={"help": "shapes (offline toy world), coco, folder or webdataset"})
    data_dir: str = field(default="", metadata={"help": "output folder; default data/<dataset>"})
    seed: int = field(default=1337, metadata={"help": "everything below is a function of this seed"})
    batch_size: int = field(default=256, metadata={"help": "images per batch when encoding features"})
    num_workers: int = field(default=-1, metadata={"help": "image-reading workers (-1: 0 for shapes, else min(8, CPUs))"})
    grid: str = field(default="", metadata={"help": "instead: draw 8 train images and their captions to this PNG"})


@dataclass
class ShapesConfig(Config):
    """The shapes world: renders scenes, pretrains its own toy CLIPs and GPT, offline, on a CPU.
    Other datasets have their own flags: --dataset coco -h, --dataset folder -h."""
    n_web: int = field(default=20000, metadata={"help": "web images, for the toy CLIPs and GPT only"})
    n_train: int = field(default=10000, metadata={"help": "train images (labeled fraction + unlabeled pool)"})
    n_val: int = field(default=500, metadata={"help": "validation images"})
    n_test: int = field(default=1000, metadata={"help": "test images"})
    # 460 x 256 reaches R@1 65% in minutes; lr 1e-3 or 2e-3, or a batch of 128 or 512, did worse
    clip_steps: int = field(default=460, metadata={"help": "reward-CLIP training steps (batch 256)"})
    eval_clip_steps: int = field(default=370, metadata={"help": "eval-CLIP training steps (batch 256)"})
    clip_lr: float = field(default=5e-4, metadata={"help": "peak learning rate of both CLIPs"})
    clip_batch_size: int = field(default=256, metadata={"help": "images per CLIP training step"})
    small_models: bool = field(default=False, metadata={"help": "smaller CLIPs and GPT (pretrain.SMALL_*): "
                                                                 "a world in minutes, as the notebooks use"})
    lm_steps: int = field(default=600, metadata={"help": "toy GPT training steps"})
    pretrain_dtype: str = field(default="auto", metadata={"help": "the toy models' training dtype: float32, "
                                                                  "bfloat16 (autocast), or auto (bfloat16 where the "
                                                                  "CPU has it); each gives its own world"})
    compositional: bool = field(default=False, metadata={"help": "also pretrain a compositional CLIP (ViT tower, "
                                                                 "hard negatives) and write its features"})
    comp_clip_steps: int = field(default=460, metadata={"help": "compositional CLIP training steps (batch 256)"})
    hard_negatives: float = field(default=0.5, metadata={"help": "compositional CLIP: share of images that take "
                                                                 "a minimal pair (a caption and its near miss)"})
    hard_negative_kinds: list[str] = field(default_factory=lambda: list(pretrain.HARD_NEGATIVES),
                                           metadata={"help": "the near misses: relation, binding, colour, shape, size"})
    comp_clip_pos: str = field(default="learnable", metadata={"help": "compositional CLIP's patch positions: "
                                                                      "learnable, or sin_cos_2d (fixed 2-D sines)"})


@dataclass
class RealConfig(Config):
    """Real images (nanocap/data/real.py): CLIP ViT-B-32-quickgelu with the openai weights by default."""
    clip: str = field(default="ViT-B-32-quickgelu", metadata={"help": "CLIP that embeds the images"})
    clip_weights: str = field(default="openai", metadata={"help": "open_clip tag or weights file"})
    eval_clip: str = field(default="", metadata={"help": "CLIP that scores captions in sample.py --eval ('' = --clip)"})
    eval_clip_weights: str = field(default="", metadata={"help": "its tag or file ('' = --clip_weights, or openai)"})
    reward_clip: str = field(default="", metadata={"help": "also encode train and val with this CLIP, for "
                                                           "train.py --reward_clip ('' = none)"})
    reward_clip_weights: str = field(default="", metadata={"help": "its tag or file ('' = openai)"})
    gpt: str = field(default="gpt2", metadata={"help": "GPT train.py starts from: gpt2, a HF folder, or none"})
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"], metadata={"help": "splits to write"})
    max_images: int = field(default=0, metadata={"help": "at most this many images per split, for a trial (0: all)"})
    shard_size: int = field(default=5000, metadata={"help": "images per feature shard; a rerun reuses finished shards"})
    device: str = field(default="auto", metadata={"help": "where CLIP runs: auto, cpu, cuda, mps"})


@dataclass
class CocoConfig(RealConfig):
    """COCO 2014 in Karpathy's split (113,287 / 5,000 / 5,000 images; restval counts as train)."""
    coco_root: str = field(default="", metadata={"help": "the folder holding train2014/ and val2014/"})
    karpathy_json: str = field(default="", metadata={"help": "Karpathy's dataset_coco.json"})


@dataclass
class FolderConfig(RealConfig):
    """Your own images and a captions.jsonl; images without captions become the unlabeled pool."""
    images: str = field(default="", metadata={"help": "your images (searched recursively)"})
    captions: str = field(default="", metadata={"help": 'captions.jsonl: {"image": ..., "captions": [...]} a line'})
    val_fraction: float = field(default=0.05, metadata={"help": "captioned images for validation (at least 1)"})
    test_fraction: float = field(default=0.05, metadata={"help": "captioned images for test (at least 1)"})


@dataclass
class WebdatasetConfig(Config):
    """An unlabeled pool from webdataset tars (img2dataset's output), for train.py --unlabeled_pool:
    CLIP features only, under torchrun each rank encoding its share of the tars."""
    shards: str = field(default="", metadata={"help": 'the tars, brace syntax: "pool/{00000..00099}.tar"'})
    clip: str = field(default="ViT-B-32-quickgelu", metadata={"help": "CLIP that embeds the images: the dataset's"})
    clip_weights: str = field(default="openai", metadata={"help": "open_clip tag or weights file: the dataset's"})
    device: str = field(default="auto", metadata={"help": "where CLIP runs: auto, cpu, cuda (a GPU per rank), mps"})


CONFIGS = {"shapes": ShapesConfig, "coco": CocoConfig, "folder": FolderConfig, "webdataset": WebdatasetConfig}


SPLITS = ("web", "train", "val", "test")


def render_split(cfg, split, n, seed):
    """Render n scenes as PNGs and write captions.jsonl with 5 captions and the scene of each."""
    folder = layout.split_dir(cfg.data_dir, split)
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
    write_jsonl(index, records)  # written last: its presence means the split is complete


def load_split(cfg, split):
    """(records, images as a (N, 64, 64, 3) uint8 array)."""
    records = layout.read_jsonl(os.path.join(layout.split_dir(cfg.data_dir, split), "captions.jsonl"))
    images = np.stack([np.asarray(Image.open(layout.image_path(cfg.data_dir, split, r)).convert("RGB"))
                       for r in tqdm(records, desc=f"load {split}", leave=False)])
    return records, images


def write_features(cfg, split, encoder, filename, clip_name, clip_weights):
    path = os.path.join(layout.split_dir(cfg.data_dir, split), filename)
    if os.path.exists(path):
        return
    records = layout.read_jsonl(os.path.join(layout.split_dir(cfg.data_dir, split), "captions.jsonl"))
    paths = [layout.image_path(cfg.data_dir, split, r) for r in records]
    feats, bad = encode_images(encoder, paths, cfg.batch_size, max(cfg.num_workers, 0), f"encode {split}")
    assert not bad, f"unreadable rendered images: {bad[:5]}"  # [(index, reason)]
    layout.save_features(path, feats, clip=clip_name, clip_weights=clip_weights, normalized=True)


def pretrain_dtype(cfg, models):
    """--pretrain_dtype resolved (pretrain.resolve_dtype). A world is pretrained in one dtype: a
    rerun that would add models of another to a folder's existing ones is refused."""
    try:
        dtype = pretrain.resolve_dtype(cfg.pretrain_dtype)
    except ValueError as e:
        raise SystemExit(f"error: --pretrain_dtype: {e}")
    meta_path = os.path.join(cfg.data_dir, "meta.json")
    made = read_json(meta_path).get("pretrain_dtype") if os.path.exists(meta_path) else None
    if made and made != dtype and os.listdir(models):
        if cfg.pretrain_dtype == "auto":
            return made  # auto keeps the world as it was made
        raise SystemExit(f"error: {cfg.data_dir} was pretrained in {made}, not {dtype}: use --pretrain_dtype "
                         f"{made}, or another --data_dir (or delete {models})")
    return dtype


def prepare_shapes(cfg):
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    models = os.path.join(cfg.data_dir, "models")
    os.makedirs(models, exist_ok=True)
    dtype = pretrain_dtype(cfg, models)
    sizes = dict(web=cfg.n_web, train=cfg.n_train, val=cfg.n_val, test=cfg.n_test)
    for k, split in enumerate(SPLITS):  # disjoint splits: each has its own seed stream
        render_split(cfg, split, sizes[split], cfg.seed * 10 + k)

    reward_cfg, eval_cfg, lm_cfg = ((pretrain.SMALL_REWARD_CLIP_CFG, pretrain.SMALL_EVAL_CLIP_CFG, pretrain.SMALL_LM_CFG)
                                    if cfg.small_models else
                                    (pretrain.REWARD_CLIP_CFG, pretrain.EVAL_CLIP_CFG, pretrain.LM_CFG))
    clips = {"reward": (reward_cfg, cfg.clip_steps, cfg.seed, 0.0),  # role: (config, steps, seed, hard negatives)
             "eval": (eval_cfg, cfg.eval_clip_steps, cfg.seed + 1, 0.0)}
    if cfg.compositional:  # the reward CLIP's data and seed; another tower, and near misses among the texts
        try:
            comp_cfg = pretrain.comp_clip_cfg(cfg.comp_clip_pos)
        except ValueError as e:
            raise SystemExit(f"error: --comp_clip_pos: {e}")
        clips["comp"] = (comp_cfg, cfg.comp_clip_steps, cfg.seed, cfg.hard_negatives)
        if not set(cfg.hard_negative_kinds) <= set(pretrain.CORRUPTIONS):
            raise SystemExit(f"error: --hard_negative_kinds {' '.join(cfg.hard_negative_kinds)}: use some of "
                             f"{' '.join(pretrain.CORRUPTIONS)}")
    web = None
    for role, (clip_cfg, steps, seed, hard) in clips.items():
        json_path, weights = os.path.join(models, f"clip_{role}.json"), os.path.join(models, f"clip_{role}.safetensors")
        if not os.path.exists(weights):
            web = web or load_split(cfg, "web")
            print(f"pretraining the {role} CLIP on {len(web[0])} web images ({steps} steps, {dtype})")
            model = pretrain.train_clip(clip_cfg, web[1], [r["captions"] for r in web[0]], steps,
                                        batch_size=cfg.clip_batch_size, lr=cfg.clip_lr, seed=seed,
                                        scenes=[r["scene"] for r in web[0]], hard_negatives=hard,
                                        corruptions=tuple(cfg.hard_negative_kinds), dtype=dtype)
            pretrain.save_clip(model, clip_cfg, json_path, weights)

    gpt_dir = os.path.join(models, "gpt")
    if not os.path.exists(os.path.join(gpt_dir, "model.safetensors")):
        web_records = web[0] if web else layout.read_jsonl(os.path.join(cfg.data_dir, "web", "captions.jsonl"))
        texts = [c for r in web_records for c in r["captions"]]
        vocab = build_vocab(texts)
        tok = get_tokenizer("gpt2", vocab)
        print(f"pretraining the toy GPT on {len(texts)} web captions (vocab {len(vocab)}, {cfg.lm_steps} steps, {dtype})")
        lm = pretrain.train_lm(texts, tok, GPTConfig(**lm_cfg, vocab_size=len(vocab)), cfg.lm_steps, seed=cfg.seed,
                               dtype=dtype)
        pretrain.save_lm(lm, tok, gpt_dir)

    # each CLIP's image features, found later by the CLIP their header names (layout.find_features)
    files = {"reward": ("features.safetensors", ("train", "val", "test")),
             "eval": ("features_eval.safetensors", ("val", "test")),
             "comp": ("features_comp.safetensors", ("train", "val", "test"))}
    encoders = {}
    for role in clips:
        json_path, weights = f"models/clip_{role}.json", f"models/clip_{role}.safetensors"  # as meta.json names them
        encoders[role] = CLIPEncoder(os.path.join(cfg.data_dir, json_path), os.path.join(cfg.data_dir, weights))
        filename, splits = files[role]
        for split in splits:
            write_features(cfg, split, encoders[role], filename, json_path, weights)

    meta = dict(dataset="shapes", seed=cfg.seed, splits=sizes,
                clip="models/clip_reward.json", clip_weights="models/clip_reward.safetensors",
                eval_clip="models/clip_eval.json", eval_clip_weights="models/clip_eval.safetensors",
                gpt="models/gpt", features_normalized=True, pretrain_dtype=dtype)
    if os.path.exists(os.path.join(models, "clip_comp.safetensors")):  # for train.py --clip or --reward_clip
        meta.update(comp_clip="models/clip_comp.json", comp_clip_weights="models/clip_comp.safetensors")
    write_json(os.path.join(cfg.data_dir, "meta.json"), meta)
    summarize(cfg, encoders, files, gpt_dir, t0, dtype)


def summarize(cfg, encoders, files, gpt_dir, t0, dtype):
    """Counts, sizes, each CLIP's quality on test (and, where it has train features, how well a
    linear probe reads a relation off them), the GPT's validation perplexity, wall time."""
    test_records, test_images = load_split(cfg, "test")
    scenes = [r["scene"] for r in test_records]
    reports = {role: pretrain.clip_report(enc, test_images, scenes, seed=cfg.seed) for role, enc in encoders.items()}
    train_scenes = [r["scene"] for r in layout.read_jsonl(os.path.join(cfg.data_dir, "train", "captions.jsonl"))]
    for role in encoders:
        filename, splits = files[role]
        if "train" in splits:
            feats = [layout.load_features(os.path.join(cfg.data_dir, split, filename)) for split in ("train", "test")]
            probe = pretrain.relation_probe(feats[0], train_scenes, feats[1], scenes)
            if probe is not None:
                reports[role]["rel_probe"], reports[role]["rel_probe_chance"] = probe
    vocab = read_json(os.path.join(gpt_dir, "nanocap_vocab.json"))
    lm = GPT.from_pretrained(gpt_dir)
    val_texts = [c for r in layout.read_jsonl(os.path.join(cfg.data_dir, "val", "captions.jsonl")) for c in r["captions"]]
    ppl = pretrain.lm_perplexity(lm, get_tokenizer("gpt2", vocab), val_texts)
    size_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cfg.data_dir) for f in fs) / 2**20
    summary = dict(counts={s: len(layout.read_jsonl(os.path.join(cfg.data_dir, s, "captions.jsonl"))) for s in SPLITS},
                   size_mb=round(size_mb, 1), clip=reports, gpt_val_perplexity=round(ppl, 3),
                   gpt_params=lm.num_params(), pretrain_dtype=dtype, wall_time_s=round(time.time() - t0, 1),
                   machine=timing.machine())  # this run's time (a rerun reuses what exists), and where it ran
    write_json(os.path.join(cfg.data_dir, "summary.json"), summary)
    print(f"\nshapes world in {cfg.data_dir}: " + ", ".join(f"{s} {n}" for s, n in summary["counts"].items())
          + f" images, {summary['size_mb']} MB")
    keys = list(reports["reward"])
    print(f"{f'test ({len(scenes)} images)':<20}" + "".join(f"{k:>{len(k) + 2}}" for k in keys))
    for role, rep in reports.items():
        print(f"{role + ' CLIP':<20}" + "".join(f"{rep[k]:>{len(k) + 2}.3f}" if k in rep else f"{'–':>{len(k) + 2}}"
                                                for k in keys))
    print(f"toy GPT ({lm.num_params() / 1e6:.2f}M params): validation perplexity {ppl:.2f}")
    print(f"pretrained in {dtype}; wall time: {summary['wall_time_s']:.0f} s")


def draw_examples(cfg):
    """A PNG of the first 8 train images of a prepared dataset, each with its reference captions."""
    records = layout.read_jsonl(os.path.join(cfg.data_dir, "train", "captions.jsonl"))[:8]
    images = [load_image(layout.image_path(cfg.data_dir, "train", r)) for r in records]
    draw_grid(cfg.grid, images, [r["captions"] for r in records])


def which_dataset(argv):
    """The --dataset of a command line, or of its --config preset; shapes by default."""
    peek = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    peek.add_argument("--dataset")
    peek.add_argument("--config")
    args, _ = peek.parse_known_args(argv)
    if args.dataset is None and args.config and os.path.isfile(args.config):
        args.dataset = read_json(args.config).get("dataset")
    return args.dataset or "shapes"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    dataset = which_dataset(argv)
    if dataset not in CONFIGS:
        raise SystemExit(f"error: unknown --dataset {dataset!r}; use shapes, coco, folder or webdataset")
    cfg = parse_config(CONFIGS[dataset], argv)
    cfg.data_dir = cfg.data_dir or os.path.join("data", cfg.dataset)
    if dataset in ("coco", "folder"):  # a second judge defaults to the CLIP itself
        cfg.eval_clip = cfg.eval_clip or cfg.clip
        cfg.eval_clip_weights = cfg.eval_clip_weights or (cfg.clip_weights if cfg.eval_clip == cfg.clip else "openai")
        cfg.reward_clip_weights = cfg.reward_clip_weights or ("openai" if cfg.reward_clip else "")
    if dataset != "webdataset" and int(os.environ.get("RANK", -1)) != -1:
        raise SystemExit(f"error: only --dataset webdataset splits its work between torchrun's ranks; make a "
                         f"{dataset} dataset with `python data_prep.py --dataset {dataset} ...` in one process")
    if dataset == "webdataset" and cfg.grid:
        raise SystemExit("error: --grid draws a dataset's train images and captions; a pool has neither")
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, once
        print_config(cfg)
    if cfg.grid:
        draw_examples(cfg)
    elif dataset == "shapes":
        prepare_shapes(cfg)
    elif dataset == "webdataset":
        webpool.run(cfg)
    else:
        real.prepare(cfg)


if __name__ == "__main__":
    main()
