"""
Losses and rewards for semi-supervised CLIP-prefix captioning
(Jin 2023, "Semi-Supervised Image Captioning with CLIP", arXiv 2306.15111).

Stage 1 (few labeled images):
    L = caption_loss + lambda * contrastive term.
    The contrastive term embeds the *generated* captions and the ground-truth
    captions with CLIP's text encoder; the InfoNCE log-probability of a generated
    caption matching its own ground truth (contrastive_reward) is a sequence reward,
    optimized with REINFORCE since sampling is not differentiable.
Stage 2 (unlabeled images):
    REINFORCE with a CLIP reward, as in Cho et al. 2022 ("Fine-grained Image
    Captioning with CLIP Reward", arXiv 2205.13115): reward CLIP-S (clip_s;
    Hessel et al. 2021, "CLIPScore", arXiv 2104.08718), K samples per image, and a
    baseline that is either the greedy caption's reward (self-critical, Rennie et al.
    2017, arXiv 1612.00563) or the leave-one-out mean of the other samples (Luo 2020,
    "A Better Variant of Self-Critical Sequence Training", arXiv 2003.09971),
    plus a per-token KL penalty towards the frozen stage-1 policy (kl_penalty).

All embeddings passed in here are assumed L2-normalized.
"""

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# supervised


def caption_loss(logits, tokens, prefix_len):
    """
    Teacher-forced cross-entropy of the caption given the prefix.

    logits: (B, P+T, V) GPT output over [prefix embeddings ; caption token embeddings]
    tokens: (B, T) caption token ids, -100 at padding
    Position P-1+t predicts token t, so
        loss = mean over real tokens of  -log softmax(logits[:, P-1+t])[tokens[:, t]]
    Prefix outputs and padding are ignored; token id 0 is an ordinary target.
    """
    P, T = prefix_len, tokens.shape[1]
    pred = logits[:, P - 1:P + T - 1]  # (B, T, V)
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), tokens.reshape(-1), ignore_index=-100)


# -----------------------------------------------------------------------------
# contrastive (stage 1)


def info_nce(a, b, logit_scale):
    """
    Symmetric InfoNCE (CLIP's loss) over paired normalized embeddings a, b: (N, D).

        logits = logit_scale * a @ b^T                  (N, N)
        loss = 1/2 [ CE(logits, arange(N)) + CE(logits^T, arange(N)) ]
    logit_scale = 1 / temperature (float or tensor).
    """
    logits = logit_scale * a @ b.T  # (N, N)
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


@torch.no_grad()
def contrastive_reward(gen_emb, gt_emb, temperature, k=1):
    """
    Stage-1 sequence reward: InfoNCE log-prob of generated caption i matching its own
    ground truth against the other ground truths in the batch.

        r_i = log softmax_j( gen_i . gt_j / tau )[own(i)]      (always <= 0)
    gen_emb: (N*k, D), the k samples of each image contiguous; gt_emb: (N, D); both
    normalized; own(i) = i // k. Returns (N*k,), detached.
    """
    logits = gen_emb @ gt_emb.T / temperature  # (N*k, N)
    own = torch.arange(gen_emb.shape[0], device=gen_emb.device) // k  # (N*k,)
    return F.log_softmax(logits, dim=1).gather(1, own[:, None]).squeeze(1)  # (N*k,)


# -----------------------------------------------------------------------------
# CLIP reward (stage 2)


@torch.no_grad()
def clip_s(image_emb, text_emb, w=2.5):
    """
    CLIP-S (Hessel et al. 2021) for paired normalized embeddings (N, D):
        CLIP-S_i = w * max(cos(image_i, text_i), 0)
    Returns (N,), detached.
    """
    cos = (image_emb * text_emb).sum(dim=-1)  # (N,)
    return w * cos.clamp(min=0)


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
