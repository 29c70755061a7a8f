"""
An unlabeled web pool: webdataset tar shards in, CLIP image features out, across torchrun ranks.

Jin (arXiv 2306.15111) trains stage 2 on images without captions; beyond COCO they come as
webdataset shards, the tars img2dataset writes and open_clip trains on (000000.tar holding
000000000.jpg, 000000000.txt, 000000000.json, ...; a sample is the members that share a key). Stage 2
needs only the features of these images (nanocap/data/pool.py), so this file turns each tar into one
feature shard:

    python data_prep.py --dataset webdataset --shards "cc3m/{00000..00331}.tar" --data_dir data/cc3m
    torchrun --nproc_per_node 8 data_prep.py --dataset webdataset --shards ...   # --nnodes on a cluster

    data/cc3m/meta.json                 the index, written by rank 0 once every rank has finished:
                                        the CLIP, and per tar its feature shard, rows and skips
    data/cc3m/pool/NNNNN.safetensors    (n, D) float16 features of NNNNN.tar's readable images, in the
                                        tar's order; the header names the CLIP, the tar, its skips
    data/cc3m/pool/NNNNN.jsonl          {"key", "caption"} of each row: the txt (or json "caption")
                                        member, kept for you; training never reads it
    data/cc3m/pool/skipped.txt          unreadable members, "tar: key.ext: reason" a line

The tars are dealt to ranks in turn (tar i to rank i mod world size) and done in rounds, one tar per
rank. After each round the ranks agree whether any failed (base.system.together): an unreadable
tar, or any error, on one rank stops all of them with one line. A feature shard whose header names
the same CLIP and tar is kept, so a killed run, with any number of ranks, resumes at the tars it had
not finished; the atomic writes (atomic_write) leave no half-written shard behind. A shard is
named after its tar, so a tar dropped from --shards leaves the others' shards valid.

With --num_workers W, each DataLoader worker reads the whole tar and decodes every W-th sample: W
reads of a local file (from the page cache after the first), which keeps the order of the tar
without a home-made reader; for tars behind a URL or pipe:, use --num_workers 1 or copy them first.
"""

import hashlib
import io
import json
import math
import os
import tarfile
import time

import torch
import torch.distributed as dist
import webdataset as wds
from safetensors import safe_open
from tqdm import tqdm

from nanocap.base.files import atomic_write_bytes, read_json, write_json, write_jsonl
from nanocap.base.system import pick_device, together
from nanocap.data import layout
from nanocap.data.images import ImageError, decode_image
from nanocap.data.real import LazyCLIP, abs_if_path, file_header


IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # a sample's image member, the first of these it has


class TarImages(torch.utils.data.IterableDataset):
    """The samples of one tar, in order, as (key, preprocessed image (3, H, W) or why it is
    unreadable, caption or None). webdataset reads the tar and groups members into samples; with
    DataLoader workers, worker w decodes samples w, w+W, ..., and the loader, which takes one item
    from each worker in turn, hands them back in the tar's order."""

    def __init__(self, tar, preprocess):
        self.tar, self.preprocess = tar, preprocess

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n_workers = (info.id, info.num_workers) if info else (0, 1)
        samples = wds.WebDataset(self.tar, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                 empty_check=False)  # one tar, all of it, in order: ranks split tars themselves
        for n, sample in enumerate(samples):
            if n % n_workers == w:
                yield self.decode(sample)

    def decode(self, sample):
        """(key, image or why it is unreadable, caption or None). The caption, the .txt member's text or
        the .json member's "caption", is kept in NNNNN.jsonl and never read by training."""
        key = sample["__key__"]
        caption = None
        if "txt" in sample:
            caption = sample["txt"].decode("utf-8", "replace").strip()
        elif "json" in sample:
            try:
                caption = json.loads(sample["json"]).get("caption")
            except (ValueError, AttributeError):
                caption = None
        ext = next((k for k in IMAGE_KEYS if k in sample), None)
        if ext is None:
            return key, f"{key}: no image member (.{', .'.join(IMAGE_KEYS)})", caption
        try:
            return key, self.preprocess(decode_image(io.BytesIO(sample[ext]), f"{key}.{ext}")), caption
        except (ImageError, OSError, ValueError) as e:
            return key, " ".join(str(e).split()), caption


def encode_tar(encoder, tar, batch_size, num_workers, show):
    """(features (n, D), [{"key", "caption"}] of its n readable images, [why] of the unreadable ones)."""
    loader = torch.utils.data.DataLoader(TarImages(tar, encoder.preprocess), batch_size=None,
                                         num_workers=num_workers)
    feats, rows, skipped, pending = [], [], [], []

    def flush():
        if pending:
            feats.append(encoder.encode_image(torch.stack(pending).to(encoder.device)).cpu())  # (b, D) unit norm
            pending.clear()

    for key, image, caption in tqdm(loader, desc=os.path.basename(tar), unit="img", leave=False, disable=not show):
        if isinstance(image, str):
            skipped.append(image)
            continue
        rows.append({"key": key, "caption": caption})
        pending.append(image)
        if len(pending) == batch_size:
            flush()
    flush()
    return (torch.cat(feats) if feats else torch.zeros(0, encoder.embed_dim)), rows, skipped


def file_stamp(path):
    """A file's size and modification time (ns), or "-" for a name that is not a file ("openai"):
    a file rewritten or retrained in place gets another stamp, without reading it."""
    if not os.path.isfile(path):
        return "-"
    st = os.stat(path)
    return f"{st.st_size} {st.st_mtime_ns}"


def tar_source(clip, tar):
    """What a feature shard was made from: the CLIP (name, weights, and the weights file's stamp),
    the tar's path and its stamp. A shard whose source differs is encoded again."""
    parts = [clip.id, file_stamp(clip.weights), os.path.abspath(tar), file_stamp(tar)]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def shard_name(tar):
    """A tar's feature shard is named after it: cc3m/00042.tar -> pool/00042.safetensors, so that
    dropping a tar from --shards leaves the others' shards where they are."""
    return f"pool/{os.path.splitext(os.path.basename(tar))[0]}.safetensors"


def encode_shard(cfg, clip, tar, show):
    """A tar -> its feature shard (+ .jsonl), unless a shard of the same CLIP and tar exists.
    Returns (images encoded, unreadable samples); (0, 0) when the shard was kept."""
    path = os.path.join(cfg.data_dir, shard_name(tar))
    made_from = file_header(path).get("source")
    if made_from == tar_source(clip, tar):
        return 0, 0
    if made_from:  # a shard of another CLIP or tar, or of the same files changed in place (size, mtime)
        print(f"{path}: its tar or CLIP changed since it was made: encoding {tar} again", flush=True)
    if not os.path.isfile(tar) and "://" not in tar and not tar.startswith("pipe:"):
        raise SystemExit(f"error: {tar}: no such file; check the paths in --shards")
    encoder = clip.get()
    try:
        feats, rows, skipped = encode_tar(encoder, tar, cfg.batch_size, cfg.num_workers, show)
    except (tarfile.TarError, OSError, EOFError) as e:  # a truncated or corrupt tar (tarfile: "empty header", ...)
        why = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        why = (why.strip().splitlines() or ["?"])[0]  # DataLoader workers add their traceback below
        raise SystemExit(f"error: {tar}: not a readable webdataset tar ({type(e).__name__}: {why}); "
                         f"replace it, or leave it out of --shards")
    skipped = [f"{tar}: {why}" for why in skipped]
    write_jsonl(path.replace(".safetensors", ".jsonl"), rows)  # before the shard: its presence means done
    layout.save_features(path, feats, clip=clip.name, clip_weights=clip.weights, normalized=True,
                         tar=os.path.abspath(tar), source=tar_source(clip, tar), skipped=json.dumps(skipped))
    return len(rows), len(skipped)


def prepare(cfg, clip, ddp):
    """Encode the tars of cfg.shards into cfg.data_dir, this rank's share of them when ddp, then
    (rank 0) the index. clip: real.LazyCLIP."""
    t0 = time.time()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    tars = wds.shardlists.expand_urls(cfg.shards)
    if not cfg.shards or not tars:
        raise SystemExit('error: --shards names no tar; pass e.g. --shards "pool/{00000..00099}.tar"')
    names = [shard_name(t) for t in tars]
    if len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise SystemExit(f"error: --shards names two tars called {os.path.basename(twice)[:-12]}.tar; their feature "
                         f"shards would share a name: give the pool one folder of tars, or one pool per folder")
    os.makedirs(os.path.join(cfg.data_dir, "pool"), exist_ok=True)
    done = torch.zeros(2, dtype=torch.long)  # (images encoded, unreadable samples) by this rank
    for r in tqdm(range(math.ceil(len(tars) / world)), desc=f"{len(tars)} tars, {world} rank(s)", unit="round",
                  disable=rank != 0):
        i = r * world + rank  # this rank's tar in round r, if it has one
        done += torch.tensor(together(ddp, lambda: encode_shard(cfg, clip, tars[i], rank == 0) if i < len(tars)
                                      else (0, 0)))
    wall = time.time() - t0
    if ddp:
        dist.all_reduce(done)  # every rank's
    together(ddp, lambda: write_index(cfg, clip, tars) if rank == 0 else None)  # the last round agreed: all done
    if rank == 0:
        encoded, bad = done.tolist()
        print(f"encoded {encoded:,} images ({bad} unreadable) in {wall:.0f} s: {encoded / max(wall, 1e-9):.1f} "
              f"images/s on {world} rank(s)" + ("" if encoded + bad else "; every shard was there already"))


def write_index(cfg, clip, tars):
    """meta.json: the CLIP and, per tar, its feature shard, rows and skips; and skipped.txt."""
    shards, skipped = [], []
    for tar in tars:
        name = shard_name(tar)
        with safe_open(os.path.join(cfg.data_dir, name), "pt") as f:
            rows, why = f.get_slice("features").get_shape()[0], json.loads(f.metadata()["skipped"])
        shards.append(dict(tar=os.path.abspath(tar), features=name, rows=rows, skipped=len(why)))
        skipped += why
    atomic_write_bytes(os.path.join(cfg.data_dir, "pool", "skipped.txt"), "".join(s + "\n" for s in skipped).encode())
    n = sum(s["rows"] for s in shards)
    write_json(os.path.join(cfg.data_dir, "meta.json"),
                      dict(dataset="webdataset", shards=cfg.shards, clip=clip.name, clip_weights=clip.weights,
                           features_normalized=True, splits={"pool": n}, skipped={"pool": len(skipped)}, pool=shards))
    for s in skipped[:10]:
        print(f"skipped: {s}")
    print(f"\npool in {cfg.data_dir}: {n:,} images from {len(tars)} tars" +
          (f", {len(skipped)} unreadable skipped (listed in {cfg.data_dir}/pool/skipped.txt)" if skipped else "") +
          f"; CLIP {clip.name} ({clip.weights}). Train with: python train.py --stage 2 --unlabeled_pool {cfg.data_dir}")


def check_folder(cfg, clip):
    """A pool gets a folder of its own, and one CLIP."""
    path = os.path.join(cfg.data_dir, "meta.json")
    meta = read_json(path) if os.path.exists(path) else {}
    if meta.get("dataset", "webdataset") != "webdataset":
        raise SystemExit(f"error: {cfg.data_dir} holds a {meta['dataset']} dataset; give the pool a folder of its own "
                         f"(e.g. --data_dir data/cc3m) and pass it to train.py --unlabeled_pool")
    if meta and not (layout.same_clip(meta["clip"], clip.name) and layout.same_clip(meta["clip_weights"], clip.weights)):
        raise SystemExit(f"error: {cfg.data_dir} holds features of CLIP {meta['clip']} ({meta['clip_weights']}); use "
                         f"another --data_dir for {clip.name} ({clip.weights})")


def run(cfg):
    """data_prep.py --dataset webdataset: join torchrun's process group (gloo: only small messages
    travel, even on GPUs), check the folder, encode, and leave the group together."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    if ddp:
        dist.init_process_group("gloo")
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)) if ddp else None)
    clip = LazyCLIP(abs_if_path(cfg.clip), abs_if_path(cfg.clip_weights), device)
    if cfg.num_workers < 0:
        cfg.num_workers = min(8, os.cpu_count() or 1)
    together(ddp, check_folder, cfg, clip)
    prepare(cfg, clip, ddp)
    if ddp:
        dist.barrier()  # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()
