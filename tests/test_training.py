"""The small helpers the objectives and train.py stand on: the learning-rate schedule, the one
weight-decay rule, caption batches, the repetition rate, the CLIP-S prompt, on-policy log-probs
at a temperature, the sampling scaffold both objectives share, and atomic writes."""
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nanocap import losses
from nanocap.base.files import atomic_write, read_json, write_json
from nanocap.base.optim import lr_at, make_optimizer, param_groups
from nanocap.captioner import Captioner
from nanocap.data import pretrain
from nanocap.decode import greedy
from nanocap.gpt import GPT, GPTConfig
from nanocap.mapper import build_mapper
from nanocap.tokenizer import caption_batch, get_tokenizer
from nanocap.tools.training import log_jsonl, read_log, restart_log


def test_lr_at_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    peak, total, warmup = 1e-3, 110, 10
    assert [lr_at(s, total, peak, warmup) for s in range(3)] == pytest.approx([1e-4, 2e-4, 3e-4])
    assert lr_at(warmup - 1, total, peak, warmup) == pytest.approx(peak)
    assert lr_at(warmup, total, peak, warmup) == pytest.approx(peak)  # the cosine starts at the peak
    assert lr_at(60, total, peak, warmup) == pytest.approx(peak * (0.1 + 0.9 * 0.5))  # halfway
    assert lr_at(total, total, peak, warmup) == pytest.approx(0.1 * peak)
    assert lr_at(10 * total, total, peak, warmup) == pytest.approx(0.1 * peak)  # never below the floor
    assert lr_at(total, total, peak, warmup, floor=0.0) == pytest.approx(0.0)
    assert lr_at(0, total, peak, 0) == pytest.approx(peak)  # no warmup: stage 2's default


def small_captioner(mapper="mlp"):
    gpt = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    return Captioner(build_mapper(mapper, 8, 4, 16), gpt)


def test_rollout_scores_k_samples_per_image_and_the_greedy_baseline_one_caption_each():
    """losses.rollout, the scaffold of both objectives: the B*K samples are scored in one call,
    the baseline is the leave-one-out mean of them, or (greedy) the reward of each image's greedy
    caption, scored with k = 1; the baseline does not change what is sampled."""
    model, B, K = small_captioner().eval(), 3, 4
    tok = SimpleNamespace(eos_id=0, decode=lambda ids: " ".join(map(str, ids)))
    feats = torch.randn(B, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def reward_fn(texts, k):
        calls.append((len(texts), k))
        return torch.tensor([float(len(t)) for t in texts])

    run = lambda kind: losses.rollout(model, feats, tok, reward_fn, k=K, baseline_kind=kind, max_new_tokens=5,
                                      generator=torch.Generator().manual_seed(1))
    mean = run("mean")
    assert calls == [(B * K, K)] and mean.out.tokens.shape[0] == len(mean.texts) == B * K
    assert mean.texts == [tok.decode(t) for t in mean.out.tokens.tolist()]
    assert torch.equal(mean.reward, torch.tensor([float(len(t)) for t in mean.texts]))
    assert torch.equal(mean.baseline, losses.baseline(mean.reward, K, "mean"))
    calls.clear()
    self_critical = run("greedy")
    assert calls == [(B * K, K), (B, 1)]
    greedy_texts = [tok.decode(t) for t in greedy(model.gpt, model.prefix(feats), 5, 0).tokens.tolist()]
    assert torch.equal(self_critical.baseline, torch.tensor([float(len(t)) for t in greedy_texts]).repeat_interleave(K))
    assert torch.equal(self_critical.out.tokens, mean.out.tokens)


class HashClip:
    """A stand-in reward CLIP: each text a fixed random unit vector of positive entries, so that CLIP-S
    (of positive image vectors) is never clipped at 0 and has no ties."""
    def encode_text(self, texts):
        seeds = [sum((i + 1) * ord(c) for i, c in enumerate(t)) for t in texts]
        return torch.stack([F.normalize(torch.rand(6, generator=torch.Generator().manual_seed(s)), dim=0)
                            for s in seeds])


def test_self_training_is_cross_entropy_on_the_teachers_captions_that_clip_s_scores_best():
    """losses.self_training_loss: the frozen teacher samples K captions per image, CLIP-S keeps the top
    share of the B*K, and the loss is the policy's cross-entropy on exactly those; the teacher gets no
    gradient, and the policy does not change what is sampled."""
    torch.manual_seed(0)
    policy, teacher, B, K, keep = small_captioner(), small_captioner().eval().requires_grad_(False), 3, 4, 0.5
    tok = SimpleNamespace(eos_id=0, decode=lambda ids: " ".join(map(str, ids)))
    feats = torch.randn(B, 8, generator=torch.Generator().manual_seed(0))
    image = F.normalize(torch.rand(B, 6, generator=torch.Generator().manual_seed(2)), dim=-1)  # the reward CLIP's
    clip = HashClip()
    loss, stats = losses.self_training_loss(policy, teacher, feats, clip, tok, k=K, keep_fraction=keep,
                                            reward_features=image, max_new_tokens=5,
                                            generator=torch.Generator().manual_seed(1))
    # by hand: the teacher's samples, their CLIP-S, the best half, the policy's CE on them
    r = losses.rollout(teacher, feats, tok, lambda texts, k: losses.clip_reward(clip, image.repeat_interleave(k, 0), texts),
                       k=K, max_new_tokens=5, generator=torch.Generator().manual_seed(1))
    order = r.reward.argsort(descending=True)
    kept, dropped = order[: B * K // 2], order[B * K // 2:]
    assert r.reward[kept].min() > r.reward[dropped].max()        # the kept share is the top by CLIP-S
    tokens, mask = r.out.tokens[kept], r.out.mask[kept]
    logits = policy(feats.repeat_interleave(K, 0)[kept], tokens[:, :-1])[:, policy.prefix_len - 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens.masked_fill(~mask, -100).reshape(-1),
                         ignore_index=-100)
    assert torch.allclose(loss, ce, atol=1e-6)
    assert stats["kept_reward"] == pytest.approx(r.reward[kept].mean().item())
    assert stats["reward"] == pytest.approx(r.reward.mean().item())
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters()) and any(p.grad is not None for p in policy.parameters())
    other = small_captioner()                                    # another policy: the same samples, the same kept
    _, stats2 = losses.self_training_loss(other, teacher, feats, clip, tok, k=K, keep_fraction=keep,
                                          reward_features=image, max_new_tokens=5,
                                          generator=torch.Generator().manual_seed(1))
    assert stats2["kept_reward"] == stats["kept_reward"]


def test_weight_decay_on_matrices_only_never_on_embeddings_norms_or_biases():
    model = small_captioner()
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    kept = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "gpt.transformer.wte.weight" in kept and "gpt.transformer.wpe.weight" in kept  # embedding tables
    assert "gpt.transformer.h.0.attn.c_attn.weight" in decayed and "mapper.fc1.weight" in decayed
    assert all(not n.endswith(".bias") and ".ln_" not in n for n in decayed)
    assert decayed | kept == set(names.values()) and not decayed & kept  # every parameter once


def test_param_groups_on_a_plain_stack_of_layers():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [(4, 4)]  # only the linear weight
    assert len(no_decay["params"]) == 4  # embedding, linear bias, norm weight and bias


def test_make_optimizer_skips_frozen_parameters():
    model = small_captioner()
    model.gpt.requires_grad_(False)  # the transformer-mapper recipe: GPT frozen
    opt = make_optimizer(model, 1e-3, 0.01)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in model.mapper.parameters()}
    assert opt.param_groups[0]["lr"] == 1e-3


def test_caption_batch_appends_eos_pads_targets_with_ignore_and_cuts():
    tok = get_tokenizer()
    a, b = tok.encode("a red circle"), tok.encode("a circle")
    inputs, targets = caption_batch(tok, ["a red circle", "a circle"])
    assert targets[0].tolist() == a + [tok.eos_id]
    assert targets[1].tolist() == b + [tok.eos_id] + [-100] * (len(a) - len(b))
    assert inputs[1].tolist() == b + [tok.eos_id] * (len(a) - len(b) + 1)  # inputs padded with EOS
    inputs, targets = caption_batch(tok, ["a red circle"], max_tokens=2)
    assert targets[0].tolist() == a[:1] + [tok.eos_id]  # cut to max_tokens, EOS included


def test_lm_batch_is_eos_caption_eos_shifted_by_one():
    tok = get_tokenizer()
    a = tok.encode("a red circle")
    x, y = pretrain.lm_batch(tok, ["a red circle", "a circle"])
    assert x[0].tolist() == [tok.eos_id] + a and y[0].tolist() == a + [tok.eos_id]
    assert y[1].tolist()[-1] == -100 and x.shape == y.shape


def test_repetition_rate_counts_captions_with_a_word_twice_in_a_row():
    assert losses.repetition_rate(["a red red circle", "a red circle", "red a red", "circle circle"]) == 0.5
    assert losses.repetition_rate([]) == 0.0


class RecordingCLIP:
    """Stands in for CLIPEncoder.encode_text: records the texts, returns fixed unit vectors."""
    def __init__(self):
        self.seen = []

    def encode_text(self, texts):
        self.seen += texts
        return F.normalize(torch.ones(len(texts), 4), dim=-1)


def test_clip_reward_joins_prompt_and_caption_one_way():
    clip = RecordingCLIP()
    image = F.normalize(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, -1.0, -1.0]]), dim=-1)
    r = losses.clip_reward(clip, image, ["a red circle", ""], w=2.5)
    assert clip.seen == ["a photo depicts a red circle", "a photo depicts"]
    assert r.tolist() == pytest.approx([2.5, 0.0])  # cos 1, and cos -0.5 clamped at 0
    assert losses.prompted(["x"], prompt="") == ["x"]


def test_sampled_logprobs_are_those_of_the_tempered_distribution():
    logits = torch.randn(2, 3, 7)
    tokens = torch.randint(7, (2, 3))
    for t in (0.5, 1.0, 2.0):
        expected = F.log_softmax(logits / t, dim=-1).gather(2, tokens[:, :, None]).squeeze(2)
        assert torch.allclose(losses.sampled_logprobs(logits, tokens, t), expected, atol=1e-6)


def test_caption_loss_is_float32_for_bf16_logits():
    logits = torch.randn(2, 6, 11)
    tokens = torch.tensor([[1, 2, 3], [4, 5, -100]])
    a = losses.caption_loss(logits.bfloat16(), tokens, 3)
    b = losses.caption_loss(logits.bfloat16().float(), tokens, 3)
    assert a.dtype == torch.float32 and torch.equal(a, b)  # the same loss as fp32 on the same values


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.json"
    write_json(path, {"a": 1})

    def broken(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(str(path), broken)
    assert read_json(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["f.json"]  # no temporary file left behind


def test_a_fresh_stage_drops_its_old_log_records_and_keeps_earlier_stages(tmp_path):
    old = [{"stage": 1, "iter": 0, "captions": []}, {"stage": 1, "iter": 10}, {"stage": 2, "iter": 0, "captions": []},
           {"stage": 2, "iter": 5}]  # step 0 is an evaluation (captions); training steps count from 1
    for r in old:
        log_jsonl(tmp_path, r)
    restart_log(tmp_path, 2)  # a rerun of stage 2 in the same out_dir
    assert read_log(tmp_path) == old[:2]
    restart_log(tmp_path, 1)  # a rerun of stage 1 makes stage 2 stale too
    assert read_log(tmp_path) == []
    restart_log(tmp_path / "none", 1)  # no log yet: nothing to do
    assert not (tmp_path / "none").exists()
    # a resume of stage 1 from step 2 keeps its steps up to 2, drops its evaluation at 2 (done again) and its
    # later steps, and keeps stage 2's records (a two-stage --resume whose stage 1 had finished, say)
    run = [{"stage": 1, "iter": 0, "captions": []}, {"stage": 1, "iter": 1}, {"stage": 1, "iter": 2},
           {"stage": 1, "iter": 2, "captions": []}, {"stage": 1, "iter": 3}, {"stage": 2, "iter": 1}]
    for r in run:
        log_jsonl(tmp_path, r)
    restart_log(tmp_path, 1, step=2)
    assert read_log(tmp_path) == run[:3] + run[5:]


def test_the_small_world_presets_parse_and_pick_the_small_models():
    import data_prep
    import train
    from nanocap.tools.cli import parse_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = parse_config(data_prep.ShapesConfig, ["--config", os.path.join(root, "configs/shapes_small_data.json")])
    assert data.small_models and data.clip_batch_size == 128 and data.data_dir == "data/shapes_small"
    run = parse_config(train.Config, ["--config", os.path.join(root, "configs/shapes_small.json")])
    assert run.data_dir == data.data_dir and run.out_dir == "out/shapes_small"
    for cfg in (pretrain.SMALL_REWARD_CLIP_CFG, pretrain.SMALL_EVAL_CLIP_CFG):  # smaller than the full world's
        assert cfg["vision_cfg"]["width"] < pretrain.REWARD_CLIP_CFG["vision_cfg"]["width"]
