"""Bad input gets one clear line, and no run loses work: sample.py on every kind of bad file,
checkpoints that carry code or do not fit, and a loss that becomes NaN."""
import os
import pickle

import pytest
import torch
from PIL import Image

import sample
import train
from nanocap import losses
from nanocap.captioner import read_checkpoint
from nanocap.data.shapes import make_split, render
from nanocap.tools.checks import check_config
from nanocap.tools.cli import parse_config

from tests.helpers import ROOT, cli


def assert_one_line_error(r, *words):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


# ---- sample.py: every bad input is one line on stderr and a non-zero exit ----------------------

def _bad_files(folder):
    """name -> (path, a word the message must contain)"""
    folder.mkdir(exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("hello, I am a text file")
    good = folder / "ok.jpg"
    render(make_split(1, seed=3)[0]).resize((200, 200)).save(good, quality=95)
    (folder / "cut.jpg").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    Image.new("1", (10000, 10000)).save(folder / "bomb.png")  # 100M pixels, a few KB on disk
    (folder / "vector.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>')
    return {"missing": (folder / "nope.jpg", "no such file"), "empty": (folder / "empty.jpg", "empty"),
            "text": (folder / "text.jpg", "not an image"), "truncated": (folder / "cut.jpg", "truncated"),
            "bomb": (folder / "bomb.png", "decompression bomb"), "unsupported": (folder / "vector.svg", "not an image")}


@pytest.mark.slow
def test_sample_bad_image_is_one_line(tmp_path, tiny_run, capsys):
    bad = _bad_files(tmp_path / "bad")
    path, word = bad["truncated"]  # one through the command line: stderr holds that one line and nothing else
    assert_one_line_error(cli("sample.py", "--out_dir", tiny_run, "--image", str(path)), str(path), word)
    for kind, (path, word) in bad.items():  # every kind, in this process: the same SystemExit line
        with pytest.raises(SystemExit) as e:
            sample.main(parse_config(sample.Config, ["--out_dir", tiny_run, "--image", str(path)]))
        message = str(e.value.code)
        assert message.startswith("error: ") and "\n" not in message and str(path) in message and word in message, kind
        assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_sample_folder_without_images_is_one_line(tmp_path, tiny_run):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("no pictures here")
    with pytest.raises(SystemExit) as e:  # in this process: the line sample.py exits with
        sample.main(parse_config(sample.Config, ["--out_dir", tiny_run, "--image", str(tmp_path / "docs")]))
    line = str(e.value.code)
    assert line.startswith("error: ") and "\n" not in line and "no images" in line


@pytest.mark.slow
def test_sample_bad_files_in_a_batch_are_skipped(tmp_path, tiny_run):
    bad = _bad_files(tmp_path / "bad")
    good = tmp_path / "bad" / "ok.jpg"
    r = cli("sample.py", "--out_dir", tiny_run, "--image", str(good), *[str(p) for p, _ in bad.values()])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert [l.split(": ")[0] for l in r.stdout.splitlines()] == [str(good)]  # the good one is captioned
    assert len([l for l in r.stderr.splitlines() if l.startswith("skipped: ")]) == len(bad)


# ---- checkpoints ---------------------------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a malicious pickle does: call a function while loading
        return (open, (self.marker, "w"))


@pytest.mark.slow
def test_checkpoint_with_pickled_code_is_refused(tmp_path, tiny_run):
    ckpt = torch.load(os.path.join(tiny_run, "stage1.pt"), weights_only=True)
    marker = tmp_path / "code_ran"
    ckpt["config"]["payload"] = _RunsCode(str(marker))
    evil = tmp_path / "evil.pt"
    torch.save(ckpt, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(ValueError, match="not a safe nanocap checkpoint"):
        read_checkpoint(evil)
    assert_one_line_error(cli("sample.py", "--ckpt", str(evil), "--image", "x.jpg"), "weights_only")
    assert not marker.exists()  # the payload never ran


@pytest.mark.slow
def test_resume_with_a_different_model_is_one_line(tmp_path, tiny_run, tiny_shapes):
    out = tmp_path / "out"
    out.mkdir()
    # only stage1.pt, as a run made before --keep_best left it: --resume falls back to it
    (out / "stage1.pt").write_bytes(open(os.path.join(tiny_run, "stage1.pt"), "rb").read())
    r = cli("train.py", "--stage", "1", "--data_dir", tiny_shapes, "--out_dir", str(out), "--resume", "--prefix_len", "4",
            "--max_iters", "3")
    assert_one_line_error(r, "stage1.pt", "prefix_len")


@pytest.mark.slow
def test_stage2_from_a_checkpoint_of_another_clip_is_one_line(tmp_path, tiny_run, tiny_shapes):
    ckpt = torch.load(os.path.join(tiny_run, "stage1.pt"), weights_only=True)
    ckpt["clip"]["weights"] = "/elsewhere/another_clip.safetensors"
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    with pytest.raises(SystemExit) as e:  # in this process: the line train.py exits with
        train.main(parse_config(train.Config, ["--stage", "2", "--data_dir", tiny_shapes, "--out_dir",
                                               str(tmp_path / "o"), "--init_from", str(other), "--stage2_iters", "1"]))
    assert str(e.value.code).startswith("error: ") and "\n" not in str(e.value.code) and "CLIP" in str(e.value.code)


# ---- training ------------------------------------------------------------------------------------

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_shapes, monkeypatch):
    real, calls = losses.caption_loss, []

    def poisoned(*a, **k):  # the 5th training step's loss is NaN (eval calls excluded below)
        loss = real(*a, **k)
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 5:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(losses, "caption_loss", poisoned)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="nan.*stage1.last.pt.*--resume"):
        train.main(train.Config(stage=1, data_dir=tiny_shapes, out_dir=str(out), max_iters=8, eval_interval=2,
                                batch_size=4, contrastive_weight=0.0))
    ckpt = read_checkpoint(out / "stage1.last.pt")  # what --resume reads (stage1.pt is the best of steps 2 and 4)
    assert ckpt["step"] == 4  # saved at the last eval before the bad step
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


# ---- flags ---------------------------------------------------------------------------------------

BAD_FLAGS = [  # (flags, the flag the line must name)
    (["--eval_interval", "0"], "--eval_interval 0"),
    (["--log_interval", "-3"], "--log_interval -3"),
    (["--lr", "-1"], "--lr -1.0"),
    (["--stage2_lr", "0"], "--stage2_lr 0.0"),
    (["--stage2_samples", "1"], "--stage2_samples 1"),
    (["--stage1_samples", "1"], "--stage1_samples 1"),
    (["--temperature", "0"], "--temperature 0.0"),
    (["--labeled_fraction", "2"], "--labeled_fraction 2.0"),
    (["--labeled_fraction", "0"], "--labeled_fraction 0.0"),
    (["--max_iters", "-1"], "--max_iters"),
    (["--stage", "3"], "--stage 3"),
    (["--baseline", "max"], "--baseline max"),
    (["--grad_accum", "0"], "--grad_accum"),
    (["--batch_size", "0"], "--batch_size"),
    (["--clip_s_scale", "0"], "--clip_s_scale 0.0"),
    (["--kl_weight", "-0.1"], "--kl_weight"),
    (["--contrastive_tau", "-1"], "--contrastive_tau -1.0"),
    (["--mapper", "lstm"], "--mapper lstm"),
    (["--dtype", "float16"], "--dtype float16"),
    (["--init_from", "out/x/stage1.pt"], "--init_from"),  # both stages: stage 2 continues this run's stage 1
    (["--device", "tpu"], "--device tpu"),
    (["--device", "meta"], "--device meta"),  # a torch device, not one that trains
    (["--stage", "1", "--unlabeled_pool", "data/cc3m"], "--unlabeled_pool"),  # stage 1 would ignore it
    (["--max_new_tokens", "300"], "--max_new_tokens"),  # more positions than the GPT has: found when it is built
]


@pytest.mark.parametrize("flags,named", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_a_flag_value_that_cannot_work_is_one_line_before_any_work(tmp_path, tiny_shapes, flags, named):
    out = tmp_path / "out"
    cfg = parse_config(train.Config, ["--data_dir", tiny_shapes, "--out_dir", str(out), *flags])
    with pytest.raises(SystemExit) as e:
        train.main(cfg)
    line = str(e.value.code)
    assert line.startswith("error: ") and "\n" not in line and named in line, line
    assert not (out / "stage1.pt").exists() and not (out / "log.jsonl").exists()  # nothing trained, nothing logged


def test_the_defaults_the_presets_and_the_greedy_baseline_with_one_sample_pass_the_checks():
    check_config(train.Config())
    check_config(train.Config(baseline="greedy", stage2_samples=1, stage1_samples=1))
    check_config(train.Config(stage=1, stage2_samples=1))  # stage 1 alone never samples K for stage 2
    check_config(train.Config(max_iters=0, stage2_iters=0))  # saves the initial state
    presets = [f for f in os.listdir(os.path.join(ROOT, "configs")) if not f.endswith("_data.json")]
    assert len(presets) >= 8
    for name in presets:
        check_config(parse_config(train.Config, ["--config", os.path.join(ROOT, "configs", name)]))


def test_old_flag_names_still_work_for_a_release_with_a_one_line_note(tmp_path, capsys):
    old = {"--contrastive_temperature": "0.05", "--contrastive_samples": "3", "--samples_per_image": "4",
           "--reward_weight": "2.0"}
    cfg = parse_config(train.Config, [x for kv in old.items() for x in kv], renamed=train.RENAMED)
    assert (cfg.contrastive_tau, cfg.stage1_samples, cfg.stage2_samples, cfg.clip_s_scale) == (0.05, 3, 4, 2.0)
    notes = capsys.readouterr().err.strip().split("\n")
    assert len(notes) == 4 and all(n.startswith("note: the command line: --") for n in notes), notes
    assert "--reward_weight is now --clip_s_scale" in " ".join(notes)
    preset = tmp_path / "old.json"
    preset.write_text('{"samples_per_image": 3, "stage1_samples": 4, "contrastive_samples": 9}')
    cfg = parse_config(train.Config, ["--config", str(preset), "--reward_weight", "1.5", "--clip_s_scale", "3"],
                       renamed=train.RENAMED)
    assert (cfg.stage2_samples, cfg.stage1_samples, cfg.clip_s_scale) == (3, 4, 3.0)  # a new name wins over its old
    assert capsys.readouterr().err.count("\n") == 3
    with pytest.raises(SystemExit):  # the old names are not flags of their own in -h, nor without `renamed`
        parse_config(train.Config, ["--reward_weight", "2.0"])
