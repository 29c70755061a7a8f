"""data_prep.py on a miniature shapes world: the layout, disjoint splits, and a second run that reuses."""
import json
import os
import re

import data_prep
from nanocap.data import layout
from tests.helpers import cli


def test_layout_and_disjoint_splits(tiny_shapes):
    meta = layout.read_json(os.path.join(tiny_shapes, "meta.json"))
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


def test_each_dataset_has_its_own_flags():
    coco = cli("data_prep.py", "--dataset", "coco", "-h").stdout
    assert "--coco_root" in coco and "--clip_weights" in coco
    assert "--n_web" not in coco and "--clip_steps" not in coco and "--images" not in coco
    folder = cli("data_prep.py", "--dataset", "folder", "-h").stdout
    assert "--captions" in folder and "--coco_root" not in folder and "--lm_steps" not in folder
    shapes = cli("data_prep.py", "-h").stdout
    assert "--n_web" in shapes and "--clip" not in re.sub(r"--clip_(steps|lr|batch_size)", "", shapes)
    assert "--dataset coco -h" in shapes  # says where the other flags are
    r = cli("data_prep.py", "--clip", "ViT-B-32")  # not a shapes-world flag: refused before any work
    assert r.returncode != 0 and "unrecognized arguments: --clip" in r.stderr
