"""
The method: both training objectives of Jin 2023, "Semi-Supervised Image Captioning with CLIP"
(arXiv 2306.15111), and the pieces they are made of.

Both objectives share one scaffold (rollout): sample K captions per image from the policy π at
temperature T, score each with a reward r, and take a baseline b, the leave-one-out mean of the
image's other samples (Luo 2020, arXiv 2003.09971) or its greedy caption's reward (self-critical,
Rennie et al. 2017, arXiv 1612.00563). Sampling is not differentiable, so a reward is optimized
with REINFORCE: the gradient of -(r - b) · log π(caption).

Stage 1, few labeled images (stage1_loss):
    L = CE(caption | prefix) + λ · REINFORCE(r),   r = the contrastive reward
    the InfoNCE log-probability, at InfoNCE temperature τ, that a sample matches its own ground truth
    among the batch's ground truths, both embedded by CLIP's text tower (contrastive_reward).
    λ = 0 is plain ClipCap.
Stage 2, unlabeled images (stage2_loss):
    L = REINFORCE(r) + β · KL(π ‖ π_ref),   r = CLIP-S = w · max(cos(image, caption), 0)
    as in Cho et al. 2022 ("Fine-grained Image Captioning with CLIP Reward", arXiv 2205.13115):
    CLIP-S is Hessel et al. 2021 (arXiv 2104.08718), and the per-token KL to π_ref, the frozen
    stage-1 policy, keeps the captions fluent.
Stage 2's baseline, self-training (self_training_loss, --stage2_objective self_training):
    L = CE(kept captions | prefix): π_ref samples K captions per image, CLIP-S keeps the best share
    (--keep_fraction), and the policy learns them as if they were labels. Not in the paper.

Symbols and flags (train.py): K --stage1_samples / --stage2_samples, T --temperature,
λ --contrastive_weight, τ --contrastive_tau, w --clip_s_scale, β --kl_weight.
All embeddings are L2-normalized (CLIPEncoder returns them so).
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanocap.decode import Generation, greedy, sample, token_logprobs
from nanocap.tokenizer import caption_batch

# -----------------------------------------------------------------------------
# CLIP-S: the reward of stage 2, and a metric

CLIP_PROMPT = "a photo depicts"  # Hessel et al.'s "A photo depicts"; CLIP's tokenizer lowercases


def prompted(captions, prompt=CLIP_PROMPT):
    """The texts CLIP-S embeds: prompt + " " + caption. The one place a prompt meets a caption."""
    return [f"{prompt} {c}".strip() for c in captions]


@torch.no_grad()
def embed_captions(clip, captions, prompt=CLIP_PROMPT, batch=256):
    """CLIP text embeddings (N, E), unit norm, of N prompted captions, `batch` texts at a time."""
    texts = prompted(captions, prompt)
    return torch.cat([clip.encode_text(texts[i:i + batch]) for i in range(0, len(texts), batch)])


@torch.no_grad()
def clip_s(image_emb, text_emb, w=2.5):
    """
    CLIP-S (Hessel et al. 2021) for paired normalized embeddings (N, D):
        CLIP-S_i = w * max(cos(image_i, text_i), 0)
    Returns (N,), detached.
    """
    cos = (image_emb * text_emb).sum(dim=-1)  # (N,)
    return w * cos.clamp(min=0)


@torch.no_grad()
def clip_reward(clip, image_emb, captions, w=2.5, prompt=CLIP_PROMPT):
    """CLIP-S of N captions for their images' CLIP embeddings (N, E) -> (N,)."""
    return clip_s(image_emb, embed_captions(clip, captions, prompt).to(image_emb.device), w)


def repetition_rate(captions):
    """Share of captions with a word repeated back to back ("a red red circle"): the usual
    symptom of a policy that games a CLIP reward (Cho et al. 2022)."""
    repeats = [any(a == b for a, b in zip(w, w[1:])) for w in (c.split() for c in captions)]
    return sum(repeats) / max(1, len(captions))

# -----------------------------------------------------------------------------
# supervised


def caption_loss(logits, tokens, prefix_len):
    """
    Teacher-forced cross-entropy of the caption given the prefix.

    logits: (B, P+T, V) GPT output over [prefix embeddings ; caption token embeddings]
    tokens: (B, T) caption token ids, -100 at padding
    Position P-1+t predicts token t, so
        loss = mean over real tokens of  -log softmax(logits[:, P-1+t])[tokens[:, t]]
    Prefix outputs and padding are ignored; token id 0 is an ordinary target. Computed in
    float32 whatever the logits' dtype (bf16 under autocast), so precision never depends on
    the caller.
    """
    P, T = prefix_len, tokens.shape[1]
    pred = logits[:, P - 1:P + T - 1].float()  # (B, T, V)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), tokens.reshape(-1), ignore_index=-100)

# -----------------------------------------------------------------------------
# contrastive


def info_nce(a, b, logit_scale, b_negatives=None):
    """
    Symmetric InfoNCE, CLIP's own loss, over paired normalized embeddings a, b: (N, D).
    Used to pretrain the shapes world's toy CLIPs (data/pretrain.py), not by the captioner.

        logits = logit_scale * a @ b^T                  (N, N)
        loss = 1/2 [ CE(logits, arange(N)) + CE(logits^T, arange(N)) ]
    logit_scale = 1 / τ (float or tensor). b_negatives (M, D), NegCLIP's hard negatives
    (Yuksekgonul et al., ICLR 2023): extra texts that join the text side of the a -> b term only,
    so each image must rank its caption above them too; they have no image of their own.
    """
    logits = logit_scale * a @ b.T  # (N, N)
    labels = torch.arange(a.shape[0], device=a.device)
    a_to_b = logits if b_negatives is None else torch.cat([logits, logit_scale * a @ b_negatives.T], dim=1)  # (N, N+M)
    return 0.5 * (F.cross_entropy(a_to_b, labels) + F.cross_entropy(logits.T, labels))


@torch.no_grad()
def contrastive_reward(gen_emb, gt_emb, tau, k=1):
    """
    Stage-1 sequence reward: InfoNCE log-prob of generated caption i matching its own
    ground truth against the other ground truths in the batch.

        r_i = log softmax_j( gen_i . gt_j / tau )[own(i)]      (always <= 0)
    gen_emb: (N*k, D), the k samples of each image contiguous; gt_emb: (N, D); both
    normalized; own(i) = i // k. Returns (N*k,), detached.
    """
    logits = gen_emb @ gt_emb.T / tau  # (N*k, N)
    own = torch.arange(gen_emb.shape[0], device=gen_emb.device) // k  # (N*k,)
    return F.log_softmax(logits, dim=1).gather(1, own[:, None]).squeeze(1)  # (N*k,)

# -----------------------------------------------------------------------------
# policy gradient


def reinforce_loss(logprobs, mask, reward, baseline):
    """
    REINFORCE with a baseline (Williams 1992; Rennie et al. 2017).

    logprobs: (N, T) log p of the sampled tokens (with grad)
    mask:     (N, T) true for real generated tokens up to and including EOS
    reward, baseline: (N,)
        loss = mean_i [ -(r_i - b_i) * sum_t mask_it * logprobs_it ]
    The advantage (r - b) is a constant: no gradient flows through it.
    """
    advantage = (reward - baseline).detach()  # (N,)
    # masked_fill (not multiply) so a -inf log-prob after EOS cannot make NaNs
    seq_logprob = logprobs.masked_fill(~mask.bool(), 0.0).sum(dim=1)  # (N,)
    return -(advantage * seq_logprob).mean()


def baseline(reward, k, kind, greedy_reward=None):
    """
    Baseline for K samples per image. reward: (B*K,), the K samples of each image
    contiguous (as produced by prefix.repeat_interleave(K, dim=0)).

    kind "mean":   leave-one-out mean,  b_i = (sum_{j in group(i)} r_j - r_i) / (K - 1)
    kind "greedy": self-critical,       b_i = greedy_reward[group(i)], greedy_reward: (B,)
    Returns (B*K,).
    """
    if kind == "mean":
        if k < 2:
            raise ValueError(f"the leave-one-out 'mean' baseline needs k >= 2 samples per image, got k={k}")
        r = reward.view(-1, k)  # (B, K)
        b = (r.sum(dim=1, keepdim=True) - r) / (k - 1)  # (B, K)
        return b.reshape(-1)  # (B*K,)
    if kind == "greedy":
        if greedy_reward is None:
            raise ValueError("the 'greedy' baseline needs greedy_reward, shape (B,)")
        if greedy_reward.shape[0] * k != reward.shape[0]:
            raise ValueError(f"greedy_reward has {greedy_reward.shape[0]} rows, expected {reward.shape[0] // k}")
        return greedy_reward.repeat_interleave(k)  # (B*K,)
    raise ValueError(f"unknown baseline kind {kind!r}; valid kinds are 'mean' and 'greedy'")


def kl_penalty(logits, ref_logits, mask):
    """
    Exact per-token KL(pi || pi_ref) between the policy and the frozen reference,
    averaged over real tokens:

        KL_t = sum_v p_t(v) (log p_t(v) - log q_t(v)),  p = softmax(logits), q = softmax(ref_logits)
        loss = sum_{n,t} mask_nt * KL_nt / sum_{n,t} mask_nt

    logits, ref_logits: (N, T, V) at the same positions; mask: (N, T).
    Gradient flows only through `logits`.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, T, V)
    logq = F.log_softmax(ref_logits.detach().float(), dim=-1)  # (N, T, V)
    kl = (logp.exp() * (logp - logq)).sum(dim=-1)  # (N, T)
    kl = kl.masked_fill(~mask.bool(), 0.0)
    return kl.sum() / mask.bool().sum().clamp(min=1)


def sampled_logprobs(logits, tokens, temperature):
    """Log-probs (N, T) of the sampled tokens under the distribution they were drawn from,
    softmax(logits / temperature): REINFORCE is on-policy only with these."""
    return token_logprobs(logits / temperature if temperature != 1 else logits, tokens)

# -----------------------------------------------------------------------------
# the scaffold both objectives share: K samples per image, their rewards, the baseline


@dataclass
class Rollout:
    """K captions sampled per image by the policy, and what REINFORCE needs of them."""
    out: Generation  # tokens (B*K, T) and mask (B*K, T); the K samples of each image contiguous
    texts: list  # the B*K captions as text
    reward: torch.Tensor  # (B*K,) r
    baseline: torch.Tensor  # (B*K,) b; None when the objective takes none (self-training)


@torch.no_grad()
def rollout(model, features, tok, reward_fn, *, k, baseline_kind="mean", temperature=1.0, max_new_tokens=40,
            generator=None):
    """
    Sample K captions per image from the policy, score them, and take the baseline:
        y_ik ~ π(· | image_i) at temperature T,   r_ik = reward_fn(y_ik),   b_ik (leave-one-out mean or greedy)
    features (B, D). reward_fn(texts, k) scores the captions of B images, k contiguous per image,
    -> (B*k,); the greedy baseline calls it with each image's greedy caption and k = 1;
    baseline_kind None takes no baseline.
    """
    prefix = model.prefix(features).repeat_interleave(k, dim=0)  # (B*K, P, C)
    out = sample(model.gpt, prefix, max_new_tokens, tok.eos_id, temperature=temperature, generator=generator)
    texts = [tok.decode(t) for t in out.tokens.tolist()]
    reward = reward_fn(texts, k)  # (B*K,)
    greedy_reward = None
    if baseline_kind == "greedy":  # self-critical: each image's greedy caption, scored the same way
        g = greedy(model.gpt, model.prefix(features), max_new_tokens, tok.eos_id)
        greedy_reward = reward_fn([tok.decode(t) for t in g.tokens.tolist()], 1)  # (B,)
    b = None if baseline_kind is None else baseline(reward, k, baseline_kind, greedy_reward)
    return Rollout(out, texts, reward, b)


def clip_s_rollout(model, features, clip, tok, *, k, w=2.5, prompt=CLIP_PROMPT, reward_features=None, **sampling):
    """rollout scored by CLIP-S, stage 2's reward: each image's K captions against the reward CLIP's
    embedding of that image, reward_features (B, D_r) (default: the features themselves, when the
    reward CLIP is the one that made them). sampling: rollout's baseline_kind, temperature,
    max_new_tokens, generator."""
    reward_features = features if reward_features is None else reward_features  # (B, D_r)
    return rollout(model, features, tok,
                   lambda texts, k: clip_reward(clip, reward_features.repeat_interleave(k, dim=0), texts, w, prompt),
                   k=k, **sampling)

# -----------------------------------------------------------------------------
# the two objectives
#
# `model` is the plain Captioner: sampling needs model.prefix and model.gpt, which a DDP or
# torch.compile wrapper does not expose. `forward` is the same model as it is trained (wrapped
# or not; default `model`): the one forward pass with gradients goes through it, so that DDP
# sees it and all-reduces the gradients. `autocast` wraps that forward (default: none).


def stage1_loss(model, features, captions, clip, tok, *, contrastive_weight, k=2, tau=None, baseline_kind="mean",
                temperature=1.0, max_new_tokens=40, max_caption_tokens=48, generator=None,
                forward=None, autocast=None):
    """
    Stage 1 on B labeled images, one reference caption each:
        L = CE(caption | prefix) + λ · REINFORCE(r),   r_ik = contrastive_reward(y_ik, captions; τ)
    features (B, D) CLIP image features; captions: B strings; contrastive_weight: λ; k: K samples
    per image; tau: τ (None: CLIP's own, 1 / logit_scale); temperature: the sampling T. Returns
    (loss, stats).
    """
    forward = model if forward is None else forward  # not `forward or model`: a compiled module has no truth value
    autocast = nullcontext() if autocast is None else autocast
    idx, tgt = caption_batch(tok, captions, max_caption_tokens, features.device)  # (B, T), -100-padded
    if contrastive_weight == 0:
        with autocast:
            logits = forward(features, idx)  # (B, P+T, V)
        ce = caption_loss(logits, tgt, model.prefix_len)
        return ce, {"loss": ce.item(), "ce": ce.item()}
    tau = tau or 1.0 / clip.logit_scale
    gt_emb = clip.encode_text(captions)  # (B, E), no grad
    r = rollout(model, features, tok, lambda texts, k: contrastive_reward(clip.encode_text(texts), gt_emb, tau, k),
                k=k, baseline_kind=baseline_kind, temperature=temperature, max_new_tokens=max_new_tokens,
                generator=generator)
    # one forward for both terms (DDP allows one per backward): ground truths, then samples
    B, P, T = len(captions), model.prefix_len, max(idx.size(1), r.out.tokens.size(1))
    pad = lambda x, v: F.pad(x, (0, T - x.size(1)), value=v)
    with autocast:
        logits = forward(torch.cat([features, features.repeat_interleave(k, dim=0)]),
                         torch.cat([pad(idx, tok.eos_id), pad(r.out.tokens, tok.eos_id)]))  # (B + B*K, P+T, V)
    ce = caption_loss(logits[:B], pad(tgt, -100), P)
    logprobs = sampled_logprobs(logits[B:, P - 1:P - 1 + r.out.tokens.size(1)], r.out.tokens, temperature)  # (B*K, Tg)
    rl = reinforce_loss(logprobs, r.out.mask, r.reward, r.baseline)
    loss = ce + contrastive_weight * rl
    return loss, {"loss": loss.item(), "ce": ce.item(), "contrastive_reward": r.reward.mean().item(),
                  "contrastive_rl": rl.item(), "gen_len": r.out.lengths().float().mean().item()}


def stage2_loss(model, reference, features, clip, tok, *, k=5, w=2.5, kl_weight=0.1, baseline_kind="mean",
                prompt=CLIP_PROMPT, temperature=1.0, max_new_tokens=40, generator=None, forward=None,
                autocast=None, reward_features=None):
    """
    Stage 2 on B unlabeled images (features only, (B, D)):
        L = REINFORCE(r) + β · KL(π ‖ π_ref),   r_ik = CLIP-S(image_i, y_ik) = w · max(cos, 0)
    k: K samples per image; w: CLIP-S's scale; kl_weight: β; reference: π_ref, the frozen
    stage-1 Captioner. `clip` is the reward CLIP and reward_features (B, D_r) its embeddings of
    the same images; by default the reward CLIP is the one that made the features, and
    reward_features are the features. Returns (loss, stats).
    """
    forward = model if forward is None else forward  # not `forward or model`: a compiled module has no truth value
    autocast = nullcontext() if autocast is None else autocast
    r = clip_s_rollout(model, features, clip, tok, k=k, w=w, prompt=prompt, reward_features=reward_features,
                       baseline_kind=baseline_kind, temperature=temperature, max_new_tokens=max_new_tokens,
                       generator=generator)
    feats_k, P = features.repeat_interleave(k, dim=0), model.prefix_len  # (B*K, D)
    with torch.no_grad():
        ref_logits = reference(feats_k, r.out.tokens[:, :-1])[:, P - 1:]  # (B*K, T, V) π_ref, the stage-1 policy
    with autocast:
        logits = forward(feats_k, r.out.tokens[:, :-1])[:, P - 1:]  # (B*K, T, V)
    rl = reinforce_loss(sampled_logprobs(logits, r.out.tokens, temperature), r.out.mask, r.reward, r.baseline)
    kl = kl_penalty(logits, ref_logits, r.out.mask)  # of the policy itself, at temperature 1
    loss = rl + kl_weight * kl
    return loss, {"loss": loss.item(), "reward": r.reward.mean().item(), "reward_std": r.reward.std().item(),
                  "baseline": r.baseline.mean().item(), "kl": kl.item(),
                  "gen_len": r.out.lengths().float().mean().item(), "repetition": repetition_rate(r.texts)}


def self_training_loss(model, teacher, features, clip, tok, *, k=5, keep_fraction=0.5, w=2.5, prompt=CLIP_PROMPT,
                       temperature=1.0, max_new_tokens=40, generator=None, forward=None, autocast=None,
                       reward_features=None):
    """
    Self-training on B unlabeled images, the simplest semi-supervised baseline (pseudo-labels, Lee
    2013; noisy student, Xie et al. 2020, arXiv 1911.04252), with the same images, reward CLIP and
    samples as stage2_loss:
        y_ik ~ π_ref(· | image_i),   r_ik = CLIP-S(image_i, y_ik),   L = CE(the kept y | prefix)
    kept: the top ⌈keep_fraction · B·K⌉ of the batch's B·K captions by CLIP-S. The teacher is the frozen
    stage-1 model, π_ref: its pseudo-labels cannot drift with the policy's own mistakes, and only the
    signal differs from stage 2's (CLIP-S picks captions here, instead of weighting them). Returns
    (loss, stats).
    """
    forward = model if forward is None else forward  # not `forward or model`: a compiled module has no truth value
    autocast = nullcontext() if autocast is None else autocast
    r = clip_s_rollout(teacher, features, clip, tok, k=k, w=w, prompt=prompt, reward_features=reward_features,
                       baseline_kind=None, temperature=temperature, max_new_tokens=max_new_tokens,
                       generator=generator)  # no baseline: CLIP-S only ranks the captions
    n_keep = max(1, math.ceil(keep_fraction * r.reward.numel()))
    kept = r.reward.topk(n_keep).indices  # (n_keep,) the captions CLIP-S scores best
    tokens, mask = r.out.tokens[kept], r.out.mask[kept]  # (n_keep, T)
    P = model.prefix_len
    with autocast:
        logits = forward(features.repeat_interleave(k, dim=0)[kept], tokens[:, :-1])[:, P - 1:]  # (n_keep, T, V)
    logprobs = token_logprobs(logits, tokens)  # (n_keep, T), the policy at temperature 1
    ce = -logprobs.masked_fill(~mask.bool(), 0.0).sum() / mask.bool().sum().clamp(min=1)
    return ce, {"loss": ce.item(), "ce": ce.item(), "reward": r.reward.mean().item(),
                "kept_reward": r.reward[kept].mean().item(), "gen_len": r.out.lengths().float().mean().item(),
                "repetition": repetition_rate([r.texts[i] for i in kept.tolist()])}

