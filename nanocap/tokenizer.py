"""
The GPT-2 tokenizer (byte-level BPE, r50k_base), through tiktoken, working offline.

GPT-2 (Radford et al. 2019) reads text as byte-pair-encoded tokens from a 50,257-entry
vocabulary; id 50256 is <|endoftext|>, which nanocap also uses to end every caption.

tiktoken normally downloads the BPE ranks file on first use, which fails offline. The same
file (byte-identical, sha256 below) ships inside the `openai-whisper` sdist as
whisper/assets/gpt2.tiktoken; `make install` puts it there with `pip install --no-deps`.
We look for the ranks file in this order:
  1. $NANOCAP_GPT2_BPE, a path to a gpt2.tiktoken / r50k_base.tiktoken file
  2. the whisper package's assets (found with importlib, without importing whisper)
  3. tiktoken's own download (only works online, or from tiktoken's cache)
"""

import hashlib
import importlib.util
import os

import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str  # the regex that splits text before BPE

R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257


def find_bpe_file():
    """Return a local path to the r50k_base ranks file, or None if there is none."""
    path = os.environ.get("NANOCAP_GPT2_BPE")
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"NANOCAP_GPT2_BPE={path} does not exist; point it at a gpt2.tiktoken file")
        return path
    spec = importlib.util.find_spec("whisper")  # locates the package without importing it
    if spec is not None and spec.origin is not None:
        path = os.path.join(os.path.dirname(spec.origin), "assets", "gpt2.tiktoken")
        if os.path.isfile(path):
            return path
    return None


_ENCODINGS = {}  # BPE file path -> tiktoken.Encoding, so each file is read once per process


def _load_encoding():
    path = find_bpe_file()
    if path not in _ENCODINGS:
        _ENCODINGS[path] = _read_encoding(path)
    return _ENCODINGS[path]


def _read_encoding(path):
    if path is None:  # last resort: tiktoken's own download (needs the internet or its cache)
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise RuntimeError(
                "GPT-2 BPE file not found offline. Run `make install` (it installs openai-whisper, which ships "
                "gpt2.tiktoken), or set NANOCAP_GPT2_BPE=/path/to/gpt2.tiktoken"
            ) from e
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != R50K_SHA256:
        raise RuntimeError(f"{path} is not the GPT-2 r50k_base file (sha256 {digest[:12]}..., expected {R50K_SHA256[:12]}...)")
    ranks = load_tiktoken_bpe(path, expected_hash=R50K_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT_TOKEN: EOT_ID})


class Tokenizer:
    """GPT-2 BPE: encode(str) -> list[int], decode(list[int]) -> str, eos_id = 50256.

    vocab: optional list of the GPT-2 ids a small model actually uses (the shapes world's toy
    GPT knows ~100 of the 50,257). Ids are then positions in that list, so the model's output
    layer has len(vocab) rows instead of 50,257: the text is still GPT-2 BPE, only renumbered.
    """

    name = "gpt2"  # stored in checkpoints, so sample.py knows how to read a model's tokens

    def __init__(self, vocab=None):
        self.enc = _load_encoding()
        self.vocab = None if vocab is None else [int(i) for i in vocab]
        if self.vocab is None:
            self.eos_id, self.vocab_size = EOT_ID, VOCAB_SIZE
        else:
            if EOT_ID not in self.vocab:
                raise ValueError("a reduced vocab must contain <|endoftext|> (50256)")
            self.to_small = {g: i for i, g in enumerate(self.vocab)}
            self.eos_id, self.vocab_size = self.to_small[EOT_ID], len(self.vocab)

    def encode(self, text):
        # captions are plain text: a literal "<|endoftext|>" in data is encoded as ordinary characters
        ids = self.enc.encode_ordinary(text)
        return ids if self.vocab is None else self._renumber(ids, text)

    def encode_batch(self, texts):
        batch = self.enc.encode_ordinary_batch(texts)
        return batch if self.vocab is None else [self._renumber(ids, t) for ids, t in zip(batch, texts)]

    def decode(self, ids):
        ids = [int(i) for i in ids]
        if self.eos_id in ids:  # a caption ends at its first <|endoftext|>
            ids = ids[: ids.index(self.eos_id)]
        if self.vocab is not None:
            ids = [self.vocab[i] for i in ids]
        return self.enc.decode(ids)

    def _renumber(self, ids, text):
        missing = [i for i in ids if i not in self.to_small]
        if missing:
            raise ValueError(f"{text!r} uses tokens outside this model's vocabulary: {self.enc.decode(missing)!r}")
        return [self.to_small[i] for i in ids]

    def describe(self):
        """What a checkpoint stores to rebuild this tokenizer: get_tokenizer(**tok.describe())."""
        return {"name": self.name, "vocab": self.vocab}


def get_tokenizer(name="gpt2", vocab=None):
    """The tokenizer a checkpoint names. Only GPT-2 BPE ("gpt2") exists, optionally renumbered."""
    if name != "gpt2":
        raise ValueError(f"unknown tokenizer {name!r}; nanocap uses 'gpt2'")
    return Tokenizer(vocab)


def caption_batch(tok, captions, max_tokens=None, device=None):
    """Captions -> (inputs (B, T), targets (B, T)): each caption's tokens + EOS, cut to max_tokens.
    Targets are padded with -100 (ignored by the loss); inputs with EOS (their outputs only predict
    padding). A captioner reads inputs after its prefix; a language model reads [EOS] + inputs[:, :-1]."""
    rows = [tok.encode(c)[: max_tokens - 1 if max_tokens else None] + [tok.eos_id] for c in captions]
    T = max(len(r) for r in rows)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        targets[i, : len(r)] = torch.tensor(r)
    inputs = targets.masked_fill(targets == -100, tok.eos_id)
    return inputs.to(device), targets.to(device)


def build_vocab(texts, tokenizer=None):
    """The sorted GPT-2 ids used by `texts`, plus <|endoftext|>: a reduced vocab for a small model."""
    tokenizer = tokenizer or Tokenizer()
    ids = {EOT_ID}
    for t in tokenizer.enc.encode_ordinary_batch(list(texts)):
        ids.update(t)
    return sorted(ids)
