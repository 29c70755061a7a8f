"""data_prep.py on a miniature shapes world: the layout, disjoint splits, and a second run that reuses."""
import json
import os

import data_prep
from nanocap import data


def test_layout_and_disjoint_splits(tiny_shapes):
    meta = data.read_json(os.path.join(tiny_shapes, "meta.json"))
    assert meta["features_normalized"] is True and meta["clip"] != meta["eval_clip"]
    seen = {}
    for split in data_prep.SPLITS:
        records = data.read_jsonl(os.path.join(tiny_shapes, split, "captions.jsonl"))
        for r in records:
            assert len(r["captions"]) == 5 and os.path.exists(data.image_path(tiny_shapes, split, r))
            key = json.dumps(r["scene"], sort_keys=True)
            assert key not in seen, f"scene in both {seen.get(key)} and {split}"
            seen[key] = split
        if split != "web":
            assert len(data.load_features(os.path.join(tiny_shapes, split, "features.safetensors"))) == len(records)


def test_second_run_reuses_everything(tiny_shapes):
    files = [os.path.join(d, f) for d, _, fs in os.walk(tiny_shapes) for f in fs if f != "summary.json"]
    before = {f: os.path.getmtime(f) for f in files if not f.endswith("meta.json")}
    cfg = data_prep.Config(data_dir=tiny_shapes, n_web=128, n_train=120, n_val=16, n_test=16,
                           clip_steps=2, eval_clip_steps=2, lm_steps=40, seed=7)
    data_prep.prepare_shapes(cfg)
    assert {f: os.path.getmtime(f) for f in before} == before  # nothing re-rendered, retrained or re-encoded
