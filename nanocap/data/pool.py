"""
Stage 2's unlabeled pool, read memory-mapped, so that memory does not grow with the pool.

Stage 2 of Jin (arXiv 2306.15111) needs nothing of an unlabeled image but its CLIP features: the
prefix and the CLIP-S reward both start from them. So a pool can be as large as a disk holds (CC3M,
CC12M, a crawl) if a step reads only the rows it draws. With `train.py --unlabeled_pool DIR ...`
stage 2 draws its images uniformly from the union of

  - the train split's unlabeled images: rows of <data_dir>/train/features.safetensors that the
    labeled split left out (layout.labeled_split), and
  - each extra pool DIR made by `data_prep.py --dataset webdataset` (nanocap/data/webpool.py):
    DIR/meta.json lists its feature shards DIR/pool/NNNNN.safetensors, (n_i, D) float16 each.

A safetensors file is an 8-byte little-endian header length, a JSON header (each tensor's dtype,
shape and byte range) and the raw bytes. MappedFeatures maps the file (mmap) and views the bytes of
"features" as an (N, D) array; indexing it reads just the rows asked for, through the page cache,
nothing is loaded up front, and after each read the pages are let go of again (MADV_DONTNEED).
Each rank draws its own rows with its own generator. Like layout.Unlabeled, a pool has no captions.
Without --unlabeled_pool, stage 2 keeps the train split's unlabeled rows in memory (layout.Unlabeled),
as it always has, so runs made before pools existed replay exactly.
"""

import json
import mmap
import os
import struct

import numpy as np
import torch

from nanocap.base.files import read_json
from nanocap.data import layout


class MappedFeatures:
    """The (N, D) float16 "features" tensor of a safetensors file, memory-mapped, and its header."""

    def __init__(self, path):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]  # the JSON header's length in bytes
            header = json.loads(f.read(n))
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the whole file; nothing is read yet
        info = header["features"]  # {"dtype": "F16", "shape": [N, D], "data_offsets": [begin, end]}
        if info["dtype"] != "F16" or len(info["shape"]) != 2:
            raise ValueError(f"{path}: features are {info['dtype']} {info['shape']}, not (N, D) float16")
        self.path, self.meta, self.shape = path, header.get("__metadata__", {}), tuple(info["shape"])
        self.rows = np.frombuffer(self.map, dtype=np.float16, count=self.shape[0] * self.shape[1],
                                  offset=8 + n + info["data_offsets"][0]).reshape(self.shape)  # (N, D), on disk

    def __len__(self):
        return self.shape[0]

    def read(self, idx):
        """(len(idx), D) float16 copy of rows idx. Then the mapping lets go of the pages it touched:
        they stay in the kernel's page cache, but not in this process's resident memory, which
        would otherwise grow over a long run towards the size of the pool (a touched row can bring
        in a large folio, a megabyte or more, with it)."""
        out = self.rows[idx]
        if hasattr(mmap, "MADV_DONTNEED"):  # Linux, macOS
            self.map.madvise(mmap.MADV_DONTNEED)
        return out


def read_pool(pool_dir):
    """(meta, [MappedFeatures]) of a pool made by data_prep.py --dataset webdataset, or one line
    that says what is wrong."""
    meta_path = os.path.join(pool_dir, "meta.json")
    if not os.path.isfile(meta_path):
        raise SystemExit(f"error: --unlabeled_pool {pool_dir} has no meta.json; make it with `python data_prep.py "
                         f"--dataset webdataset --shards ... --data_dir {pool_dir}` (a killed run: run it again)")
    meta = read_json(meta_path)
    if meta.get("dataset") != "webdataset":
        raise SystemExit(f"error: --unlabeled_pool {pool_dir} is a {meta.get('dataset')} dataset, not a pool; pools "
                         f"come from data_prep.py --dataset webdataset (a dataset's own unlabeled images are always used)")
    more_open_files(len(meta["pool"]))
    shards = []
    for shard in meta["pool"]:
        path = os.path.join(pool_dir, shard["features"])
        try:
            shards.append(MappedFeatures(path))
        except (OSError, ValueError, KeyError, struct.error) as e:  # missing, truncated, not features
            raise SystemExit(f"error: {path} is not a whole feature shard ({type(e).__name__}: {e}); run the "
                             f"data_prep.py --dataset webdataset command of {pool_dir} again (it redoes what is missing)")
    return meta, shards


def more_open_files(n):
    """Each mapped shard holds an open file (CPython's mmap keeps a handle): CC12M's 1,240 tars alone
    pass the usual limit of 1,024 open files, so raise the soft limit towards the hard one."""
    try:
        import resource  # POSIX only
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 1024  # and room for everything else
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


class UnlabeledPool:
    """Unlabeled rows from several memory-mapped sources, drawn without loading them. A source is
    (MappedFeatures, row indices or None for all rows). No captions: reading them raises."""

    def __init__(self, sources):
        self.sources = [(m, None if idx is None else np.asarray(idx, dtype=np.int64)) for m, idx in sources]
        sizes = [len(m) if idx is None else len(idx) for m, idx in self.sources]
        self.starts = np.cumsum([0] + sizes)  # (S+1,): source s holds pool rows starts[s] .. starts[s+1]-1
        self.dim = self.sources[0][0].shape[1]

    def __len__(self):
        return int(self.starts[-1])

    @property
    def captions(self):
        raise RuntimeError("stage 2 must never read the captions of unlabeled images")

    def rows(self, pick):
        """(B, D) float32 features of pool rows `pick` (B,) int64, in that order."""
        out = np.empty((len(pick), self.dim), dtype=np.float16)
        source = np.searchsorted(self.starts, pick, side="right") - 1  # (B,) which source holds each row
        for s in np.unique(source):
            here = source == s
            mapped, idx = self.sources[s]
            local = pick[here] - self.starts[s]
            out[here] = mapped.read(local if idx is None else idx[local])  # reads only these rows
        return torch.from_numpy(out).float()

    def batch(self, batch_size, generator, device="cpu"):
        """B = min(batch_size, len) distinct rows drawn uniformly by generator (on `device`), in
        O(B) time and memory whatever the pool's size: (features (B, D), features (B, D)), the
        second as what the reward CLIP scores (the pool's CLIP is the reward CLIP)."""
        n, B = len(self), min(batch_size, len(self))
        pick, seen = [], set()  # the draws in order, and the same as a set: each repeat check is O(1)
        while len(pick) < B:  # redraw the rare repeats: randperm(n) would cost O(n) every step
            for i in torch.randint(n, (B,), generator=generator, device=device).tolist():
                if i not in seen and len(pick) < B:
                    pick.append(i)
                    seen.add(i)
        feats = self.rows(np.array(pick, dtype=np.int64)).to(device)
        return feats, feats


def stage2_pool(data_dir, train_features, unlabeled_idx, pool_dirs, clip_info, reward_info):
    """The UnlabeledPool of the train split's unlabeled rows plus the pools in pool_dirs, and what a
    checkpoint records of each pool. A pool of another CLIP, or another reward CLIP, is refused in
    one line: its rows would mean nothing to the mapper, or to the reward."""
    train = MappedFeatures(train_features)
    sources, seen = [(train, unlabeled_idx)], []
    same = layout.same_clip
    if not (same(reward_info["name"], clip_info["name"]) and same(reward_info["weights"], clip_info["weights"])):
        raise SystemExit(f"error: --unlabeled_pool holds features of the captioner's CLIP only; stage 2 with "
                         f"--reward_clip {reward_info['name']} cannot score them: drop one of the two")
    for pool_dir in dict.fromkeys(os.path.abspath(d) for d in pool_dirs):  # each folder once
        meta, shards = read_pool(pool_dir)
        clip, weights = (layout.in_data_dir(pool_dir, meta[k]) for k in ("clip", "clip_weights"))
        if not (same(clip, clip_info["name"]) and same(weights, clip_info["weights"])):
            raise SystemExit(f"error: --unlabeled_pool {pool_dir} holds features of CLIP {clip} ({weights}), but "
                             f"{data_dir} holds features of CLIP {clip_info['name']} ({clip_info['weights']}); "
                             f"make the pool with `data_prep.py --dataset webdataset --clip ... --clip_weights ...` "
                             f"as the dataset's")
        for m in shards:
            if m.shape[1] != train.shape[1]:
                raise SystemExit(f"error: {m.path} has {m.shape[1]}-dimensional features, {data_dir} "
                                 f"{train.shape[1]}-dimensional; make the pool again with the dataset's CLIP")
        sources += [(m, None) for m in shards if len(m)]
        seen.append(dict(dir=os.path.abspath(pool_dir), rows=sum(len(m) for m in shards), shards=len(shards),
                         source=meta["shards"]))
    if not any(len(m) if idx is None else len(idx) for m, idx in sources):
        raise SystemExit(f"error: stage 2 has no unlabeled image to draw: {data_dir} leaves none unlabeled and the "
                         f"pools hold no rows (every image of their tars was unreadable: see their pool/skipped.txt)")
    return UnlabeledPool(sources), seen
