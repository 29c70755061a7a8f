"""
Caption images with a trained nanocap checkpoint, or caption a whole split and score it.

    python sample.py --image x.jpg                       # greedy caption of one image
    python sample.py --image a.jpg b.png photos/ --method beam --beam_size 5
    python sample.py --image x.jpg --method sample --num_captions 5 --top_p 0.9
    python sample.py --split test --eval --out_json results/test.json
    python sample.py --split test --compare 8            # stage-1 and stage-2 captions side by side
    python sample.py --table results/*.json              # score files as one table (mean ± std over seeds)
    python sample.py --claims results                    # the paper's claims, seed by seed
    python sample.py --claims results --claims_full c_full_2400   # against full supervision at 4x the steps
    python sample.py --two_by_two results                # the features x reward 2x2, seed by seed
    python sample.py --changes results/small_float32      # stage 2 - stage 1 of a run, seed by seed
    python sample.py --paired results/self_a results/self_f   # (f) - (a), seed by seed
    python sample.py --timings results/timings.json   # the timing records of the Makefile's long targets
    python sample.py --bench results/bench_cpu.json    # bench.py's record as a table
    python sample.py --refresh README.md docs/*.md       # write every generated block again (--check: compare)
    python sample.py --curves out/small/*/seed* --grid curves.png   # stage-2 training curves of several runs

The checkpoint names its CLIP (model and weights), whether the features are normalized, and
its tokenizer, so --ckpt is all a model needs. Without --ckpt, the latest stage in --out_dir.

Which CLIP judges: CLIP-S, RefCLIP-S and R@k come from the dataset's evaluation CLIP (meta.json's
eval_clip). In the shapes world that is a second toy CLIP, of another seed and width, but trained
on the same web data with the same recipe as the reward CLIP, so it shares its blind spots
(relations, which colour goes with which shape). On COCO it is by default the captioner's own
CLIP, ViT-B/32, as papers report CLIP-S, and so the very CLIP whose score stage 2 maximised;
data_prep.py --eval_clip names an independent judge (docs/coco.md's recipe uses ViT-L/14).
When the judge is not the checkpoint's reward CLIP, "reward CLIP-S" and "reward R@1" are scored
by the reward CLIP too, where the dataset holds its test features: the score that was optimized.
"""

import contextlib
import glob
import io
import os
import shlex
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanocap.base.files import atomic_write_bytes, read_json, write_json
from nanocap.base.system import pick_device
from nanocap.captioner import load_captioner
from nanocap.clip_encoder import CLIPEncoder
from nanocap.data import grammar, layout, shapes
from nanocap.data.images import ImageError, find_images, load_image
from nanocap.decode import LENGTH_PENALTY, generate
from nanocap.losses import clip_s, embed_captions
from nanocap.tokenizer import get_tokenizer
from nanocap.tools import report, timing
from nanocap.tools.cli import parse_config


@dataclass
class Config:
    """Caption images, or a split with --eval."""
    image: list[str] = field(default_factory=list, metadata={"help": "image files and/or folders"})
    ckpt: str = field(default="", metadata={"help": "checkpoint; default: the latest stage in out_dir"})
    out_dir: str = field(default="out/shapes", metadata={"help": "where train.py wrote stage1.pt / stage2.pt"})
    method: str = field(default="greedy", metadata={"help": "greedy, beam or sample"})
    beam_size: int = field(default=5, metadata={"help": "beam search width"})
    length_penalty: float = field(default=LENGTH_PENALTY, metadata={"help": "beam: rank by sum(logp)/length**this"})
    num_captions: int = field(default=1, metadata={"help": "captions per image (best beams, or samples)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int = field(default=0, metadata={"help": "sample from the k likeliest tokens (0: all)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1: off)"})
    max_new_tokens: int = field(default=40, metadata={"help": "longest caption, in tokens"})
    batch_size: int = field(default=64, metadata={"help": "images decoded together"})
    seed: int = field(default=0, metadata={"help": "for --method sample"})
    split: str = field(default="", metadata={"help": "caption this split of the checkpoint's dataset (e.g. test)"})
    data_dir: str = field(default="", metadata={"help": "dataset; default: the one the checkpoint was trained on"})
    eval: bool = field(default=False, metadata={"help": "with --split: score the captions"})
    out_json: str = field(default="", metadata={"help": "with --eval: write the scores here (captions beside it)"})
    references: bool = field(default=False, metadata={"help": "with --eval: score reference 1 against the other 4"})
    spice: bool = field(default=True, metadata={"help": "with --eval: SPICE too, when Java and CoreNLP allow"})
    compare: int = field(default=0, metadata={"help": "with --split: this many images, by each of --ckpts"})
    ckpts: list[str] = field(default_factory=list, metadata={"help": "with --compare: checkpoints (default: stage 1 and 2)"})
    grid: str = field(default="", metadata={"help": "with --compare: also draw them to this PNG"})
    table: list[str] = field(default_factory=list, metadata={"help": "print score files as one markdown table; "
                                                                     "name.seedN.json files make one row, mean ± std"})
    claims: str = field(default="", metadata={"help": "a results folder: check the paper's claims seed by seed"})
    claims_full: str = field(default="c_full", metadata={"help": "with --claims: the full-supervision row (c) "
                                                                 "to compare with, e.g. c_full_2400"})
    two_by_two: str = field(default="", metadata={"help": "a results folder: stage 2's change in each cell of the "
                                                          "features x reward 2x2, seed by seed"})
    changes: list[str] = field(default_factory=list, metadata={"help": "score-file prefixes (results/small_float32): "
                               "stage 2's change over stage 1 (PREFIX_stage{1,2}.seedN.json), seed by seed"})
    paired: list[str] = field(default_factory=list, metadata={"help": "score-file prefixes in pairs, BEFORE AFTER "
                              "...: after - before (PREFIX.seedN.json), seed by seed"})
    bench: str = field(default="", metadata={"help": "a bench.py record (results/bench_cpu.json) as a table"})
    timings: str = field(default="", metadata={"help": "a timings file (results/timings.json): its records as a table"})
    refresh: list[str] = field(default_factory=list, metadata={"help": "Markdown files: write each block between "
                               "<!-- generated by: python sample.py ARGS --> and <!-- /generated --> again, by "
                               "running those ARGS (from the repository root)"})
    check: bool = field(default=False, metadata={"help": "with --refresh: write nothing; fail if a block differs"})
    curves: list[str] = field(default_factory=list, metadata={"help": "train.py out_dirs: their stage-2 training "
                              "curves in one PNG, --grid"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, mps"})


def latest_checkpoint(out_dir):
    for stage in (2, 1):
        path = os.path.join(out_dir, f"stage{stage}.pt")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no stage1.pt or stage2.pt in {out_dir}; train with `python train.py --stage 1` or pass --ckpt")


@torch.no_grad()
def caption_features(cfg, model, tok, features, device):
    """Captions for CLIP features (N, D): a list of N lists of num_captions strings."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    out = []
    for i in range(0, len(features), cfg.batch_size):
        prefix = model.prefix(features[i : i + cfg.batch_size].to(device))
        g = generate(model.gpt, prefix, cfg.method, cfg.max_new_tokens, tok.eos_id, cfg.beam_size,
                     cfg.length_penalty, cfg.num_captions, cfg.temperature, cfg.top_k, cfg.top_p, gen)
        texts = [tok.decode(t) for t in g.tokens.tolist()]
        out += [texts[j : j + cfg.num_captions] for j in range(0, len(texts), cfg.num_captions)]
    return out


def split_features(data_dir, split, clip):
    """(N, D) features of a split's images by the checkpoint's CLIP: the file whose header names it
    (features.safetensors for the dataset's own CLIP, features_*.safetensors for another)."""
    path = layout.find_features(data_dir, split, clip["name"], clip["weights"])
    if path is None:
        raise SystemExit(f"error: {data_dir}/{split} holds no features of CLIP {clip['name']} ({clip['weights']}), "
                         f"which the checkpoint was trained on; pass the --data_dir it was trained on")
    return layout.load_features(path)


def caption_images(cfg, model, ckpt, tok, device):
    files, errors = find_images(cfg.image)
    images, names = [], []
    for f in files:
        try:
            images.append(load_image(f))
            names.append(f)
        except ImageError as e:
            errors.append(str(e))
    if not images and len(errors) == 1:
        raise SystemExit(f"error: {errors[0]}")  # one bad input: its reason is the whole message
    for e in errors:
        print(f"skipped: {e}", file=sys.stderr)
    if not images:
        raise SystemExit("error: no readable image among " + " ".join(cfg.image))
    clip = CLIPEncoder(ckpt["clip"]["name"], ckpt["clip"]["weights"], device=device)
    feats = torch.cat([clip.encode_image(images[i : i + cfg.batch_size]) for i in range(0, len(images), cfg.batch_size)])
    for name, caps in zip(names, caption_features(cfg, model, tok, feats, device)):
        for c in caps:
            print(f"{name}: {c}")
    return 1 if errors else 0


def evaluate_split(cfg, model, ckpt, tok, device):
    from nanocap.tools import metrics  # pycocoevalcap: imported only when scoring
    data_dir = cfg.data_dir or ckpt["config"]["data_dir"]
    meta = read_json(os.path.join(data_dir, "meta.json"))
    in_data = lambda p: layout.in_data_dir(data_dir, p)  # names such as ViT-B-32-quickgelu stay names
    split_dir = layout.split_dir(data_dir, cfg.split)
    records = layout.read_jsonl(os.path.join(split_dir, "captions.jsonl"))
    references = [r["captions"] for r in records]
    if cfg.references:  # the human ceiling: reference 1 scored against the other four
        candidates = [refs[0] for refs in references]
        references = [refs[1:] for refs in references]
    else:
        feats = split_features(data_dir, cfg.split, ckpt["clip"])
        candidates = [caps[0] for caps in caption_features(cfg, model, tok, feats, device)]
    eval_clip = CLIPEncoder(in_data(meta["eval_clip"]), in_data(meta["eval_clip_weights"]), device=device)
    eval_feats_file = os.path.join(split_dir, "features_eval.safetensors")
    if os.path.exists(eval_feats_file):
        eval_feats = layout.load_features(eval_feats_file).to(device)
    else:
        eval_feats = torch.cat([eval_clip.encode_image([load_image(layout.image_path(data_dir, cfg.split, r))
                                                        for r in records[i : i + cfg.batch_size]])
                                for i in range(0, len(records), cfg.batch_size)])
    scenes = [r["scene"] for r in records] if all("scene" in r for r in records) else None  # the shapes world
    scores = metrics.evaluate_captions(candidates, references, clip=eval_clip, image_features=eval_feats,
                                       scenes=scenes, attribute_scorer=shapes.attribute_scores if scenes else None,
                                       fluent=grammar.fluent if scenes else None,
                                       spice=cfg.spice)
    reward = ckpt.get("reward_clip") or ckpt["clip"]  # before --reward_clip, the feature CLIP scored the samples
    judge = (in_data(meta["eval_clip"]), in_data(meta["eval_clip_weights"]))
    reward_feats = layout.find_features(data_dir, cfg.split, reward["name"], reward["weights"])
    if layout.same_clip(judge[0], reward["name"]) and layout.same_clip(judge[1], reward["weights"]):
        print(f"judged by {judge[0]} ({judge[1]}), the reward CLIP: CLIP-S measures the score that was optimized")
    elif reward_feats and not cfg.references:
        print(f"judged by {judge[0]} ({judge[1]}); reward CLIP-S and R@1 by the reward CLIP, {reward['name']}")
        reward_clip = CLIPEncoder(reward["name"], reward["weights"], device=device)
        feats = layout.load_features(reward_feats)
        texts = F.normalize(embed_captions(reward_clip, candidates).float().cpu(), dim=-1)  # (N, D_r), no references
        scores["reward CLIP-S"] = 100 * clip_s(F.normalize(feats, dim=-1), texts).mean().item()
        scores["reward R@1"] = metrics.retrieval(reward_clip, feats, candidates, ks=(1,))["R@1"]
    print(metrics.format_table(scores))
    if cfg.out_json:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out_json)), exist_ok=True)
        write_json(cfg.out_json, scores)
        stem = cfg.out_json[:-5] if cfg.out_json.endswith(".json") else cfg.out_json
        ids = [r.get("image_id", i) for i, r in enumerate(records)]
        write_json(stem + ".captions.json", [{"image_id": i, "caption": c} for i, c in zip(ids, candidates)])
        print(f"wrote {cfg.out_json} and {stem}.captions.json")
    return 0


def marked(caption, scene):
    """The caption, then how many of its claims are true and which are false (the shapes parser)."""
    s = shapes.attribute_scores(caption, scene)
    wrong = [claim for claim, ok in s["checked"] if not ok]
    return f"{caption}  [{s['true']} true" + (f"; false: {', '.join(wrong)}]" if wrong else "]")


def compare_checkpoints(cfg, device):
    """The first `compare` images of a split: a reference, then each checkpoint's caption."""
    paths = cfg.ckpts or [os.path.join(cfg.out_dir, f"stage{s}.pt") for s in (1, 2)]
    columns, data_dir = {}, cfg.data_dir
    several_runs = len({os.path.dirname(os.path.abspath(p)) for p in paths}) > 1
    for n, path in enumerate(paths):
        try:
            model, ckpt = load_captioner(path, device)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}")
        data_dir = data_dir or ckpt["config"]["data_dir"]  # one dataset for all: the same images in every column
        split_dir = layout.split_dir(data_dir, cfg.split)
        feats = split_features(data_dir, cfg.split, ckpt["clip"])[: cfg.compare]
        tok = get_tokenizer(**ckpt["tokenizer"])
        # a short label: "stage 1", or "shapes_full/stage1" when the checkpoints come from several runs
        stem = os.path.splitext(os.path.basename(path))[0]
        label = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), stem) if several_runs \
            else stem.replace("stage", "stage ")
        if label in columns:
            label = f"{label} ({n + 1})"  # never let two checkpoints share a column
        columns[label] = [caps[0] for caps in caption_features(cfg, model, tok, feats, device)]
    records = layout.read_jsonl(os.path.join(split_dir, "captions.jsonl"))[: cfg.compare]
    if all("scene" in r for r in records):  # the shapes world: mark each caption's false claims
        columns = {k: [marked(c, r["scene"]) for c, r in zip(v, records)] for k, v in columns.items()}
    width = max(len(k) for k in columns) + 1
    for i, r in enumerate(records):
        print(r["image"] + f"\n  {'reference:':<{width}} {r['captions'][0]}")
        for label, caps in columns.items():
            print(f"  {label + ':':<{width}} {caps[i]}")
    if cfg.grid:
        images = [load_image(layout.image_path(data_dir, cfg.split, r)) for r in records]
        report.draw_grid(cfg.grid, images, [[f"{k}: {v[i]}" for k, v in columns.items()] for i in range(len(records))])
    return 0


def refresh_blocks(paths, check=False):
    """Every generated block of these Markdown files made again by its own sample.py command (a
    results table, the claims, ...), run here; with check, only say which files would change."""
    def run(args):  # a block's arguments, globs expanded as a shell would; what main prints
        argv = [w for a in shlex.split(args) for w in (sorted(glob.glob(a)) if "*" in a else [a])]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(parse_config(Config, argv))
        return out.getvalue().rstrip("\n")
    stale = []
    for path in paths:
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise SystemExit(f"error: cannot read {path}: {e.strerror}") from None
        new = report.refresh_blocks(text, run)
        if new != text:
            stale.append(path)
            if not check:
                atomic_write_bytes(path, new.encode())
    if check and stale:
        raise SystemExit(f"error: generated blocks differ from their commands in {', '.join(stale)}: "
                         f"run python sample.py --refresh {' '.join(stale)}")
    print(f"{'checked' if check else 'refreshed'} {len(paths)} file(s); {len(stale)} "
          f"{'differ' if check else 'changed'}")
    return 0


def main(cfg):
    if cfg.refresh:
        return refresh_blocks(cfg.refresh, cfg.check)
    if cfg.curves:
        if not cfg.grid:
            raise SystemExit("error: --curves draws a PNG: name it with --grid FILE.png")
        try:
            report.stage2_curves(cfg.curves, cfg.grid)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}")
        print(f"wrote {cfg.grid}")
        return 0
    if cfg.table or cfg.claims or cfg.two_by_two or cfg.changes or cfg.paired or cfg.timings or cfg.bench:
        if len(cfg.paired) % 2:
            raise SystemExit("error: --paired takes prefixes in pairs, BEFORE AFTER (results/self_a results/self_f)")
        try:
            lines = (report.score_table(cfg.table) if cfg.table else
                     report.claims(cfg.claims, full=cfg.claims_full) if cfg.claims else
                     report.stage2_changes(cfg.changes) if cfg.changes else
                     report.paired_changes(list(zip(cfg.paired[::2], cfg.paired[1::2]))) if cfg.paired else
                     timing.table(cfg.timings) if cfg.timings else
                     report.bench_table(cfg.bench) if cfg.bench else
                     report.two_by_two(cfg.two_by_two))
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        print("\n".join(lines))
        return 0
    if not cfg.image and not cfg.split:
        raise SystemExit("error: nothing to caption; pass --image FILE_OR_FOLDER ... or --split test --eval")
    if cfg.method not in ("greedy", "beam", "sample"):
        raise SystemExit(f"error: unknown --method {cfg.method!r}; use greedy, beam or sample")
    device = pick_device(cfg.device)
    if cfg.split and cfg.compare:
        return compare_checkpoints(cfg, device)
    try:
        model, ckpt = load_captioner(cfg.ckpt or latest_checkpoint(cfg.out_dir), device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    tok = get_tokenizer(**ckpt["tokenizer"])
    if cfg.split:
        return evaluate_split(cfg, model, ckpt, tok, device)
    return caption_images(cfg, model, ckpt, tok, device)


if __name__ == "__main__":
    sys.exit(main(parse_config(Config)))
