"""
Small helpers that train.py needs and that would only clutter it: the device, caption batches,
the AdamW parameter groups, the learning-rate schedule, the log file and its plot, and the
repetition rate that exposes a degenerate CLIP-reward policy (Cho et al. 2022).
"""

import json
import math
import os

import torch


def pick_device(name="auto", local_rank=None):
    """auto: CUDA if present, else Apple MPS, else CPU. Under DDP on CUDA, the process's own GPU."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def caption_batch(tok, captions, max_tokens, device):
    """Captions -> (inputs (B, T), targets (B, T)): each caption's tokens + EOS, cut to max_tokens.
    Targets are padded with -100 (ignored); inputs with EOS (their outputs only predict padding)."""
    rows = [tok.encode(c)[: max_tokens - 1] + [tok.eos_id] for c in captions]
    T = max(len(r) for r in rows)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        targets[i, : len(r)] = torch.tensor(r)
    inputs = targets.masked_fill(targets == -100, tok.eos_id)
    return inputs.to(device), targets.to(device)


def make_optimizer(model, lr, weight_decay):
    """AdamW on the trainable parameters; weight decay on matrices only (not biases, norms, gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def lr_at(step, total, peak, warmup, floor=0.1):
    """Linear warmup to `peak`, then cosine decay to floor * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def repetition_rate(captions):
    """Share of captions with a word repeated back to back ("a red red circle"), the usual
    symptom of a policy that games a CLIP reward."""
    def repeats(c):
        w = c.split()
        return any(a == b for a, b in zip(w, w[1:]))
    return sum(map(repeats, captions)) / max(1, len(captions))


def log_jsonl(out_dir, record):
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(out_dir):
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_log(out_dir, stage):
    """Plot a stage's training and validation curves to out_dir/stage<N>.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in read_log(out_dir) if r.get("stage") == stage]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "captions" in r]
    keys = ["loss", "ce", "contrastive_reward"] if stage == 1 else ["reward", "kl", "gen_len", "repetition"]
    keys = [k for k in keys if train and k in train[-1]]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4 * (len(keys) + 1), 3.2))
    for ax, k in zip(axes, keys):
        ax.plot([r["iter"] for r in train if k in r], [r[k] for r in train if k in r])
        ax.set_title(k)
        ax.set_xlabel("step")
    vk = "val_loss" if stage == 1 else "val_reward"
    axes[-1].plot([r["iter"] for r in evals], [r[vk] for r in evals], marker="o")
    axes[-1].set_title(vk)
    axes[-1].set_xlabel("step")
    fig.suptitle(f"stage {stage}")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"stage{stage}.png"), dpi=100)
    plt.close(fig)
