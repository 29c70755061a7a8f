"""Our GPT-2 against the reference: a tiny random transformers GPT2LMHeadModel, saved the way
the hub stores GPT-2, loaded with GPT.from_pretrained (the minGPT test, done offline)."""

import pytest
import torch

from nanocap.gpt import GPT, GPTConfig, convert_hf_state_dict

transformers = pytest.importorskip("transformers")

VOCAB = 50257


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random biases and LayerNorm affine, so that no transposition bug can hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.normal_(0, 0.1)
    return model


def _hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def _check_parity(ours, hf, idx):
    ours.eval()
    with torch.no_grad():
        logits = ours(idx)
    ref = _hf_logits(hf, idx)
    assert (logits - ref).abs().max().item() < 1e-4
    # greedy tokens from a short prompt must be identical
    ref_gen = hf.generate(idx[:1, :4], max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 4:]
    cur = idx[:1, :4]
    for _ in range(8):
        with torch.no_grad():
            nxt = ours(cur)[:, -1].argmax(-1, keepdim=True)
        cur = torch.cat([cur, nxt], 1)
    assert torch.equal(cur[0, 4:], ref_gen)


def test_parity_safetensors(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)  # writes config.json + model.safetensors, as on the hub
    assert (tmp_path / "model.safetensors").exists()
    ours = GPT.from_pretrained(str(tmp_path))
    idx = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    _check_parity(ours, hf_model, idx)
    # a path to the weights file itself works too
    ours2 = GPT.from_pretrained(str(tmp_path / "model.safetensors"))
    assert torch.equal(ours2.transformer.wte.weight, ours.transformer.wte.weight)


def test_parity_legacy_pytorch_model_bin(hf_model, tmp_path):
    """The real gpt2 pytorch_model.bin has no 'transformer.' prefix, no lm_head, and carries the
    attn.bias / attn.masked_bias mask buffers. Build exactly that and load it."""
    sd = {}
    for k, v in hf_model.state_dict().items():
        if k == "lm_head.weight":
            continue
        sd[k.removeprefix("transformer.")] = v.clone()
    n = hf_model.config.n_positions
    for i in range(hf_model.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    hf_model.config.to_json_file(tmp_path / "config.json")
    ours = GPT.from_pretrained(str(tmp_path))
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    _check_parity(ours, hf_model, idx)


def test_strict_keys(hf_model):
    sd = dict(hf_model.state_dict())
    del sd["transformer.h.1.mlp.c_fc.bias"]
    model = GPT(GPTConfig(block_size=64, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32))
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(convert_hf_state_dict(sd), strict=True)


def test_weight_tying_and_conv1d_transpose(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path))
    assert ours.lm_head.weight.data_ptr() == ours.transformer.wte.weight.data_ptr()
    hf_w = hf_model.transformer.h[0].attn.c_attn.weight  # Conv1D: (in, out)
    assert torch.equal(ours.transformer.h[0].attn.c_attn.weight, hf_w.t())


def test_missing_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        GPT.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a local path nor a GPT-2 name"):
        GPT.from_pretrained("not-a-model")


def test_hub_name_offline_fails_fast(monkeypatch, tmp_path):
    import time
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to find
    t0 = time.time()
    with pytest.raises(RuntimeError, match="local folder"):
        GPT.from_pretrained("gpt2")
    assert time.time() - t0 < 10


def test_targets_loss_and_ignore_index():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 50, (2, 8))
    targets = idx.roll(-1, 1).clone()
    targets[:, -1] = -100
    logits, loss = model(idx, targets=targets)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), targets[:, :-1].reshape(-1))
    assert torch.allclose(loss, ref)


def test_prefix_embeddings_come_first():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 50, (2, 6))
    prefix = model.embed(idx[:, :3])  # embeddings of the first 3 tokens, given as a "prefix"
    with torch.no_grad():
        full = model(idx)
        split = model(idx=idx[:, 3:], inputs_embeds=prefix)
    assert torch.allclose(full, split, atol=1e-6)


def test_kv_cache_matches_full_sequence():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=100, n_layer=2, n_head=4, n_embd=32)).eval()
    prefix = torch.randn(3, 5, 32)
    idx = torch.randint(0, 100, (3, 9))
    with torch.no_grad():
        full = model(idx=idx, inputs_embeds=prefix)  # (3, 14, V)
        cache = model.new_cache(3, 14)
        steps = [model(inputs_embeds=prefix, cache=cache)]  # prefix in one go
        steps.append(model(idx=idx[:, :3], cache=cache))  # a chunk of 3 (masked attention path)
        for t in range(3, 9):  # then one token at a time
            steps.append(model(idx=idx[:, t : t + 1], cache=cache))
    inc = torch.cat(steps, dim=1)
    assert cache.pos == 14
    assert (inc - full).abs().max().item() < 1e-5


def test_block_size_is_enforced():
    model = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_save_pretrained_round_trip_and_hf_reads_it(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=60, n_layer=2, n_head=2, n_embd=16)).eval()
    model.save_pretrained(tmp_path)
    back = GPT.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 60, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(idx), back(idx))
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
        assert (hf(idx).logits - model(idx)).abs().max().item() < 1e-4


def test_kv_cache_reorder_follows_rows_through_both_buffers():
    from nanocap.gpt import KVCache
    cfg = GPTConfig(block_size=16, vocab_size=10, n_layer=2, n_head=2, n_embd=8)
    cache = KVCache(cfg, batch_size=4, max_len=6, device="cpu", dtype=torch.float32)
    want_k = torch.randn(2, 4, 2, 3, 4)  # (layers, B, heads, filled positions, head_dim)
    for layer in range(2):
        cache.update(layer, want_k[layer], -want_k[layer])
    cache.pos = 3
    for index in ([2, 2, 0, 1], [3, 0, 1, 1], [1, 0, 3, 2]):  # the second buffer swaps in and back out
        index = torch.tensor(index)
        cache.reorder(index)
        want_k = want_k.index_select(1, index)
        assert torch.equal(cache.k[:, :, :, :3], want_k) and torch.equal(cache.v[:, :, :, :3], -want_k)
    cache.reorder(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))  # a new batch size: a new cache
    assert cache.k.shape[1] == 8 and torch.equal(cache.k[:, ::2, :, :3], want_k)
