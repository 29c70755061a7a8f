"""
Checks that turn a user's mistake in train.py's flags into one line that says what to do.

A checkpoint continued (stage 2, --resume) must come from this dataset's CLIP features and,
when resuming, describe the same model; stage 2's unlabeled pool must be the complement of the
labeled split its stage-1 checkpoint learned from (Jin, arXiv 2306.15111: stage 2 never sees a
caption of its images); --clip / --clip_weights must name the CLIP that made the features.
"""

import os

from nanocap.data import layout


def _same(a, b):
    """Two CLIP names, tags or paths that mean the same thing."""
    if a is None or b is None:
        return a == b
    return a == b or (os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def check_checkpoint(cfg, path, ckpt, clip_info, model=None):
    """A checkpoint to continue from must have been trained on this dataset's CLIP features and,
    when resuming, describe the same model as the flags; otherwise say so in one line."""
    theirs = ckpt["clip"]
    if not (_same(theirs["name"], clip_info["name"]) and _same(theirs["weights"], clip_info["weights"])):
        raise SystemExit(f"error: {path} was trained on features of CLIP {theirs['name']} ({theirs['weights']}), but "
                         f"{cfg.data_dir} holds features of CLIP {clip_info['name']} ({clip_info['weights']}); "
                         f"pass the --data_dir it was trained on")
    if model is not None and ckpt["model_args"] != model.model_args():
        ours = model.model_args()
        diff = [f"{k} {ckpt['model_args'][part].get(k)} in the checkpoint, {ours[part].get(k)} from the flags"
                for part in ours for k in ours[part] if ckpt["model_args"][part].get(k) != ours[part].get(k)]
        raise SystemExit(f"error: {path} was made with a different model ({'; '.join(diff)}); resume with the "
                         f"flags it was made with (its config is saved in it), or start afresh in a new --out_dir")


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


def check_clip(cfg, clip_info, dataset):
    """--clip / --clip_weights, when given, must name the CLIP that made the dataset's features."""
    if ((cfg.clip and not _same(cfg.clip, clip_info["name"]))
            or (cfg.clip_weights and not _same(cfg.clip_weights, clip_info["weights"]))):
        name, weights = cfg.clip or clip_info["name"], cfg.clip_weights or clip_info["weights"]
        raise SystemExit(f"error: the features in {cfg.data_dir} come from CLIP {clip_info['name']} "
                         f"({clip_info['weights']}), not {name} ({weights}); the captioner must be trained on its own "
                         f"CLIP's features: run `python data_prep.py --dataset {dataset} --clip {name} --clip_weights "
                         f"{weights} --data_dir NEW_DIR ...` and train with --data_dir NEW_DIR")
