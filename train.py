"""
Train the captioner of Jin, "Semi-Supervised Image Captioning with CLIP" (arXiv 2306.15111).

Stage 1, few labels (--labeled_fraction of the train images, each with all its captions):
    loss = CE(caption | prefix) + λ · REINFORCE(contrastive reward)     losses.stage1_loss
Stage 2, unlabeled images (their captions are never read), from the stage-1 checkpoint:
    loss = REINFORCE(CLIP-S) + β · KL(π ‖ π_stage1)                      losses.stage2_loss
    its images: the train split's unlabeled ones, plus any --unlabeled_pool (nanocap/data/pool.py)
The objectives live in nanocap/losses.py; this file is config, data, model and the loop.
Two CLIPs have two parts: --clip's image features feed the mapper, and --reward_clip scores the
sampled captions (stage 1's contrastive reward, stage 2's CLIP-S); by default one CLIP does both.

    python train.py                            # stage 1, then stage 2 from its checkpoint
    python train.py --stage 1                  # one stage; --stage 2 starts from out_dir/stage1.pt
    python train.py --config configs/coco_mlp.json    # COCO: ClipCap's MLP recipe, 2% of labels
    python train.py --reward_clip data/shapes/models/clip_comp.json \
        --reward_clip_weights data/shapes/models/clip_comp.safetensors   # captions scored by another CLIP
    python train.py --stage 2 --unlabeled_pool data/cc3m   # more unlabeled images: data_prep.py --dataset webdataset
    torchrun --nproc_per_node 2 train.py --stage 1    # DDP (gloo on CPU, nccl on CUDA); one rank's error stops all
"""

import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanocap import losses
from nanocap.captioner import (Captioner, checkpoint_step, load_captioner, read_checkpoint, save_checkpoint,
                               state_digest)
from nanocap.clip_encoder import CLIPEncoder
from nanocap.data import layout, pool
from nanocap.decode import greedy
from nanocap.gpt import GPT, GPTConfig
from nanocap.mapper import build_mapper
from nanocap.tokenizer import caption_batch, get_tokenizer
from nanocap.tools.checks import (check_checkpoint, check_config, check_pools, check_reference, check_split,
                                  check_splits, resolve_clips, split_digest)
from nanocap.tools.cli import parse_config, print_config
from nanocap.tools.training import (lr_at, log_jsonl, make_optimizer, plot_log, restart_log, rng_states,
                                    set_rng_states, setup_system, together)

# -----------------------------------------------------------------------------
# config


@dataclass
class Config:
    """Train stage 1 (few labels), stage 2 (CLIP reward on unlabeled images), or both in turn."""
    stage: int = field(default=0, metadata={"help": "1: few labels; 2: CLIP-S on the unlabeled pool; 0: 1 then 2"})
    data_dir: str = field(default="data/shapes", metadata={"help": "a dataset made by data_prep.py"})
    out_dir: str = field(default="out/shapes", metadata={"help": "stage1.pt, stage2.pt, log.jsonl, plots"})
    init_from: str = field(default="", metadata={"help": "--stage 2 only: the stage-1 checkpoint it continues "
                                                          "(default out_dir/stage1.pt)"})
    resume: bool = field(default=False, metadata={"help": "continue each stage from its last checkpoint in out_dir"})
    keep_best: bool = field(default=True, metadata={"help": "stage 1: stage1.pt is the lowest val loss, the last "
                                                            "state goes to stage1.last.pt (stage 2 keeps its last)"})
    seed: int = field(default=1337, metadata={"help": "labeled split, batches and sampling"})
    # model (stage 1; stage 2 continues the stage-1 model, finetune_gpt included)
    clip: str = field(default="", metadata={"help": "CLIP whose features feed the mapper ('' = the dataset's)"})
    clip_weights: str = field(default="", metadata={"help": "its weights ('' = the dataset's CLIP weights)"})
    reward_clip: str = field(default="", metadata={"help": "CLIP that scores sampled captions ('' = --clip)"})
    reward_clip_weights: str = field(default="", metadata={"help": "its weights ('' = --clip_weights, or openai)"})
    gpt: str = field(default="", metadata={"help": "'' = the dataset's GPT; a GPT-2 name, HF folder, or none"})
    gpt_n_layer: int = field(default=4, metadata={"help": "--gpt none: layers"})
    gpt_n_embd: int = field(default=128, metadata={"help": "--gpt none: width"})
    mapper: str = field(default="mlp", metadata={"help": "mlp (ClipCap, GPT fine-tuned) or transformer"})
    prefix_len: int = field(default=10, metadata={"help": "prefix embeddings made from one image"})
    mapper_layers: int = field(default=8, metadata={"help": "transformer mapper: layers"})
    finetune_gpt: bool = field(default=True, metadata={"help": "train GPT too (ClipCap MLP recipe), or freeze it"})
    # data
    labeled_fraction: float = field(default=0.02, metadata={"help": "share of the captioned train images"})
    max_caption_tokens: int = field(default=48, metadata={"help": "longer captions are cut"})
    unlabeled_pool: list[str] = field(default_factory=list, metadata={"help": "stage 2: more unlabeled images, "
                                      "pools from data_prep.py --dataset webdataset (read memory-mapped)"})
    # stage 1
    batch_size: int = field(default=32, metadata={"help": "stage 1: images per step and process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per step (for small GPUs)"})
    max_iters: int = field(default=600, metadata={"help": "stage 1: steps (0: save the initial state)"})
    lr: float = field(default=1e-3, metadata={"help": "stage 1: peak learning rate"})
    warmup_iters: int = field(default=100, metadata={"help": "stage 1: linear warmup, then cosine to lr/10"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW, on matrices only (both stages)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm (0: off)"})
    # λ = 0.01: the contrastive REINFORCE term is ~100x the CE in size; at 0.1 the CE rose
    contrastive_weight: float = field(default=0.01, metadata={"help": "λ of the contrastive term (0: ClipCap)"})
    contrastive_temperature: float = field(default=0.0, metadata={"help": "τ of the contrastive reward (0: CLIP's)"})
    contrastive_samples: int = field(default=2, metadata={"help": "captions sampled per image for it"})
    # REINFORCE (the contrastive term of stage 1, and stage 2)
    baseline: str = field(default="mean", metadata={"help": "mean (leave-one-out over K) or greedy"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature; REINFORCE uses its log-probs"})
    max_new_tokens: int = field(default=40, metadata={"help": "longest sampled caption"})
    # stage 2
    stage2_iters: int = field(default=300, metadata={"help": "stage 2: steps (0: save the initial state)"})
    stage2_batch_size: int = field(default=16, metadata={"help": "stage 2: unlabeled images per step and process"})
    stage2_lr: float = field(default=1e-4, metadata={"help": "stage 2: peak learning rate"})
    stage2_warmup_iters: int = field(default=0, metadata={"help": "stage 2: linear warmup (0: it continues a policy)"})
    samples_per_image: int = field(default=5, metadata={"help": "stage 2: K sampled captions per image"})
    reward_weight: float = field(default=2.5, metadata={"help": "w in CLIP-S = w·max(cos, 0)"})
    kl_weight: float = field(default=0.1, metadata={"help": "β of the per-token KL to the stage-1 policy"})
    clip_prompt: str = field(default=losses.CLIP_PROMPT, metadata={"help": "text put before a caption for CLIP-S"})
    # watching
    eval_interval: int = field(default=200, metadata={"help": "validate, print 8 val captions, checkpoint"})
    log_interval: int = field(default=20, metadata={"help": "log training figures"})
    # system
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, mps"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on CUDA, else float32), float32, bfloat16"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})


# -----------------------------------------------------------------------------
# data: the labeled fraction for stage 1, the rest (features only) for stage 2


def load_data(cfg, stage):
    """(meta, clip_info, reward_info, the stage's training set, val, split, pools). Stage 1 trains on
    a layout.Captioned set, stage 2 on a layout.Unlabeled pool, which holds no captions at all, only
    the features and the reward CLIP's features (with --unlabeled_pool: a pool.UnlabeledPool, read
    memory-mapped). split describes the labeled split; stage 1 saves it, stage 2 checks it against
    the checkpoint it continues; pools are what a checkpoint records of the extra pools."""
    if not os.path.isfile(os.path.join(cfg.data_dir, "meta.json")):
        raise SystemExit(f"error: no dataset in {cfg.data_dir} (no meta.json); make one with data_prep.py first")
    meta = layout.read_json(os.path.join(cfg.data_dir, "meta.json"))
    check_splits(cfg.data_dir, meta)
    clip, reward = resolve_clips(cfg, meta, meta.get("dataset", "folder"), reward_images=stage == 2 or cfg.stage == 0)
    clip_info = {k: clip[k] for k in ("name", "weights", "normalized")}  # what a checkpoint records
    reward_info = {k: reward[k] for k in ("name", "weights")}
    n_train = len(pool.MappedFeatures(clip["features"]["train"]))  # its header: nothing is loaded yet
    # own folders: captioned train images come first, the uncaptioned ones are always unlabeled
    labeled_idx, unlabeled_idx = layout.labeled_split(n_train, cfg.labeled_fraction, cfg.seed,
                                                      meta.get("train_captioned"))
    split = dict(labeled_fraction=cfg.labeled_fraction, seed=cfg.seed, n_train=n_train,
                 n_captioned=meta.get("train_captioned"), n_labeled=len(labeled_idx),
                 labeled=split_digest(labeled_idx))  # which images: the same flags on a re-made dataset may differ
    pools = cfg.unlabeled_pool if stage == 2 else []
    if not (labeled_idx if stage == 1 else unlabeled_idx or pools):
        raise SystemExit(f"error: stage {stage} needs {'captioned' if stage == 1 else 'unlabeled'} train images "
                         f"and {cfg.data_dir} leaves none at --labeled_fraction {cfg.labeled_fraction}")
    if cfg.unlabeled_pool and (stage == 2 or cfg.stage == 0):  # both stages: stage 1 checks the pools first
        pool_set, seen = pool.stage2_pool(cfg.data_dir, clip["features"]["train"], unlabeled_idx,
                                          cfg.unlabeled_pool, clip_info, reward_info)
    if stage == 1:
        records = layout.read_jsonl(os.path.join(cfg.data_dir, "train", "captions.jsonl"))
        feats = layout.load_features(clip["features"]["train"])
        train_set = layout.Captioned(feats[labeled_idx], [records[i]["captions"] for i in labeled_idx])
        if not all(train_set.captions):
            raise SystemExit(f"error: {cfg.data_dir}/train has uncaptioned images before meta.json's "
                             f"train_captioned; re-run data_prep.py")
    elif pools:  # the train split's unlabeled rows and the pools' rows, memory-mapped, no captions
        train_set, pools = pool_set, seen
    else:
        feats, reward_feats = (layout.load_features(f["features"]["train"]) for f in (clip, reward))
        train_set = layout.Unlabeled(feats[unlabeled_idx], reward_feats[unlabeled_idx])  # no captions at all
    val_dir = os.path.join(cfg.data_dir, "val")
    val = layout.Captioned(layout.load_features(clip["features"]["val"]),
                           [r["captions"] for r in layout.read_jsonl(os.path.join(val_dir, "captions.jsonl"))],
                           layout.load_features(reward["features"]["val"]) if "val" in reward["features"] else None)
    return meta, clip_info, reward_info, train_set, val, split, pools


# -----------------------------------------------------------------------------
# model: new (stage 1) or the stage-1 checkpoint (stage 2)


def new_model(cfg, meta, feature_dim):
    """Stage 1: a new mapper in front of the dataset's GPT (or a GPT from scratch). (model, tok)."""
    gpt_spec = cfg.gpt or layout.in_data_dir(cfg.data_dir, meta["gpt"])
    vocab = None
    if gpt_spec == "none":
        gpt = GPT(GPTConfig(block_size=256, n_layer=cfg.gpt_n_layer, n_head=4, n_embd=cfg.gpt_n_embd))
    else:
        gpt = GPT.from_pretrained(gpt_spec)
        vocab_file = os.path.join(gpt_spec, "nanocap_vocab.json")  # the shapes world's reduced vocabulary
        vocab = layout.read_json(vocab_file) if os.path.isfile(vocab_file) else None
    longest = cfg.prefix_len + max(cfg.max_new_tokens, cfg.max_caption_tokens)
    if longest > gpt.config.block_size:
        raise SystemExit(f"error: --prefix_len {cfg.prefix_len} and a caption of up to {longest - cfg.prefix_len} "
                         f"tokens need {longest} positions, and the GPT has {gpt.config.block_size}; lower "
                         f"--max_new_tokens / --max_caption_tokens or --prefix_len")
    extra = {"n_layer": cfg.mapper_layers} if cfg.mapper == "transformer" else {}
    mapper = build_mapper(cfg.mapper, feature_dim, cfg.prefix_len, gpt.config.n_embd, **extra)
    model = Captioner(mapper, gpt)
    model.gpt.requires_grad_(cfg.finetune_gpt)
    return model, get_tokenizer("gpt2", vocab)


def stage1_model(cfg, clip_info, split, device, master):
    """Stage 2: the stage-1 checkpoint twice, as the policy to train and as the frozen reference
    of the KL. (model, reference, tok, path). GPT trains exactly when it did in stage 1."""
    start = cfg.init_from or os.path.join(cfg.out_dir, "stage1.pt")
    try:
        model, ckpt = load_captioner(start)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    check_checkpoint(cfg, start, ckpt, clip_info)
    check_split(start, ckpt, split)
    finetune_gpt = ckpt["config"]["finetune_gpt"]
    model.gpt.requires_grad_(finetune_gpt)
    if master:
        print(f"stage 2 continues {start}: finetune_gpt = {finetune_gpt}, as in stage 1 (--finetune_gpt is not used)")
    reference = Captioner.from_args(ckpt["model_args"])
    reference.load_state_dict(ckpt["model"])
    reference.to(device).eval().requires_grad_(False)
    return model, reference, get_tokenizer(**ckpt["tokenizer"]), start

# -----------------------------------------------------------------------------
# one stage: the training loop


def train_stage(cfg, stage, system):
    """Run one stage: its data, its model, then the loop (evaluate, checkpoint, step, log)."""
    device, master, ddp = system.device, system.master, system.ddp
    torch.manual_seed(cfg.seed + system.rank)  # each stage starts from the seed: `--stage 2` alone is the same
    gen = torch.Generator(device=device).manual_seed(cfg.seed + system.rank)  # batches and sampled captions
    meta, clip_info, reward_info, train_set, val, split, pools = together(ddp, load_data, cfg, stage)
    if stage == 1:
        model, tok = together(ddp, new_model, cfg, meta, val.features.size(1))
        reference, start = None, ""  # stage 1 has no KL, so no reference policy
    else:
        model, reference, tok, start = together(ddp, stage1_model, cfg, clip_info, split, device, master)
    model.to(device)
    reward_clip = CLIPEncoder(reward_info["name"], reward_info["weights"], device=device)  # scores sampled captions
    iters, peak_lr, warmup = ((cfg.max_iters, cfg.lr, cfg.warmup_iters) if stage == 1 else
                              (cfg.stage2_iters, cfg.stage2_lr, cfg.stage2_warmup_iters))
    optimizer = make_optimizer(model, peak_lr, cfg.weight_decay)
    # what every checkpoint of the stage records besides its state; reference: the KL's, by its weights
    info = dict(config=asdict(cfg), clip=clip_info, reward_clip=reward_info, tokenizer=tok.describe(), stage=stage,
                init_from=os.path.abspath(start) if start else "", split=split, pools=pools,
                reference=state_digest(reference) if reference is not None else "")
    step, best = together(ddp, resume_from, cfg, stage, info, model, optimizer, gen, system)
    forward = torch.compile(model) if cfg.compile else model
    forward = DDP(forward, device_ids=[device.index] if device.type == "cuda" else None) if ddp else forward
    if master:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        where = f" (train split + {len(pools)} pool(s))" if pools else ""
        print(f"stage {stage}: {n_train / 1e6:.2f}M trainable of {n_all / 1e6:.2f}M parameters; {len(train_set)} "
              f"{'labeled' if stage == 1 else 'unlabeled'} images{where}; device {device}, {system.dtype}")

    model.train()
    t0, first = time.time(), step
    while True:
        if step == first or step % cfg.eval_interval == 0 or step == iters:  # the start (or resumed step), the end
            rngs = rng_states(system, gen)  # every rank's streams, so that a resume gives each its own back
            # rank 0's work, under together: if it fails, every rank stops with its one line
            best = together(ddp, evaluate_and_save, cfg, stage, step, iters, model, optimizer, rngs, val, tok,
                            reward_clip, system, info, best)
        if step == iters:
            break
        lr = lr_at(step, iters, peak_lr, warmup)
        for g in optimizer.param_groups:
            g["lr"] = lr
        for micro in range(cfg.grad_accum):
            last = micro == cfg.grad_accum - 1
            with forward.no_sync() if ddp and not last else nullcontext():  # DDP syncs on the last
                # under DDP, a NaN or an error on any rank stops every rank (together)
                loss, stats = together(ddp, finite_loss, cfg, stage, step, model, forward, reference, train_set,
                                       reward_clip, tok, gen, system)
                (loss / cfg.grad_accum).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if master and (step % cfg.log_interval == 0 or step == 1):
            elapsed = time.time() - t0
            print(f"step {step}/{iters} | " + " | ".join(f"{k} {v:.4f}" for k, v in stats.items())
                  + f" | {elapsed:.0f}s")
            log_jsonl(cfg.out_dir, dict(stage=stage, iter=step, lr=lr, time=elapsed, **stats))
    together(ddp, finish_stage, cfg, stage, best, system)


def checkpoint_files(cfg, stage):
    """(path, last): the stage's checkpoint and the file its last state goes to. Stage 1 with
    --keep_best keeps its lowest val loss in stage1.pt and its last state in stage1.last.pt;
    otherwise both are stage<N>.pt (stage 2's val reward is its own reward: choosing by it would hack)."""
    path = os.path.join(cfg.out_dir, f"stage{stage}.pt")
    return path, os.path.join(cfg.out_dir, "stage1.last.pt") if cfg.keep_best and stage == 1 else path


def last_state_file(cfg, stage):
    """The stage's last state, whatever --keep_best was when it was written: of stage<N>.pt and
    stage<N>.last.pt (a --keep_best run's, whose stage<N>.pt is its best), the one of the later step."""
    path, last = (os.path.join(cfg.out_dir, f"stage{stage}{s}.pt") for s in ("", ".last"))
    if not os.path.isfile(last) or os.path.isfile(path) and checkpoint_step(path) > checkpoint_step(last):
        return path
    return last


def not_finite(cfg, stage, what, value, step):
    """The one line that stops a run whose `what` (the loss, a val figure) became `value` (NaN, inf),
    naming the checkpoint to resume from."""
    path = last_state_file(cfg, stage)
    return SystemExit(f"error: the {what} became {value} at step {step}; the last good checkpoint is "
                      f"{path if os.path.isfile(path) else 'none yet'}. Lower {'--lr' if stage == 1 else '--stage2_lr'}"
                      f" and resume with --resume")


def evaluate_and_save(cfg, stage, step, iters, model, optimizer, rngs, val, tok, reward_clip, system, info, best):
    """Rank 0 validates, then checkpoints the last state (with --keep_best, stage 1 also copies it to
    stage1.pt while its val loss is the lowest so far); other ranks do nothing. Step 0, the initial
    state, is saved only when the stage has no steps. Returns the best {"val_loss", "step"} so far."""
    if not system.master:
        return best
    path, last_path = checkpoint_files(cfg, stage)
    result, captions = evaluate(cfg, stage, model, val, tok, reward_clip, system)
    print(f"stage {stage} step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    print("\n".join(f"  val[{i}] {c}" for i, c in enumerate(captions)))
    log_jsonl(cfg.out_dir, dict(stage=stage, iter=step, **result, captions=captions))
    for k, v in result.items():
        if not math.isfinite(v):  # a NaN is never "the lowest so far": stop before it overwrites a good state
            raise not_finite(cfg, stage, k, v, step)
    if step == 0 and iters > 0:
        return best
    improved = stage == 1 and result["val_loss"] < best["val_loss"]
    if improved:
        best = {"val_loss": result["val_loss"], "step": step}
    save_checkpoint(last_path, model, **info, step=step, optimizer=optimizer.state_dict(), best=best, **rngs)
    if last_path != path and improved:  # the best is a copy of the last, taken when it was the best
        layout.atomic_write(path, lambda tmp: shutil.copyfile(last_path, tmp))
        print(f"val_loss {best['val_loss']:.4f} is the lowest so far: {path} is step {step}")
    elif last_path != path:
        print(f"val_loss did not improve on {best['val_loss']:.4f} (step {best['step']}): {path} kept")
    return best


def finish_stage(cfg, stage, best, system):
    """Rank 0 plots the stage's curves and says what it saved."""
    if not system.master:
        return
    plot_log(cfg.out_dir, stage)
    path, last_path = checkpoint_files(cfg, stage)
    kept = f" (step {best['step']}, the lowest val loss; the last state is {last_path})" if last_path != path else ""
    print(f"saved {path}{kept} and {os.path.join(cfg.out_dir, f'stage{stage}.png')}")


def resume_from(cfg, stage, info, model, optimizer, gen, system):
    """With --resume, load the stage's last state into model, optimizer and this rank's random
    streams, and return (its step, the best val loss so far) (step 0: start afresh). With both
    stages (no --stage), a stage without a checkpoint starts afresh."""
    best = {"val_loss": float("inf"), "step": 0}
    path = last_state_file(cfg, stage)
    if not cfg.resume or (cfg.stage == 0 and not os.path.isfile(path)):
        if system.master:
            restart_log(cfg.out_dir, stage)
        return 0, best
    try:
        ckpt = read_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    check_checkpoint(cfg, path, ckpt, info["clip"], model)
    check_pools(path, ckpt, info["pools"])
    check_reference(path, ckpt, info)
    iters = cfg.max_iters if stage == 1 else cfg.stage2_iters
    if ckpt["step"] > iters:
        raise SystemExit(f"error: {path} is at step {ckpt['step']}, past --{'max' if stage == 1 else 'stage2'}_iters "
                         f"{iters}; resume with at least {ckpt['step']} steps, or start afresh in a new --out_dir")
    model.load_state_dict(ckpt["model"], strict=True)
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_states(ckpt, path, system, gen, cfg.seed)  # after CLIP's construction, which draws from torch's
    if system.master:
        restart_log(cfg.out_dir, stage, ckpt["step"])  # the records of steps after it, from the run it stopped
        print(f"resuming stage {stage} from {path}, step {ckpt['step']}")
    return ckpt["step"], ckpt.get("best", best)


def finite_loss(cfg, stage, step, model, forward, reference, train_set, reward_clip, tok, gen, system):
    """stage_loss, or one line if it is not finite."""
    loss, stats = stage_loss(cfg, stage, model, forward, reference, train_set, reward_clip, tok, gen, system)
    if not torch.isfinite(loss):
        raise not_finite(cfg, stage, "loss", loss.item(), step)
    return loss, stats


def stage_loss(cfg, stage, model, forward, reference, train_set, clip, tok, gen, system):
    """One micro-batch of the stage's objective: (loss, stats). `clip` is the reward CLIP;
    `forward` is `model` as trained (DDP- and/or compile-wrapped); losses.py says why both are passed."""
    batch_size = cfg.batch_size if stage == 1 else cfg.stage2_batch_size
    feats, scored_by = (train_set.batch(batch_size, gen, system.device) if isinstance(train_set, pool.UnlabeledPool)
                        else layout.get_batch(train_set, batch_size, gen, system.device))  # captions, or reward features
    common = dict(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, baseline_kind=cfg.baseline,
                  generator=gen, forward=forward, autocast=system.autocast())
    if stage == 1:
        return losses.stage1_loss(model, feats, scored_by, clip, tok, weight=cfg.contrastive_weight,
                                  k=cfg.contrastive_samples, tau=cfg.contrastive_temperature or None,
                                  max_caption_tokens=cfg.max_caption_tokens, **common)
    return losses.stage2_loss(model, reference, feats, clip, tok, k=cfg.samples_per_image,
                              reward_weight=cfg.reward_weight, kl_weight=cfg.kl_weight, prompt=cfg.clip_prompt,
                              reward_features=scored_by, **common)


@torch.no_grad()
def evaluate(cfg, stage, model, val, tok, clip, system):
    """Greedy captions of 8 fixed val images, and a val figure on 256: stage 1 the cross-entropy
    of each image's first caption, stage 2 the CLIP-S of the greedy captions."""
    model.eval()
    device = system.device
    fixed = greedy(model.gpt, model.prefix(val.features[:8].to(device)), cfg.max_new_tokens, tok.eos_id)
    captions = [tok.decode(t) for t in fixed.tokens.tolist()]
    feats = val.features[: 8 * 32].to(device)
    if stage == 1:
        idx, tgt = caption_batch(tok, [c[0] for c in val.captions[: len(feats)]], cfg.max_caption_tokens, device)
        with system.autocast():
            logits = model(feats, idx)
        result = {"val_loss": losses.caption_loss(logits, tgt, model.prefix_len).item()}
    else:
        g = greedy(model.gpt, model.prefix(feats), cfg.max_new_tokens, tok.eos_id)
        texts = [tok.decode(t) for t in g.tokens.tolist()]
        reward = losses.clip_reward(clip, val.reward_features[: len(feats)].to(device), texts, cfg.reward_weight,
                                    cfg.clip_prompt)
        result = {"val_reward": reward.mean().item()}
    model.train()
    return result, captions

# -----------------------------------------------------------------------------


def main(cfg):
    check_config(cfg)  # a flag value that cannot work is one line, before any work starts
    system = setup_system(cfg.device, cfg.dtype)
    if system.master:
        print_config(cfg)
        os.makedirs(cfg.out_dir, exist_ok=True)
    for stage in ([1, 2] if cfg.stage == 0 else [cfg.stage]):
        train_stage(cfg, stage, system)
        if system.ddp:  # rank 0 writes the final checkpoint last: stage 2 must not read it before,
            dist.barrier()  # and no rank may tear gloo/nccl down while another still talks to it
    if system.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_config(Config))
