"""
The optimizer's side of training: AdamW's parameter groups (one weight-decay rule for every
model nanocap trains: the captioner, and the shapes world's toy CLIPs and GPT) and the
learning-rate schedule (linear warmup, then cosine decay).
"""

import math

import torch
import torch.nn as nn


def param_groups(model, weight_decay):
    """AdamW groups over the trainable parameters: weight decay on weight matrices and conv
    kernels; none on biases, norms, gains, embedding tables (token, position, class) or
    logit_scale. Embeddings are not decayed (CLIP's and minGPT's rule): a rare token's row gets
    few gradients, and decay would pull it to zero between them. The one rule for every model."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in tables or "embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, lr, weight_decay):
    """AdamW on the trainable parameters, grouped by param_groups."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98))


def lr_at(step, total, peak, warmup, floor=0.1):
    """Linear warmup to `peak`, then cosine decay to floor * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
