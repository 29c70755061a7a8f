"""train.py on a miniature shapes world: stage 1 learns, its contrastive term reaches the gradient,
stage 2 raises its reward without ever reading an unlabeled caption, both stages in one run equal
two runs, stage 1 keeps its best checkpoint and stage 2 its last, stage 2's pool is stage 1's
unlabeled split, and resume is exact."""
import json
import os
import shutil
import signal
import time

import pytest
import torch

import sample
import train
from nanocap import losses
from nanocap.base.files import atomic_write, read_json, write_json
from nanocap.base.system import System
from nanocap.captioner import load_captioner, read_checkpoint, state_digest
from nanocap.clip_encoder import CLIPEncoder
from nanocap.data import layout
from nanocap.tokenizer import caption_batch, get_tokenizer
from nanocap.tools.cli import parse_config
from nanocap.tools.training import read_log

from tests.helpers import cli_start


def run(out_dir, data_dir, **kw):
    cfg = train.Config(data_dir=data_dir, out_dir=str(out_dir), eval_interval=1000, log_interval=1, **kw)
    train.main(cfg)
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


def losses_of(log, key, stage):
    return [r[key] for r in log if r.get("stage") == stage and key in r]


def test_stage1_overfits_a_few_images(tmp_path, tiny_shapes):
    log = run(tmp_path / "out", tiny_shapes, stage=1, labeled_fraction=0.04, batch_size=5, max_iters=60, lr=3e-3,
              warmup_iters=5, contrastive_weight=0.0)  # 5 labeled images
    ce = losses_of(log, "ce", 1)
    assert len(ce) == 60
    assert sum(ce[-5:]) / 5 < 0.5 * sum(ce[:5]) / 5
    ckpt = read_checkpoint(tmp_path / "out" / "stage1.pt")
    for key in ("config", "model_args", "clip", "tokenizer", "stage", "step"):
        assert key in ckpt
    assert ckpt["stage"] == 1 and ckpt["step"] == 60 and ckpt["clip"]["normalized"] is True
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert (tmp_path / "out" / "stage1.png").exists()


def stage1_grads(model, clip, tok, feats, refs, weight, seed=0):
    """Gradients of losses.stage1_loss at this weight, sampling from a generator seeded `seed`."""
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(seed)
    loss, stats = losses.stage1_loss(model, feats, refs, clip, tok, contrastive_weight=weight, k=2, generator=gen)
    loss.backward()
    return flat_grad(model), stats


def flat_grad(model):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def test_contrastive_term_reaches_the_gradient_and_lambda_0_is_cross_entropy(tmp_path, tiny_run, tiny_shapes):
    model, ckpt = load_captioner(os.path.join(tiny_run, "stage1.pt"))
    model.train()
    tok = get_tokenizer(**ckpt["tokenizer"])
    clip = CLIPEncoder(ckpt["clip"]["name"], ckpt["clip"]["weights"])
    val = layout.read_jsonl(os.path.join(tiny_shapes, "val", "captions.jsonl"))[:6]
    feats = layout.load_features(os.path.join(tiny_shapes, "val", "features.safetensors"))[:6]
    refs = [r["captions"][0] for r in val]

    g0, _ = stage1_grads(model, clip, tok, feats, refs, weight=0.0)
    idx, tgt = caption_batch(tok, refs, 48)
    model.zero_grad(set_to_none=True)
    losses.caption_loss(model(feats, idx), tgt, model.prefix_len).backward()
    ce_only = flat_grad(model)
    assert torch.allclose(g0, ce_only, atol=1e-6)  # λ = 0: nothing but the cross-entropy

    g_half, stats = stage1_grads(model, clip, tok, feats, refs, weight=0.5)
    g_one, _ = stage1_grads(model, clip, tok, feats, refs, weight=1.0)
    rl = g_one - g0  # the same samples (same seed): the gradient of the REINFORCE term alone
    assert rl.norm() > 1e-3 * g0.norm(), "λ > 0 left the gradient unchanged"
    assert torch.allclose(g_half - g0, 0.5 * rl, rtol=1e-4, atol=1e-5)  # and it is scaled by λ
    assert stats["contrastive_rl"] != 0.0


@pytest.mark.parametrize("stage,knob", [(1, "contrastive_weight"), (2, "kl_weight")])
def test_train_py_weights_its_objective_by_lambda_and_beta(tiny_run, tiny_shapes, stage, knob):
    """train.py hands --contrastive_weight (λ) and --kl_weight (β) to the objective: with the
    same samples (same seed) the loss at weight w is loss(0) + w * (loss(1) - loss(0)), and the term moves it."""
    model, ckpt = load_captioner(os.path.join(tiny_run, "stage1.pt"))
    reference, _ = load_captioner(os.path.join(tiny_run, "stage1.pt"))
    with torch.no_grad():  # a policy a little away from its reference, so that the KL is not 0
        for p in model.mapper.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    tok = get_tokenizer(**ckpt["tokenizer"])
    clip = CLIPEncoder(ckpt["clip"]["name"], ckpt["clip"]["weights"])
    feats = layout.load_features(os.path.join(tiny_shapes, "val", "features.safetensors"))
    data = (layout.Captioned(feats, [r["captions"] for r in layout.read_jsonl(os.path.join(tiny_shapes, "val",
            "captions.jsonl"))]) if stage == 1 else layout.Unlabeled(feats))
    system = System(ddp=False, rank=0, device=torch.device("cpu"), dtype=torch.float32)

    def loss_at(w):
        cfg = train.Config(data_dir=tiny_shapes, batch_size=4, stage2_batch_size=4, stage2_samples=2, **{knob: w})
        run = train.Run(train.Data({}, {}, {}, data, None, {}, []), model, model, reference, tok, clip, None,
                        torch.Generator().manual_seed(0), {}, 0, {})
        return train.finite_loss(cfg, train.stages(cfg)[stage - 1], run, 0, system)[0].item()
    l0, l1, half = loss_at(0.0), loss_at(1.0), loss_at(0.5)
    assert abs(l1 - l0) > 1e-3, (l0, l1)
    assert half == pytest.approx(l0 + 0.5 * (l1 - l0), abs=1e-4)


def test_stage2_raises_reward_and_never_reads_unlabeled_captions(tmp_path, tiny_shapes, monkeypatch):
    run(tmp_path / "out", tiny_shapes, stage=1, batch_size=8, max_iters=30, lr=3e-3, contrastive_weight=0.0)
    train_captions = os.path.join(tiny_shapes, "train", "captions.jsonl")
    real_read = layout.read_jsonl

    def guarded(path):  # any read of the train captions in stage 2 fails the test
        assert os.path.abspath(path) != os.path.abspath(train_captions), "stage 2 read the train captions"
        return real_read(path)

    monkeypatch.setattr(layout, "read_jsonl", guarded)
    log = run(tmp_path / "out", tiny_shapes, stage=2, stage2_iters=40, stage2_batch_size=8, stage2_samples=4,
              stage2_lr=3e-3, kl_weight=0.0, baseline="mean")
    reward = losses_of(log, "reward", 2)
    assert len(reward) == 40
    assert sum(reward[-8:]) / 8 > sum(reward[:8]) / 8
    last_step = [r for r in log if r.get("stage") == 2 and "reward" in r][-1]
    for key in ("reward_std", "baseline", "kl", "gen_len", "repetition"):
        assert key in last_step
    with pytest.raises(RuntimeError, match="never read"):
        layout.Unlabeled(torch.zeros(2, 4)).captions
    # a reward CLIP's features travel with the pool: each drawn row is the same image in both
    feats, reward = torch.arange(10.0)[:, None].repeat(1, 4), torch.arange(10.0)[:, None].repeat(1, 3) + 100
    f, r = layout.Unlabeled(feats, reward).batch(5, torch.Generator().manual_seed(0))
    assert f.shape == (5, 4) and r.shape == (5, 3) and torch.equal(r[:, 0], f[:, 0] + 100)
    f, r = layout.Unlabeled(feats).batch(5, torch.Generator().manual_seed(0))
    assert torch.equal(f, r)  # by default the reward CLIP is the feature CLIP


@pytest.mark.slow
def test_no_stage_runs_stage_1_then_stage_2_as_two_runs_do(tmp_path, tiny_shapes, capsys):
    kw = dict(batch_size=4, max_iters=3, contrastive_weight=0.0, stage2_iters=3, stage2_batch_size=4,
              stage2_samples=2, stage2_warmup_iters=2, stage2_lr=1e-3)
    both = run(tmp_path / "both", tiny_shapes, **kw)  # no stage: 1, then 2 from its checkpoint
    assert "finetune_gpt = True" in capsys.readouterr().out  # stage 2 says what it inherits
    run(tmp_path / "apart", tiny_shapes, stage=1, **kw)
    run(tmp_path / "apart", tiny_shapes, stage=2, **kw)
    a, _ = load_captioner(tmp_path / "both" / "stage2.pt")
    b, ckpt = load_captioner(tmp_path / "apart" / "stage2.pt")
    assert ckpt["stage"] == 2 and ckpt["init_from"].endswith("stage1.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert losses_of(both, "lr", 2)[:2] == [5e-4, 1e-3]  # --stage2_warmup_iters 2: linear warmup


def same_weights(path_a, path_b):
    (ma, ca), (mb, cb) = load_captioner(path_a), load_captioner(path_b)
    assert ca["step"] == cb["step"]
    return all(torch.equal(va, vb) for va, vb in zip(ma.state_dict().values(), mb.state_dict().values()))


class Killed(BaseException):
    """The process dying, as train.py sees it: nothing catches it."""


@pytest.mark.slow
def test_a_kill_between_the_best_and_the_last_state_resumes_to_the_same_run(tmp_path, tiny_shapes, monkeypatch):
    # A new best is two writes (the best, then the last state). Die between them at the run's last new best,
    # then --resume: the run must end where an uninterrupted one ends, its best included. (A last state
    # written first would name a best that stage1.pt never received, and --resume would keep that stage1.pt.)
    args = ["--stage", "1", "--data_dir", tiny_shapes, "--max_iters", "4", "--eval_interval", "2",
            "--log_interval", "1", "--batch_size", "4", "--contrastive_weight", "0"]
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(parse_config(train.Config, ["--out_dir", str(a), *args]))
    lowest, new_bests = float("inf"), 0
    for r in read_log(a):
        if r["stage"] == 1 and r["iter"] > 0 and r.get("val_loss", lowest) < lowest:
            lowest, new_bests = r["val_loss"], new_bests + 1
    calls = []

    def dies(path, write):   # train.py's only atomic_write: the second write of a new best
        calls.append(path)
        if len(calls) == new_bests:
            raise Killed(path)
        return atomic_write(path, write)
    monkeypatch.setattr(train, "atomic_write", dies)
    with pytest.raises(Killed):
        train.main(parse_config(train.Config, ["--out_dir", str(b), *args]))
    monkeypatch.undo()
    train.main(parse_config(train.Config, ["--out_dir", str(b), "--resume", *args]))
    assert same_weights(a / "stage1.last.pt", b / "stage1.last.pt")
    assert same_weights(a / "stage1.pt", b / "stage1.pt")
    assert read_checkpoint(a / "stage1.pt")["best"] == read_checkpoint(b / "stage1.pt")["best"]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny_shapes):
    args = ["--stage", "1", "--data_dir", tiny_shapes, "--max_iters", "8", "--eval_interval", "2",
            "--log_interval", "1", "--batch_size", "4", "--stage1_samples", "2", "--contrastive_weight", "0.5"]
    a = tmp_path / "a"
    train.main(parse_config(train.Config, ["--out_dir", str(a), *args]))  # uninterrupted, in this process
    b = tmp_path / "b"
    proc = cli_start("train.py", "--out_dir", b, *args)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill -9 once a checkpoint exists, mid-run
        if (b / "stage1.last.pt").exists() and proc.poll() is None:
            time.sleep(0.5)
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = read_checkpoint(b / "stage1.last.pt")["step"]
    assert 0 < step < 8, "the kill should land mid-run"
    train.main(parse_config(train.Config, ["--out_dir", str(b), "--resume", *args]))  # the resume, here too
    assert read_checkpoint(b / "stage1.last.pt")["step"] == 8
    assert same_weights(a / "stage1.last.pt", b / "stage1.last.pt")  # the last state, bit for bit
    assert same_weights(a / "stage1.pt", b / "stage1.pt")  # and the same best, though it may predate the kill
    last = lambda d: [json.loads(l) for l in open(d / "log.jsonl")][-1]
    assert last(a)["val_loss"] == last(b)["val_loss"]


def scripted_evaluate(monkeypatch, val_losses, val_rewards=()):
    """train.evaluate replaced by one that returns the given val figures in turn."""
    figures = {1: iter(val_losses), 2: iter(val_rewards)}

    def evaluate(cfg, stage, *args):
        return {"val_loss" if stage.n == 1 else "val_reward": next(figures[stage.n])}, []

    monkeypatch.setattr(train, "evaluate", evaluate)


def test_stage1_keeps_its_best_checkpoint_and_stage2_its_last(tmp_path, tiny_shapes, monkeypatch):
    kw = dict(batch_size=4, max_iters=6, contrastive_weight=0.0, stage2_iters=4, stage2_batch_size=4,
              stage2_samples=2)
    # steps 0, 2, 4, 6: the val loss is lowest at step 4; stage 2's val reward is highest at step 2
    scripted_evaluate(monkeypatch, [9.0, 1.0, 0.5, 0.7], [1.0, 2.0, 1.5])
    train.main(train.Config(data_dir=tiny_shapes, out_dir=str(tmp_path / "best"), eval_interval=2, **kw))
    best, last = read_checkpoint(tmp_path / "best" / "stage1.pt"), read_checkpoint(tmp_path / "best" / "stage1.last.pt")
    assert (best["step"], last["step"]) == (4, 6)
    assert best["best"] == last["best"] == {"val_loss": 0.5, "step": 4}
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])
    stage2 = read_checkpoint(tmp_path / "best" / "stage2.pt")
    assert stage2["step"] == 4 and stage2["init_from"].endswith("stage1.pt")  # the last, not the best reward
    assert not (tmp_path / "best" / "stage2.last.pt").exists()
    # --no-keep_best: stage1.pt is the last state, and there is no stage1.last.pt
    scripted_evaluate(monkeypatch, [9.0, 1.0, 0.5, 0.7])
    train.main(train.Config(stage=1, data_dir=tiny_shapes, out_dir=str(tmp_path / "last"), eval_interval=2,
                            keep_best=False, **kw))
    assert read_checkpoint(tmp_path / "last" / "stage1.pt")["step"] == 6
    assert not (tmp_path / "last" / "stage1.last.pt").exists()
    assert same_weights(tmp_path / "last" / "stage1.pt", tmp_path / "best" / "stage1.last.pt")


def test_stage2_takes_its_pool_from_the_stage1_split_and_refuses_another(tmp_path, tiny_run, tiny_shapes, capsys):
    ckpt = read_checkpoint(os.path.join(tiny_run, "stage1.pt"))
    assert ckpt["split"]["labeled_fraction"] == 0.02 and ckpt["split"]["seed"] == 1337
    assert ckpt["split"]["n_labeled"] == 2 and ckpt["split"]["n_train"] == 120
    stage2 = lambda **kw: train.main(train.Config(stage=2, data_dir=tiny_shapes, out_dir=str(tmp_path / "s2"),
                                                  init_from=os.path.join(tiny_run, "stage1.pt"), stage2_iters=1,
                                                  stage2_batch_size=2, stage2_samples=2, **kw))
    labeled, _ = layout.labeled_split(120, 0.02, 1337)
    _, pool = layout.labeled_split(120, 0.02, 1338)
    for kw, named in ((dict(seed=1338), "--seed 1338 (stage 1: 1337)"),
                      (dict(labeled_fraction=0.5), "--labeled_fraction 0.5 (stage 1: 0.02)")):
        with pytest.raises(SystemExit) as e:
            stage2(**kw)
        line = str(e.value)
        assert "\n" not in line and line.startswith(f"error: {named} would put ")
        assert line.endswith("it left unlabeled; pass stage 1's --labeled_fraction 0.02 --seed 1337")
        if "seed" in kw:
            assert f"would put {len(set(labeled) & set(pool))} of the 2 images" in line
        else:  # a larger fraction, same seed: stage 1's labeled images stay out, 58 unseen ones go too
            assert "would put 0 of the 2 images" in line and "leave out 58 of the 118 it left unlabeled" in line
    stage2()  # stage 1's own split: its 118 unlabeled images
    assert "118 unlabeled images" in capsys.readouterr().out


def test_zero_steps_save_the_initial_state(tmp_path, tiny_shapes):
    """--max_iters 0 / --stage2_iters 0: each stage evaluates and saves the state it starts from."""
    run(tmp_path / "out", tiny_shapes, max_iters=0, stage2_iters=0, batch_size=4, stage2_batch_size=2,
        stage2_samples=2)
    s1, s2 = read_checkpoint(tmp_path / "out" / "stage1.pt"), read_checkpoint(tmp_path / "out" / "stage2.pt")
    assert s1["step"] == s2["step"] == 0 and s1["best"]["step"] == 0
    assert all(torch.equal(s1["model"][k], s2["model"][k]) for k in s1["model"])  # stage 2 of 0 steps: stage 1
    assert (tmp_path / "out" / "stage1.png").exists() and (tmp_path / "out" / "stage2.png").exists()


def test_resume_without_keep_best_continues_the_last_state(tmp_path, tiny_shapes, monkeypatch, capsys):
    """A run with --keep_best (stage1.pt the best, step 2; stage1.last.pt the last, step 4), resumed
    with --keep_best false, continues from step 4, not from the best; resumed again, from the later
    of the two files. A checkpoint past --max_iters is one line."""
    kw = dict(stage=1, data_dir=tiny_shapes, out_dir=str(tmp_path), batch_size=4, eval_interval=2, log_interval=1,
              contrastive_weight=0.0)
    scripted_evaluate(monkeypatch, [9.0, 1.0, 2.0])
    train.main(train.Config(**kw, max_iters=4))
    assert (read_checkpoint(tmp_path / "stage1.pt")["step"], read_checkpoint(tmp_path / "stage1.last.pt")["step"]) \
        == (2, 4)
    capsys.readouterr()
    scripted_evaluate(monkeypatch, [3.0, 3.0])  # steps 4 (where it resumes) and 6
    train.main(train.Config(**kw, max_iters=6, resume=True, keep_best=False))
    out = capsys.readouterr().out
    assert f"resuming stage 1 from {tmp_path / 'stage1.last.pt'}, step 4" in out
    assert "step 3/6" not in out and "step 5/6" in out  # steps 3 and 4 were not done again
    assert read_checkpoint(tmp_path / "stage1.pt")["step"] == 6  # --keep_best false: the last state
    scripted_evaluate(monkeypatch, [3.0, 3.0])
    train.main(train.Config(**kw, max_iters=8, resume=True, keep_best=False))
    assert f"resuming stage 1 from {tmp_path / 'stage1.pt'}, step 6" in capsys.readouterr().out  # not .last's 4
    with pytest.raises(SystemExit, match="is at step 8, past --max_iters 6"):
        train.main(train.Config(**kw, max_iters=6, resume=True))


def test_a_checkpoint_from_before_per_rank_streams_resumes_exactly(tmp_path, tiny_shapes, monkeypatch):
    """A single process's checkpoint with the old keys (generator, torch_rng; no KL reference, no split
    digest) resumes to the uninterrupted run's weights."""
    kw = dict(stage=1, data_dir=tiny_shapes, batch_size=4, max_iters=4, eval_interval=2, contrastive_weight=0.5,
              stage1_samples=2)
    train.main(train.Config(**kw, out_dir=str(tmp_path / "whole")))
    lr_at = train.lr_at

    def stop_at_2(step, *args):
        if step == 2:
            raise KeyboardInterrupt
        return lr_at(step, *args)
    monkeypatch.setattr(train, "lr_at", stop_at_2)
    with pytest.raises(KeyboardInterrupt):
        train.main(train.Config(**kw, out_dir=str(tmp_path / "old")))
    monkeypatch.setattr(train, "lr_at", lr_at)
    path = tmp_path / "old" / "stage1.last.pt"
    ckpt = read_checkpoint(path)
    ckpt["generator"], ckpt["torch_rng"] = ckpt.pop("generators")[0], ckpt.pop("torch_rngs")[0]
    del ckpt["reference"], ckpt["split"]["labeled"]
    torch.save(ckpt, path)
    train.main(train.Config(**kw, out_dir=str(tmp_path / "old"), resume=True))
    assert same_weights(tmp_path / "whole" / "stage1.last.pt", tmp_path / "old" / "stage1.last.pt")


def test_a_nan_validation_loss_is_one_line_naming_the_last_good_checkpoint(tmp_path, tiny_shapes, monkeypatch):
    scripted_evaluate(monkeypatch, [9.0, 1.0, float("nan")])  # steps 0, 2, 4
    with pytest.raises(SystemExit) as e:
        train.main(train.Config(stage=1, data_dir=tiny_shapes, out_dir=str(tmp_path), batch_size=4, max_iters=6,
                                eval_interval=2, contrastive_weight=0.0))
    line = str(e.value.code)
    assert line.startswith("error: the val_loss became nan at step 4") and "\n" not in line
    assert f"the last good checkpoint is {tmp_path / 'stage1.last.pt'}" in line
    assert read_checkpoint(tmp_path / "stage1.last.pt")["step"] == 2  # the NaN state was not saved over it
    assert read_checkpoint(tmp_path / "stage1.pt")["step"] == 2


def remade_with(tmp_path, tiny_shapes, **meta_changes):
    """tiny_shapes as data_prep would re-make it with other meta.json values: the same files, linked."""
    remade = tmp_path / "remade"
    remade.mkdir()
    for name in os.listdir(tiny_shapes):
        if name != "meta.json":
            os.symlink(os.path.join(tiny_shapes, name), remade / name)
    meta = read_json(os.path.join(tiny_shapes, "meta.json"))
    write_json(remade / "meta.json", dict(meta, **meta_changes))
    return str(remade)


def test_stage2_refuses_a_dataset_whose_captioned_set_changed(tmp_path, tiny_run, tiny_shapes):
    """Same n_train, flags and seed, but 100 captioned train images instead of all 120: another
    labeled split, so stage 1's labeled images could land in stage 2's pool."""
    remade = remade_with(tmp_path, tiny_shapes, train_captioned=100)
    labeled, _ = layout.labeled_split(120, 0.02, 1337)
    _, pool = layout.labeled_split(120, 0.02, 1337, 100)
    with pytest.raises(SystemExit) as e:
        train.main(train.Config(stage=2, data_dir=remade, out_dir=str(tmp_path / "s2"), stage2_iters=1,
                                init_from=os.path.join(tiny_run, "stage1.pt"), stage2_batch_size=2,
                                stage2_samples=2))
    line = str(e.value.code)
    assert "\n" not in line and "learned from another labeled split" in line
    assert "had all captioned train images, this one has 100" in line
    assert f"would put {len(set(labeled) & set(pool))} of the 2 images" in line


def test_resumed_stage2_keeps_its_kl_reference(tmp_path, tiny_shapes):
    kw = dict(data_dir=tiny_shapes, out_dir=str(tmp_path / "out"), batch_size=4, max_iters=2, contrastive_weight=0.0,
              stage2_iters=2, stage2_batch_size=2, stage2_samples=2, eval_interval=1000)
    train.main(train.Config(**kw))
    stage2 = read_checkpoint(tmp_path / "out" / "stage2.pt")
    assert stage2["reference"] == state_digest(load_captioner(tmp_path / "out" / "stage1.pt")[0])
    train.main(train.Config(**dict(kw, stage=2, resume=True)))  # its own reference: resumes
    other = tmp_path / "other.pt"
    shutil.copyfile(tmp_path / "out" / "stage1.pt", other)
    with pytest.raises(SystemExit, match=r"continued .*stage1\.pt, its KL reference, and this run's is .*other\.pt"):
        train.main(train.Config(**dict(kw, stage=2, resume=True, init_from=str(other))))
    train.main(train.Config(**dict(kw, stage=1, max_iters=3)))  # stage 1 trained again in place: other weights
    with pytest.raises(SystemExit, match="has changed since"):
        train.main(train.Config(**dict(kw, stage=2, resume=True)))


@pytest.mark.slow
@pytest.mark.skipif(not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")),
                    reason="torch.compile on the CPU needs a C++ compiler (g++ or clang++)")
def test_bfloat16_and_compile_train_both_stages_and_sample(tmp_path, tiny_shapes, capsys):
    """The GPU presets' code path (bf16 autocast, torch.compile) on the CPU: both stages train, the
    compiled forward gives the eager one's losses, and the checkpoint samples. One step a stage (each
    compile costs about 15 s here): stage 2's other shapes make dynamo compile the forward again,
    with dynamic shapes, as a GPU run does at its second step."""
    kw = dict(dtype="bfloat16", max_iters=1, stage2_iters=1, batch_size=4, contrastive_weight=0.5,
              stage1_samples=2, stage2_batch_size=2, stage2_samples=2)
    compiled = run(tmp_path / "compiled", tiny_shapes, compile=True, **kw)
    eager = run(tmp_path / "eager", tiny_shapes, **kw)
    # the same batches and samples (the generator draws alike): the same losses up to bf16 rounding in
    # another order (seen here: 3e-4 relative at most)
    for stage, key in ((1, "loss"), (1, "ce"), (2, "loss"), (2, "kl")):
        assert losses_of(compiled, key, stage) == pytest.approx(losses_of(eager, key, stage), rel=0.01, abs=1e-3)
    ckpt = read_checkpoint(tmp_path / "compiled" / "stage2.pt")
    assert ckpt["step"] == 1 and not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    images = os.path.join(tiny_shapes, "test", "images")
    image = os.path.join(images, sorted(os.listdir(images))[0])
    capsys.readouterr()
    assert sample.main(parse_config(sample.Config, ["--out_dir", str(tmp_path / "compiled"), "--image", image])) == 0
    out = capsys.readouterr().out  # stage2.pt, the latest, captions the image
    assert out.startswith(f"{image}: ") and len(out.split(": ", 1)[1].split()) >= 1
