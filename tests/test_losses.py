"""Tests for nanocap.losses against hand computations and reference implementations."""

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from nanocap.losses import (baseline, caption_loss, clip_s, contrastive_reward, info_nce,
                            kl_penalty, reinforce_loss)


def normed(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


# -----------------------------------------------------------------------------
# caption_loss


def test_caption_loss_hand_computed():
    # P=2, T=2, V=3, one caption [2, 0]: position 1 predicts token 2, position 2 predicts 0
    logits = torch.tensor([[[9.0, 9.0, 9.0],     # prefix position 0: ignored
                            [1.0, 2.0, 3.0],     # predicts tokens[0] = 2
                            [0.5, 0.0, 0.0],     # predicts tokens[1] = 0
                            [7.0, -7.0, 7.0]]])  # last position predicts nothing
    tokens = torch.tensor([[2, 0]])
    nll0 = -math.log(math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3)))
    nll1 = -math.log(math.exp(0.5) / (math.exp(0.5) + 2.0))
    assert caption_loss(logits, tokens, prefix_len=2).item() == pytest.approx((nll0 + nll1) / 2, abs=1e-6)


def test_caption_loss_ignores_prefix_and_padding():
    B, P, T, V = 2, 3, 4, 7
    logits = torch.randn(B, P + T, V)
    tokens = torch.tensor([[1, 0, 5, -100], [3, 6, -100, -100]])
    ref = caption_loss(logits, tokens, P)
    changed = logits.clone()
    changed[:, :P - 1] += 10 * torch.randn(B, P - 1, V)        # prefix outputs before the last one
    changed[:, -1] += 10 * torch.randn(B, V)                   # last output predicts nothing
    changed[0, P - 1 + 3] += 10 * torch.randn(V)               # predicts padding of caption 0
    changed[1, P - 1 + 2:P - 1 + 4] += 10 * torch.randn(2, V)  # predicts padding of caption 1
    torch.testing.assert_close(caption_loss(changed, tokens, P), ref)
    # and the mean is over the 5 real tokens, not over B*T
    per_tok = F.cross_entropy(logits[:, P - 1:P + T - 1].reshape(-1, V), tokens.reshape(-1),
                              ignore_index=-100, reduction="sum")
    torch.testing.assert_close(ref, per_tok / 5)


def test_caption_loss_token_zero_is_learned():
    P, V = 2, 5
    logits = torch.zeros(1, P + 2, V)
    tokens = torch.tensor([[0, 3]])
    ref = caption_loss(logits, tokens, P)
    logits[0, P - 1, 0] += 2.0  # raise the logit of the real target id 0
    assert caption_loss(logits, tokens, P) < ref - 1e-3


# -----------------------------------------------------------------------------
# info_nce and contrastive_reward


@pytest.mark.parametrize("scale", [1.0, 100.0, torch.tensor(14.3)])
def test_info_nce_matches_open_clip(scale):
    a, b = normed(8, 16, seed=1), normed(8, 16, seed=2)
    ref = ClipLoss()(a, b, scale)
    torch.testing.assert_close(info_nce(a, b, scale), ref, atol=1e-6, rtol=0)


def test_info_nce_hard_negatives_join_the_image_to_text_side_only():
    torch.manual_seed(0)
    a, b, neg = (F.normalize(torch.randn(n, 8), dim=-1) for n in (4, 4, 3))
    labels = torch.arange(4)
    logits = 10 * a @ b.T  # (4, 4)
    expected = 0.5 * (F.cross_entropy(torch.cat([logits, 10 * a @ neg.T], dim=1), labels)
                      + F.cross_entropy(logits.T, labels))  # negatives have no image: not in text -> image
    assert torch.allclose(info_nce(a, b, 10, b_negatives=neg), expected)
    assert info_nce(a, b, 10, b_negatives=neg) > info_nce(a, b, 10)  # a near miss can only add loss
    # a near miss as close to the images as a true caption costs more than one far from them
    assert info_nce(a, b, 10, b_negatives=b[:1]) > info_nce(a, b, 10, b_negatives=-b[:1])


def test_contrastive_reward_direct():
    gen, gt, tau = normed(5, 8, seed=3), normed(5, 8, seed=4), 0.07
    r = contrastive_reward(gen, gt, tau)
    assert r.shape == (5,) and not r.requires_grad
    for i in range(5):
        s = torch.stack([gen[i] @ gt[j] / tau for j in range(5)])
        expected = s[i] - torch.logsumexp(s, dim=0)
        assert r[i].item() == pytest.approx(expected.item(), abs=1e-5)
    # a caption that is its own ground truth, at a small temperature, is all but certain: log-prob ~ 0
    assert torch.allclose(contrastive_reward(gt, gt, 1e-3), torch.zeros(5), atol=1e-4)


def test_contrastive_reward_prefers_matched_pair():
    gt = normed(4, 8, seed=5)
    r_match = contrastive_reward(gt, gt, 0.1)            # caption i == its own ground truth
    r_shift = contrastive_reward(gt.roll(1, dims=0), gt, 0.1)  # caption i == someone else's
    assert (r_match > r_shift).all()
    # and each matched caption's own ground truth is its most likely pair
    logp = F.log_softmax(gt @ gt.T / 0.1, dim=1)
    assert (logp.argmax(dim=1) == torch.arange(4)).all()


def test_contrastive_reward_k_samples_per_image():
    gen, gt, tau = normed(6, 8, seed=8), normed(3, 8, seed=9), 0.1  # K=2 samples for each of 3 images
    r = contrastive_reward(gen, gt, tau, k=2)
    assert r.shape == (6,)
    for i in range(6):
        s = gen[i] @ gt.T / tau
        assert r[i].item() == pytest.approx((s[i // 2] - torch.logsumexp(s, 0)).item(), abs=1e-5)


def test_contrastive_reward_no_grad():
    gen = normed(3, 4, seed=6).requires_grad_()
    assert not contrastive_reward(gen, normed(3, 4, seed=7), 0.1).requires_grad


# -----------------------------------------------------------------------------
# clip_s


def test_clip_s_hand_made():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    txt = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.6, 0.8], [-0.8, 0.6]])
    # cos:                 1.0         -1.0          0.8          0.0
    expected = torch.tensor([2.5, 0.0, 2.0, 0.0])
    torch.testing.assert_close(clip_s(img, txt), expected)
    torch.testing.assert_close(clip_s(img, txt, w=1.0), expected / 2.5)
    neg = torch.tensor([[0.6, -0.8]])  # cos with [0.6, 0.8] is -0.28 -> clipped to 0
    assert clip_s(torch.tensor([[0.6, 0.8]]), neg).item() == 0.0


# -----------------------------------------------------------------------------
# REINFORCE


def tiny_policy_logprobs(W, tokens):
    # a "policy" with one free logit row per position: W (T, V), tokens (N, T) -> (N, T)
    logp = F.log_softmax(W, dim=-1)  # (T, V)
    return logp.gather(1, tokens.T).T


def test_reinforce_zero_advantage_zero_grad():
    W = torch.randn(4, 6, requires_grad=True)
    tokens = torch.tensor([[1, 2, 3, 0], [5, 4, 0, 0]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    r = torch.tensor([0.7, -0.2])
    reinforce_loss(tiny_policy_logprobs(W, tokens), mask, r, r.clone()).backward()
    assert torch.equal(W.grad, torch.zeros_like(W))


@pytest.mark.parametrize("advantage,sign", [(1.0, 1), (-1.0, -1)])
def test_reinforce_step_moves_logprob(advantage, sign):
    torch.manual_seed(0)
    W = torch.randn(3, 5, requires_grad=True)
    opt = torch.optim.SGD([W], lr=0.5)
    tokens = torch.tensor([[4, 1, 2]])
    mask = torch.ones(1, 3)
    before = tiny_policy_logprobs(W, tokens).sum().item()
    loss = reinforce_loss(tiny_policy_logprobs(W, tokens), mask, torch.tensor([advantage]), torch.tensor([0.0]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = tiny_policy_logprobs(W, tokens).sum().item()
    assert sign * (after - before) > 1e-3


def test_reinforce_masked_tokens_get_no_grad():
    W = torch.randn(4, 6, requires_grad=True)
    tokens = torch.tensor([[1, 2, 0, 3]])  # EOS (id 0) at t=2, t=3 is after EOS
    mask = torch.tensor([[True, True, True, False]])
    logprobs = tiny_policy_logprobs(W, tokens)
    logprobs = torch.cat([logprobs[:, :3], torch.full((1, 1), float("-inf"))], dim=1)  # junk after EOS
    loss = reinforce_loss(logprobs, mask, torch.tensor([1.0]), torch.tensor([0.0]))
    assert torch.isfinite(loss)
    W2 = torch.randn(4, 6, requires_grad=True)
    reinforce_loss(tiny_policy_logprobs(W2, tokens), mask, torch.tensor([1.0]), torch.tensor([0.0])).backward()
    assert torch.equal(W2.grad[3], torch.zeros(6))
    assert (W2.grad[:3].abs().sum(dim=1) > 0).all()


def test_reinforce_value_and_detached_advantage():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    reward = torch.tensor([2.0, 1.0], requires_grad=True)
    b = torch.tensor([1.0, 3.0])
    loss = reinforce_loss(logprobs, mask, reward, b)
    # mean( -(1)(-6), -(-2)(-1) ) = (6 - 2) / 2
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert reward.grad is None or torch.equal(reward.grad, torch.zeros(2))


# -----------------------------------------------------------------------------
# baseline


def test_baseline_leave_one_out_k3():
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 3.0, 3.0])  # two images, K=3
    expected = torch.tensor([4.0, 3.5, 1.5, 3.0, 1.5, 1.5])
    torch.testing.assert_close(baseline(r, 3, "mean"), expected)


def test_baseline_greedy_repeats():
    r = torch.arange(6.0)
    g = torch.tensor([10.0, 20.0])
    torch.testing.assert_close(baseline(r, 3, "greedy", greedy_reward=g),
                               torch.tensor([10.0, 10.0, 10.0, 20.0, 20.0, 20.0]))


def test_baseline_errors():
    with pytest.raises(ValueError, match="k >= 2"):
        baseline(torch.ones(4), 1, "mean")
    with pytest.raises(ValueError, match="greedy_reward"):
        baseline(torch.ones(4), 2, "greedy")
    with pytest.raises(ValueError, match="mean.*greedy"):
        baseline(torch.ones(4), 2, "median")


# -----------------------------------------------------------------------------
# kl_penalty


def test_kl_zero_for_identical_policies():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    kl = kl_penalty(logits, logits.detach().clone(), torch.ones(2, 3))
    assert kl.item() == pytest.approx(0.0, abs=1e-7)
    kl.backward()
    assert logits.grad.abs().max().item() < 1e-7


def test_kl_matches_kl_div_and_ignores_masked():
    logits = torch.randn(2, 4, 6, requires_grad=True)
    ref = torch.randn(2, 4, 6, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    kl = kl_penalty(logits, ref, mask)
    assert kl.item() > 0
    # F.kl_div(input=log q, target=log p, log_target=True) = sum p (log p - log q)
    per_tok = F.kl_div(F.log_softmax(ref, -1), F.log_softmax(logits, -1),
                       reduction="none", log_target=True).sum(-1)  # (N, T)
    torch.testing.assert_close(kl, per_tok[mask].mean())
    # changing masked positions changes nothing
    logits2, ref2 = logits.detach().clone(), ref.detach().clone()
    logits2[~mask] += 5 * torch.randn(int((~mask).sum()), 6)
    ref2[~mask] -= 5 * torch.randn(int((~mask).sum()), 6)
    torch.testing.assert_close(kl_penalty(logits2, ref2, mask), kl.detach())
    # gradient only through the policy logits
    kl.backward()
    assert ref.grad is None
    assert logits.grad[mask].abs().sum() > 0
    assert torch.equal(logits.grad[~mask], torch.zeros(int((~mask).sum()), 6))
