"""An unlabeled web pool (nanocap/data/webpool.py, nanocap/data/pool.py): webdataset tars written
with webdataset's own writer (a corrupt member, a sample without an image, captions as txt and json)
-> data_prep.py --dataset webdataset, in one process and on 2 gloo ranks under torchrun, row for row
the same; a rank that fails stops both, and the rerun resumes; stage 2 on the dataset plus the pool,
never reading a caption; and the one-line errors."""
import builtins
import io
import json
import mmap
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file

import data_prep
import train
from nanocap.base.files import read_json, write_json
from nanocap.captioner import read_checkpoint
from nanocap.clip_encoder import CLIPEncoder
from nanocap.data import layout, pool, webpool
from nanocap.data.real import LazyCLIP
from nanocap.data.shapes import make_split, render

from tests.helpers import cli, free_port, join_as_rank, run_ranks


def write_tars(folder, n_tars, per_tar, seed=3, corrupt=(), no_image=()):
    """n_tars tars of per_tar shapes scenes each, as img2dataset writes them (jpg + txt + json);
    sample numbers in `corrupt` get garbage bytes, those in `no_image` only a caption."""
    os.makedirs(folder, exist_ok=True)
    scenes = make_split(n_tars * per_tar, seed=seed)
    for t in range(n_tars):
        with wds.TarWriter(os.path.join(folder, f"{t:05d}.tar")) as sink:
            for j in range(per_tar):
                n = t * per_tar + j
                sample = {"__key__": f"{n:09d}", "txt": f"caption {n}", "json": json.dumps({"caption": f"caption {n}"})}
                buf = io.BytesIO()
                render(scenes[n], size=64).save(buf, format="JPEG" if n % 2 else "PNG")
                if n in corrupt:
                    sample["jpg"] = b"not an image at all"
                elif n not in no_image:
                    sample["jpg" if n % 2 else "png"] = buf.getvalue()
                sample.pop("txt" if n % 3 == 0 else "nothing", None)  # every third: the json caption only
                sink.write(sample)
    return os.path.join(folder, "{00000..%05d}.tar" % (n_tars - 1))


def prep_pool(data_dir, shards, tiny_shapes, *extra, clip="reward"):
    return ["--dataset", "webdataset", "--shards", shards, "--data_dir", data_dir, "--batch_size", "3",
            "--num_workers", "0", "--clip", os.path.join(tiny_shapes, "models", f"clip_{clip}.json"),
            "--clip_weights", os.path.join(tiny_shapes, "models", f"clip_{clip}.safetensors"), *extra]


@pytest.mark.slow
def test_pool_from_tars_skips_the_unreadable_and_keeps_captions(tmp_path, tiny_shapes, capsys):
    shards = write_tars(tmp_path / "tars", n_tars=2, per_tar=5, corrupt={3}, no_image={6})
    data_prep.main(prep_pool(str(tmp_path / "pool"), shards, tiny_shapes))
    out = capsys.readouterr().out
    assert "8 images from 2 tars, 2 unreadable skipped" in out
    meta = read_json(tmp_path / "pool" / "meta.json")
    assert meta["dataset"] == "webdataset" and meta["splits"] == {"pool": 8} and [s["rows"] for s in meta["pool"]] == [4, 4]
    skipped = (tmp_path / "pool" / "pool" / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 2 and "000000003.jpg: not an image" in skipped[0] and "000000006: no image member" in skipped[1]
    rows = [json.loads(line) for line in (tmp_path / "pool" / "pool" / "00000.jsonl").read_text().splitlines()]
    assert [r["key"] for r in rows] == ["000000000", "000000001", "000000002", "000000004"]
    assert [r["caption"] for r in rows] == ["caption 0", "caption 1", "caption 2", "caption 4"]  # 0: from json
    # row for row the CLIP features of the images, in the tar's order
    clip = CLIPEncoder(*(os.path.join(tiny_shapes, "models", f"clip_reward.{e}") for e in ("json", "safetensors")))
    scenes = make_split(10, seed=3)
    images = []
    for n in (0, 1, 2, 4):
        buf = io.BytesIO()
        render(scenes[n], size=64).save(buf, format="JPEG" if n % 2 else "PNG")
        images.append(clip.preprocess(Image.open(buf).convert("RGB")))
    want = clip.encode_image(torch.stack(images)).half()
    got = load_file(tmp_path / "pool" / "pool" / "00000.safetensors")["features"]
    assert torch.allclose(got.float(), want.float(), atol=2e-3)
    # DataLoader workers decode samples in turn, and the loader hands them back in the tar's order
    tar = str(tmp_path / "tars" / "00001.tar")
    feats, rows, skipped = webpool.encode_tar(clip, tar, 3, 0, False)
    feats2, rows2, skipped2 = webpool.encode_tar(clip, tar, 3, 2, False)
    assert rows2 == rows and skipped2 == skipped and torch.allclose(feats2, feats, atol=1e-6)


def torchrun_prep(args, nproc=2):
    return cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "data_prep.py",
               *args, OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_two_ranks_equal_one_and_a_failing_rank_stops_both_then_resumes(tmp_path, tiny_shapes):
    shards = write_tars(tmp_path / "tars", n_tars=3, per_tar=4)
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: the same float sums
    try:
        data_prep.main(prep_pool(str(one), shards, tiny_shapes))
    finally:
        torch.set_num_threads(threads)
    # tar 1 goes to rank 1: make it unreadable, and rank 1 fails while rank 0 encodes tar 0
    good = (tmp_path / "tars" / "00001.tar").read_bytes()
    (tmp_path / "tars" / "00001.tar").write_bytes(good[:700])  # truncated mid-member
    two = tmp_path / "two"
    r = torchrun_prep(prep_pool(str(two), shards, tiny_shapes))
    assert r.returncode != 0
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rank 1 of 2" in errors[0] and "00001.tar: not a readable webdataset tar" in errors[0]
    assert (two / "pool" / "00000.safetensors").exists() and not (two / "meta.json").exists()  # no index
    mtime = (two / "pool" / "00000.safetensors").stat().st_mtime_ns
    (tmp_path / "tars" / "00001.tar").write_bytes(good)
    r = torchrun_prep(prep_pool(str(two), shards, tiny_shapes))  # resumes: tar 0's shard is kept
    assert r.returncode == 0, r.stderr[-2000:]
    assert (two / "pool" / "00000.safetensors").stat().st_mtime_ns == mtime
    assert read_json(two / "meta.json")["pool"] == read_json(one / "meta.json")["pool"]
    for t in range(3):
        a, b = (load_file(d / "pool" / f"{t:05d}.safetensors")["features"] for d in (one, two))
        assert torch.equal(a, b), t


@pytest.mark.slow
def test_stage2_on_dataset_plus_pool_never_reads_a_caption(tmp_path, tiny_shapes, tiny_run, monkeypatch, capsys):
    shards = write_tars(tmp_path / "tars", n_tars=2, per_tar=6, seed=5)
    pool_dir = str(tmp_path / "pool")
    data_prep.main(prep_pool(pool_dir, shards, tiny_shapes))
    real_open, real_read = builtins.open, layout.read_jsonl

    def guarded_open(path, *a, **k):  # no caption file of the train split or of the pool is opened
        p = os.path.abspath(str(path)) if isinstance(path, (str, os.PathLike)) else ""
        assert not (p.endswith(".jsonl") and (p.startswith(pool_dir) or p.endswith("train/captions.jsonl"))), p
        return real_open(path, *a, **k)
    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(layout, "read_jsonl", lambda p: (guarded_open(p).close(), real_read(p))[1])
    drawn = []
    real_rows = pool.UnlabeledPool.rows
    monkeypatch.setattr(pool.UnlabeledPool, "rows", lambda self, pick: (drawn.extend(pick.tolist()),
                                                                         real_rows(self, pick))[1])
    out = tmp_path / "out"
    train.main(train.Config(stage=2, data_dir=tiny_shapes, out_dir=str(out), init_from=os.path.join(tiny_run, "stage1.pt"),
                            unlabeled_pool=[pool_dir], stage2_iters=6, stage2_batch_size=8, stage2_samples=2,
                            eval_interval=1000))
    n_unlabeled = 120 - round(0.02 * 120)
    assert f"{n_unlabeled + 12} unlabeled images" in capsys.readouterr().out
    assert max(drawn) >= n_unlabeled  # the pool's rows were drawn, not only the dataset's
    ckpt = read_checkpoint(out / "stage2.pt")
    assert [(p["dir"], p["rows"], p["shards"]) for p in ckpt["pools"]] == [(os.path.abspath(pool_dir), 12, 2)]
    with pytest.raises(SystemExit, match="drew from the pools"):  # --resume continues the same draws, or none
        train.main(train.Config(stage=2, data_dir=tiny_shapes, out_dir=str(out), resume=True, stage2_iters=8,
                                init_from=os.path.join(tiny_run, "stage1.pt")))
    with pytest.raises(RuntimeError, match="never read"):
        pool.UnlabeledPool([(pool.MappedFeatures(os.path.join(pool_dir, "pool", "00000.safetensors")), None)]).captions


def test_pool_rows_are_drawn_distinct_and_memory_mapped(tmp_path):
    feats = torch.arange(40.0).repeat_interleave(4).view(40, 4)
    layout.save_features(tmp_path / "a.safetensors", feats[:30])
    layout.save_features(tmp_path / "b.safetensors", feats[30:])
    a, b = pool.MappedFeatures(str(tmp_path / "a.safetensors")), pool.MappedFeatures(str(tmp_path / "b.safetensors"))
    assert isinstance(a.map, mmap.mmap) and not a.rows.flags.owndata  # a view of the mapped file
    p = pool.UnlabeledPool([(a, [1, 5, 7]), (b, None)])  # 3 rows of a, all 10 of b
    assert len(p) == 13
    assert torch.equal(p.rows(np.array([0, 2, 3, 12])), feats[[1, 7, 30, 39]])
    f, r = p.batch(13, torch.Generator().manual_seed(0))
    assert torch.equal(f, r) and sorted(f[:, 0].tolist()) == [1, 5, 7] + list(range(30, 40))  # all, once each
    f2, _ = p.batch(5, torch.Generator().manual_seed(0))
    assert torch.equal(f2, p.batch(5, torch.Generator().manual_seed(0))[0]) and len(set(f2[:, 0].tolist())) == 5


def test_pool_errors_are_one_line(tmp_path, tiny_shapes, tiny_run):
    shards = write_tars(tmp_path / "tars", n_tars=1, per_tar=3)
    eval_pool = str(tmp_path / "eval_pool")
    data_prep.main(prep_pool(eval_pool, shards, tiny_shapes, clip="eval"))
    kw = dict(stage=2, data_dir=tiny_shapes, out_dir=str(tmp_path / "out"), init_from=os.path.join(tiny_run, "stage1.pt"))
    with pytest.raises(SystemExit, match="holds features of CLIP .*clip_eval.json"):
        train.main(train.Config(**kw, unlabeled_pool=[eval_pool]))
    with pytest.raises(SystemExit, match="has no meta.json"):
        train.main(train.Config(**kw, unlabeled_pool=[str(tmp_path)]))
    with pytest.raises(SystemExit, match="is a shapes dataset, not a pool"):
        train.main(train.Config(**kw, unlabeled_pool=[tiny_shapes]))
    with pytest.raises(SystemExit, match="holds a shapes dataset; give the pool a folder of its own"):
        data_prep.main(prep_pool(tiny_shapes, shards, tiny_shapes))
    with pytest.raises(SystemExit, match="holds features of CLIP .*clip_eval.json"):  # one CLIP per pool
        data_prep.main(prep_pool(eval_pool, shards, tiny_shapes))
    with pytest.raises(SystemExit, match="two tars called 00000.tar"):  # their shards would share a name
        data_prep.main(prep_pool(str(tmp_path / "p3"), shards + "::" + shards.replace("tars", "tars2"), tiny_shapes))
    with pytest.raises(SystemExit, match="is an unlabeled pool .* --unlabeled_pool"):
        train.main(train.Config(stage=1, data_dir=eval_pool, out_dir=str(tmp_path / "out3")))
    shard = os.path.join(eval_pool, "pool", "00000.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(200)  # cut inside its header
    with pytest.raises(SystemExit, match="00000.safetensors is not a whole feature shard"):
        train.main(train.Config(**kw, unlabeled_pool=[eval_pool]))
    with pytest.raises(SystemExit, match="00001.tar: no such file"):
        data_prep.main(prep_pool(str(tmp_path / "p2"), str(tmp_path / "tars" / "{00000..00001}.tar"), tiny_shapes))
    # a dataset made for evaluation only (data_prep.py --splits val test) has no train split
    evaluation_only = tmp_path / "eval_only"
    os.makedirs(evaluation_only)
    for name in ("models", "val", "test"):
        os.symlink(os.path.join(tiny_shapes, name), evaluation_only / name)
    meta = read_json(os.path.join(tiny_shapes, "meta.json"))
    write_json(evaluation_only / "meta.json", dict(meta, splits={"val": 16, "test": 16}))
    with pytest.raises(SystemExit, match="has no train split"):
        train.main(train.Config(stage=1, data_dir=str(evaluation_only), out_dir=str(tmp_path / "out2")))


def nan_on_rank_1(rank, port, data_dir, out_dir, result_dir):
    """One rank of a 2-rank stage 1, run the way torchrun runs it; rank 1's loss becomes NaN at step 2."""
    join_as_rank(rank, port)
    real_loss, calls = train.contrastive_objective, []

    def loss(*args):
        value, stats = real_loss(*args)
        calls.append(1)
        return (value * float("nan"), stats) if rank == 1 and len(calls) == 2 else (value, stats)
    train.contrastive_objective = loss
    try:
        train.main(train.Config(stage=1, data_dir=data_dir, out_dir=out_dir, max_iters=5, eval_interval=1000,
                                batch_size=4, contrastive_weight=0.0))
        code = 0
    except SystemExit as e:
        code = e.code
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(code, f)


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank(tmp_path, tiny_shapes):
    run_ranks(nan_on_rank_1, (free_port(), tiny_shapes, str(tmp_path / "out"), str(tmp_path)))
    codes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert codes[1] == 1
    assert codes[0].startswith("error: rank 1 of 2: the loss became nan at step 1"), codes[0]


def test_a_shard_is_made_again_when_its_tar_or_clip_weights_change_in_place(tmp_path):
    """The reuse digest stamps the CLIP weights file and the tar by size and mtime: a CLIP retrained
    in place, or a tar rewritten at the same size, gives another source, so its shard is encoded again."""
    weights, tar = tmp_path / "clip.safetensors", tmp_path / "00000.tar"
    weights.write_bytes(b"w" * 100)
    tar.write_bytes(b"a" * 100)
    clip = LazyCLIP("clip.json", str(weights), "cpu")  # as data_prep names a toy CLIP: nothing is loaded
    source = webpool.tar_source(clip, str(tar))
    assert webpool.tar_source(clip, str(tar)) == source  # nothing changed: the shard is kept
    stamp = lambda path, ns: os.utime(path, ns=(ns, ns))
    later = tar.stat().st_mtime_ns + 10**9
    tar.write_bytes(b"b" * 100)  # the same size, other content, written a second later
    stamp(tar, later)
    assert webpool.tar_source(clip, str(tar)) != source
    source = webpool.tar_source(clip, str(tar))
    weights.write_bytes(b"v" * 100)  # the CLIP retrained in place: same path, same size
    stamp(weights, later)
    assert webpool.tar_source(clip, str(tar)) != source
    named = LazyCLIP("ViT-B-32", "openai", "cpu")
    assert webpool.tar_source(named, str(tar)) == webpool.tar_source(named, str(tar))  # a name has no file to stamp
