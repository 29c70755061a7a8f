"""Tests for nanocap/clip_encoder.py. Offline: random weights only, saved to files and loaded back by path."""

import json
import time

import huggingface_hub
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from nanocap.clip_encoder import CLIPEncoder

TEXTS = ["a photo of a dog", "a red circle above a blue square", ""]

TINY_CFG = {  # a ModifiedResNet CLIP small enough to build in a blink
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}


def make_images():
    """Two non-square noise images, so a random (train) crop would differ from the eval center crop."""
    rng = np.random.RandomState(0)
    return [Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(300, 200), (180, 260)]]


def assert_unit_norm(x):
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(x.shape[0]), atol=1e-5, rtol=0)


# ---------- ViT-B-32: random weights in a file == open_clip called directly ----------

@pytest.fixture(scope="module")
def vitb32(tmp_path_factory):
    """Random ViT-B-32-quickgelu saved as .pt and .safetensors, plus open_clip's own features (built once)."""
    folder = tmp_path_factory.mktemp("vitb32")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-quickgelu").eval()
    preprocess = open_clip.image_transform(224, is_train=False)  # independent of the encoder's transform
    pixels = torch.stack([preprocess(im) for im in make_images()])  # (2, 3, 224, 224)
    tokens = open_clip.get_tokenizer("ViT-B-32-quickgelu")(TEXTS)  # (3, 77)
    with torch.no_grad():
        ref_img = F.normalize(model.encode_image(pixels), dim=-1)  # (2, 512)
        ref_txt = F.normalize(model.encode_text(tokens), dim=-1)  # (3, 512)
    state = model.state_dict()
    torch.save(state, folder / "vitb32.pt")
    save_file(state, str(folder / "vitb32.safetensors"))
    return dict(pt=str(folder / "vitb32.pt"), safetensors=str(folder / "vitb32.safetensors"),
                pixels=pixels, ref_img=ref_img, ref_txt=ref_txt)


@pytest.fixture(scope="module")
def vitb32_encoder(vitb32):
    return CLIPEncoder("ViT-B-32-quickgelu", pretrained=vitb32["pt"])


@pytest.mark.slow
def test_vitb32_file_weights_match_open_clip(vitb32, vitb32_encoder):
    enc = vitb32_encoder
    img = enc.encode_image(make_images())  # PIL path: the encoder's own eval preprocess
    torch.testing.assert_close(img, vitb32["ref_img"], atol=1e-6, rtol=0)
    torch.testing.assert_close(enc.encode_image(vitb32["pixels"]), vitb32["ref_img"], atol=1e-6, rtol=0)
    torch.testing.assert_close(enc.encode_text(TEXTS), vitb32["ref_txt"], atol=1e-6, rtol=0)
    assert (enc.embed_dim, enc.image_size, enc.pretrained) == (512, 224, vitb32["pt"])
    assert enc.model_name == "ViT-B-32-quickgelu"


@pytest.mark.slow
def test_vitb32_safetensors_weights_match_open_clip(vitb32):
    enc = CLIPEncoder("ViT-B-32-quickgelu", pretrained=vitb32["safetensors"])
    torch.testing.assert_close(enc.encode_image(vitb32["pixels"]), vitb32["ref_img"], atol=1e-6, rtol=0)
    torch.testing.assert_close(enc.encode_text(TEXTS), vitb32["ref_txt"], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_frozen_eval_unit_norm(vitb32_encoder):
    enc = vitb32_encoder
    parent = torch.nn.ModuleDict({"clip": enc, "head": torch.nn.Linear(512, 2)})
    parent.train()  # what a training loop does to the captioner that holds the encoder
    assert parent["head"].training
    assert not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    img, txt = enc.encode_image(make_images()), enc.encode_text(TEXTS)
    assert img.shape == (2, 512) and txt.shape == (3, 512)
    assert not img.requires_grad and not txt.requires_grad
    assert_unit_norm(img)
    assert_unit_norm(txt)
    assert enc.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's init value


# ---------- a tiny custom model config (JSON file), as the shapes world will save ----------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "tiny_rn.json").write_text(json.dumps(TINY_CFG))
    torch.manual_seed(0)
    enc = CLIPEncoder(str(folder / "tiny_rn.json"), pretrained=None)
    return folder, enc


def test_tiny_config_shapes_and_norm(tiny):
    folder, enc = tiny
    assert (enc.embed_dim, enc.image_size) == (128, 64)
    assert enc.model_name == str(folder / "tiny_rn.json")
    img, txt = enc.encode_image(make_images()), enc.encode_text(TEXTS)
    assert img.shape == (2, 128) and txt.shape == (3, 128)
    assert_unit_norm(img)
    assert_unit_norm(txt)
    # ModifiedResNet has BatchNorm: in train mode the batch statistics would change these features
    enc.train()
    assert not enc.training and not enc.model.visual.bn1.training
    torch.testing.assert_close(enc.encode_image(make_images()), img, atol=0, rtol=0)


def test_tiny_weights_file_loads_back(tiny, tmp_path):
    folder, enc = tiny
    torch.save(enc.model.state_dict(), tmp_path / "tiny.pt")
    save_file(enc.model.state_dict(), str(tmp_path / "tiny.safetensors"))
    torch.manual_seed(1)  # a different random init, which the loaded weights must overwrite
    other = CLIPEncoder(str(folder / "tiny_rn.json"), pretrained=None)
    assert not torch.allclose(other.encode_text(TEXTS), enc.encode_text(TEXTS))
    for name in ["tiny.pt", "tiny.safetensors"]:
        torch.manual_seed(1)
        loaded = CLIPEncoder(str(folder / "tiny_rn.json"), pretrained=str(tmp_path / name))
        assert torch.equal(loaded.encode_image(make_images()), enc.encode_image(make_images()))
        assert torch.equal(loaded.encode_text(TEXTS), enc.encode_text(TEXTS))


def test_tiny_local_dir(tiny, tmp_path):
    _, enc = tiny
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG}))
    with pytest.raises(RuntimeError, match="weights file"):  # open_clip alone would init randomly here
        CLIPEncoder(f"local-dir:{tmp_path}")
    save_file(enc.model.state_dict(), str(tmp_path / "open_clip_model.safetensors"))
    loaded = CLIPEncoder(f"local-dir:{tmp_path}")
    assert torch.equal(loaded.encode_text(TEXTS), enc.encode_text(TEXTS))


def test_weights_that_do_not_fit_fail_clearly(tiny, tmp_path):
    _, enc = tiny
    torch.save(enc.model.state_dict(), tmp_path / "tiny.pt")
    (tmp_path / "tiny_rn_wide.json").write_text(json.dumps({**TINY_CFG, "embed_dim": 64}))
    with pytest.raises(RuntimeError, match="same model config"):
        CLIPEncoder(str(tmp_path / "tiny_rn_wide.json"), pretrained=str(tmp_path / "tiny.pt"))


def test_bad_inputs(tiny):
    _, enc = tiny
    with pytest.raises(ValueError, match="PIL images"):
        enc.encode_image(torch.zeros(2, 3, 224, 224))  # wrong size for this model
    with pytest.raises(TypeError):
        enc.encode_image(make_images()[0])  # a single image, not a list
    with pytest.raises(TypeError):
        enc.encode_text("a single string")
    with pytest.raises(ValueError, match="list_models"):
        CLIPEncoder("ViT-B-33", pretrained=None)


# ---------- weights sources that must fail fast, with one clear message ----------

def test_openai_weights_need_quickgelu():
    with pytest.raises(ValueError, match="quickgelu"):
        CLIPEncoder("ViT-B-32", pretrained="openai")


def test_unknown_tag_fails_clearly():
    with pytest.raises(RuntimeError, match="local file"):
        CLIPEncoder("ViT-B-32-quickgelu", pretrained="no_such_tag")


@pytest.mark.parametrize("model_name,pretrained", [
    ("ViT-B-32-quickgelu", "openai"),
    ("hf-hub:nanocap-test/no-such-repo", None),
])
def test_offline_download_fails_fast(model_name, pretrained, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    t0 = time.time()
    with pytest.raises(RuntimeError, match="offline and not in the cache") as info:
        CLIPEncoder(model_name, pretrained=pretrained, cache_dir=str(tmp_path))  # empty cache
    assert time.time() - t0 < 10
    assert "local file" in str(info.value)
