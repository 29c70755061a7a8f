"""Real data, the path a real run takes, on a miniature fake COCO made on the fly: JPEGs in train2014/
and val2014/, a Karpathy-format JSON (with a corrupt image), random ViT-B-32 weights in a file and a
tiny random GPT-2 in Hugging Face format. data_prep.py -> stage 1 -> stage 2 -> sample.py --eval,
a rerun that reuses the feature shards, your own folder with uncaptioned images, and the errors."""
import json
import os
import random
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import data_prep
import sample
import train
from nanocap.base.files import read_json
from nanocap.captioner import read_checkpoint
from nanocap.data import layout, real
from nanocap.data.shapes import captions, make_split, render
from nanocap.tools import metrics
from nanocap.tools.cli import parse_config

from tests.helpers import cli


def error_lines(r):
    return [line for line in r.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Random ViT-B-32-quickgelu weights in a safetensors file (float16: 300 MB, not 600), the open_clip
    model holding exactly those weights, and a tiny random GPT-2 saved by transformers."""
    import open_clip
    import transformers
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32-quickgelu").eval()
    state = {k: v.half() if v.is_floating_point() else v for k, v in clip.state_dict().items()}
    clip.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    save_file(state, str(folder / "vitb32.safetensors"))
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50257, n_positions=128)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder / "gpt")  # config.json + model.safetensors
    return dict(clip=str(folder / "vitb32.safetensors"), gpt=str(folder / "gpt"), model=clip)


@pytest.fixture(scope="module")
def fake_coco(tmp_path_factory):
    """8 images in COCO 2014's folders, as Karpathy splits them (2 train, 2 restval, 2 val, 2 test),
    plus one train JPEG cut in half. Returns the COCO root; the JSON is root/dataset_coco.json."""
    root = tmp_path_factory.mktemp("coco")
    splits = ["train", "train", "restval", "restval", "val", "val", "test", "test"]
    rng = random.Random(0)
    images = []
    for i, (scene, split) in enumerate(zip(make_split(len(splits), seed=3), splits)):
        folder = "train2014" if split == "train" else "val2014"
        (root / folder).mkdir(exist_ok=True)
        name = f"COCO_{folder}_{1000 + i:012d}.jpg"
        render(scene, size=96).save(root / folder / name, quality=90)
        images.append({"filepath": folder, "filename": name, "split": split, "cocoid": 1000 + i,
                       "sentences": [{"raw": c + " ", "tokens": c.split()} for c in captions(scene, rng)]})
    whole = (root / "train2014" / images[0]["filename"]).read_bytes()
    (root / "train2014" / "COCO_train2014_000000001099.jpg").write_bytes(whole[: len(whole) // 2])
    images.insert(1, dict(images[0], filename="COCO_train2014_000000001099.jpg", cocoid=1099))
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


def prep_coco(data_dir, models, coco, *extra):
    data_prep.main(["--dataset", "coco", "--coco_root", str(coco), "--karpathy_json", str(coco / "dataset_coco.json"),
                    "--data_dir", str(data_dir), "--clip_weights", models["clip"], "--gpt", models["gpt"],
                    "--batch_size", "2", "--shard_size", "3", *extra])


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory, models, fake_coco):
    data_dir = tmp_path_factory.mktemp("data") / "coco"
    prep_coco(data_dir, models, fake_coco, "--num_workers", "2")  # DataLoader workers, as on a real run
    return data_dir


@pytest.mark.slow
def test_coco_layout_meta_and_skipped_image(coco_dir, models):
    meta = read_json(coco_dir / "meta.json")
    assert meta["clip"] == meta["eval_clip"] == "ViT-B-32-quickgelu"
    assert meta["clip_weights"] == meta["eval_clip_weights"] == models["clip"] and meta["gpt"] == models["gpt"]
    assert meta["features_normalized"] is True
    assert meta["splits"] == {"train": 4, "val": 2, "test": 2} and meta["train_captioned"] == 4
    records = layout.read_jsonl(coco_dir / "train" / "captions.jsonl")
    assert [r["image_id"] for r in records] == [1000, 1001, 1002, 1003]  # restval joined train, 1099 dropped
    assert all(len(r["captions"]) == 5 and r["captions"][0] == r["captions"][0].strip() for r in records)
    skipped = (coco_dir / "train" / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and "COCO_train2014_000000001099.jpg" in skipped[0]
    assert len(list((coco_dir / "train" / "shards").iterdir())) == 2  # 5 images in shards of 3
    feats = load_file(coco_dir / "train" / "features.safetensors")["features"]
    assert feats.dtype == torch.float16 and feats.shape == (4, 512)
    import open_clip  # row i is open_clip's own embedding of line i's image: the rows still line up
    preprocess = open_clip.image_transform(224, is_train=False)
    pixels = torch.stack([preprocess(Image.open(r["image"]).convert("RGB")) for r in records])
    with torch.no_grad():
        expected = F.normalize(models["model"].encode_image(pixels), dim=-1)
    torch.testing.assert_close(feats.float(), expected, atol=2e-3, rtol=0)
    for split in ("val", "test"):  # the evaluation CLIP is the captioner's: the same rows
        a, b = (load_file(coco_dir / split / f)["features"] for f in ("features.safetensors", "features_eval.safetensors"))
        assert torch.equal(a, b) and len(a) == 2


@pytest.mark.slow
def test_coco_stage1_stage2_and_eval(tmp_path, coco_dir, models, capsys):
    out = tmp_path / "out"
    common = dict(data_dir=str(coco_dir), out_dir=str(out), eval_interval=1000, log_interval=1, max_new_tokens=8,
                  labeled_fraction=0.5)  # both stages: stage 2's pool is the half stage 1 did not see captioned
    train.main(train.Config(stage=1, batch_size=2, max_iters=2, stage1_samples=2, **common))
    ckpt = read_checkpoint(out / "stage1.pt")
    assert ckpt["clip"]["name"] == "ViT-B-32-quickgelu" and ckpt["clip"]["weights"] == models["clip"]
    assert ckpt["model_args"]["gpt"]["n_embd"] == 32  # the GPT named in meta.json
    train.main(train.Config(stage=2, stage2_iters=2, stage2_batch_size=2, stage2_samples=2, **common))
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len([r for r in log if r.get("stage") == 2 and "reward" in r]) == 2
    res = tmp_path / "res" / "test.json"
    argv = ["--out_dir", str(out), "--split", "test", "--eval", "--out_json", str(res), "--max_new_tokens", "8"]
    capsys.readouterr()
    assert sample.main(parse_config(sample.Config, argv)) == 0
    assert "the reward CLIP: CLIP-S measures the score that was optimized" in capsys.readouterr().out  # COCO's default
    scores = json.loads(res.read_text())
    keys = ["BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr", "CLIP-S", "RefCLIP-S", "R@1"] + ["METEOR"] * metrics.java_available()
    assert all(k in scores for k in keys), sorted(scores)
    results = json.loads((tmp_path / "res" / "test.captions.json").read_text())
    assert [r["image_id"] for r in results] == [1006, 1007]  # COCO's results format, by cocoid


@pytest.mark.slow
def test_coco_rerun_reuses_shards(coco_dir, models, fake_coco, monkeypatch):
    shards = sorted((coco_dir / "train" / "shards").iterdir())
    mtimes = [p.stat().st_mtime_ns for p in shards]
    feats = load_file(coco_dir / "train" / "features.safetensors")["features"]
    records = layout.read_jsonl(coco_dir / "train" / "captions.jsonl")
    os.remove(coco_dir / "train" / "captions.jsonl")  # as if killed after its last shard
    os.remove(coco_dir / "train" / "features.safetensors")
    monkeypatch.setattr(real, "CLIPEncoder", lambda *a, **k: pytest.fail("a CLIP was loaded to encode again"))
    prep_coco(coco_dir, models, fake_coco, "--num_workers", "0")
    assert [p.stat().st_mtime_ns for p in shards] == mtimes
    assert torch.equal(load_file(coco_dir / "train" / "features.safetensors")["features"], feats)
    assert layout.read_jsonl(coco_dir / "train" / "captions.jsonl") == records


@pytest.mark.slow
def test_own_folder_uncaptioned_images_are_the_unlabeled_pool(tmp_path, models, capsys):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    names = ["a.jpg", "b.png", "sub/c.jpg", "d.jpg", "e.jpg", "f.png", "sub/g.jpg"]
    scenes = make_split(len(names), seed=11)
    for name, scene in zip(names, scenes):
        render(scene, size=80).save(photos / name)
    rng = random.Random(2)
    lines = [{"image": n, "captions": captions(s, rng, n=2)} for n, s in zip(names[:3], scenes)]
    lines.append({"image": str(photos / "d.jpg"), "captions": captions(scenes[3], rng, n=2)})  # absolute path
    lines.append({"image": "e.jpg", "captions": []})  # f.png and sub/g.jpg have no line at all
    malformed = '{"image": "a.png", "captions": [oops]}\n{"image": "f.png", "captions": "one string"}\n'
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + malformed)
    data_dir = tmp_path / "data"
    data_prep.main(["--dataset", "folder", "--images", str(photos), "--captions", str(tmp_path / "captions.jsonl"),
                    "--data_dir", str(data_dir), "--clip_weights", models["clip"], "--gpt", models["gpt"],
                    "--batch_size", "4", "--num_workers", "0"])
    meta = read_json(data_dir / "meta.json")
    assert meta["splits"] == {"train": 5, "val": 1, "test": 1} and meta["train_captioned"] == 2
    # the two malformed lines (6 and 7) were skipped, counted and listed; the run completed
    report = (data_dir / "bad_caption_lines.txt").read_text().splitlines()
    assert [l.split(": ")[0] for l in report] == [f"{tmp_path / 'captions.jsonl'}:6", f"{tmp_path / 'captions.jsonl'}:7"]
    assert "skipped 2 malformed line(s)" in capsys.readouterr().out
    records = layout.read_jsonl(data_dir / "train" / "captions.jsonl")
    assert all(r["captions"] for r in records[:2]) and [r["captions"] for r in records[2:]] == [[], [], []]
    assert sorted(os.path.relpath(r["image"], photos) for r in records[2:]) == ["e.jpg", "f.png", "sub/g.jpg"]
    assert layout.labeled_split(5, 1.0, 0, meta["train_captioned"]) == ([0, 1], [2, 3, 4])
    out = tmp_path / "out"
    common = dict(data_dir=str(data_dir), out_dir=str(out), eval_interval=1000, max_new_tokens=8, labeled_fraction=1.0)
    capsys.readouterr()
    train.main(train.Config(stage=1, batch_size=2, max_iters=2, contrastive_weight=0.0, **common))
    assert "; 2 labeled images;" in capsys.readouterr().out
    train.main(train.Config(stage=2, stage2_iters=1, stage2_batch_size=3, stage2_samples=2, **common))
    assert "; 3 unlabeled images;" in capsys.readouterr().out


@pytest.mark.slow
def test_missing_inputs_are_one_line_errors(tmp_path):
    render(make_split(1, seed=1)[0]).save(tmp_path / "a.png")
    r = cli("data_prep.py", "--dataset", "folder", "--images", tmp_path, "--captions", tmp_path / "nope.jsonl",
            "--data_dir", tmp_path / "d")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(error_lines(r)) == 1 and "--captions" in error_lines(r)[0]
    with pytest.raises(SystemExit, match="--coco_root"):
        data_prep.main(["--dataset", "coco", "--data_dir", str(tmp_path / "c")])
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'bad.jsonl'}:2: not valid JSON")):
        (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "captions": ["a shape"]}\n{oops\n')
        layout.read_jsonl(tmp_path / "bad.jsonl")  # strict reading (train.py, sample.py) names the line


@pytest.mark.slow
def test_train_refuses_a_clip_other_than_the_features(tmp_path, coco_dir):
    r = cli("train.py", "--stage", "1", "--data_dir", coco_dir, "--out_dir", tmp_path / "out", "--clip", "ViT-B-16")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(error_lines(r)) == 1 and "data_prep.py --dataset coco --clip ViT-B-16" in error_lines(r)[0]


@pytest.mark.slow
def test_coco_reward_clip_of_another_architecture(tmp_path, coco_dir, models, fake_coco, monkeypatch):
    """ViT-B-32 features feed the mapper; a ViT-S-32 (width 384, its own random weights in a local
    file) scores the captions. data_prep adds its features to a dataset, reusing the B-32 shards."""
    import open_clip
    torch.manual_seed(1)
    small = open_clip.create_model("ViT-S-32").eval()
    save_file({k: v.half() for k, v in small.state_dict().items()}, str(tmp_path / "vits32.safetensors"))
    data_dir = tmp_path / "coco"
    shutil.copytree(coco_dir, data_dir)
    common = dict(data_dir=str(data_dir), out_dir=str(tmp_path / "out"), eval_interval=1000, max_new_tokens=6,
                  labeled_fraction=0.5, reward_clip="ViT-S-32", reward_clip_weights=str(tmp_path / "vits32.safetensors"))
    with pytest.raises(SystemExit, match=r"--dataset coco .* --reward_clip ViT-S-32 .*reuses the feature shards"):
        train.main(train.Config(stage=2, **common))  # the features come first, in one line
    prep_coco(data_dir, models, fake_coco, "--num_workers", "0", "--reward_clip", "ViT-S-32",
              "--reward_clip_weights", str(tmp_path / "vits32.safetensors"))
    for split, n in (("train", 4), ("val", 2)):
        feats = load_file(data_dir / split / "features_reward.safetensors")["features"]
        assert feats.shape == (n, 384)  # the reward CLIP's own embedding width, not B-32's 512
    assert not (data_dir / "test" / "features_reward.safetensors").exists()  # the test split is the judge's
    assert torch.equal(load_file(data_dir / "train" / "features.safetensors")["features"],
                       load_file(coco_dir / "train" / "features.safetensors")["features"])
    seen = {}
    stage2_loss = train.losses.stage2_loss
    def spy(model, reference, features, clip, tok, **kw):  # what stage 2 scores its samples with
        seen.update(features=features.shape, reward=kw["reward_features"].shape, clip=clip.embed_dim)
        return stage2_loss(model, reference, features, clip, tok, **kw)
    monkeypatch.setattr(train.losses, "stage2_loss", spy)
    train.main(train.Config(stage=0, batch_size=2, max_iters=1, stage2_iters=1, stage2_batch_size=2,
                            stage2_samples=2, **common))
    assert seen == {"features": (2, 512), "reward": (2, 384), "clip": 384}
    for stage in (1, 2):
        ckpt = read_checkpoint(data_dir.parent / "out" / f"stage{stage}.pt")
        assert ckpt["clip"]["name"] == "ViT-B-32-quickgelu" and ckpt["clip"]["weights"] == models["clip"]
        assert ckpt["reward_clip"] == {"name": "ViT-S-32", "weights": str(tmp_path / "vits32.safetensors")}
