"""
Checks that turn a user's mistake in train.py's flags into one line that says what to do.

A checkpoint continued (stage 2, --resume) must come from this dataset's CLIP features and,
when resuming, describe the same model; stage 2's unlabeled pool must be the complement of the
labeled split its stage-1 checkpoint learned from (Jin, arXiv 2306.15111: stage 2 never sees a
caption of its images); --clip and --reward_clip must name CLIPs whose features the dataset holds;
and the dataset must have the splits that training reads.
"""

import os

from nanocap.data import layout


def check_checkpoint(cfg, path, ckpt, clip_info, model=None):
    """A checkpoint to continue from must have been trained on this dataset's CLIP features and,
    when resuming, describe the same model as the flags; otherwise say so in one line."""
    theirs = ckpt["clip"]
    same = layout.same_clip
    if not (same(theirs["name"], clip_info["name"]) and same(theirs["weights"], clip_info["weights"])):
        raise SystemExit(f"error: {path} was trained on features of CLIP {theirs['name']} ({theirs['weights']}), but "
                         f"{cfg.data_dir} holds features of CLIP {clip_info['name']} ({clip_info['weights']}); "
                         f"pass the --data_dir it was trained on")
    if model is not None and ckpt["model_args"] != model.model_args():
        ours = model.model_args()
        diff = [f"{k} {ckpt['model_args'][part].get(k)} in the checkpoint, {ours[part].get(k)} from the flags"
                for part in ours for k in ours[part] if ckpt["model_args"][part].get(k) != ours[part].get(k)]
        raise SystemExit(f"error: {path} was made with a different model ({'; '.join(diff)}); resume with the "
                         f"flags it was made with (its config is saved in it), or start afresh in a new --out_dir")


def check_pools(path, ckpt, pools):
    """--resume continues the draws of a stage-2 run: from the same pools, or it would change them."""
    theirs = [(p["dir"], p["rows"]) for p in ckpt.get("pools", [])]
    if theirs != [(p["dir"], p["rows"]) for p in pools]:
        raise SystemExit(f"error: {path} drew from the pools {theirs or 'none'} (folder, rows); resume with the same "
                         f"--unlabeled_pool, or start stage 2 afresh in a new --out_dir")


def check_split(path, ckpt, split):
    """Stage 2's unlabeled pool is the complement of the labeled split that stage 1 trained on, so
    stage 2's --labeled_fraction and --seed must choose that same split; otherwise say so in one line."""
    theirs = ckpt.get("split") or ckpt["config"]  # checkpoints before the split was saved: their config
    wrong = [f"--{k} {split[k]} (stage 1: {theirs[k]})" for k in ("labeled_fraction", "seed") if split[k] != theirs[k]]
    if wrong:
        labeled, unlabeled = layout.labeled_split(split["n_train"], theirs["labeled_fraction"], theirs["seed"],
                                                  split["n_captioned"])
        _, pool = layout.labeled_split(split["n_train"], split["labeled_fraction"], split["seed"], split["n_captioned"])
        raise SystemExit(f"error: {' and '.join(wrong)} would put {len(set(labeled) & set(pool))} of the "
                         f"{len(labeled)} images {path} learned with their captions into stage 2's unlabeled pool "
                         f"and leave out {len(set(unlabeled) - set(pool))} of the {len(unlabeled)} it left unlabeled; "
                         f"pass stage 1's --labeled_fraction {theirs['labeled_fraction']} --seed {theirs['seed']}")
    if "n_train" in theirs and theirs["n_train"] != split["n_train"]:
        raise SystemExit(f"error: {path} was trained on a dataset of {theirs['n_train']} train images, {split['n_train']} "
                         f"here; pass the --data_dir it was trained on")


def check_splits(data_dir, meta):
    """Training needs the train and val splits; a folder made for evaluation only has neither."""
    if meta.get("dataset") == "webdataset":
        raise SystemExit(f"error: {data_dir} is an unlabeled pool (data_prep.py --dataset webdataset): stage 2 takes "
                         f"it as --unlabeled_pool {data_dir}, beside the --data_dir of a dataset with captions")
    missing = [s for s in ("train", "val") if s not in meta.get("splits", {"train": 0, "val": 0})]
    if missing:
        raise SystemExit(f"error: {data_dir} has no {' or '.join(missing)} split (data_prep.py --splits left it "
                         f"out: it is for evaluation); train on a dataset made with --splits train val test")


def resolve_clips(cfg, meta, dataset, reward_images):
    """(clip, reward): the CLIP whose features feed the mapper, and the CLIP that scores sampled
    captions (stage 1's contrastive reward, stage 2's CLIP-S; by default the same one). Each is
    {"name", "weights", "normalized", "features": {split: path}}, with the paths of its train and
    val image features (the reward CLIP's only when reward_images, as stage 2 needs them). A CLIP
    whose features the dataset lacks gets one line saying how to write them."""
    data_dir = cfg.data_dir
    own = {"name": layout.in_data_dir(data_dir, meta["clip"]), "normalized": meta["features_normalized"],
           "weights": layout.in_data_dir(data_dir, meta["clip_weights"])}
    clip = dict(own, name=cfg.clip or own["name"], weights=cfg.clip_weights or own["weights"])
    same_model = not cfg.reward_clip or layout.same_clip(cfg.reward_clip, clip["name"])
    reward = dict(own, name=cfg.reward_clip or clip["name"],
                  weights=cfg.reward_clip_weights or (clip["weights"] if same_model else "openai"))
    for info, splits in ((clip, ("train", "val")), (reward, ("train", "val") if reward_images else ())):
        is_own = layout.same_clip(info["name"], own["name"]) and layout.same_clip(info["weights"], own["weights"])
        info["features"] = {s: os.path.join(layout.split_dir(data_dir, s), "features.safetensors") if is_own else
                            layout.find_features(data_dir, s, info["name"], info["weights"]) for s in splits}
    missing = [s for s, p in clip["features"].items() if p is None]
    if missing:
        name, weights = clip["name"], clip["weights"]
        raise SystemExit(f"error: the features in {data_dir} come from CLIP {own['name']} ({own['weights']}), not "
                         f"{name} ({weights}); the captioner must be trained on its own CLIP's features: run "
                         f"`python data_prep.py --dataset {dataset} --clip {name} --clip_weights {weights} --data_dir "
                         f"NEW_DIR ...` and train with --data_dir NEW_DIR")
    missing = [s for s, p in reward["features"].items() if p is None]
    if missing:
        how = ("the shapes world writes them for its compositional CLIP: `python data_prep.py --compositional`"
               if dataset == "shapes" else
               f"`python data_prep.py --dataset {dataset} ... --data_dir {data_dir} --reward_clip {reward['name']} "
               f"--reward_clip_weights {reward['weights']}` (it reuses the feature shards)")
        raise SystemExit(f"error: stage 2 scores captions with reward CLIP {reward['name']} ({reward['weights']}) "
                         f"against its own image features, and {data_dir}/{missing[0]} has none; {how}")
    return clip, reward
