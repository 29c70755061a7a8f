"""sample.py through its command line, and the image loader on every kind of file users have."""
import json
import os
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import sample
from nanocap.data.images import ImageError, load_image
from nanocap.data.shapes import make_split, render
from nanocap.tools.cli import parse_config

from tests.helpers import cli


def sample_cli(*args):
    return cli("sample.py", *args)


def sample_here(*args):
    """sample.py's main in this process (no interpreter start-up): its return code."""
    return sample.main(parse_config(sample.Config, [str(a) for a in args]))


@pytest.mark.slow
def test_captions_a_generated_image_and_a_folder(tmp_path, tiny_run, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, scene in enumerate(make_split(3, seed=5)):
        render(scene).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_text("not an image")
    r = sample_cli("--out_dir", tiny_run, "--image", str(folder), "--method", "beam", "--beam_size", "3")
    assert r.returncode == 1  # the bad file is reported, the good ones are still captioned
    assert len([l for l in r.stdout.splitlines() if ": " in l]) == 3
    assert "broken.jpg" in r.stderr and "Traceback" not in r.stderr
    # the other modes in this process (the command line above is the one a user types)
    assert sample_here("--out_dir", tiny_run, "--image", folder / "0.png") == 0
    assert capsys.readouterr().out.startswith(str(folder / "0.png") + ": ")
    assert sample_here("--out_dir", tiny_run, "--image", folder / "1.png", "--method", "sample",
                       "--num_captions", "3", "--top_p", "0.9") == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


@pytest.mark.slow
def test_user_errors_get_one_line(tmp_path, tiny_run):
    r = sample_cli("--out_dir", tiny_run, "--image", str(tmp_path / "missing.jpg"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "no such file" in r.stderr
    with pytest.raises(SystemExit, match="^error: .*train.py --stage 1"):  # one line (in this process)
        sample_here("--out_dir", tmp_path, "--image", tmp_path / "missing.jpg")


@pytest.mark.slow
def test_eval_writes_scores_and_coco_captions(tmp_path, tiny_run, capsys):
    out = tmp_path / "res" / "test.json"
    assert sample_here("--out_dir", tiny_run, "--split", "test", "--eval", "--out_json", out) == 0
    printed = capsys.readouterr().out
    scores = json.loads(out.read_text())
    for key in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "CLIP-S", "RefCLIP-S", "R@1", "R@5", "R@10",
                "no_claim", "attr_recall", "fluency", "reward CLIP-S", "reward R@1"):
        assert key in scores
    # the shapes world's judge is the evaluation CLIP; the reward CLIP's own score is kept apart
    assert "judged by" in printed and "reward CLIP-S and R@1 by the reward CLIP" in printed
    captions = json.loads((tmp_path / "res" / "test.captions.json").read_text())
    assert set(captions[0]) == {"image_id", "caption"} and len(captions) == 16


@pytest.mark.slow
def test_compare_prints_each_checkpoint_and_draws_a_grid(tmp_path, tiny_run, capsys):
    grid = tmp_path / "cmp.png"
    ckpt = os.path.join(tiny_run, "stage1.pt")
    (tmp_path / "copy").mkdir()
    shutil.copy(ckpt, tmp_path / "copy" / "stage1.pt")  # two runs: labels become run/stage1, copy/stage1
    assert sample_here("--split", "test", "--compare", "3", "--ckpts", ckpt, tmp_path / "copy" / "stage1.pt",
                       "--grid", grid) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(l.startswith("images/") for l in lines) == 3
    assert sum(l.strip().startswith("reference:") for l in lines) == 3
    assert sum(l.strip().startswith("copy/stage1:") for l in lines) == 3
    assert sum("/stage1:" in l for l in lines) == 6  # two columns, three images
    assert sum(bool(re.search(r"\[\d+ true(; false: .+)?\]$", l)) for l in lines) == 6  # each claim checked
    assert Image.open(grid).format == "PNG"
    sample.main(parse_config(sample.Config, ["--split", "test", "--compare", "2", "--ckpts", ckpt, ckpt]))
    out = capsys.readouterr().out  # the same file twice: two columns
    assert sum(l.strip().startswith("stage 1 (2):") for l in out.splitlines()) == 2
    with pytest.raises(SystemExit, match="^error: .*nope.pt"):  # one line, no traceback
        sample.main(parse_config(sample.Config, ["--split", "test", "--compare", "2", "--ckpts", str(tmp_path / "nope.pt")]))


@pytest.mark.slow
def test_table_collects_score_files(tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps({"BLEU-4": 12.345, "CIDEr": 100.0, "distinct": 50}))
    (tmp_path / "b.json").write_text(json.dumps({"CIDEr": 7.0}))
    (tmp_path / "a.captions.json").write_text(json.dumps([{"image_id": 0, "caption": "x"}]))  # caught by a glob
    (tmp_path / "notes.json").write_text(json.dumps(["not scores"]))
    files = (tmp_path / f for f in ("a.json", "a.captions.json", "notes.json", "b.json"))
    assert sample_here("--table", *files) == 0
    out, err = capsys.readouterr()
    assert "notes.json is not a score file" in err and "captions" not in err  # captions: passed over
    header, rule, a, b = out.strip().splitlines()
    assert header.split("|")[1].strip() == "row" and "CIDEr" in header
    cells = lambda row: [c.strip() for c in row.strip("|").split("|")]
    cols = cells(header)
    assert cells(a)[0] == "a" and cells(a)[cols.index("BLEU-4")] == "12.3" and cells(a)[cols.index("CIDEr")] == "100.0"
    assert cells(b)[cols.index("BLEU-4")] == "–" and cells(b)[cols.index("CIDEr")] == "7.0"
    with pytest.raises(SystemExit, match="^error: .*missing.json"):
        sample_here("--table", tmp_path / "missing.json")


# ---- the image loader ----------------------------------------------------------------------

def _picture():
    a = np.zeros((20, 30, 3), dtype=np.uint8)
    a[:, :10] = (255, 0, 0)  # a red band on the left: shows whether the picture was rotated
    return Image.fromarray(a)


@pytest.mark.parametrize("fmt,mode", [("JPEG", "RGB"), ("PNG", "RGB"), ("WEBP", "RGB"), ("GIF", "P"),
                                      ("PNG", "L"), ("PNG", "RGBA"), ("JPEG", "CMYK"), ("PNG", "I;16")])
def test_formats_and_modes_load_as_rgb(tmp_path, fmt, mode):
    im = _picture()
    im = im.convert(mode) if mode != "I;16" else Image.fromarray((np.asarray(im.convert("L")).astype(np.uint16) * 257))
    path = tmp_path / f"x.{fmt.lower()}"
    im.save(path, fmt)
    out = load_image(str(path))
    assert out.mode == "RGB" and out.size == (30, 20)


def test_rgba_composites_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert load_image(str(tmp_path / "t.png")).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_honoured(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    _picture().save(tmp_path / "r.jpg", exif=exif)
    out = load_image(str(tmp_path / "r.jpg"))
    assert out.size == (20, 30)  # upright: width and height swapped


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    r, g, b = load_image(str(tmp_path / "a.gif")).getpixel((4, 4))
    assert r > 200 and b < 50


@pytest.mark.parametrize("content,match", [(b"", "empty"), (b"hello, I am text", "not an image")])
def test_bad_files_raise_one_line(tmp_path, content, match):
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageError, match=match) as e:
        load_image(str(p))
    assert "\n" not in str(e.value)


def test_truncated_and_bomb_images(tmp_path, monkeypatch):
    _picture().resize((300, 200)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated"):
        load_image(str(tmp_path / "cut.jpg"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 300x200 is now "too many pixels"
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(str(tmp_path / "full.jpg"))
    with pytest.raises(ImageError, match="no such file"):
        load_image(str(tmp_path / "nope.png"))
