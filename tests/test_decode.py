"""Decoding: the cache-based batched decoders agree with slow, obviously-correct references."""
import pytest
import torch
from torch.nn import functional as F

from nanocap.decode import beam_search, generate, greedy, sample
from nanocap.gpt import GPT, GPTConfig

V, EOS = 40, 3  # with the fixture's seed, token 3 ends captions at varied lengths


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=V, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # larger weights: a peakier, more varied output than the 0.02 init
        for p in m.parameters():
            p.mul_(3)
    return m


@pytest.fixture(scope="module")
def prefix():
    return torch.randn(5, 4, 32, generator=torch.Generator().manual_seed(1))


def slow_greedy(model, prefix, n):
    """Reference: no cache, re-run the whole sequence each step (ClipCap's predict loop)."""
    toks, lps = [], []
    with torch.no_grad():
        for _ in range(n):
            idx = torch.tensor([toks], dtype=torch.long) if toks else None
            logits = model(idx=idx, inputs_embeds=prefix[None])[0, -1]
            t = int(logits.argmax())
            toks.append(t)
            lps.append(float(F.log_softmax(logits, -1)[t]))
            if t == EOS:
                break
    return toks, lps


def test_greedy_matches_no_cache_reference(model, prefix):
    gen = greedy(model, prefix, max_new_tokens=12, eos_id=EOS)
    for i in range(prefix.size(0)):
        toks, lps = slow_greedy(model, prefix[i], 12)
        n = int(gen.mask[i].sum())
        assert gen.tokens[i, :n].tolist() == toks
        assert torch.allclose(gen.logprobs[i, :n], torch.tensor(lps), atol=1e-5)
        assert (gen.logprobs[i, n:] == 0).all() and (gen.tokens[i, n:] == EOS).all()


def test_batched_equals_single(model, prefix):
    gen = greedy(model, prefix, max_new_tokens=12, eos_id=EOS)
    for i in range(prefix.size(0)):
        one = greedy(model, prefix[i : i + 1], max_new_tokens=12, eos_id=EOS)
        n = int(one.mask[0].sum())
        assert torch.equal(gen.tokens[i, :n], one.tokens[0, :n])
        assert int(gen.mask[i].sum()) == n


def test_stops_at_eos_and_max_len(model, prefix):
    gen = greedy(model, prefix, max_new_tokens=12, eos_id=EOS)
    assert gen.tokens.size(1) <= 12
    for i in range(prefix.size(0)):
        n = int(gen.mask[i].sum())
        real = gen.tokens[i, :n].tolist()
        assert EOS not in real[:-1]  # EOS only ever as the last real token
        assert real[-1] == EOS or n == 12
    lengths = gen.lengths()
    assert (lengths >= 1).all() and lengths.max() <= 12
    assert len(set(lengths.tolist())) > 1, "fixture should give varied lengths"


def test_beam1_equals_greedy(model, prefix):
    g = greedy(model, prefix, max_new_tokens=12, eos_id=EOS)
    b = beam_search(model, prefix, beam_size=1, max_new_tokens=12, eos_id=EOS)
    assert torch.equal(g.tokens, b.tokens)
    assert torch.equal(g.mask, b.mask)
    assert torch.allclose(g.logprobs, b.logprobs, atol=1e-6)


def test_batched_beam_equals_per_item(model, prefix):
    b = beam_search(model, prefix, beam_size=4, max_new_tokens=10, eos_id=EOS, length_penalty=0.7, num_return=2)
    assert b.tokens.size(0) == prefix.size(0) * 2
    for i in range(prefix.size(0)):
        one = beam_search(model, prefix[i : i + 1], beam_size=4, max_new_tokens=10, eos_id=EOS,
                          length_penalty=0.7, num_return=2)
        for r in range(2):
            n = int(one.mask[r].sum())
            assert torch.equal(b.tokens[2 * i + r, :n], one.tokens[r, :n])
            assert torch.allclose(b.logprobs[2 * i + r, :n], one.logprobs[r, :n], atol=1e-5)


def test_beam_finds_at_least_greedy_score(model, prefix):
    g = greedy(model, prefix, max_new_tokens=10, eos_id=EOS)
    b = beam_search(model, prefix, beam_size=5, max_new_tokens=10, eos_id=EOS, length_penalty=0.0)
    assert (b.logprobs.sum(1) >= g.logprobs.sum(1) - 1e-5).all()


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_beams_are_ranked_by_length_penalised_score(model, prefix, alpha):
    K = 4  # all K beams back, best first: sum(logp) / length**alpha never rises along a row
    b = beam_search(model, prefix, beam_size=K, max_new_tokens=10, eos_id=EOS, length_penalty=alpha, num_return=K)
    final = (b.logprobs.sum(1) / b.lengths().float().pow(alpha)).view(-1, K)  # (N, K)
    assert (final[:, 1:] <= final[:, :-1] + 1e-5).all(), final
    assert len(set(b.lengths().tolist())) > 1  # beams of several lengths: the penalty has something to rank


def test_length_penalty_changes_which_beam_wins(model, prefix):
    short, long = (beam_search(model, prefix, beam_size=4, max_new_tokens=10, eos_id=EOS, length_penalty=a)
                   for a in (0.0, 2.0))
    assert (long.lengths() >= short.lengths()).all() and (long.lengths() > short.lengths()).any()


def test_beam_logprobs_are_the_models(model, prefix):
    b = beam_search(model, prefix[:2], beam_size=3, max_new_tokens=8, eos_id=EOS)
    for i in range(2):
        n = int(b.mask[i].sum())
        toks = b.tokens[i, :n]
        with torch.no_grad():
            logits = model(idx=toks[None, :-1], inputs_embeds=prefix[i : i + 1])[0, 3:]  # positions P-1..
        ref = F.log_softmax(logits, -1).gather(1, toks[:, None]).squeeze(1)
        assert torch.allclose(b.logprobs[i, :n], ref, atol=1e-5)


def test_sampling_is_seeded_and_diverse(model, prefix):
    p = prefix[:1].repeat(16, 1, 1)
    a = sample(model, p, max_new_tokens=8, eos_id=EOS, generator=torch.Generator().manual_seed(0), temperature=1.5)
    b = sample(model, p, max_new_tokens=8, eos_id=EOS, generator=torch.Generator().manual_seed(0), temperature=1.5)
    assert torch.equal(a.tokens, b.tokens)
    assert len({tuple(t.tolist()) for t in a.tokens}) > 1, "real sampling gives different captions"


def test_top_k1_is_greedy_and_top_p_restricts(model, prefix):
    g = greedy(model, prefix, max_new_tokens=8, eos_id=EOS)
    s = sample(model, prefix, max_new_tokens=8, eos_id=EOS, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(g.tokens, s.tokens)
    s = sample(model, prefix, max_new_tokens=8, eos_id=EOS, top_p=1e-6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(g.tokens, s.tokens)  # a tiny nucleus keeps only the top token


def test_top_p_keeps_the_nucleus():
    from nanocap.decode import _filter_logits
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_filter_logits(logits, 1.0, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(_filter_logits(logits, 1.0, 3, 1.0))
    assert kept.tolist() == [[True, True, True, False]]


def test_generate_entry_point(model, prefix):
    out = generate(model, prefix[:2], method="sample", num_return=3, max_new_tokens=6, eos_id=EOS,
                   generator=torch.Generator().manual_seed(0))
    assert out.tokens.size(0) == 6
    out = generate(model, prefix[:2], method="beam", beam_size=3, num_return=3, max_new_tokens=6, eos_id=EOS)
    assert out.tokens.size(0) == 6
    with pytest.raises(ValueError):
        generate(model, prefix, method="nucleus")


def test_score_recomputes_decoding_logprobs_with_grad(model, prefix):
    from nanocap.decode import score
    gen = sample(model, prefix, max_new_tokens=8, eos_id=EOS, generator=torch.Generator().manual_seed(5))
    p = prefix.clone().requires_grad_(True)
    logprobs, logits = score(model, p, gen.tokens)
    assert logits.shape == (*gen.tokens.shape, V)
    assert torch.allclose(logprobs[gen.mask], gen.logprobs[gen.mask], atol=1e-5)
    logprobs[gen.mask].sum().backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
