"""
What an unlabeled web pool costs (docs/web-pool.md): stage 2's memory and speed against the
size of the pool, and data_prep.py --dataset webdataset's throughput on 1 and 2 ranks.

    python -m nanocap.tools.poolbench                              # about 15 minutes on 2 CPU cores (an estimate)
    python -m nanocap.tools.poolbench --sizes 100000 --extract_images 0   # a quick look

Everything is made here, offline, at the real shape: CLIP ViT-B-32-quickgelu with random weights
(512-d features), so a pool of 4M rows is 4M x 512 x fp16 = 4 GB on disk, as a real one would be.

  memory  A small dataset (2,000 train images, random unit features) and a 1-step stage-1 model
          (GPT from scratch, --gpt none); then `train.py --stage 2` for --steps steps with no pool
          and with a synthetic pool of each --sizes rows (shards of 250,000 rows, written as
          data_prep.py writes them). Each run is a fresh process, watched from outside: its peak
          resident memory (VmHWM in /proc/PID/status, Linux) and peak anonymous memory (RssAnon,
          what is not the mapped file); steps/s from its log; and, in this process, the mean time
          of pool.UnlabeledPool.batch(16) over 1,000 draws from the pool's shards.
  extract --extract_images JPEGs (256 px shapes scenes) in 4 tars, written with webdataset's
          TarWriter; data_prep.py --dataset webdataset on 1 process (OMP_NUM_THREADS=2) and under
          torchrun on 2 ranks (1 thread each), --num_workers 0 both: images/s over the whole command
          (start-up and CLIP loading included) and as data_prep.py reports it (the tars alone).
"""

import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import save_file

from nanocap.base.files import write_json, write_jsonl
from nanocap.data import layout, pool
from nanocap.tools import timing
from nanocap.tools.cli import parse_config, print_config
from nanocap.tools.training import read_log

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARD_ROWS = 250_000


@dataclass
class Config:
    """Stage 2's memory and speed against pool size; extraction throughput on 1 and 2 ranks."""
    sizes: list[int] = field(default_factory=lambda: [100_000, 1_000_000, 4_000_000],
                             metadata={"help": "pool sizes in rows (each written, run, then deleted)"})
    steps: int = field(default=20, metadata={"help": "stage-2 steps per run"})
    extract_images: int = field(default=384, metadata={"help": "images for the extraction runs (0: skip them)"})
    work_dir: str = field(default="out/poolbench", metadata={"help": "scratch space (up to 4.5 GB)"})
    out: str = field(default="results/poolbench.json", metadata={"help": "the figures"})
    seed: int = field(default=0, metadata={"help": "weights, features, scenes"})


def run(args, env=None):
    """Run a command from the repository root, watching its memory. (wall s, peak RSS MB, peak anon MB, output)."""
    log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would stop the child
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", **(env or {})))
    t0, hwm, anon = time.time(), 0, 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                status = {line.split(":")[0]: line.split()[1] for line in f if line.startswith(("VmHWM", "RssAnon"))}
            hwm, anon = max(hwm, int(status["VmHWM"])), max(anon, int(status["RssAnon"]))
        except (OSError, KeyError):
            pass
        time.sleep(0.1)
    log.seek(0)
    out = log.read()
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(args[:4])} ... failed:\n{out[-3000:]}")
    return time.time() - t0, hwm / 1024, anon / 1024, out


def make_clip(work):
    """Random ViT-B-32-quickgelu weights in a file: the real shape, no download."""
    import open_clip
    path = os.path.join(work, "vitb32.safetensors")
    if not os.path.exists(path):
        save_file(open_clip.create_model("ViT-B-32-quickgelu").state_dict(), path)
    return path


def unit_rows(n, gen):
    return torch.nn.functional.normalize(torch.randn(n, 512, generator=gen), dim=-1)  # (n, 512)


def make_dataset(work, weights, gen):
    """A dataset folder as data_prep.py writes one: 2,000 train and 16 val images, features only."""
    data = os.path.join(work, "data")
    for split, n in (("train", 2000), ("val", 16)):
        os.makedirs(os.path.join(data, split), exist_ok=True)
        layout.save_features(os.path.join(data, split, "features.safetensors"), unit_rows(n, gen),
                             clip="ViT-B-32-quickgelu", clip_weights=weights, normalized=True)
        write_jsonl(os.path.join(data, split, "captions.jsonl"),
                           [{"image": f"{i}.jpg", "captions": ["a red circle", "a blue square"]} for i in range(n)])
    write_json(os.path.join(data, "meta.json"), dict(dataset="folder", splits={"train": 2000, "val": 16},
                      clip="ViT-B-32-quickgelu", clip_weights=weights, gpt="none", features_normalized=True))
    return data


def make_pool(folder, rows, weights, gen):
    """A pool of `rows` random unit rows in the layout of nanocap/data/webpool.py."""
    os.makedirs(os.path.join(folder, "pool"), exist_ok=True)
    shards = []
    for i, lo in enumerate(range(0, rows, SHARD_ROWS)):
        n = min(SHARD_ROWS, rows - lo)
        name = f"pool/{i:05d}.safetensors"
        layout.save_features(os.path.join(folder, name), unit_rows(n, gen), clip="ViT-B-32-quickgelu",
                             clip_weights=weights, normalized=True, tar=f"synthetic-{i}", skipped="[]")
        shards.append(dict(tar=f"synthetic-{i}", features=name, rows=n, skipped=0))
    write_json(os.path.join(folder, "meta.json"), dict(
        dataset="webdataset", shards="synthetic", clip="ViT-B-32-quickgelu", clip_weights=weights,
        features_normalized=True, splits={"pool": rows}, skipped={"pool": 0}, pool=shards))


def steps_per_s(out_dir, steps):
    log = [r for r in read_log(out_dir) if r.get("stage") == 2 and "time" in r]
    first, last = log[0], log[-1]  # step 1 and the last: the first step's warm-up left out
    return (last["iter"] - first["iter"]) / (last["time"] - first["time"])


def bench_memory(cfg, work, weights, gen):
    data = make_dataset(work, weights, gen)
    py = [sys.executable, "train.py", "--data_dir", data, "--eval_interval", "1000", "--log_interval", "1"]
    run(py + ["--stage", "1", "--out_dir", os.path.join(work, "stage1"), "--max_iters", "1", "--batch_size", "4",
              "--contrastive_weight", "0"])
    rows = []
    for size in [0] + cfg.sizes:
        pool_dir, out_dir = os.path.join(work, f"pool{size}"), os.path.join(work, f"stage2_{size}")
        draw_ms = None
        if size:
            t = time.time()
            make_pool(pool_dir, size, weights, gen)
            print(f"wrote a pool of {size:,} rows in {time.time() - t:.0f} s")
            draws = pool.UnlabeledPool([(m, None) for m in pool.read_pool(pool_dir)[1]])
            t = time.time()
            for _ in range(1000):
                draws.batch(16, gen)
            draw_ms = (time.time() - t)  # 1000 draws: the total in s is the mean in ms
        wall, rss, anon, _ = run(py + ["--stage", "2", "--out_dir", out_dir, "--init_from",
                                       os.path.join(work, "stage1", "stage1.pt"), "--stage2_iters", str(cfg.steps),
                                       "--stage2_batch_size", "16", "--stage2_samples", "2",
                                       "--max_new_tokens", "16"] + (["--unlabeled_pool", pool_dir] if size else []))
        rows.append(dict(pool_rows=size, pool_gb=round(size * 512 * 2 / 1e9, 2), peak_rss_mb=round(rss),
                         peak_anon_mb=round(anon), steps_per_s=round(steps_per_s(out_dir, cfg.steps), 3),
                         draw_16_ms=draw_ms and round(draw_ms, 3), wall_s=round(wall, 1)))
        print(rows[-1])
        shutil.rmtree(pool_dir, ignore_errors=True)
    return rows


def bench_extract(cfg, work, weights):
    import webdataset as wds

    from nanocap.data.shapes import make_split, render
    tars = os.path.join(work, "tars")
    os.makedirs(tars, exist_ok=True)
    scenes = make_split(cfg.extract_images, seed=cfg.seed)
    per_tar = -(-len(scenes) // 4)
    for t in range(4):
        with wds.TarWriter(os.path.join(tars, f"{t:05d}.tar")) as sink:
            for n in range(t * per_tar, min(len(scenes), (t + 1) * per_tar)):
                buf = io.BytesIO()
                render(scenes[n], size=256).save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"{n:09d}", "jpg": buf.getvalue(), "txt": "a caption"})
    prep = ["data_prep.py", "--dataset", "webdataset", "--shards", os.path.join(tars, "{00000..00003}.tar"),
            "--clip", "ViT-B-32-quickgelu", "--clip_weights", weights, "--num_workers", "0", "--batch_size", "32"]
    rows = []
    for ranks in (1, 2):
        out = os.path.join(work, f"extract{ranks}")
        shutil.rmtree(out, ignore_errors=True)
        launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                        "--standalone", "--nproc_per_node", str(ranks)]
        wall, rss, _, out = run(launcher + prep + ["--data_dir", out], env={"OMP_NUM_THREADS": str(2 // ranks)})
        encoding = float(re.search(r"([\d.]+) images/s", out).group(1))  # data_prep's own figure: the tars alone
        rows.append(dict(ranks=ranks, threads_per_rank=2 // ranks, images=len(scenes), wall_s=round(wall, 1),
                         images_per_s=round(len(scenes) / wall, 1), encoding_images_per_s=encoding))
        print(rows[-1])
    return rows


def main(cfg):
    cfg.sizes = [int(n) for n in cfg.sizes]  # the command line gives strings
    print_config(cfg)
    work = os.path.abspath(cfg.work_dir)
    os.makedirs(work, exist_ok=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    weights = make_clip(work)
    start = time.time()
    result = dict(config=asdict(cfg), machine=timing.machine(),  # machine: the CPU, its cores, torch, ...
                  memory=bench_memory(cfg, work, weights, gen),
                  extract=bench_extract(cfg, work, weights) if cfg.extract_images else [])
    result["wall_s"] = round(time.time() - start, 1)  # the runs, without making the CLIP weights
    write_json(cfg.out, result)
    print("\n| pool rows | pool on disk | peak RSS | peak anonymous | stage-2 steps/s | a draw of 16 rows |"
          "\n|---|---|---|---|---|---|")
    for r in result["memory"]:
        draw = f"{r['draw_16_ms']} ms" if r["draw_16_ms"] else "–"
        print(f"| {r['pool_rows']:,} | {r['pool_gb']} GB | {r['peak_rss_mb']:,} MB | {r['peak_anon_mb']:,} MB "
              f"| {r['steps_per_s']} | {draw} |")
    if result["extract"]:
        print("\n| ranks | threads each | images | command wall | images/s, whole command | images/s, tars only |"
              "\n|---|---|---|---|---|---|")
        for r in result["extract"]:
            print(f"| {r['ranks']} | {r['threads_per_rank']} | {r['images']} | {r['wall_s']} s | {r['images_per_s']} "
                  f"| {r['encoding_images_per_s']} |")
    print(f"\nwrote {cfg.out}")


if __name__ == "__main__":
    main(parse_config(Config))
