"""
Our own GPT-2, the language model that writes the caption.

GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners") is a stack
of pre-LayerNorm transformer blocks with learned position embeddings and an output head tied
to the token embedding. This file follows nanoGPT (Karpathy) closely, with three additions
that CLIP-prefix captioning (ClipCap, Mokady et al. 2021; Jin 2023, arXiv 2306.15111) needs:

  1. forward() takes input *embeddings* as well as token ids, so that the mapper's prefix of
     embeddings can be put in front of the caption:  [p_1 .. p_P, e(w_1) .. e(w_T)].
  2. a KV cache, so that decoding one token costs one token's compute (ClipCap re-ran the
     whole sequence at every step).
  3. from_pretrained(), which loads the Hugging Face GPT-2 weights from a local folder or
     file, or from the hub when online, into this module.
"""

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanocap.base.files import atomic_write


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length (prefix + caption)
    vocab_size: int = 50257  # GPT-2's BPE vocabulary
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5


class KVCache:
    """Keys and values of all past positions, preallocated for max_len positions.

    k, v: (n_layer, B, n_head, max_len, head_dim); `pos` is how many positions are filled.
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        hd = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self._spare = None  # reorder's second buffer, made on first use

    def update(self, layer, k, v):
        """Store k, v (B, nh, T, hd) of `layer` at positions pos..pos+T; return all keys/values so far."""
        T = k.size(2)
        if self.pos + T > self.k.size(3):
            raise RuntimeError(f"KV cache is full ({self.k.size(3)} positions); allocate a larger max_len")
        self.k[layer, :, :, self.pos : self.pos + T] = k
        self.v[layer, :, :, self.pos : self.pos + T] = v
        return self.k[layer, :, :, : self.pos + T], self.v[layer, :, :, : self.pos + T]

    def reorder(self, index):
        """Keep batch rows `index` (B',), in that order. Beam search uses this to follow its beams.
        Only the filled positions are copied, into a second buffer that then swaps in: no new
        allocation per step, which on CPU was 10x the cost of the copy itself."""
        if index.numel() != self.k.size(1):  # the batch changes size: a new cache
            self.k, self.v = self.k.index_select(1, index), self.v.index_select(1, index)
            self._spare = None
            return
        if self._spare is None:
            self._spare = (torch.empty_like(self.k), torch.empty_like(self.v))
        k, v = self._spare
        p = self.pos
        torch.index_select(self.k[:, :, :, :p], 1, index, out=k[:, :, :, :p])
        torch.index_select(self.v[:, :, :, :p], 1, index, out=v[:, :, :, :p])
        self._spare = (self.k, self.v)
        self.k, self.v = k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(layer, k, v)  # (B, nh, past+T, hd)
        dropout_p = self.dropout if self.training else 0.0
        if past == 0:  # plain causal attention over the T new positions
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1:  # one new token sees every past position: no mask needed
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:  # T new tokens after `past` cached ones: new token i sees positions <= past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def embed(self, idx):
        """Token ids (B, T) -> token embeddings (B, T, n_embd), the space the prefix lives in."""
        return self.transformer.wte(idx)

    def new_cache(self, batch_size, max_len):
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)

    def forward(self, idx=None, inputs_embeds=None, targets=None, cache=None, last_only=False):
        """
        idx: (B, T) token ids and/or inputs_embeds: (B, P, n_embd); given both, the embeddings
        come first: [inputs_embeds; wte(idx)], which is how a CLIP prefix precedes a caption.
        targets: (B, P+T) ids that each position should predict, -100 where ignored.
        cache: a KVCache; the new positions continue after cache.pos, and are appended to it.
        last_only: logits for the last position only (B, 1, V): decoding needs no more, and the
        vocabulary projection is the largest matmul of a small GPT.
        Returns logits (B, P+T, vocab_size), and the mean cross-entropy loss when targets are given.
        """
        parts = []
        if inputs_embeds is not None:
            parts.append(inputs_embeds)
        if idx is not None:
            parts.append(self.transformer.wte(idx))
        assert parts, "give idx or inputs_embeds"
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, T, C)
        T = x.size(1)
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} positions exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=x.device)  # (T,)
        x = self.transformer.drop(x + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.pos += T
        if last_only:
            assert targets is None, "last_only is for decoding; the loss needs every position"
            x = x[:, -1:]  # (B, 1, C)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    # ---------------------------------------------------------------------------------------
    # Loading the Hugging Face GPT-2 weights

    HUB_NAMES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
                 "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0):
        """
        Load GPT-2 weights in Hugging Face format from
          - a local folder holding config.json and model.safetensors or pytorch_model.bin,
          - a local weights file (config.json beside it), or
          - a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, or org/repo) through huggingface_hub.
        """
        weights, config_file = _resolve_files(name_or_path, cls.HUB_NAMES)
        with open(config_file) as f:
            hf = json.load(f)
        config = GPTConfig(block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), vocab_size=hf["vocab_size"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=dropout,
                           layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{config_file}: activation {hf['activation_function']!r} is not GPT-2's gelu_new")
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd_hf = load_file(weights)
        else:
            sd_hf = torch.load(weights, map_location="cpu", weights_only=True)
        model = cls(config)
        model.load_state_dict(convert_hf_state_dict(sd_hf), strict=True)
        return model

    def save_pretrained(self, folder):
        """Write config.json + model.safetensors in Hugging Face GPT-2 format, the inverse of
        from_pretrained (the shapes world saves its toy GPT this way, so it loads like GPT-2)."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        c = self.config
        hf = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
                  n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                  n_head=c.n_head, layer_norm_epsilon=c.layer_norm_epsilon, activation_function="gelu_new",
                  resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout, tie_word_embeddings=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(hf, f, indent=2)
        sd = {k: (v.t() if k.endswith(_CONV1D) else v).detach().cpu().contiguous()
              for k, v in self.state_dict().items() if k != "lm_head.weight"}  # tied: stored once, as wte
        weights = os.path.join(folder, "model.safetensors")
        atomic_write(weights, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))


# HF's GPT-2 uses Conv1D layers, whose weights are stored (in, out): transpose them for nn.Linear
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def convert_hf_state_dict(sd_hf):
    """Hugging Face GPT-2 keys -> ours. Old files lack the 'transformer.' prefix and carry the
    causal-mask buffers attn.bias / attn.masked_bias, which are not weights; the tied lm_head
    may or may not be saved. Everything else must match exactly (load_state_dict(strict=True))."""
    sd = {}
    for k, v in sd_hf.items():
        k = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers, not weights (c_attn.bias ends in "_attn.bias")
        if k == "lm_head.weight":
            continue  # tied to wte; checked below
        sd[k] = v.t().contiguous() if k.endswith(_CONV1D) else v
    if "lm_head.weight" in sd_hf and "transformer.wte.weight" in sd:
        if not torch.equal(sd_hf["lm_head.weight"], sd["transformer.wte.weight"]):
            raise ValueError("lm_head.weight differs from wte.weight: not a weight-tied GPT-2")
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def _resolve_files(name_or_path, hub_names):
    """Return (weights file, config.json) for a local folder, a local file, or a hub name."""
    if os.path.isdir(name_or_path):
        folder = name_or_path
        for fname in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(folder, fname)):
                return os.path.join(folder, fname), os.path.join(folder, "config.json")
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
    if os.path.isfile(name_or_path):
        config_file = os.path.join(os.path.dirname(os.path.abspath(name_or_path)), "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config.json must sit beside {name_or_path}")
        return name_or_path, config_file
    if name_or_path not in hub_names and name_or_path.count("/") != 1:
        raise FileNotFoundError(f"{name_or_path!r} is neither a local path nor a GPT-2 name ({', '.join(hub_names)})")
    from huggingface_hub import hf_hub_download
    repo = hub_names.get(name_or_path, name_or_path)
    try:
        config_file = hf_hub_download(repo, "config.json")
        try:
            weights = hf_hub_download(repo, "model.safetensors")
        except Exception:
            weights = hf_hub_download(repo, "pytorch_model.bin")
    except Exception as e:
        raise RuntimeError(
            f"could not fetch GPT-2 {name_or_path!r} from the hub ({type(e).__name__}; offline or not cached). "
            f"Download it once online, or pass a local folder with config.json and model.safetensors: --gpt /path/to/gpt2"
        ) from e
    return weights, config_file
