"""data_prep.py on a miniature shapes world: the layout, disjoint splits, and a second run that reuses."""
import json
import os
import re

import pytest

import data_prep
from nanocap.base.files import read_json
from nanocap.data import layout


def test_layout_and_disjoint_splits(tiny_shapes):
    meta = read_json(os.path.join(tiny_shapes, "meta.json"))
    assert meta["features_normalized"] is True and meta["clip"] != meta["eval_clip"]
    seen = {}
    for split in data_prep.SPLITS:
        records = layout.read_jsonl(os.path.join(tiny_shapes, split, "captions.jsonl"))
        for r in records:
            assert len(r["captions"]) == 5 and os.path.exists(layout.image_path(tiny_shapes, split, r))
            key = json.dumps(r["scene"], sort_keys=True)
            assert key not in seen, f"scene in both {seen.get(key)} and {split}"
            seen[key] = split
        if split != "web":
            assert len(layout.load_features(os.path.join(tiny_shapes, split, "features.safetensors"))) == len(records)


def test_second_run_reuses_everything(tiny_shapes):
    files = [os.path.join(d, f) for d, _, fs in os.walk(tiny_shapes) for f in fs if f != "summary.json"]
    before = {f: os.path.getmtime(f) for f in files if not f.endswith("meta.json")}
    cfg = data_prep.ShapesConfig(data_dir=tiny_shapes, n_web=128, n_train=120, n_val=16, n_test=16,
                           clip_steps=2, eval_clip_steps=2, lm_steps=40, seed=7)
    data_prep.prepare_shapes(cfg)
    assert {f: os.path.getmtime(f) for f in before} == before  # nothing re-rendered, retrained or re-encoded


def test_each_dataset_has_its_own_flags(capsys):
    def usage(*argv):  # in this process: the command line is parsed before any work
        with pytest.raises(SystemExit):
            data_prep.main(list(argv))
        return capsys.readouterr()
    coco = usage("--dataset", "coco", "-h").out
    assert "--coco_root" in coco and "--clip_weights" in coco
    assert "--n_web" not in coco and "--clip_steps" not in coco and "--images" not in coco
    folder = usage("--dataset", "folder", "-h").out
    assert "--captions" in folder and "--coco_root" not in folder and "--lm_steps" not in folder
    pool = usage("--dataset", "webdataset", "-h").out
    assert "--shards" in pool and "--clip_weights" in pool and "--captions" not in pool and "--eval_clip" not in pool
    shapes = usage("-h").out
    assert "--n_web" in shapes and "--clip" not in re.sub(r"--clip_(steps|lr|batch_size)", "", shapes)
    assert "--dataset coco -h" in shapes  # says where the other flags are
    err = usage("--clip", "ViT-B-32").err  # not a shapes-world flag: refused before any work
    assert "unrecognized arguments: --clip" in err


def test_compositional_clip_its_features_and_a_cell_of_the_2x2(tiny_shapes, tmp_path):
    """--compositional adds a third CLIP and its features to a world; train.py can take its features
    (--clip) while the bag-of-words CLIP scores the captions (--reward_clip), and sample.py finds
    the test features of the CLIP the checkpoint names."""
    import shutil

    import torch

    import sample
    import train
    from nanocap.captioner import read_checkpoint

    world = str(tmp_path / "shapes")
    shutil.copytree(tiny_shapes, world)
    data_prep.prepare_shapes(data_prep.ShapesConfig(data_dir=world, n_web=128, n_train=120, n_val=16, n_test=16,
                                                    clip_steps=2, eval_clip_steps=2, lm_steps=40, seed=7,
                                                    compositional=True, comp_clip_steps=2, clip_batch_size=32))
    meta = read_json(os.path.join(world, "meta.json"))
    assert meta["comp_clip"] == "models/clip_comp.json" and meta["clip"] == "models/clip_reward.json"
    assert json.load(open(os.path.join(world, "models", "clip_comp.json")))["vision_cfg"]["patch_size"] == 8
    assert set(json.load(open(os.path.join(world, "summary.json")))["clip"]) == {"reward", "eval", "comp"}
    comp = [os.path.join(world, "models", "clip_comp" + ext) for ext in (".json", ".safetensors")]
    for split in ("train", "val", "test"):
        assert layout.find_features(world, split, *comp) == os.path.join(world, split, "features_comp.safetensors")
    bow = [os.path.join(world, "models", "clip_reward" + ext) for ext in (".json", ".safetensors")]
    out = str(tmp_path / "out")
    train.main(train.Config(data_dir=world, out_dir=out, clip=comp[0], clip_weights=comp[1], reward_clip=bow[0],
                            reward_clip_weights=bow[1], max_iters=2, batch_size=4, stage2_iters=1,
                            stage2_batch_size=4, stage2_samples=2, eval_interval=1000, max_new_tokens=8))
    ckpt = read_checkpoint(os.path.join(out, "stage2.pt"))
    assert ckpt["clip"]["name"] == comp[0] and ckpt["reward_clip"] == {"name": bow[0], "weights": bow[1]}
    # sample.py captions the test split from the features of the CLIP the checkpoint names
    assert sample.split_features(world, "test", ckpt["clip"]).shape == (16, 128)
    assert torch.equal(sample.split_features(world, "test", ckpt["clip"]),
                       layout.load_features(os.path.join(world, "test", "features_comp.safetensors")))


def test_the_pretrain_dtype_is_recorded_and_a_world_keeps_one(tiny_shapes, pretrain_dtype, capsys):
    assert read_json(os.path.join(tiny_shapes, "meta.json"))["pretrain_dtype"] == pretrain_dtype
    assert read_json(os.path.join(tiny_shapes, "summary.json"))["pretrain_dtype"] == pretrain_dtype
    other = {"float32": "bfloat16", "bfloat16": "float32"}[pretrain_dtype]
    with pytest.raises(SystemExit, match=f"pretrained in {pretrain_dtype}, not {other}: use --pretrain_dtype"):
        data_prep.main(["--data_dir", tiny_shapes, "--pretrain_dtype", other])
    with pytest.raises(SystemExit, match="use auto, float32 or bfloat16"):
        data_prep.main(["--data_dir", tiny_shapes, "--pretrain_dtype", "float16"])
