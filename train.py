"""
Train the captioner of Jin, "Semi-Supervised Image Captioning with CLIP" (arXiv 2306.15111).

Stage 1, few labels (--labeled_fraction of the train images, each with all its captions):
    loss = CE(caption | prefix) + λ · REINFORCE(contrastive reward)
  For each image, K captions are sampled and embedded with the CLIP text encoder; the reward is
  the InfoNCE log-probability that a caption matches its own ground truth against the other
  ground truths of the batch. λ = 0 (--contrastive_weight 0) is plain ClipCap.
Stage 2, unlabeled images (their captions are never read), starting from the stage-1 checkpoint:
    loss = REINFORCE(CLIP-S) + β · KL(π ‖ π_stage1)
  K samples per image, reward CLIP-S = w·max(cos(image, "a photo depicts " + caption), 0) from
  the reward CLIP, baseline greedy (self-critical) or the leave-one-out mean of the K samples.

    python train.py --stage 1
    python train.py --stage 2                  # from out_dir/stage1.pt
    python train.py --stage 1 --config configs/coco_mlp.json    # COCO: ClipCap's MLP recipe, 2% of labels
    torchrun --nproc_per_node 2 train.py --stage 1    # DDP (gloo on CPU, nccl on CUDA)
"""

import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanocap import data, losses
from nanocap.captioner import Captioner, load_captioner, read_checkpoint, save_checkpoint
from nanocap.cli import parse_config, print_config
from nanocap.clip_encoder import CLIPEncoder
from nanocap.decode import greedy, sample, score, token_logprobs
from nanocap.gpt import GPT, GPTConfig
from nanocap.mapper import build_mapper
from nanocap.tokenizer import get_tokenizer
from nanocap.train_utils import (caption_batch, log_jsonl, lr_at, make_optimizer, pick_device,
                                 plot_log, repetition_rate)


@dataclass
class Config:
    """Train stage 1 (few labels) or stage 2 (CLIP reward on unlabeled images)."""
    stage: int = field(default=1, metadata={"help": "1: labeled fraction, CE + λ·contrastive; 2: unlabeled, CLIP-S REINFORCE"})
    data_dir: str = field(default="data/shapes", metadata={"help": "a dataset made by data_prep.py"})
    out_dir: str = field(default="out/shapes", metadata={"help": "checkpoints stage1.pt / stage2.pt, log.jsonl, plots"})
    init_from: str = field(default="", metadata={"help": "stage 2: the stage-1 checkpoint (default out_dir/stage1.pt)"})
    resume: bool = field(default=False, metadata={"help": "continue this stage from out_dir/stage<N>.pt"})
    seed: int = field(default=1337, metadata={"help": "labeled split, batches and sampling"})
    # model (stage 1; stage 2 takes its model from the stage-1 checkpoint)
    clip: str = field(default="", metadata={"help": "'' = the dataset's CLIP; if given, it must be the CLIP the features come from"})
    clip_weights: str = field(default="", metadata={"help": "'' = the dataset's CLIP weights (tag or file); checked like --clip"})
    gpt: str = field(default="", metadata={"help": "'' = the dataset's GPT, a GPT-2 name or HF folder, or 'none' (from scratch)"})
    gpt_n_layer: int = field(default=4, metadata={"help": "--gpt none: layers"})
    gpt_n_embd: int = field(default=128, metadata={"help": "--gpt none: width"})
    mapper: str = field(default="mlp", metadata={"help": "mlp (ClipCap, GPT fine-tuned) or transformer (GPT frozen)"})
    prefix_len: int = field(default=10, metadata={"help": "prefix embeddings made from one image"})
    mapper_layers: int = field(default=8, metadata={"help": "transformer mapper: layers"})
    finetune_gpt: bool = field(default=True, metadata={"help": "train GPT too (ClipCap MLP recipe), or freeze it"})
    # data
    labeled_fraction: float = field(default=0.02, metadata={"help": "share of the captioned train images whose captions stage 1 uses"})
    max_caption_tokens: int = field(default=48, metadata={"help": "longer captions are cut"})
    # stage 1 optimization
    batch_size: int = field(default=32, metadata={"help": "images per step and process (stage 1)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per step (for small GPUs)"})
    max_iters: int = field(default=600, metadata={"help": "stage 1 steps"})
    lr: float = field(default=1e-3, metadata={"help": "stage 1 peak learning rate"})
    warmup_iters: int = field(default=100, metadata={"help": "linear warmup, then cosine to lr/10"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW, on matrices only"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm (0: off)"})
    contrastive_weight: float = field(default=0.01, metadata={"help": "λ of the contrastive term (0: ClipCap)"})
    contrastive_temperature: float = field(default=0.0, metadata={"help": "τ of the contrastive reward (0: the CLIP's own)"})
    contrastive_samples: int = field(default=2, metadata={"help": "captions sampled per image for the contrastive term"})
    # REINFORCE (the contrastive term of stage 1, and stage 2)
    samples_per_image: int = field(default=5, metadata={"help": "stage 2: K sampled captions per image"})
    baseline: str = field(default="mean", metadata={"help": "mean (leave-one-out over K) or greedy (self-critical)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the policy"})
    max_new_tokens: int = field(default=40, metadata={"help": "longest sampled caption"})
    # stage 2
    stage2_iters: int = field(default=300, metadata={"help": "stage 2 steps"})
    stage2_batch_size: int = field(default=16, metadata={"help": "unlabeled images per step and process"})
    stage2_lr: float = field(default=1e-4, metadata={"help": "stage 2 peak learning rate"})
    reward_weight: float = field(default=2.5, metadata={"help": "w in CLIP-S = w·max(cos, 0)"})
    kl_weight: float = field(default=0.1, metadata={"help": "β of the per-token KL to the stage-1 policy"})
    clip_prompt: str = field(default="a photo depicts", metadata={"help": "text put before a caption for CLIP-S"})
    # watching
    eval_interval: int = field(default=200, metadata={"help": "validate, print 8 val captions, checkpoint"})
    log_interval: int = field(default=20, metadata={"help": "log training figures"})
    # system
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, mps"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on CUDA, else float32), float32, bfloat16"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})


def main(cfg):
    # ---- processes and devices: one process, or DDP under torchrun --------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)) if ddp else None)
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    torch.manual_seed(cfg.seed + rank)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + rank)  # batches and sampled captions
    if master:
        print_config(cfg)
        os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, f"stage{cfg.stage}.pt")

    # ---- data: the labeled fraction for stage 1, the rest (features only) for stage 2 -------
    if not os.path.isfile(os.path.join(cfg.data_dir, "meta.json")):
        raise SystemExit(f"error: no dataset in {cfg.data_dir} (no meta.json); make one with data_prep.py first")
    meta = data.read_json(os.path.join(cfg.data_dir, "meta.json"))
    in_data = lambda p: data.in_data_dir(cfg.data_dir, p)
    clip_info = {"name": in_data(meta["clip"]), "weights": in_data(meta["clip_weights"]),
                 "normalized": meta["features_normalized"]}
    check_clip(cfg, clip_info)
    train_feats = data.load_features(os.path.join(cfg.data_dir, "train", "features.safetensors"))
    # own folders: captioned train images come first, the uncaptioned ones are always unlabeled
    labeled_idx, unlabeled_idx = data.labeled_split(len(train_feats), cfg.labeled_fraction, cfg.seed,
                                                    meta.get("train_captioned"))
    if not (labeled_idx if cfg.stage == 1 else unlabeled_idx):
        raise SystemExit(f"error: stage {cfg.stage} needs {'captioned' if cfg.stage == 1 else 'unlabeled'} train images "
                         f"and {cfg.data_dir} leaves none at --labeled_fraction {cfg.labeled_fraction}")
    if cfg.stage == 1:
        records = data.read_jsonl(os.path.join(cfg.data_dir, "train", "captions.jsonl"))
        labeled = data.Captioned(train_feats[labeled_idx], [records[i]["captions"] for i in labeled_idx])
        if not all(labeled.captions):
            raise SystemExit(f"error: {cfg.data_dir}/train has uncaptioned images before meta.json's train_captioned; "
                             f"re-run data_prep.py")
        del records  # only the labeled captions are kept
    else:
        pool = data.Unlabeled(train_feats[unlabeled_idx])  # features only: captions are unreachable
    val_records = data.read_jsonl(os.path.join(cfg.data_dir, "val", "captions.jsonl"))
    val = data.Captioned(data.load_features(os.path.join(cfg.data_dir, "val", "features.safetensors")),
                         [r["captions"] for r in val_records])

    # ---- model: new (stage 1), from a checkpoint (stage 2), or resumed --------------------------
    try:
        resume = read_checkpoint(ckpt_path) if cfg.resume else None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if cfg.stage == 1:
        gpt_spec = cfg.gpt or in_data(meta["gpt"])
        if gpt_spec == "none":
            gpt = GPT(GPTConfig(block_size=256, n_layer=cfg.gpt_n_layer, n_head=4, n_embd=cfg.gpt_n_embd))
            vocab = None
        else:
            gpt = GPT.from_pretrained(gpt_spec)
            vocab_file = os.path.join(gpt_spec, "nanocap_vocab.json")
            vocab = data.read_json(vocab_file) if os.path.isfile(vocab_file) else None
        extra = {"n_layer": cfg.mapper_layers} if cfg.mapper == "transformer" else {}
        mapper = build_mapper(cfg.mapper, train_feats.size(1), cfg.prefix_len, gpt.config.n_embd, **extra)
        model = Captioner(mapper, gpt)
        tok = get_tokenizer("gpt2", vocab)
        start = None
    else:
        start = cfg.init_from or os.path.join(cfg.out_dir, "stage1.pt")
        try:
            model, start_ckpt = load_captioner(start)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}")
        check_checkpoint(cfg, start, start_ckpt, clip_info)
        tok = get_tokenizer(**start_ckpt["tokenizer"])
        reference = Captioner.from_args(start_ckpt["model_args"])  # the frozen stage-1 policy, for the KL
        reference.load_state_dict(start_ckpt["model"])
        reference.to(device).eval().requires_grad_(False)
    if resume is not None:
        check_checkpoint(cfg, ckpt_path, resume, clip_info, model)
        model.load_state_dict(resume["model"], strict=True)
    # stage 2 trains GPT exactly when stage 1 did: it continues the same policy
    model.gpt.requires_grad_(cfg.finetune_gpt if cfg.stage == 1 else start_ckpt["config"]["finetune_gpt"])
    model.to(device)
    clip = CLIPEncoder(clip_info["name"], clip_info["weights"], device=device)
    tau = cfg.contrastive_temperature or 1.0 / clip.logit_scale
    iters = cfg.max_iters if cfg.stage == 1 else cfg.stage2_iters
    peak_lr = cfg.lr if cfg.stage == 1 else cfg.stage2_lr
    optimizer = make_optimizer(model, peak_lr, cfg.weight_decay)
    step = 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        step = resume["step"]
        gen.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        if master:
            print(f"resuming stage {cfg.stage} from step {step}")
    train_model = torch.compile(model) if cfg.compile else model
    train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else train_model
    if master:
        print(f"captioner: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable "
              f"of {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M; {len(labeled) if cfg.stage == 1 else len(pool)} "
              f"{'labeled' if cfg.stage == 1 else 'unlabeled'} images; device {device}, {dtype}")

    def clip_s(feats, token_rows):  # CLIP-S of captions (N,) for image features (N, D)
        texts = [f"{cfg.clip_prompt} {tok.decode(t)}".strip() for t in token_rows.tolist()]
        return losses.clip_s(feats.to(device), clip.encode_text(texts), w=cfg.reward_weight)

    def checkpoint():
        save_checkpoint(ckpt_path, model, config=asdict(cfg), clip=clip_info, tokenizer=tok.describe(),
                        stage=cfg.stage, step=step, optimizer=optimizer.state_dict(), generator=gen.get_state(),
                        torch_rng=torch.get_rng_state(), init_from=start or "")

    @torch.no_grad()
    def evaluate():
        model.eval()
        fixed = greedy(model.gpt, model.prefix(val.features[:8].to(device)), cfg.max_new_tokens, tok.eos_id)
        captions = [tok.decode(t) for t in fixed.tokens.tolist()]
        feats = val.features[: 8 * 32].to(device)
        if cfg.stage == 1:  # validation cross-entropy on the first caption of each image
            idx, tgt = caption_batch(tok, [c[0] for c in val.captions[: len(feats)]], cfg.max_caption_tokens, device)
            with autocast:
                result = {"val_loss": losses.caption_loss(model(feats, idx), tgt, model.prefix_len).item()}
        else:  # validation reward: CLIP-S of the greedy captions
            g = greedy(model.gpt, model.prefix(feats), cfg.max_new_tokens, tok.eos_id)
            result = {"val_reward": clip_s(feats, g.tokens).mean().item()}
        model.train()
        return result, captions

    # ---- the training loop ----------------------------------------------------------------------
    model.train()
    t0 = time.time()
    while True:
        if step % cfg.eval_interval == 0 or step == iters:
            if master:
                result, captions = evaluate()
                print(f"stage {cfg.stage} step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
                for i, c in enumerate(captions):
                    print(f"  val[{i}] {c}")
                log_jsonl(cfg.out_dir, dict(stage=cfg.stage, iter=step, **result, captions=captions))
                if step > 0:
                    checkpoint()
        if step == iters:
            break
        lr = lr_at(step, iters, peak_lr, cfg.warmup_iters if cfg.stage == 1 else 0)
        for g in optimizer.param_groups:
            g["lr"] = lr
        stats = {}
        for micro in range(cfg.grad_accum):
            sync = ddp and micro < cfg.grad_accum - 1
            with train_model.no_sync() if sync else nullcontext():
                if cfg.stage == 1:
                    loss, stats = stage1_loss(cfg, train_model, model, labeled, tok, clip, tau, gen, device, autocast)
                else:
                    loss, stats = stage2_loss(cfg, train_model, model, reference, pool, tok, clip_s, gen, device, autocast)
                if not torch.isfinite(loss):
                    raise SystemExit(f"error: the loss became {loss.item()} at step {step}; the last good checkpoint "
                                     f"is {ckpt_path}. Lower --lr or --stage2_lr and resume with --resume")
                (loss / cfg.grad_accum).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if master and (step % cfg.log_interval == 0 or step == 1):
            elapsed = time.time() - t0
            print(f"step {step}/{iters} | " + " | ".join(f"{k} {v:.4f}" for k, v in stats.items()) + f" | {elapsed:.0f}s")
            log_jsonl(cfg.out_dir, dict(stage=cfg.stage, iter=step, lr=lr, time=elapsed, **stats))
    if master:
        plot_log(cfg.out_dir, cfg.stage)
        print(f"saved {ckpt_path} and {os.path.join(cfg.out_dir, f'stage{cfg.stage}.png')}")
    if ddp:
        dist.barrier()  # no rank tears gloo/nccl down while another still talks to it
        dist.destroy_process_group()


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


def check_clip(cfg, clip_info):
    """--clip / --clip_weights, when given, must name the CLIP that made the dataset's features."""
    if ((cfg.clip and not _same(cfg.clip, clip_info["name"]))
            or (cfg.clip_weights and not _same(cfg.clip_weights, clip_info["weights"]))):
        raise SystemExit(f"error: the features in {cfg.data_dir} come from CLIP {clip_info['name']} ({clip_info['weights']}), "
                         f"not {cfg.clip or clip_info['name']} ({cfg.clip_weights or clip_info['weights']}); the captioner must "
                         f"be trained on its own CLIP's features: run `python data_prep.py --clip {cfg.clip or clip_info['name']} "
                         f"--clip_weights {cfg.clip_weights or clip_info['weights']} --data_dir NEW_DIR ...` and train with --data_dir NEW_DIR")


def stage1_loss(cfg, train_model, model, labeled, tok, clip, tau, gen, device, autocast):
    """CE on one caption of each of B distinct labeled images, + λ · contrastive REINFORCE."""
    B = min(cfg.batch_size, len(labeled))
    pick = torch.randperm(len(labeled), generator=gen, device=device)[:B].cpu()
    feats = labeled.features[pick].to(device)  # (B, D)
    refs = [labeled.captions[i][int(torch.randint(len(labeled.captions[i]), (1,), generator=gen, device=device))]
            for i in pick.tolist()]
    idx, tgt = caption_batch(tok, refs, cfg.max_caption_tokens, device)  # (B, T) inputs, -100-padded targets
    if cfg.contrastive_weight == 0:
        with autocast:
            ce = losses.caption_loss(train_model(feats, idx), tgt, model.prefix_len)
        return ce, {"loss": ce.item(), "ce": ce.item()}
    K = cfg.contrastive_samples
    with torch.no_grad():  # sample K captions per image from the current policy
        prefix = model.prefix(feats).repeat_interleave(K, dim=0)
        g = sample(model.gpt, prefix, cfg.max_new_tokens, tok.eos_id, temperature=cfg.temperature, generator=gen)
        gen_emb = clip.encode_text([tok.decode(t) for t in g.tokens.tolist()])  # (B*K, E)
        gt_emb = clip.encode_text(refs)  # (B, E)
        # reward: log-prob that a sample matches its own ground truth among the batch's ground truths
        reward = losses.contrastive_reward(gen_emb, gt_emb, tau, k=K)  # (B*K,)
        greedy_r = None
        if cfg.baseline == "greedy":
            gg = greedy(model.gpt, model.prefix(feats), cfg.max_new_tokens, tok.eos_id)
            greedy_r = losses.contrastive_reward(clip.encode_text([tok.decode(t) for t in gg.tokens.tolist()]), gt_emb, tau)
        base = losses.baseline(reward, K, cfg.baseline, greedy_r)
    # one forward through the (DDP) model for both terms: ground truths, then samples
    T = max(idx.size(1), g.tokens.size(1))
    pad = lambda x, v: torch.nn.functional.pad(x, (0, T - x.size(1)), value=v)
    all_idx = torch.cat([pad(idx, tok.eos_id), pad(g.tokens, tok.eos_id)])
    with autocast:
        logits_all = train_model(torch.cat([feats, feats.repeat_interleave(K, dim=0)]), all_idx)
    P = model.prefix_len
    ce = losses.caption_loss(logits_all[:B], pad(tgt, -100), P)
    sample_logits = logits_all[B:, P - 1 : P - 1 + g.tokens.size(1)]  # (B*K, Tg, V)
    logprobs = token_logprobs(sample_logits, g.tokens)
    rl = losses.reinforce_loss(logprobs, g.mask, reward, base)
    loss = ce + cfg.contrastive_weight * rl
    return loss, {"loss": loss.item(), "ce": ce.item(), "contrastive_reward": reward.mean().item(),
                  "gen_len": g.lengths().float().mean().item()}


def stage2_loss(cfg, train_model, model, reference, pool, tok, clip_s, gen, device, autocast):
    """REINFORCE with the CLIP-S reward on K samples per unlabeled image, + β · KL to stage 1."""
    B, K = min(cfg.stage2_batch_size, len(pool)), cfg.samples_per_image
    pick = torch.randperm(len(pool), generator=gen, device=device)[:B].cpu()
    feats = pool.features[pick].to(device)  # (B, D) features only: the pool has no captions
    with torch.no_grad():
        prefix = model.prefix(feats).repeat_interleave(K, dim=0)  # (B*K, P, C)
        g = sample(model.gpt, prefix, cfg.max_new_tokens, tok.eos_id, temperature=cfg.temperature, generator=gen)
        feats_k = feats.repeat_interleave(K, dim=0)
        reward = clip_s(feats_k, g.tokens)  # (B*K,)
        greedy_r = None
        if cfg.baseline == "greedy":
            greedy_r = clip_s(feats, greedy(model.gpt, model.prefix(feats), cfg.max_new_tokens, tok.eos_id).tokens)
        base = losses.baseline(reward, K, cfg.baseline, greedy_r)
        ref_logits = score(reference.gpt, reference.prefix(feats_k), g.tokens)[1]
    with autocast:
        logits = train_model(feats_k, g.tokens[:, :-1])[:, model.prefix_len - 1 :]  # (B*K, T, V)
    logprobs = token_logprobs(logits, g.tokens)
    rl = losses.reinforce_loss(logprobs, g.mask, reward, base)
    kl = losses.kl_penalty(logits, ref_logits, g.mask)
    loss = rl + cfg.kl_weight * kl
    return loss, {"loss": loss.item(), "reward": reward.mean().item(), "reward_std": reward.std().item(),
                  "baseline": base.mean().item(), "kl": kl.item(), "gen_len": g.lengths().float().mean().item(),
                  "repetition": repetition_rate([tok.decode(t) for t in g.tokens.tolist()])}


if __name__ == "__main__":
    main(parse_config(Config))
