"""
Decoding captions from a prefix: batched greedy, sampling (temperature, top-k, top-p) and beam search.

Every method starts from a batch of prefix embeddings (N, P, n_embd) made by the mapper from
CLIP image features (ClipCap, Mokady et al. 2021; Jin 2023, arXiv 2306.15111), runs the prefix
through GPT once, then adds one token at a time with the KV cache, for the whole batch at
once. Decoding stops at <|endoftext|> (EOS, which is kept as the caption's last token) or after
max_new_tokens.

Every method returns a Generation: the token ids, the log-probability of each token under the
model itself (the softmax of the raw logits, whatever temperature or top-k/top-p shaped the
sampling), and a mask of the real tokens. REINFORCE needs log-probs with gradients; decoding runs
under no_grad, so training recomputes them in one teacher-forced forward pass (losses.py).

ClipCap's anchors to avoid: no cache (the whole sequence re-run at every step), one image at
a time, and a "top-p" sampler that was in fact greedy.
"""

from dataclasses import dataclass

import torch
from torch.nn import functional as F

# Beam search ranks finished beams by sum(logp) / length**LENGTH_PENALTY: 1.0 is the mean log-prob
# per token, as ClipCap's beam search (the COCO yardstick) normalizes; 0 would be the raw sum,
# which favours short captions. The one default: sample.py's --length_penalty refers to it.
LENGTH_PENALTY = 1.0


@dataclass
class Generation:
    tokens: torch.Tensor  # (N, T) generated ids; after a sequence's EOS, filled with EOS
    logprobs: torch.Tensor  # (N, T) log p(token | prefix, earlier tokens); 0 after the end
    mask: torch.Tensor  # (N, T) bool, True for real tokens up to and including EOS

    def lengths(self):
        return self.mask.sum(dim=1)  # (N,)


def _start(gpt, prefix, max_new_tokens):
    """Run the prefix (N, P, C) once; return the cache and the logits for the first new token."""
    N, P, _ = prefix.shape
    cache = gpt.new_cache(N, P + max_new_tokens)
    logits = gpt(inputs_embeds=prefix, cache=cache, last_only=True)[:, -1, :]  # (N, V)
    return cache, logits


def _filter_logits(logits, temperature, top_k, top_p):
    """Shape the next-token distribution: temperature, then top-k, then nucleus (top-p)."""
    logits = logits / max(temperature, 1e-8)
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (N, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = (probs.cumsum(dim=-1) - probs) >= top_p  # the top token is never dropped
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def sample(gpt, prefix, max_new_tokens=20, eos_id=50256, greedy=False,
           temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Greedy (greedy=True) or random decoding of one caption per prefix row (N, P, C).

    For K samples per image, repeat the prefix: prefix.repeat_interleave(K, dim=0).
    `generator` (a torch.Generator on the prefix's device) makes sampling reproducible.
    """
    N = prefix.size(0)
    cache, logits = _start(gpt, prefix, max_new_tokens)
    done = torch.zeros(N, dtype=torch.bool, device=prefix.device)
    tokens, logprobs, mask = [], [], []
    for t in range(max_new_tokens):
        logp = F.log_softmax(logits.float(), dim=-1)  # (N, V) the model's own distribution
        if greedy:
            nxt = logits.argmax(dim=-1)  # (N,)
        else:
            probs = F.softmax(_filter_logits(logits.float(), temperature, top_k, top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (N,)
        lp = logp.gather(1, nxt[:, None]).squeeze(1)  # (N,)
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)  # finished rows just pad
        tokens.append(nxt)
        logprobs.append(lp.masked_fill(done, 0.0))
        mask.append(~done)
        done = done | (nxt == eos_id)
        if done.all() or t == max_new_tokens - 1:
            break
        logits = gpt(idx=nxt[:, None], cache=cache)[:, -1, :]  # one new position, cached past
    return Generation(torch.stack(tokens, 1), torch.stack(logprobs, 1), torch.stack(mask, 1))


def greedy(gpt, prefix, max_new_tokens=20, eos_id=50256):
    """Batched greedy decoding: the most likely token at every step."""
    return sample(gpt, prefix, max_new_tokens, eos_id, greedy=True)


@torch.no_grad()
def beam_search(gpt, prefix, beam_size=5, max_new_tokens=20, eos_id=50256,
                length_penalty=LENGTH_PENALTY, num_return=1):
    """Batched beam search: beam_size hypotheses per image, all images at once.

    Hypotheses are ranked during the search by their summed log-prob; a finished hypothesis
    stays in its beam and only extends with EOS at no cost. At the end the beams are ranked by
    sum(logp) / length**length_penalty (0 = raw sum; 1 = mean per token, which favours longer
    captions) and the best `num_return` of each image are returned, best first:
    rows [i*num_return, (i+1)*num_return) belong to image i.
    """
    N, K = prefix.size(0), beam_size
    assert 1 <= num_return <= K, "num_return must be between 1 and beam_size"
    cache, logits = _start(gpt, prefix, max_new_tokens)
    logp = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    V = logp.size(-1)
    scores, tok = logp.topk(K, dim=-1)  # (N, K) the K best first tokens of each image
    cache.reorder(torch.arange(N, device=prefix.device).repeat_interleave(K))  # N -> N*K rows
    scores, tok = scores.reshape(-1), tok.reshape(-1)  # (N*K,)
    seqs, seq_lp = tok[:, None], scores[:, None]  # (N*K, t)
    mask = torch.ones_like(seqs, dtype=torch.bool)
    done = tok == eos_id
    for t in range(1, max_new_tokens):
        if done.all():
            break
        logits = gpt(idx=seqs[:, -1:], cache=cache)[:, -1, :]
        logp = F.log_softmax(logits.float(), dim=-1)  # (N*K, V)
        logp[done] = float("-inf")  # a finished hypothesis can only be padded with EOS ...
        logp[done, eos_id] = 0.0  # ... which costs nothing
        cand = (scores[:, None] + logp).view(N, K * V)  # every beam times every next token
        top, flat = cand.topk(K, dim=-1)  # (N, K)
        beam, tok = flat // V, flat % V  # which beam each survivor extends, and with what
        src = (torch.arange(N, device=prefix.device)[:, None] * K + beam).reshape(-1)  # (N*K,)
        tok = tok.reshape(-1)
        cache.reorder(src)
        step_lp = logp[src, tok]  # (N*K,)
        was_done = done[src]
        seqs = torch.cat([seqs[src], tok[:, None]], dim=1)
        seq_lp = torch.cat([seq_lp[src], step_lp.masked_fill(was_done, 0.0)[:, None]], dim=1)
        mask = torch.cat([mask[src], ~was_done[:, None]], dim=1)
        scores, done = top.reshape(-1), was_done | (tok == eos_id)
    lengths = mask.sum(dim=1).float()  # (N*K,)
    final = (scores / lengths.pow(length_penalty)).view(N, K)
    best = final.argsort(dim=-1, descending=True)[:, :num_return]  # (N, R)
    rows = (torch.arange(N, device=prefix.device)[:, None] * K + best).reshape(-1)  # (N*R,)
    return Generation(seqs[rows], seq_lp[rows], mask[rows])


def generate(gpt, prefix, method="greedy", max_new_tokens=20, eos_id=50256, beam_size=5,
             length_penalty=LENGTH_PENALTY, num_return=1, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One entry point for sample.py: method is 'greedy', 'beam' or 'sample'.
    num_return captions per image (rows grouped per image): the best beams, or independent samples."""
    if method == "greedy":
        return greedy(gpt, prefix, max_new_tokens, eos_id)
    if method == "beam":
        return beam_search(gpt, prefix, max(beam_size, num_return), max_new_tokens, eos_id, length_penalty, num_return)
    if method == "sample":
        prefix = prefix.repeat_interleave(num_return, dim=0)
        return sample(gpt, prefix, max_new_tokens, eos_id, False, temperature, top_k, top_p, generator)
    raise ValueError(f"unknown decoding method {method!r}; use greedy, beam or sample")


def score(gpt, prefix, tokens):
    """Teacher-forced log-probs of given captions, with gradients: a tool for looking inside, which
    training does not call. Notebook 03 checks sampling's log-probs against it, notebook 06 scores
    samples under the reference with it, and a test checks decoding (KV cache and all) against it.
    Training computes the same quantity in its own forward pass, through the Captioner (which may
    be DDP- or compile-wrapped), inside losses.stage1_loss and losses.stage2_loss.

    prefix (N, P, C), tokens (N, T) from a Generation -> (logprobs (N, T), logits (N, T, V)), where
    logits[:, t] is the distribution that token t was drawn from. Pass mask-aware losses the
    Generation's mask: values after a caption's end are meaningless.
    """
    P = prefix.size(1)
    logits = gpt(idx=tokens[:, :-1], inputs_embeds=prefix)[:, P - 1 :, :]  # (N, T, V)
    return token_logprobs(logits, tokens), logits


def token_logprobs(logits, tokens):
    """log softmax(logits)[token] at each position: logits (N, T, V), tokens (N, T) -> (N, T)."""
    return F.log_softmax(logits.float(), dim=-1).gather(2, tokens[:, :, None]).squeeze(2)
