"""
Train the captioner of Jin, "Semi-Supervised Image Captioning with CLIP" (arXiv 2306.15111).

Stage 1, few labels (--labeled_fraction of the train images, each with all its captions):
    loss = CE(caption | prefix) + λ · REINFORCE(contrastive reward)     losses.stage1_loss
Stage 2, unlabeled images (their captions are never read), from the stage-1 checkpoint:
    loss = REINFORCE(CLIP-S) + β · KL(π ‖ π_ref)                         losses.stage2_loss
    π_ref is the stage-1 policy, frozen; the images: the train split's unlabeled ones, plus any
    --unlabeled_pool (nanocap/data/pool.py)
The objectives live in nanocap/losses.py. This file reads top to bottom: the config, the two
stages (one record each: what the loop needs to know of a stage), the data, the models, the
loop, and its evaluation and checkpoints.
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
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanocap import losses
from nanocap.base.files import atomic_write, read_json
from nanocap.base.optim import lr_at, make_optimizer
from nanocap.base.system import setup_system, together
from nanocap.captioner import Captioner, load_captioner, save_checkpoint, state_digest
from nanocap.clip_encoder import CLIPEncoder
from nanocap.data import layout, pool
from nanocap.decode import greedy
from nanocap.gpt import GPT, GPTConfig
from nanocap.mapper import build_mapper
from nanocap.tokenizer import Tokenizer, caption_batch, get_tokenizer
from nanocap.tools.checks import check_checkpoint, check_config, check_split, check_splits, resolve_clips, split_digest
from nanocap.tools.cli import parse_config, print_config
from nanocap.tools.training import checkpoint_files, finish_stage, log_jsonl, not_finite, resume_from, rng_states

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
    contrastive_tau: float = field(default=0.0, metadata={"help": "τ of the contrastive reward (0: reward CLIP's)"})
    stage1_samples: int = field(default=2, metadata={"help": "stage 1: K captions sampled per image for it"})
    # sampling, for REINFORCE (the contrastive term of stage 1, and stage 2)
    baseline: str = field(default="mean", metadata={"help": "mean (leave-one-out over K) or greedy"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature T; REINFORCE uses its log-probs"})
    max_new_tokens: int = field(default=40, metadata={"help": "longest sampled caption"})
    # stage 2
    stage2_iters: int = field(default=300, metadata={"help": "stage 2: steps (0: save the initial state)"})
    stage2_batch_size: int = field(default=16, metadata={"help": "stage 2: unlabeled images per step and process"})
    stage2_lr: float = field(default=1e-4, metadata={"help": "stage 2: peak learning rate"})
    stage2_warmup_iters: int = field(default=0, metadata={"help": "stage 2: linear warmup (0: it continues a policy)"})
    stage2_samples: int = field(default=5, metadata={"help": "stage 2: K captions sampled per image"})
    clip_s_scale: float = field(default=2.5, metadata={"help": "w, CLIP-S's scale: CLIP-S = w·max(cos, 0)"})
    kl_weight: float = field(default=0.1, metadata={"help": "β of the per-token KL to π_ref, the stage-1 policy"})
    stage2_objective: str = field(default="clip_reward", metadata={"help": "clip_reward (the paper: REINFORCE on "
                                  "CLIP-S + β·KL) or self_training (CE on π_ref's captions that CLIP-S scores best)"})
    keep_fraction: float = field(default=0.5, metadata={"help": "self_training: the share of the B·K captions kept"})
    clip_prompt: str = field(default=losses.CLIP_PROMPT, metadata={"help": "text put before a caption for CLIP-S"})
    # watching
    eval_interval: int = field(default=200, metadata={"help": "validate, print 8 val captions, checkpoint"})
    log_interval: int = field(default=20, metadata={"help": "log training figures"})
    # system
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, mps"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on CUDA, else float32), float32, bfloat16"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})


# old flag -> new: the old names still work, with a one-line note, until the next release
RENAMED = {"contrastive_temperature": "contrastive_tau", "contrastive_samples": "stage1_samples",
           "samples_per_image": "stage2_samples", "reward_weight": "clip_s_scale"}

# -----------------------------------------------------------------------------
# the two stages, one record each: what the loop needs to know of a stage


@dataclass
class Stage:
    """A stage as the loop sees it."""
    n: int  # 1 or 2
    iters: int  # optimizer steps
    lr: float  # peak learning rate
    warmup: int  # linear warmup steps, then cosine decay to lr/10
    batch_size: int  # images per step and process
    iters_flag: str  # the flags that set iters and lr, for the messages that name them
    lr_flag: str
    labeled: bool  # learns from the labeled images and their captions, or from the unlabeled ones
    tracks_best: bool  # follows its lowest val loss (stage1.pt, with --keep_best); stage 2 keeps its last state
    objective: Callable  # (cfg, run, features, scored_by, autocast) -> (loss, stats)
    validate: Callable  # (cfg, run, val features (N, D), system) -> {val figure: value}


def stages(cfg):
    """The stages to run, in order: --stage 1, --stage 2, or both (0). Stage 2 keeps its last state:
    its val figure is its own reward, and choosing a checkpoint by it would favour reward hacking."""
    one = Stage(1, cfg.max_iters, cfg.lr, cfg.warmup_iters, cfg.batch_size, "--max_iters", "--lr", labeled=True,
                tracks_best=True, objective=contrastive_objective, validate=val_loss)
    two = Stage(2, cfg.stage2_iters, cfg.stage2_lr, cfg.stage2_warmup_iters, cfg.stage2_batch_size, "--stage2_iters",
                "--stage2_lr", labeled=False, tracks_best=False, validate=val_reward,
                objective={"clip_reward": clip_reward_objective, "self_training": self_training_objective}[
                    cfg.stage2_objective])
    return {0: [one, two], 1: [one], 2: [two]}[cfg.stage]


def contrastive_objective(cfg, run, features, captions, autocast):
    """Stage 1 on labeled images, one caption each: CE + λ · REINFORCE(contrastive reward)."""
    return losses.stage1_loss(run.model, features, captions, run.reward_clip, run.tok,
                              contrastive_weight=cfg.contrastive_weight, k=cfg.stage1_samples,
                              tau=cfg.contrastive_tau or None, max_caption_tokens=cfg.max_caption_tokens,
                              **sampling(cfg, run, autocast))


def clip_reward_objective(cfg, run, features, reward_features, autocast):
    """Stage 2 on unlabeled images (features only): REINFORCE(CLIP-S) + β · KL(π ‖ π_ref)."""
    return losses.stage2_loss(run.model, run.reference, features, run.reward_clip, run.tok, k=cfg.stage2_samples,
                              w=cfg.clip_s_scale, kl_weight=cfg.kl_weight, prompt=cfg.clip_prompt,
                              reward_features=reward_features, **sampling(cfg, run, autocast))


def self_training_objective(cfg, run, features, reward_features, autocast):
    """Stage 2's baseline (not the paper's): CE on the captions of π_ref that CLIP-S scores best."""
    shared = sampling(cfg, run, autocast)
    del shared["baseline_kind"]  # CLIP-S ranks the captions; nothing is weighted by an advantage
    return losses.self_training_loss(run.model, run.reference, features, run.reward_clip, run.tok,
                                     k=cfg.stage2_samples, keep_fraction=cfg.keep_fraction, w=cfg.clip_s_scale,
                                     prompt=cfg.clip_prompt, reward_features=reward_features, **shared)


def sampling(cfg, run, autocast):
    """What both objectives share: how the K captions are sampled and baselined, and how the model runs
    (`forward` is the model as trained, compile- and/or DDP-wrapped: losses.py says why)."""
    return dict(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, baseline_kind=cfg.baseline,
                generator=run.gen, forward=run.forward, autocast=autocast)

# -----------------------------------------------------------------------------
# data: the labeled fraction for stage 1, the rest (features only) for stage 2


@dataclass
class Data:
    """What a stage reads."""
    meta: dict  # the dataset's meta.json
    clip: dict  # the CLIP whose features feed the mapper: name, weights, normalized (checkpoints record it)
    reward_clip: dict  # the CLIP that scores sampled captions: name, weights
    train: object  # the stage's images, each set with .batch(B, generator, device) -> (features, scored_by)
    val: layout.Captioned  # the val images: features, captions, the reward CLIP's features
    split: dict  # the labeled split: stage 1 saves it, stage 2 checks it against the checkpoint it continues
    pools: list  # what a checkpoint records of the --unlabeled_pool pools


def load_data(cfg, stage):
    """The stage's Data. Stage 1 trains on a layout.Captioned set (features, each image's captions);
    stage 2 on a layout.Unlabeled set, which holds no captions at all, only the features and the
    reward CLIP's features (with --unlabeled_pool: a pool.UnlabeledPool, read memory-mapped)."""
    if not os.path.isfile(os.path.join(cfg.data_dir, "meta.json")):
        raise SystemExit(f"error: no dataset in {cfg.data_dir} (no meta.json); make one with data_prep.py first")
    meta = read_json(os.path.join(cfg.data_dir, "meta.json"))
    check_splits(cfg.data_dir, meta)
    clip, reward = resolve_clips(cfg, meta, meta.get("dataset", "folder"),
                                 reward_images=not stage.labeled or cfg.stage == 0)
    clip_info = {k: clip[k] for k in ("name", "weights", "normalized")}  # what a checkpoint records
    reward_info = {k: reward[k] for k in ("name", "weights")}
    n_train = len(pool.MappedFeatures(clip["features"]["train"]))  # its header: nothing is loaded yet
    # own folders: captioned train images come first, the uncaptioned ones are always unlabeled
    labeled_idx, unlabeled_idx = layout.labeled_split(n_train, cfg.labeled_fraction, cfg.seed,
                                                      meta.get("train_captioned"))
    split = dict(labeled_fraction=cfg.labeled_fraction, seed=cfg.seed, n_train=n_train,
                 n_captioned=meta.get("train_captioned"), n_labeled=len(labeled_idx),
                 labeled=split_digest(labeled_idx))  # which images: the same flags on a re-made dataset may differ
    pools = [] if stage.labeled else cfg.unlabeled_pool
    if not (labeled_idx if stage.labeled else unlabeled_idx or pools):
        raise SystemExit(f"error: stage {stage.n} needs {'captioned' if stage.labeled else 'unlabeled'} train images "
                         f"and {cfg.data_dir} leaves none at --labeled_fraction {cfg.labeled_fraction}")
    if cfg.unlabeled_pool and (not stage.labeled or cfg.stage == 0):  # both stages: stage 1 checks the pools first
        pool_set, seen = pool.stage2_pool(cfg.data_dir, clip["features"]["train"], unlabeled_idx,
                                          cfg.unlabeled_pool, clip_info, reward_info)
    if stage.labeled:
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
    return Data(meta, clip_info, reward_info, train_set, val, split, pools)

# -----------------------------------------------------------------------------
# model: new (stage 1), or the stage-1 checkpoint as the policy and its reference (stage 2)


def build_models(cfg, stage, data, system):
    """(model, reference, tok, start): the policy to train, π_ref for the KL (None in stage 1, which
    has no KL), the tokenizer, and the checkpoint the stage continues ("": none)."""
    if stage.n == 1:
        model, tok = new_model(cfg, data.meta, data.val.features.size(1))
        return model, None, tok, ""
    return stage2_models(cfg, data, system.device, system.master)


def new_model(cfg, meta, feature_dim):
    """Stage 1: a new mapper in front of the dataset's GPT (or a GPT from scratch). (model, tok)."""
    gpt_spec = cfg.gpt or layout.in_data_dir(cfg.data_dir, meta["gpt"])
    vocab = None
    if gpt_spec == "none":
        gpt = GPT(GPTConfig(block_size=256, n_layer=cfg.gpt_n_layer, n_head=4, n_embd=cfg.gpt_n_embd))
    else:
        gpt = GPT.from_pretrained(gpt_spec)
        vocab_file = os.path.join(gpt_spec, "nanocap_vocab.json")  # the shapes world's reduced vocabulary
        vocab = read_json(vocab_file) if os.path.isfile(vocab_file) else None
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


def stage2_models(cfg, data, device, master):
    """Stage 2's two models, both the stage-1 checkpoint: the policy π to train, and π_ref, its
    frozen copy, the reference of the KL. (model, reference, tok, path). GPT trains exactly when it
    did in stage 1."""
    start = cfg.init_from or os.path.join(cfg.out_dir, "stage1.pt")
    try:
        model, ckpt = load_captioner(start)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    check_checkpoint(cfg, start, ckpt, data.clip)
    check_split(start, ckpt, data.split)
    finetune_gpt = ckpt["config"]["finetune_gpt"]
    model.gpt.requires_grad_(finetune_gpt)
    if master:
        print(f"stage 2 continues {start}: finetune_gpt = {finetune_gpt}, as in stage 1 (--finetune_gpt is not used)")
    reference = Captioner.from_args(ckpt["model_args"])
    reference.load_state_dict(ckpt["model"])
    reference.to(device).eval().requires_grad_(False)
    return model, reference, get_tokenizer(**ckpt["tokenizer"]), start

# -----------------------------------------------------------------------------
# the training loop


@dataclass
class Run:
    """What one stage's loop works with (start_stage makes it)."""
    data: Data
    model: Captioner  # the policy, as saved
    forward: torch.nn.Module  # the same model as trained: compiled and/or DDP-wrapped
    reference: Captioner | None  # stage 2: π_ref, the frozen stage-1 policy of the KL
    tok: Tokenizer
    reward_clip: CLIPEncoder  # scores sampled captions (and stage 2's val captions)
    optimizer: torch.optim.Optimizer
    gen: torch.Generator  # batches and sampled captions, one stream per rank
    info: dict  # what every checkpoint of the stage records besides its state
    first_step: int  # 0, or the step it resumed from
    best: dict  # {"val_loss", "step"}: the lowest val loss so far (stage 1)


def start_stage(cfg, stage, system):
    """A stage's Run: its data, models, optimizer and random streams, resumed with --resume."""
    device, ddp = system.device, system.ddp
    torch.manual_seed(cfg.seed + system.rank)  # each stage starts from the seed: `--stage 2` alone is the same
    gen = torch.Generator(device=device).manual_seed(cfg.seed + system.rank)  # batches and sampled captions
    data = together(ddp, load_data, cfg, stage)
    model, reference, tok, start = together(ddp, build_models, cfg, stage, data, system)
    model.to(device)
    reward_clip = CLIPEncoder(data.reward_clip["name"], data.reward_clip["weights"], device=device)
    optimizer = make_optimizer(model, stage.lr, cfg.weight_decay)
    # what every checkpoint of the stage records besides its state; reference: the KL's, by its weights
    info = dict(config=asdict(cfg), clip=data.clip, reward_clip=data.reward_clip, tokenizer=tok.describe(),
                stage=stage.n, init_from=os.path.abspath(start) if start else "", split=data.split, pools=data.pools,
                reference=state_digest(reference) if reference is not None else "")
    step, best = together(ddp, resume_from, cfg, stage, info, model, optimizer, gen, system)
    forward = torch.compile(model) if cfg.compile else model
    forward = DDP(forward, device_ids=[device.index] if device.type == "cuda" else None) if ddp else forward
    if system.master:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        where = f" (train split + {len(data.pools)} pool(s))" if data.pools else ""
        print(f"stage {stage.n}: {n_train / 1e6:.2f}M trainable of {n_all / 1e6:.2f}M parameters; {len(data.train)} "
              f"{'labeled' if stage.labeled else 'unlabeled'} images{where}; device {device}, {system.dtype}")
    return Run(data, model, forward, reference, tok, reward_clip, optimizer, gen, info, step, best)


def train_stage(cfg, stage, system):
    """One stage: start it, then loop: evaluate and checkpoint, take a step, log."""
    run = start_stage(cfg, stage, system)
    run.model.train()
    step, t0 = run.first_step, time.time()
    while True:
        if step == run.first_step or step % cfg.eval_interval == 0 or step == stage.iters:  # and the end
            rngs = rng_states(system, run.gen)  # every rank's streams, so that a resume gives each its own back
            # rank 0's work, under together: if it fails, every rank stops with its one line
            run.best = together(system.ddp, evaluate_and_save, cfg, stage, run, step, rngs, system)
        if step == stage.iters:
            break
        lr = lr_at(step, stage.iters, stage.lr, stage.warmup)
        stats = optimizer_step(cfg, stage, run, step, lr, system)
        step += 1
        if system.master and (step % cfg.log_interval == 0 or step == 1):
            elapsed = time.time() - t0
            print(f"step {step}/{stage.iters} | " + " | ".join(f"{k} {v:.4f}" for k, v in stats.items())
                  + f" | {elapsed:.0f}s")
            log_jsonl(cfg.out_dir, dict(stage=stage.n, iter=step, lr=lr, time=elapsed, **stats))
    together(system.ddp, finish_stage, cfg, stage, run.best, system)


def optimizer_step(cfg, stage, run, step, lr, system):
    """One AdamW step at learning rate lr over --grad_accum micro-batches; the last one's stats."""
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    for micro in range(cfg.grad_accum):
        last = micro == cfg.grad_accum - 1
        with run.forward.no_sync() if system.ddp and not last else nullcontext():  # DDP syncs on the last
            # under DDP, a NaN or an error on any rank stops every rank (together)
            loss, stats = together(system.ddp, finite_loss, cfg, stage, run, step, system)
            (loss / cfg.grad_accum).backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in run.model.parameters() if p.requires_grad], cfg.grad_clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return stats


def finite_loss(cfg, stage, run, step, system):
    """One micro-batch of the stage's objective, (loss, stats); one line if the loss is not finite."""
    features, scored_by = run.data.train.batch(stage.batch_size, run.gen, system.device)  # captions, or reward feats
    loss, stats = stage.objective(cfg, run, features, scored_by, system.autocast())
    if not torch.isfinite(loss):
        raise not_finite(cfg, stage, "loss", loss.item(), step)
    return loss, stats

# -----------------------------------------------------------------------------
# evaluation and checkpoints (which file, and resuming from it: nanocap/tools/training.py)


@torch.no_grad()
def evaluate(cfg, stage, run, system):
    """Greedy captions of 8 fixed val images, and the stage's val figure on 256 of them."""
    run.model.eval()
    val, device = run.data.val, system.device
    fixed = greedy(run.model.gpt, run.model.prefix(val.features[:8].to(device)), cfg.max_new_tokens, run.tok.eos_id)
    captions = [run.tok.decode(t) for t in fixed.tokens.tolist()]
    result = stage.validate(cfg, run, val.features[: 8 * 32].to(device), system)
    run.model.train()
    return result, captions


def val_loss(cfg, run, features, system):
    """Stage 1's val figure: the cross-entropy of each image's first caption."""
    captions = [c[0] for c in run.data.val.captions[: len(features)]]
    idx, tgt = caption_batch(run.tok, captions, cfg.max_caption_tokens, system.device)
    with system.autocast():
        logits = run.model(features, idx)
    return {"val_loss": losses.caption_loss(logits, tgt, run.model.prefix_len).item()}


def val_reward(cfg, run, features, system):
    """Stage 2's val figure: the CLIP-S of the greedy captions."""
    g = greedy(run.model.gpt, run.model.prefix(features), cfg.max_new_tokens, run.tok.eos_id)
    texts = [run.tok.decode(t) for t in g.tokens.tolist()]
    reward_features = run.data.val.reward_features[: len(features)].to(system.device)
    reward = losses.clip_reward(run.reward_clip, reward_features, texts, cfg.clip_s_scale, cfg.clip_prompt)
    return {"val_reward": reward.mean().item()}


def evaluate_and_save(cfg, stage, run, step, rngs, system):
    """Rank 0 validates, then checkpoints the last state (with --keep_best, stage 1 also keeps it in
    stage1.pt while its val loss is the lowest so far); other ranks do nothing. Step 0, the initial
    state, is saved only when the stage has no steps. Returns the best {"val_loss", "step"} so far."""
    best = run.best
    if not system.master:
        return best
    path, last_path = checkpoint_files(cfg, stage)
    result, captions = evaluate(cfg, stage, run, system)
    print(f"stage {stage.n} step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    print("\n".join(f"  val[{i}] {c}" for i, c in enumerate(captions)))
    log_jsonl(cfg.out_dir, dict(stage=stage.n, iter=step, **result, captions=captions))
    for k, v in result.items():
        if not math.isfinite(v):  # a NaN is never "the lowest so far": stop before it overwrites a good state
            raise not_finite(cfg, stage, k, v, step)
    if step == 0 and stage.iters > 0:
        return best
    improved = stage.tracks_best and result["val_loss"] < best["val_loss"]
    if improved:
        best = {"val_loss": result["val_loss"], "step": step}
    # A new best goes to stage1.pt first, then is copied to the last state: a kill between the two leaves
    # stage1.pt the later file, and --resume continues from it (last_state_file takes the later step). The
    # other order could leave a last state naming a best that stage1.pt never received.
    first = path if improved else last_path
    save_checkpoint(first, run.model, **run.info, step=step, optimizer=run.optimizer.state_dict(), best=best, **rngs)
    if first != last_path:
        atomic_write(last_path, lambda tmp: shutil.copyfile(first, tmp))
    if last_path != path and improved:
        print(f"val_loss {best['val_loss']:.4f} is the lowest so far: {path} is step {step}")
    elif last_path != path:
        print(f"val_loss did not improve on {best['val_loss']:.4f} (step {best['step']}): {path} kept")
    return best


# -----------------------------------------------------------------------------


def main(cfg):
    check_config(cfg)  # a flag value that cannot work is one line, before any work starts
    system = setup_system(cfg.device, cfg.dtype)
    if system.master:
        print_config(cfg)
        os.makedirs(cfg.out_dir, exist_ok=True)
    for stage in stages(cfg):
        train_stage(cfg, stage, system)
        if system.ddp:  # rank 0 writes the final checkpoint last: stage 2 must not read it before,
            dist.barrier()  # and no rank may tear gloo/nccl down while another still talks to it
    if system.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_config(Config, renamed=RENAMED))
