"""train.py on a miniature shapes world: stage 1 learns, stage 2 raises its reward without ever
reading an unlabeled caption, resume is exact, and DDP matches a single process."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from nanocap import data
from nanocap.captioner import load_captioner, read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tmp_path, data_dir, **kw):
    cfg = train.Config(data_dir=data_dir, out_dir=str(tmp_path / "out"), eval_interval=1000, log_interval=1, **kw)
    train.main(cfg)
    return [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]


def losses_of(log, key, stage):
    return [r[key] for r in log if r.get("stage") == stage and key in r]


def test_stage1_overfits_a_few_images(tmp_path, tiny_shapes):
    log = run(tmp_path, tiny_shapes, labeled_fraction=0.04, batch_size=5, max_iters=60, lr=3e-3,
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


def test_stage1_contrastive_term_runs(tmp_path, tiny_shapes):
    log = run(tmp_path, tiny_shapes, batch_size=4, max_iters=3, contrastive_samples=2, contrastive_weight=0.5)
    assert all(r <= 0 for r in losses_of(log, "contrastive_reward", 1))  # a log-probability


def test_stage2_raises_reward_and_never_reads_unlabeled_captions(tmp_path, tiny_shapes, monkeypatch):
    run(tmp_path, tiny_shapes, batch_size=8, max_iters=30, lr=3e-3, contrastive_weight=0.0)
    train_captions = os.path.join(tiny_shapes, "train", "captions.jsonl")
    real_read = data.read_jsonl

    def guarded(path):  # any read of the train captions in stage 2 fails the test
        assert os.path.abspath(path) != os.path.abspath(train_captions), "stage 2 read the train captions"
        return real_read(path)

    monkeypatch.setattr(data, "read_jsonl", guarded)
    log = run(tmp_path, tiny_shapes, stage=2, stage2_iters=40, stage2_batch_size=8, samples_per_image=4,
              stage2_lr=3e-3, kl_weight=0.0, baseline="mean")
    reward = losses_of(log, "reward", 2)
    assert len(reward) == 40
    assert sum(reward[-8:]) / 8 > sum(reward[:8]) / 8
    last_step = [r for r in log if r.get("stage") == 2 and "reward" in r][-1]
    for key in ("reward_std", "baseline", "kl", "gen_len", "repetition"):
        assert key in last_step
    with pytest.raises(RuntimeError, match="never read"):
        data.Unlabeled(torch.zeros(2, 4)).captions


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny_shapes):
    args = ["--data_dir", tiny_shapes, "--max_iters", "12", "--eval_interval", "2", "--log_interval", "1",
            "--batch_size", "4", "--contrastive_samples", "2", "--contrastive_weight", "0.5"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    a = tmp_path / "a"
    subprocess.run([sys.executable, "train.py", "--out_dir", str(a)] + args, cwd=ROOT, env=env, check=True,
                   capture_output=True)
    b = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "train.py", "--out_dir", str(b)] + args, cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill -9 once a checkpoint exists, mid-run
        if (b / "stage1.pt").exists() and proc.poll() is None:
            time.sleep(0.5)
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = read_checkpoint(b / "stage1.pt")["step"]
    assert 0 < step < 12, "the kill should land mid-run"
    subprocess.run([sys.executable, "train.py", "--out_dir", str(b), "--resume"] + args, cwd=ROOT, env=env,
                   check=True, capture_output=True)
    ma, _ = load_captioner(a / "stage1.pt")
    mb, ckpt_b = load_captioner(b / "stage1.pt")
    assert ckpt_b["step"] == 12
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k
    last = lambda d: [json.loads(l) for l in open(d / "log.jsonl")][-1]
    assert last(a)["val_loss"] == last(b)["val_loss"]
