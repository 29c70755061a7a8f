"""
Mapping networks: turn one frozen CLIP image embedding into a GPT-2 prefix.

The idea comes from ClipCap (Mokady et al. 2021, "ClipCap: CLIP Prefix for Image
Captioning", arXiv 2111.09734) and is the captioner used by Jin 2023
("Semi-Supervised Image Captioning with CLIP", arXiv 2306.15111): a small network
maps the CLIP embedding (B, clip_dim) to `prefix_len` vectors in GPT-2's input
embedding space (B, prefix_len, n_embd). GPT-2 reads that prefix and then writes
the caption, as if the prefix were the embeddings of some "words" describing the image.

Two mappers, as in ClipCap:
- MLPMapper: Linear -> Tanh -> Linear, reshaped into the prefix. ClipCap uses it
  when GPT-2 is fine-tuned too (512 -> 3840 -> 7680 for a 10 x 768 prefix).
- TransformerMapper: the CLIP embedding becomes `clip_len` tokens, learned constant
  tokens are appended, a small transformer mixes them, and the outputs at the
  constant positions are the prefix. ClipCap uses it with a frozen GPT-2.

build_mapper(kind, ...) picks one by name. Each mapper keeps its constructor
arguments in a plain `.config` dict, so `build_mapper(**mapper.config)` rebuilds it
(e.g. from a checkpoint).
"""

import torch
import torch.nn as nn

# -----------------------------------------------------------------------------


class MLPMapper(nn.Module):
    """ClipCap's MLP mapper: (B, clip_dim) -> (B, prefix_len, n_embd)."""

    def __init__(self, clip_dim, prefix_len, n_embd):
        super().__init__()
        self.config = dict(kind="mlp", clip_dim=clip_dim, prefix_len=prefix_len, n_embd=n_embd)
        self.prefix_len = prefix_len
        self.n_embd = n_embd
        hidden = prefix_len * n_embd // 2
        self.fc1 = nn.Linear(clip_dim, hidden)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden, prefix_len * n_embd)

    def forward(self, x):
        # x: (B, clip_dim) CLIP image embedding (may arrive in fp16 from CLIP)
        x = x.to(self.fc1.weight.dtype)
        x = self.fc2(self.act(self.fc1(x)))  # (B, prefix_len * n_embd)
        return x.view(x.shape[0], self.prefix_len, self.n_embd)  # (B, prefix_len, n_embd)


class TransformerMapper(nn.Module):
    """
    ClipCap's transformer mapper: (B, clip_dim) -> (B, prefix_len, n_embd).

    Sequence fed to the transformer (no causal mask, every token sees every token):
        [ linear(clip) reshaped to clip_len tokens ; prefix_len learned constants ]
    and the outputs at the constant positions are the prefix.
    Blocks are pre-norm, MLP ratio 2 with ReLU, no dropout, as in ClipCap.
    """

    def __init__(self, clip_dim, prefix_len, n_embd, clip_len=None, n_layer=8, n_head=8):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        clip_len = prefix_len if clip_len is None else clip_len
        self.config = dict(kind="transformer", clip_dim=clip_dim, prefix_len=prefix_len,
                           n_embd=n_embd, clip_len=clip_len, n_layer=n_layer, n_head=n_head)
        self.prefix_len = prefix_len
        self.clip_len = clip_len
        self.n_embd = n_embd
        self.linear = nn.Linear(clip_dim, clip_len * n_embd)
        self.prefix_const = nn.Parameter(torch.randn(prefix_len, n_embd))
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(
                d_model=n_embd, nhead=n_head, dim_feedforward=2 * n_embd,
                dropout=0.0, activation="relu", batch_first=True, norm_first=True,
            )
            for _ in range(n_layer)
        ])

    def forward(self, x):
        # x: (B, clip_dim) CLIP image embedding (may arrive in fp16 from CLIP)
        B = x.shape[0]
        x = x.to(self.linear.weight.dtype)
        clip_tokens = self.linear(x).view(B, self.clip_len, self.n_embd)  # (B, clip_len, n_embd)
        const = self.prefix_const.unsqueeze(0).expand(B, -1, -1)  # (B, prefix_len, n_embd)
        h = torch.cat([clip_tokens, const], dim=1)  # (B, clip_len + prefix_len, n_embd)
        for block in self.blocks:
            h = block(h)
        return h[:, self.clip_len:]  # (B, prefix_len, n_embd)


# -----------------------------------------------------------------------------


def build_mapper(kind, clip_dim, prefix_len, n_embd, **kwargs):
    """Build a mapper by name: kind is "mlp" or "transformer"; kwargs go to the transformer."""
    if kind == "mlp":
        if kwargs:
            raise ValueError(f"MLPMapper takes no extra arguments, got {sorted(kwargs)}")
        return MLPMapper(clip_dim, prefix_len, n_embd)
    if kind == "transformer":
        return TransformerMapper(clip_dim, prefix_len, n_embd, **kwargs)
    raise ValueError(f"unknown mapper kind {kind!r}; valid kinds are 'mlp' and 'transformer'")
