"""
COCO Karpathy split and user folders into nanocap's layout (nanocap/data/layout.py).

Real images differ from the shapes world in three ways, and this file handles each:
  1. they live elsewhere (a COCO download, your photo folder): records point at them by absolute
     path, and nothing is copied;
  2. there are many (COCO: 123,287): each is read and encoded once, in batches, with DataLoader
     workers, shard by shard, so a killed run resumes at the shard it was writing;
  3. some cannot be read: they are skipped, listed in <split>/skipped.txt and dropped from
     captions.jsonl, so row i of features.safetensors is still line i of captions.jsonl.

Sources:
  coco    Karpathy's dataset_coco.json: {"images": [{"filepath": "val2014", "filename":
          "COCO_val2014_000000391895.jpg", "split": "train" | "restval" | "val" | "test",
          "cocoid": 391895, "sentences": [{"raw": "A man ..."}, ...]}, ...]}. restval joins train,
          which gives 113,287 / 5,000 / 5,000 images with 5 (a few: 6 or 7) captions each.
  folder  your images (a folder, searched recursively) and a captions.jsonl with one
          {"image": "cats/1.jpg", "captions": ["a cat on a sofa", ...]} per line ("image" relative
          to the folder, or absolute; lines naming the same image add up). The captioned images
          are split by --seed into val (--val_fraction), test (--test_fraction, at least one image
          each) and train. Every image without a line, or with "captions": [], goes to train as an
          unlabeled image, after all captioned ones; meta["train_captioned"] counts the latter.

Per split, under data_dir/<split>/:
    shards/features_00000.safetensors  (n, D) float16 features of images [0, n) of the split, the
                                       unreadable ones (zero rows) named in the header; a shard
                                       made for the same images and CLIP is reused
    features.safetensors               (N, D) float16: the shards, unreadable rows dropped
    features_eval.safetensors          val, test: (N, D') from the evaluation CLIP (its own shards
                                       when it differs from the captioner's CLIP, else a copy)
    features_reward.safetensors        train, val, with --reward_clip: (N, D'') from the CLIP that
                                       scores sampled captions in train.py (its own shards)
    skipped.txt                        the unreadable images, one "path: reason" a line
    captions.jsonl                     written last: its presence means the split is complete
"""

import hashlib
import json
import os
import random
import time

import torch
from safetensors import safe_open
from tqdm import tqdm

from nanocap.base.files import atomic_write_bytes, read_json, write_json, write_jsonl
from nanocap.base.system import pick_device
from nanocap.clip_encoder import CLIPEncoder
from nanocap.data import layout
from nanocap.data.images import IMAGE_EXTENSIONS, ImageError, load_image


# -----------------------------------------------------------------------------
# encoding image files, each once


class ImageFiles(torch.utils.data.Dataset):
    """Reads and preprocesses image files for CLIP; an unreadable one yields its error (a string)."""

    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, self.preprocess(load_image(self.paths[i]))  # (3, H, W)
        except (ImageError, OSError, ValueError) as e:
            why = str(e) if isinstance(e, ImageError) else f"{self.paths[i]}: {e}"
            return i, " ".join(why.split())  # one line, for skipped.txt


def _collate(batch):
    ok = [(i, x) for i, x in batch if isinstance(x, torch.Tensor)]
    bad = [(i, x) for i, x in batch if not isinstance(x, torch.Tensor)]
    idx = torch.tensor([i for i, _ in ok], dtype=torch.long)
    return idx, (torch.stack([x for _, x in ok]) if ok else None), bad


def encode_images(encoder, paths, batch_size, num_workers, desc):
    """CLIP features (N, D) of image files, each read and encoded once, and [(index, reason)] of the
    unreadable ones, whose rows stay zero so that the caller can report and drop them."""
    loader = torch.utils.data.DataLoader(ImageFiles(paths, encoder.preprocess), batch_size=batch_size,
                                         num_workers=num_workers, collate_fn=_collate,
                                         pin_memory=encoder.device.type == "cuda")
    features = torch.zeros(len(paths), encoder.embed_dim)
    bad = []
    for idx, x, bad_batch in tqdm(loader, desc=desc, leave=False):
        bad += bad_batch
        if x is not None:
            features[idx] = encoder.encode_image(x).cpu()  # (b, D), unit norm
    return features, bad


class LazyCLIP:
    """A CLIP named by (name, weights), built on first use: a run that finds every shard loads none."""

    def __init__(self, name, weights, device):
        self.name, self.weights, self.device = name, weights, device
        self.id = f"{name} | {weights}"
        self._encoder = None

    def get(self):
        if self._encoder is None:
            try:
                self._encoder = CLIPEncoder(self.name, self.weights, device=self.device)
            except (RuntimeError, ValueError) as e:
                raise SystemExit(f"error: {e}")
        return self._encoder


def _digest(items):
    return hashlib.sha1("\n".join(items).encode()).hexdigest()


def file_header(path):
    """The string metadata of a safetensors file, {} when there is no such file."""
    if not os.path.exists(path):
        return {}
    with safe_open(path, "pt") as f:
        return f.metadata() or {}


def encode_sharded(clip, paths, folder, cfg, desc):
    """Features (N, D) float16 of image files, made cfg.shard_size images at a time under folder/,
    and {index: reason} of the unreadable ones. A shard whose header says it was made from the same
    images with the same CLIP is read back instead of encoded."""
    os.makedirs(folder, exist_ok=True)
    chunks, bad = [], {}
    starts = range(0, len(paths), cfg.shard_size)
    for k, lo in enumerate(tqdm(starts, desc=desc, unit="shard")):
        part = paths[lo : lo + cfg.shard_size]
        path = os.path.join(folder, f"features_{k:05d}.safetensors")
        source = _digest([clip.id] + part)
        if file_header(path).get("source") != source:
            feats, unreadable = encode_images(clip.get(), part, cfg.batch_size, cfg.num_workers, f"shard {k}")
            layout.save_features(path, feats, source=source, clip=clip.name, clip_weights=clip.weights,
                                 unreadable=json.dumps({str(i): why for i, why in unreadable}))
        with safe_open(path, "pt") as f:
            chunks.append(f.get_tensor("features"))  # (n, D) float16
            bad.update({lo + int(i): why for i, why in json.loads(f.metadata()["unreadable"]).items()})
    return torch.cat(chunks), bad


def write_split(cfg, split, records, clip, eval_clip, reward_clip=None):
    """Encode the images of `records` ({"image": absolute path, "captions": [...], ...} each) and write
    the split's files, unreadable images dropped everywhere. Returns (records kept, skipped count)."""
    folder = layout.split_dir(cfg.data_dir, split)
    os.makedirs(folder, exist_ok=True)
    index = os.path.join(folder, "captions.jsonl")
    clips = [clip] + ([eval_clip] if split in ("val", "test") else [])
    others = {"eval": eval_clip} if split in ("val", "test") else {}  # the other CLIPs' features: {role: CLIP}
    if reward_clip is not None and split in ("train", "val"):
        others["reward"] = reward_clip
        clips.append(reward_clip)
    source = _digest([c.id for c in clips] + [json.dumps(r) for r in records])
    if os.path.exists(index) and file_header(os.path.join(folder, "features.safetensors")).get("source") == source:
        kept = layout.read_jsonl(index)
        print(f"{split}: {len(kept)} images, reused")
        return kept, len(records) - len(kept)
    if os.path.exists(index):
        os.remove(index)  # the split is incomplete until the new captions.jsonl is written
    paths = [r["image"] for r in records]
    feats, bad = encode_sharded(clip, paths, os.path.join(folder, "shards"), cfg, f"encode {split}")
    other_feats = {}
    for role, other in others.items():  # the same images by another CLIP; one that is the captioner's: a copy
        other_feats[role], other_bad = feats, {}
        if other.id != clip.id:
            other_feats[role], other_bad = encode_sharded(other, paths, os.path.join(folder, f"shards_{role}"), cfg,
                                                          f"encode {split} ({role} CLIP)")
        bad.update(other_bad)
    keep = [i for i in range(len(records)) if i not in bad]
    if not keep:
        raise SystemExit(f"error: none of the {len(records)} {split} images could be read, e.g. {bad[min(bad)]}")
    for i in sorted(bad)[:20]:
        tqdm.write(f"skipped: {bad[i]}")
    if len(bad) > 20:
        tqdm.write(f"skipped: ... and {len(bad) - 20} more")
    atomic_write_bytes(os.path.join(folder, "skipped.txt"), "".join(f"{bad[i]}\n" for i in sorted(bad)).encode())
    layout.save_features(os.path.join(folder, "features.safetensors"), feats[keep], clip=clip.name,
                       clip_weights=clip.weights, normalized=True, source=source)
    for role, other in others.items():
        layout.save_features(os.path.join(folder, f"features_{role}.safetensors"), other_feats[role][keep],
                             clip=other.name, clip_weights=other.weights, normalized=True)
    kept = [records[i] for i in keep]
    write_jsonl(index, kept)  # last: its presence means the split is complete
    print(f"{split}: {len(kept)} images" + (f", {len(bad)} unreadable skipped (listed in {folder}/skipped.txt)" if bad else ""))
    return kept, len(bad)

# -----------------------------------------------------------------------------
# the sources: records {"image": absolute path, "captions": [...]} per split


def read_karpathy(cfg):
    """{split: records} from Karpathy's split file; restval counts as train."""
    if not cfg.coco_root or not os.path.isdir(cfg.coco_root):
        raise SystemExit(f"error: --coco_root {cfg.coco_root!r} is not a folder; pass the folder that holds COCO 2014's "
                         f"train2014/ and val2014/ (see docs/coco.md)")
    if not cfg.karpathy_json or not os.path.isfile(cfg.karpathy_json):
        raise SystemExit(f"error: --karpathy_json {cfg.karpathy_json!r} is not a file; pass Karpathy's dataset_coco.json "
                         f"(see docs/coco.md)")
    try:
        images = read_json(cfg.karpathy_json)["images"]
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {cfg.karpathy_json} is not a Karpathy split file ({type(e).__name__}: {e}); "
                         f'expected {{"images": [{{"filepath", "filename", "split", "cocoid", "sentences"}}, ...]}}')
    root = os.path.abspath(cfg.coco_root)
    splits = {"train": [], "val": [], "test": []}
    for n, im in enumerate(images):
        try:
            split = {"train": "train", "restval": "train", "val": "val", "test": "test"}[im["split"]]
            splits[split].append({"image": os.path.join(root, im.get("filepath", ""), im["filename"]),
                                  "captions": [s["raw"].strip() for s in im["sentences"] if s["raw"].strip()],
                                  "image_id": im.get("cocoid", im.get("imgid", n))})
        except (KeyError, TypeError, AttributeError) as e:
            raise SystemExit(f"error: {cfg.karpathy_json}: image {n} is not in Karpathy's format (missing or bad {e}); "
                             f'expected "filepath", "filename", "split", "cocoid" and "sentences": [{{"raw": ...}}]')
    for split, records in splits.items():  # a wrong --coco_root would otherwise skip every image
        if records and not os.path.exists(records[0]["image"]):
            raise SystemExit(f"error: {records[0]['image']} not found: --coco_root must hold the folders the JSON "
                             f"names in 'filepath' (train2014/, val2014/)")
    return splits


def read_folder(cfg):
    """{split: records} from --images DIR and --captions FILE; uncaptioned images go to train."""
    if not cfg.images or not os.path.isdir(cfg.images):
        raise SystemExit(f"error: --images {cfg.images!r} is not a folder; pass the folder that holds your images")
    if not cfg.captions or not os.path.isfile(cfg.captions):
        raise SystemExit(f"error: --captions {cfg.captions!r} is not a file; pass a captions.jsonl with one "
                         f'{{"image": "photo.jpg", "captions": ["...", ...]}} per line')
    root = os.path.abspath(cfg.images)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.lower().endswith(IMAGE_EXTENSIONS))
    lines, problems = layout.parse_jsonl(cfg.captions)  # malformed lines are skipped, counted and listed
    os.makedirs(cfg.data_dir, exist_ok=True)
    report = os.path.join(cfg.data_dir, "bad_caption_lines.txt")
    atomic_write_bytes(report, "".join(p + "\n" for p in problems).encode())
    for p in problems[:5]:
        print(f"skipped: {p}")
    if problems:
        print(f"skipped {len(problems)} malformed line(s) of {cfg.captions}, all listed in {report}")
    captions = {}
    for r in lines:
        path = os.path.normpath(os.path.join(root, r["image"]))  # an absolute "image" stays as it is
        if not os.path.isfile(path):
            raise SystemExit(f"error: {cfg.captions}: image {r['image']!r} not found (relative paths start at --images {root})")
        captions.setdefault(path, []).extend(c.strip() for c in r.get("captions", []) if c.strip())
    files += sorted(set(captions) - set(files))  # captioned images outside the folder, by absolute path
    captioned = [p for p in files if captions.get(p)]
    uncaptioned = [p for p in files if not captions.get(p)]
    order = captioned[:]
    random.Random(cfg.seed).shuffle(order)
    n_val, n_test = (max(1, round(f * len(order))) for f in (cfg.val_fraction, cfg.test_fraction))
    if n_val + n_test >= len(order):
        raise SystemExit(f"error: {cfg.captions} captions {len(order)} images, too few for {n_val} validation, {n_test} "
                         f"test and at least one train image; caption more, or lower --val_fraction / --test_fraction")
    val, test, train = sorted(order[:n_val]), sorted(order[n_val : n_val + n_test]), sorted(order[n_val + n_test :])
    record = lambda p: {"image": p, "captions": captions.get(p, [])}
    return {"train": [record(p) for p in train + uncaptioned], "val": [record(p) for p in val],
            "test": [record(p) for p in test]}


def abs_if_path(p):
    """Local files and folders are recorded by absolute path, names ('gpt2', 'openai') as they are."""
    return os.path.abspath(p) if p and os.path.exists(p) else p


def prepare(cfg):
    """Make data_dir from COCO or a folder: captions, CLIP features, meta.json."""
    t0 = time.time()
    if cfg.num_workers < 0:
        cfg.num_workers = min(8, os.cpu_count() or 1)
    for s in cfg.splits:
        if s not in ("train", "val", "test"):
            raise SystemExit(f"error: unknown split {s!r} in --splits; use train, val, test")
    meta_path = os.path.join(cfg.data_dir, "meta.json")
    clip_name, clip_weights = abs_if_path(cfg.clip), abs_if_path(cfg.clip_weights)
    old = read_json(meta_path) if os.path.exists(meta_path) else {}
    if old.get("dataset") == "webdataset":
        raise SystemExit(f"error: {cfg.data_dir} holds an unlabeled pool; give the {cfg.dataset} dataset a folder of its own")
    if old and (old.get("clip"), old.get("clip_weights")) != (clip_name, clip_weights):
        raise SystemExit(f"error: {cfg.data_dir} holds features of CLIP {old.get('clip')} ({old.get('clip_weights')}); "
                         f"use another --data_dir for {clip_name} ({clip_weights})")
    records = read_karpathy(cfg) if cfg.dataset == "coco" else read_folder(cfg)
    device = pick_device(cfg.device)
    clip = LazyCLIP(clip_name, clip_weights, device)
    eval_clip = LazyCLIP(abs_if_path(cfg.eval_clip), abs_if_path(cfg.eval_clip_weights), device)
    if eval_clip.id == clip.id:
        eval_clip = clip  # one model, loaded once
    reward_clip = None  # by default the captioner's CLIP scores its captions: no features to add
    if cfg.reward_clip:
        reward_clip = LazyCLIP(abs_if_path(cfg.reward_clip), abs_if_path(cfg.reward_clip_weights), device)
        reward_clip = None if reward_clip.id == clip.id else eval_clip if reward_clip.id == eval_clip.id else reward_clip
    counts, skipped = dict(old.get("splits", {})), dict(old.get("skipped", {}))
    meta = dict(old)
    for split in cfg.splits:
        rows = records[split][: cfg.max_images] if cfg.max_images else records[split]
        if not rows:
            raise SystemExit(f"error: no {split} images in {cfg.karpathy_json if cfg.dataset == 'coco' else cfg.captions}")
        rows.sort(key=lambda r: not r["captions"])  # stable: captioned images first, then the unlabeled pool
        kept, skipped[split] = write_split(cfg, split, rows, clip, eval_clip, reward_clip)
        counts[split] = len(kept)
        if split == "train":
            meta["train_captioned"] = sum(1 for r in kept if r["captions"])
    meta.update(dataset=cfg.dataset, splits=counts, skipped=skipped, clip=clip_name, clip_weights=clip_weights,
                eval_clip=eval_clip.name, eval_clip_weights=eval_clip.weights, gpt=abs_if_path(cfg.gpt),
                features_normalized=True)
    write_json(meta_path, meta)
    print(f"\n{cfg.dataset} in {cfg.data_dir}: " + ", ".join(f"{s} {n:,}" for s, n in counts.items()) + " images"
          + (f" (train: {meta['train_captioned']:,} captioned)" if "train_captioned" in meta else "")
          + f"; CLIP {clip_name} ({clip_weights}); {time.time() - t0:.0f} s")
    if reward_clip is not None:
        print(f"reward CLIP features written for train and val: train with --reward_clip {reward_clip.name} "
              f"--reward_clip_weights {reward_clip.weights}")
