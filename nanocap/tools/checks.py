"""
Checks that turn a user's mistake in train.py's flags into one line that says what to do.

Every flag value that cannot work is refused before any work starts (check_config).

A checkpoint continued (stage 2, --resume) must come from this dataset's CLIP features and,
when resuming, describe the same model; stage 2's unlabeled pool must be the complement of the
labeled split its stage-1 checkpoint learned from (Jin, arXiv 2306.15111: stage 2 never sees a
caption of its images); a resumed stage 2 must keep the KL reference it started with; --clip and
--reward_clip must name CLIPs whose features the dataset holds; and the dataset must have the
splits that training reads.
"""

import hashlib
import os

from nanocap.data import layout


def check_config(cfg):
    """Every value of train.py's Config that cannot work, as one line naming the flag."""
    stage1, stage2 = cfg.stage in (0, 1), cfg.stage in (0, 2)
    k_min = 2 if cfg.baseline == "mean" else 1  # the leave-one-out mean of K samples needs another sample
    rules = [
        (cfg.stage in (0, 1, 2), f"--stage {cfg.stage}: use 1, 2, or 0 (1 then 2)"),
        (not cfg.init_from or cfg.stage == 2, "--init_from names the checkpoint that --stage 2 continues; in a run of "
         "both stages, stage 2 continues the stage 1 it has just trained: pass --stage 2, or drop --init_from"),
        (not cfg.unlabeled_pool or stage2, "--unlabeled_pool adds unlabeled images to stage 2; --stage 1 never reads "
         "them: drop it, or run stage 2"),
        (0 < cfg.labeled_fraction <= 1, f"--labeled_fraction {cfg.labeled_fraction}: a share of the captioned train "
         f"images, in (0, 1]"),
        (cfg.max_iters >= 0 and cfg.stage2_iters >= 0, "--max_iters and --stage2_iters are step counts: 0 or more"),
        (cfg.warmup_iters >= 0 and cfg.stage2_warmup_iters >= 0, "--warmup_iters and --stage2_warmup_iters: 0 or more"),
        (cfg.lr > 0 and cfg.stage2_lr > 0, f"--lr {cfg.lr} / --stage2_lr {cfg.stage2_lr}: learning rates are > 0"),
        (cfg.weight_decay >= 0 and cfg.grad_clip >= 0, "--weight_decay and --grad_clip: 0 (off) or more"),
        (cfg.batch_size >= 1 and cfg.stage2_batch_size >= 1 and cfg.grad_accum >= 1,
         "--batch_size, --stage2_batch_size and --grad_accum: 1 or more"),
        (cfg.eval_interval >= 1 and cfg.log_interval >= 1, f"--eval_interval {cfg.eval_interval} / --log_interval "
         f"{cfg.log_interval}: every how many steps, so 1 or more"),
        (cfg.temperature > 0, f"--temperature {cfg.temperature}: sampling divides the logits by it; use a value > 0 "
         f"(1: the model's own distribution)"),
        (cfg.contrastive_tau >= 0, f"--contrastive_tau {cfg.contrastive_tau}: τ > 0, or 0 for the reward CLIP's own"),
        (cfg.contrastive_weight >= 0 and cfg.kl_weight >= 0,
         "--contrastive_weight (λ) and --kl_weight (β): 0 or more"),
        (cfg.clip_s_scale > 0, f"--clip_s_scale {cfg.clip_s_scale}: CLIP-S's scale w, > 0"),
        (cfg.baseline in ("mean", "greedy"), f"--baseline {cfg.baseline}: use mean (leave-one-out) or greedy"),
        (cfg.stage2_objective in ("clip_reward", "self_training"),
         f"--stage2_objective {cfg.stage2_objective}: use clip_reward (the paper) or self_training"),
        (0 < cfg.keep_fraction <= 1, f"--keep_fraction {cfg.keep_fraction}: a share of the sampled captions, in (0, 1]"),
        (not (stage1 and cfg.contrastive_weight > 0) or cfg.stage1_samples >= k_min,
         f"--stage1_samples {cfg.stage1_samples}: the {cfg.baseline} baseline needs K >= {k_min}"),
        (not stage2 or cfg.stage2_samples >= k_min,
         f"--stage2_samples {cfg.stage2_samples}: the {cfg.baseline} baseline needs K >= {k_min}"),
        (cfg.max_new_tokens >= 1 and cfg.max_caption_tokens >= 1,
         "--max_new_tokens and --max_caption_tokens: 1 or more"),
        (cfg.prefix_len >= 1 and cfg.mapper_layers >= 1, "--prefix_len and --mapper_layers: 1 or more"),
        (cfg.mapper in ("mlp", "transformer"), f"--mapper {cfg.mapper}: use mlp or transformer"),
        (cfg.gpt_n_layer >= 1 and cfg.gpt_n_embd >= 4 and cfg.gpt_n_embd % 4 == 0,
         "--gpt_n_layer: 1 or more; --gpt_n_embd: a multiple of its 4 heads"),
        (cfg.dtype in ("auto", "float32", "bfloat16"), f"--dtype {cfg.dtype}: use auto, float32 or bfloat16"),
    ]
    for ok, why in rules:
        if not ok:
            raise SystemExit(f"error: {why}")


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


def split_digest(labeled):
    """What identifies a labeled split: a digest of its image indices (sorted)."""
    return hashlib.sha1(",".join(map(str, labeled)).encode()).hexdigest()


def check_split(path, ckpt, split):
    """Stage 2's unlabeled pool is the complement of the labeled split that stage 1 trained on, so
    stage 2's --labeled_fraction and --seed must choose that same split, and the dataset must give
    the same split for them (the same captioned images); otherwise say so in one line."""
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
    if theirs.get("labeled", split["labeled"]) != split["labeled"] or (
            theirs.get("n_captioned", split["n_captioned"]) != split["n_captioned"]):  # re-made with other captions
        labeled, _ = layout.labeled_split(split["n_train"], split["labeled_fraction"], split["seed"],
                                          theirs.get("n_captioned"))
        _, pool = layout.labeled_split(split["n_train"], split["labeled_fraction"], split["seed"], split["n_captioned"])
        was, now = (n if n is not None else "all" for n in (theirs.get("n_captioned"), split["n_captioned"]))
        why = (f"its dataset had {was} captioned train images, this one has {now}, which would put "
               f"{len(set(labeled) & set(pool))} of the {len(labeled)} images it learned with their captions into "
               f"stage 2's unlabeled pool" if was != now else "the same flags choose other labeled images here")
        raise SystemExit(f"error: {path} learned from another labeled split: {why}; pass the --data_dir it was "
                         f"trained on, or train stage 1 again on this one")


def check_reference(path, ckpt, info):
    """A resumed stage 2 keeps the KL reference it started with: the same stage-1 file (init_from),
    holding the same weights (a digest of them); otherwise say so in one line."""
    if ckpt.get("stage") != 2:
        return
    theirs, ours = ckpt.get("init_from", ""), info["init_from"]  # absolute (older checkpoints: as typed)
    if theirs and not layout.same_clip(os.path.abspath(theirs), ours):  # the same path, or the same file
        raise SystemExit(f"error: {path} continued {theirs}, its KL reference, and this run's is {ours}: resume with "
                         f"--init_from {theirs}, or start stage 2 afresh in a new --out_dir")
    if ckpt.get("reference") and ckpt["reference"] != info["reference"]:
        raise SystemExit(f"error: {ours} has changed since {path} started from it (other weights: stage 1 was "
                         f"trained again?), so the KL would pull towards another policy; start stage 2 afresh "
                         f"(delete {path}, or use a new --out_dir)")


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
