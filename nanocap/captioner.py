"""
The captioner (ClipCap, Mokady et al. 2021; Jin 2023, arXiv 2306.15111): a mapper that turns a
CLIP image embedding into a prefix of GPT input embeddings, and the GPT that continues it.

    features (B, D) --mapper--> prefix (B, P, C) --GPT--> logits over [prefix ; caption tokens]

CLIP itself is not part of the module: its features are precomputed (each image encoded once),
and the checkpoint records which CLIP made them, so sampling uses the same one.

Checkpoints describe themselves: model args, the training config, the CLIP name and weights,
whether the features are normalized, the tokenizer, the stage and the step. They hold
parameters only (no library buffers), unwrapped from DDP and torch.compile (no `_orig_mod.`),
are written atomically, and load strictly with torch.load(weights_only=True).
"""

import hashlib
import os
import warnings
from dataclasses import asdict

import torch
import torch.nn as nn

from nanocap.base.files import atomic_write
from nanocap.gpt import GPT, GPTConfig
from nanocap.mapper import build_mapper

CHECKPOINT_VERSION = 1


class Captioner(nn.Module):
    def __init__(self, mapper, gpt):
        super().__init__()
        self.mapper = mapper
        self.gpt = gpt

    @property
    def prefix_len(self):
        return self.mapper.config["prefix_len"]

    def prefix(self, features):
        """CLIP features (B, D) -> prefix embeddings (B, P, C)."""
        return self.mapper(features)

    def forward(self, features, idx):
        """features (B, D), caption token ids idx (B, T) -> logits (B, P+T, V); position P-1+t
        predicts idx[:, t] (see losses.caption_loss)."""
        return self.gpt(idx=idx, inputs_embeds=self.mapper(features))

    def model_args(self):
        return {"mapper": dict(self.mapper.config), "gpt": asdict(self.gpt.config)}

    @classmethod
    def from_args(cls, args):
        return cls(build_mapper(**args["mapper"]), GPT(GPTConfig(**args["gpt"])))


def unwrap(model):
    """The plain module inside DDP and/or torch.compile wrappers."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


def save_checkpoint(path, model, **info):
    """Write {"model": params, "model_args": ..., **info} atomically (atomic_write).
    info holds config, clip, tokenizer, stage, step, optimizer state, ... (plain types and tensors)."""
    model = unwrap(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {"version": CHECKPOINT_VERSION, "model": state, "model_args": model.model_args(), **info}
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def state_digest(model):
    """sha1 of a model's state (names and bytes): equal exactly when two models hold the same weights.
    A stage-2 checkpoint records its KL reference's, which --resume checks."""
    h = hashlib.sha1()
    for k, v in unwrap(model).state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_checkpoint(path):
    """torch.load with weights_only=True: a file that carries pickled code is refused."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; train one with `python train.py --stage 1`")
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4 detected": the outcome speaks for itself
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for code, RuntimeError for a truncated file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a safe nanocap checkpoint (loaded with weights_only=True): {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION or "model_args" not in ckpt:
        raise ValueError(f"{path} is not a nanocap checkpoint (version {CHECKPOINT_VERSION})")
    return ckpt


def checkpoint_step(path):
    """The step of a checkpoint, read without loading its tensors (they stay memory-mapped); -1 for a
    file that cannot be read so (read_checkpoint then says what is wrong with it, in one line)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
    except Exception:
        return -1


def load_captioner(path, device="cpu"):
    """(Captioner in eval mode, checkpoint dict) from a checkpoint file, loaded strictly."""
    ckpt = read_checkpoint(path)
    model = Captioner.from_args(ckpt["model_args"])
    model.load_state_dict(ckpt["model"], strict=True)
    return model.to(device).eval(), ckpt
