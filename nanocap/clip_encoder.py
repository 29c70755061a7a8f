"""The frozen CLIP encoder: images and texts -> unit vectors in CLIP's joint space.

In CLIP-prefix captioning (Jin, "Semi-Supervised Image Captioning with CLIP",
arXiv 2306.15111, following ClipCap) a frozen CLIP visual encoder embeds the
image, a mapper turns that vector into a GPT-2 prefix, and GPT-2 writes the
caption. The text tower is used too: CLIP scores (caption, image) pairs for the
semi-supervised stage. This file is a thin wrapper on open_clip that

  1. builds the model from one of
       - an open_clip name             'ViT-B-32-quickgelu'
       - a hub / local folder          'hf-hub:org/repo', 'local-dir:/path'
       - a JSON model config file      'configs/tiny_clip.json'  (open_clip format:
                                        {"embed_dim":..,"vision_cfg":{..},"text_cfg":{..}})
  2. loads weights from an open_clip tag ('openai'), a local file (.pt/.bin/
     .safetensors state dict), or none at all (random init, for tests),
  3. freezes it and keeps it in eval mode, whatever a parent module does,
  4. returns L2-normalised float32 features (B, embed_dim).

Pitfalls it guards: OpenAI weights need a '-quickgelu' model name (open_clip
only warns, and the features silently change); open_clip returns the model in
train mode; open_clip quietly falls back to random weights when a hub folder
has no weights file; a missing download is turned into one clear message.
"""

import json
import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import is_offline_mode
from PIL import Image

LOCAL_FILE_HINT = "--clip_weights /path/to/open_clip_model.safetensors"


class CLIPEncoder(torch.nn.Module):
    def __init__(self, model_name: str = "ViT-B-32-quickgelu", pretrained: str | None = "openai",
                 device="cpu", cache_dir: str | None = None):
        """model_name: open_clip name, 'hf-hub:org/repo', 'local-dir:/path', or a path to a JSON model config.
        pretrained: open_clip tag ('openai', 'laion2b_s34b_b79k'), a local weights file, or None (random init).
                    Ignored for 'hf-hub:'/'local-dir:' names: their weights come from that location.
        cache_dir:  where downloads are cached (None: the huggingface_hub default)."""
        super().__init__()
        model_name = str(model_name)  # a pathlib.Path to a JSON config is fine too
        pretrained = None if pretrained is None else str(pretrained)
        self.model_name = model_name  # as given, so a checkpoint can record how to rebuild the encoder
        oc_name, schema = _resolve_model_name(model_name)
        if schema is not None:
            pretrained = None  # the weights come from the hub repo / local folder itself
        if pretrained is not None:
            _check_weights_source(oc_name, pretrained)
        self.pretrained = pretrained

        # schema names must bring weights: open_clip would otherwise quietly init randomly
        must_load = pretrained is not None or schema is not None
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                oc_name, pretrained=pretrained, device=device, cache_dir=cache_dir,
                require_pretrained=must_load)
        except Exception as e:
            raise RuntimeError(_load_error_message(model_name, pretrained, schema, e)) from e

        model.requires_grad_(False)
        self.model = model
        self.preprocess = preprocess  # eval transform: resize, center crop, to tensor, normalise
        self.tokenizer = open_clip.get_tokenizer(oc_name, cache_dir=cache_dir)
        size = model.visual.image_size  # int (ResNet) or (H, W) tuple (ViT)
        h, w = (size, size) if isinstance(size, int) else size
        if h != w:
            raise ValueError(f"CLIP model {model_name} takes {h}x{w} images; only square inputs are supported")
        self.image_size = h
        self.eval()  # open_clip hands the model back in train mode; train() below keeps it in eval
        # one dummy forward tells the output width whatever the architecture (ViT, ResNet, timm, ...)
        self.embed_dim = int(self._forward_image(torch.zeros(1, 3, h, h)).shape[-1])

    def train(self, mode: bool = True):
        # CLIP is frozen: stay in eval mode (BatchNorm, dropout) even when a parent calls .train()
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature, exp(logit_scale): cosine similarity * this = CLIP logit."""
        return float(self.model.logit_scale.exp())

    @torch.no_grad()
    def encode_image(self, images) -> torch.Tensor:
        """images: a list of PIL images, or a preprocessed float tensor (B, 3, H, W).
        returns: (B, embed_dim) float32, unit L2 norm."""
        if isinstance(images, torch.Tensor):
            x = images
            s = self.image_size
            if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
                raise ValueError(f"encode_image expects preprocessed images of shape (B, 3, {s}, {s}), "
                                 f"got {tuple(x.shape)}; pass PIL images to have them preprocessed")
        elif isinstance(images, (list, tuple)) and len(images) > 0 and all(isinstance(im, Image.Image) for im in images):
            x = torch.stack([self.preprocess(im) for im in images])  # (B, 3, H, W)
        else:
            raise TypeError("encode_image expects a non-empty list of PIL images or a tensor (B, 3, H, W)")
        return self._forward_image(x)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """texts: list of B strings (longer ones are truncated to the context length).
        returns: (B, embed_dim) float32, unit L2 norm."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or len(texts) == 0:
            raise TypeError("encode_text expects a non-empty list of strings, e.g. ['a red circle']")
        tokens = self.tokenizer(list(texts)).to(self.device)  # (B, context_length) int64
        features = self.model.encode_text(tokens)  # (B, embed_dim)
        return F.normalize(features.float(), dim=-1)

    # ---- internals ----

    @torch.no_grad()
    def _forward_image(self, x: torch.Tensor) -> torch.Tensor:
        p = next(self.model.parameters())
        features = self.model.encode_image(x.to(device=p.device, dtype=p.dtype))  # (B, embed_dim)
        return F.normalize(features.float(), dim=-1)


def _resolve_model_name(model_name: str) -> tuple[str, str | None]:
    """Return (the name open_clip knows the model by, schema or None). Registers JSON config files."""
    if model_name.startswith("hf-hub:"):
        return model_name, "hf-hub"
    if model_name.startswith("local-dir:"):
        return model_name, "local-dir"
    if model_name.endswith(".json"):
        path = Path(model_name)
        if not path.is_file():
            raise ValueError(f"CLIP model config file not found: {model_name}")
        cfg = json.loads(path.read_text())
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(f"{model_name} is not an open_clip model config: it needs the keys 'embed_dim', "
                             f"'vision_cfg', 'text_cfg' (for a folder with open_clip_config.json use "
                             f"'local-dir:{path.parent}')")
        # open_clip knows configs by file stem; re-adding the file makes it win over an older one of that name
        open_clip.add_model_config(path)
        return path.stem, None
    name = model_name.replace("/", "-")  # open_clip's own cleaning: 'ViT-B/32' -> 'ViT-B-32'
    if name not in open_clip.list_models():
        raise ValueError(f"unknown CLIP model '{model_name}': use a name from open_clip.list_models() "
                         f"(e.g. ViT-B-32-quickgelu), 'hf-hub:org/repo', 'local-dir:/path', or a JSON config file")
    return name, None


def _check_weights_source(name: str, pretrained: str) -> None:
    """Fail early on a weights source open_clip would accept silently, or could not find."""
    if os.path.isfile(pretrained):
        return  # a local state dict; whether it fits the model shows when it is loaded
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)  # {} when not a known tag for this model
    wants_quickgelu = pretrained.lower() == "openai" or tag_cfg.get("quick_gelu", False)
    has_quickgelu = open_clip.get_model_config(name).get("quick_gelu", False)
    if wants_quickgelu and not has_quickgelu:
        fix = f"{name}-quickgelu" if f"{name}-quickgelu" in open_clip.list_models() else "e.g. ViT-B-32-quickgelu"
        raise ValueError(f"CLIP weights '{pretrained}' were trained with QuickGELU but model '{name}' uses GELU, "
                         f"which silently changes the features: use a '-quickgelu' model name ({fix})")
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise RuntimeError(f"could not load CLIP weights '{pretrained}' for {name}: not a known open_clip tag "
                           f"for this model (known: {tags}) and not an existing file. Pass a local file: "
                           f"{LOCAL_FILE_HINT}")


def _load_error_message(model_name: str, pretrained: str | None, schema: str | None, err: Exception) -> str:
    """One readable line saying what failed and what to do about it."""
    reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    if schema == "local-dir":
        return (f"could not load CLIP from '{model_name}': {reason}. The folder needs open_clip_config.json "
                f"and a weights file such as open_clip_model.safetensors")
    if pretrained is not None and os.path.isfile(pretrained):
        return (f"could not load CLIP weights file '{pretrained}' into {model_name}: {reason}. The file must be "
                f"an open_clip state dict saved from this same model config")
    if pretrained is None and schema is None:
        return f"could not build CLIP model '{model_name}': {reason}"
    # an open_clip tag or an hf-hub repo: the download failed
    source = f"'{pretrained}' for {model_name}" if schema is None else f"from '{model_name}'"
    if is_offline_mode():
        why = "offline and not in the cache (HF_HUB_OFFLINE=1). Download once online"
    else:
        why = f"download failed ({reason}). Check the connection"
    return f"could not load CLIP weights {source}: {why}, or pass a local file: {LOCAL_FILE_HINT}"
