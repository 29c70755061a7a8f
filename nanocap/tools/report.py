"""
Reports: score files as one markdown table (mean ± std over seeds), the paper's claims checked
seed by seed, the features x reward 2x2 read off seed by seed, stage 2's change paired by seed
and its training curves over several runs, and images beside their captions as one PNG.

sample.py --table prints the table, sample.py --claims the claims, sample.py --two_by_two the
2x2, sample.py --changes stage 2's changes and sample.py --paired any two rows' changes. The docs
hold their printouts as generated blocks, each marked with its command, which sample.py --refresh
runs again (refresh_blocks); sample.py --curves --grid, --compare --grid and data_prep.py --grid
draw the pictures.
"""

import glob
import json
import os
import re
import statistics
import sys
import textwrap

from nanocap.tools.training import read_log

TABLE_COLUMNS = ["BLEU-4", "METEOR", "CIDEr", "CLIP-S", "RefCLIP-S", "R@1", "attr_precision", "no_claim",
                 "rel_precision", "attr_recall", "fluency", "distinct"]


def read_scores(f):
    """The scores in a file written by sample.py --eval --out_json, or None if it holds none (such
    as the *.captions.json beside each). An unreadable file raises ValueError."""
    try:
        with open(f) as fh:
            scores = json.load(fh)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read scores from {f}: {e}") from None
    return scores if isinstance(scores, dict) and any(c in scores for c in TABLE_COLUMNS) else None


def run_name(f):
    """results/b_stage2.seed1338.json -> (b_stage2, 1338); results/e_references.json -> (e_references, None)."""
    m = re.fullmatch(r"(.*?)(?:\.seed(\d+))?\.json", os.path.basename(f))
    return (m.group(1), int(m.group(2)) if m.group(2) else None) if m else (f, None)


def mean_std(values):
    """'mean ± std' (the sample standard deviation, n - 1) of several values, or the one value."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


# the names the docs give the score files' rows; a run not named here is shown by its file name
ROW_NAMES = {
    "a_stage1_2pct": "(a) stage 1, 2% of the labels",
    "b_stage2": "(b) (a) + stage 2 on the unlabeled 98%",
    "c_full": "(c) stage 1, 100% of the labels",
    "c_full_2400": "(c′) (c) with 4× the steps (2,400)",
    "d_clipcap": "(d) (a) with λ = 0 (ClipCap: cross-entropy only)",
    "e_references": "(e) the references: one against the other four",
    "a_stage1_2pct_last": "(a) at its last step (600), not its best",
    "d_clipcap_last": "(d) at its last step (600), not its best",
    "self_a": "(a) stage 1, 2% of the labels",
    "self_b": "(b) (a) + stage 2, the CLIP reward",
    "self_f": "(f) (a) + stage 2, self-training",
    "2x2_comp_features_stage1": "compositional features, bag-of-words reward: stage 1",
    "2x2_comp_features_stage2": "… then stage 2",
    "2x2_comp_reward_stage1": "bag-of-words features, compositional reward: stage 1",
    "2x2_comp_reward_stage2": "… then stage 2",
    "2x2_comp_stage1": "compositional features, compositional reward: stage 1",
    "2x2_comp_stage2": "… then stage 2",
    "2x2_comp_full": "full supervision, compositional features",
    "small_float32": "float32 world",
    "small_bfloat16": "bfloat16 world",
    "small_beta0.1_float32": "float32 world, β = 0.1",
}


def score_table(files, columns=TABLE_COLUMNS, names=ROW_NAMES):
    """Score files as markdown lines, a row per run: files that differ only in their seed
    (name.seedN.json) make one row of mean ± std over the seeds, named by `names` where it names
    the run. The *.captions.json beside each are passed over; other files without scores are
    skipped with a line on stderr."""
    runs = {}  # name -> [scores], in the order given
    for f in files:
        if f.endswith(".captions.json"):
            continue
        scores = read_scores(f)
        if scores is None:
            print(f"skipped: {f} is not a score file of --eval --out_json", file=sys.stderr)
            continue
        runs.setdefault(run_name(f)[0], []).append(scores)
    lines = ["| row | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for name, group in runs.items():
        cells = [mean_std([s[c] for s in group]) if all(c in s for s in group) else "–" for c in columns]
        lines.append(f"| {names.get(name, name)} | {len(group)} | " + " | ".join(cells) + " |")
    return lines


def by_seed(results_dir, name):
    """{seed: scores} of the files results_dir/name.seedN.json."""
    scores = {}
    for f in glob.glob(os.path.join(results_dir, f"{name}.seed*.json")):
        seed = run_name(f)[1]  # None for the name.seedN.captions.json beside each
        if seed is not None:
            scores[seed] = read_scores(f)
    return scores


def claims(results_dir, semi="b_stage2", full="c_full", stage1="a_stage1_2pct"):
    """The paper's claims, semi-supervised (b) against full supervision (c), checked seed by seed:
    CIDEr(b) ≥ 0.9 × CIDEr(c), CLIP-S(b) > CLIP-S(c) and R@1(b) > R@1(c), as a markdown table
    with the count of seeds each held for; then stage 2's change of attribute precision,
    (b) - (a) by seed, against its spread over the seeds. Returns the lines to print."""
    b, c, a = by_seed(results_dir, semi), by_seed(results_dir, full), by_seed(results_dir, stage1)
    seeds = sorted(set(b) & set(c))
    if not seeds:
        raise ValueError(f"no seed has both {semi}.seedN.json and {full}.seedN.json in {results_dir}; "
                         f"make them with `make results-seed SEED=N`")
    checks = [("CIDEr", 0.9), ("CLIP-S", 1.0), ("R@1", 1.0)]  # (b) >= 0.9 x (c), or (b) > (c) where 1.0
    names = [f"{m}(b) ≥ {f} × {m}(c)" if f != 1.0 else f"{m}(b) > {m}(c)" for m, f in checks]
    lines = [f"| seed ({semi} against {full}) | " + " | ".join(names) + " |", "|---" * (len(checks) + 1) + "|"]
    held = [0] * len(checks)
    for seed in seeds:
        cells = []
        for i, (m, f) in enumerate(checks):
            ours, theirs = b[seed][m], c[seed][m]
            ok = ours >= f * theirs if f != 1.0 else ours > theirs
            held[i] += ok
            bar = f"{f} × {theirs:.1f} = {f * theirs:.1f}" if f != 1.0 else f"{theirs:.1f}"
            cells.append(f"{'yes' if ok else 'no'}: {ours:.1f} {('≥' if ok else '<') if f != 1.0 else ('>' if ok else '≤')} {bar}")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    lines.append("| held in | " + " | ".join(f"{n} of {len(seeds)} seeds" for n in held) + " |")
    paired = [s for s in seeds if s in a]
    if len(paired) >= 2:
        change = [b[s]["attr_precision"] - a[s]["attr_precision"] for s in paired]
        spread = max(statistics.stdev([a[s]["attr_precision"] for s in paired]),
                     statistics.stdev([b[s]["attr_precision"] for s in paired]), statistics.stdev(change))
        mean = statistics.mean(change)
        larger = (all(d < 0 for d in change) or all(d > 0 for d in change)) and abs(mean) > spread
        lines += ["", f"attr_precision, (b) - (a) by seed: {', '.join(f'{d:+.1f}' for d in change)}; mean change "
                  f"{mean:+.1f} ± {statistics.stdev(change):.1f} over {len(paired)} seeds. The largest std over seeds "
                  f"(of (a), (b) or the change) is {spread:.1f}: the change is "
                  f"{'larger than the spread' if larger else 'within the spread'}."]
    return lines


def paired_changes(pairs, metrics=("CIDEr", "CLIP-S", "R@1", "attr_precision", "rel_precision", "attr_recall",
                                   "fluency", "distinct")):
    """After - before, paired by seed, for each (before, after) pair of score-file prefixes
    (results/self_a, results/self_f: the files PREFIX.seedN.json), as a markdown row of
    'mean ± std (seed by seed)' per metric. Returns the lines to print."""
    lines = ["| change | seeds | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for before, after in pairs:
        n, cells = _paired(before, after, metrics)
        label = f"{ROW_NAMES.get(os.path.basename(after), after).split(' ')[0]} − " \
                f"{ROW_NAMES.get(os.path.basename(before), before).split(' ')[0]}"
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    return lines


def _paired(before, after, metrics):
    """How many seeds both prefixes' score files have, and after - before of each metric over them,
    one 'mean ± std (seed by seed)' cell per metric."""
    one, two = (by_seed(os.path.dirname(p) or ".", os.path.basename(p)) for p in (before, after))
    seeds = sorted(set(one) & set(two))
    if not seeds:
        raise ValueError(f"no seed has both {before}.seedN.json and {after}.seedN.json")
    return len(seeds), [_cell([two[s][m] - one[s][m] if m in one[s] and m in two[s] else None for s in seeds])
                        for m in metrics]


def bench_table(path):
    """bench.py's record (results/bench_cpu.json) as markdown lines: each ratio nanocap against the
    other side (above 1: nanocap is faster) with both sides' figures, then what it ran on."""
    try:
        with open(path) as f:
            r = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read a bench.py record from {path}: {e}") from None
    shapes = [s for s in ("small", "gpt2") if f"train_{s}" in r]
    rows = [("train step (forward + backward) vs `transformers.GPT2LMHeadModel`, tokens/s", "train_{}", None, "1.1"),
            ("greedy, 10-token prefix + 20 tokens, batch 32, vs `transformers` `generate`, captions/s",
             "decoding_{}", "greedy_vs_hf", "1.5"),
            ("greedy vs a loop without a cache (ClipCap's predict.py, batched)", "decoding_{}", "greedy_vs_nocache", "5"),
            ("beam 5 vs `transformers` `generate(num_beams=5)`, captions/s", "decoding_{}", "beam5_vs_hf", "1.2")]
    names = {"small": "shapes GPT", "gpt2": "GPT-2 124M"}
    lines = ["| benchmark | " + " | ".join(names[s] for s in shapes) + " | target |", "|---" * (len(shapes) + 2) + "|"]
    for label, key, sub, target in rows:
        cells = [r[key.format(s)][sub] if sub else r[key.format(s)] for s in shapes]
        lines.append(f"| {label} | " + " | ".join(f"{c['ratio']:.2f}× ({c['ours']:,.1f} vs {c['theirs']:,.1f})"
                                                   for c in cells) + f" | ≥ {target}× |")
    p = r["precompute"]
    lines.append("| CLIP features through data_prep's pipeline vs the bare forward on tensors in memory, images/s | "
                 + " | " * (len(shapes) - 1) + f"{p['ratio']:.2f}× ({p['ours']:,.1f} vs {p['theirs']:,.1f}) | ≥ 0.8× |")
    s2, m = r["stage2_step"], r.get("machine")
    lines += ["", f"One stage-2 step (`losses.stage2_loss` and its backward, 16 images × 5 samples): "
              f"{s2['step_s']:.2f} s, {s2['images_per_s']:.1f} images/s."]
    if m:
        v = r["versions"]
        lines.append(f"Measured by `python bench.py{' --profile' if r['config'].get('profile') else ''}` in "
                     f"{r['wall_s'] / 60:.0f} min on {m['cpu']}, {m['cores']} cores ({r['device']}), bfloat16 "
                     f"{'yes' if m['bf16'] else 'no'}, torch {m['torch']}, transformers {v['transformers']}.")
    return lines


# a block of a Markdown file that a command wrote: the marker names the command, sample.py's arguments
BLOCK = re.compile(r"(<!-- generated by: python sample\.py (.*?) -->\n)(.*?)(<!-- /generated -->)", re.S)


def refresh_blocks(text, run):
    """The Markdown text with each generated block written again: run(args) gets the marker's
    sample.py arguments and returns what they print, which replaces the block's lines."""
    return BLOCK.sub(lambda m: m.group(1) + run(m.group(2)) + "\n" + m.group(4), text)


# the 2x2 of features x reward (docs/blind-spots.md): each cell's stage-1 and stage-2
# runs, then full supervision on either features; names as `make results-2x2` writes them
CELLS = [("bag-of-words features, bag-of-words reward", "a_stage1_2pct", "b_stage2"),
         ("compositional features, bag-of-words reward", "2x2_comp_features_stage1", "2x2_comp_features_stage2"),
         ("bag-of-words features, compositional reward", "2x2_comp_reward_stage1", "2x2_comp_reward_stage2"),
         ("compositional features, compositional reward", "2x2_comp_stage1", "2x2_comp_stage2")]
FULL = ("c_full", "2x2_comp_full")  # full supervision on the bag-of-words, then the compositional features


def _cell(values):
    """'mean ± std (v1, v2, ...)' of per-seed values, None skipped (and said); '–' when none."""
    kept = [v for v in values if v is not None]
    if not kept:
        return "–"
    mean = f"{statistics.mean(kept):+.1f}" + (f" ± {statistics.stdev(kept):.1f}" if len(kept) > 1 else "")
    cell = f"{mean} ({', '.join(f'{v:+.1f}' for v in kept)})" if len(kept) > 1 else mean
    return cell if len(kept) == len(values) else f"{cell} ({len(kept)} of {len(values)} seeds)"


def two_by_two(results_dir, metrics=("attr_precision", "rel_precision", "attr_recall")):
    """The 2x2 read off seed by seed. Each cell's scores (mean ± std over seeds); stage 2's change
    (stage 2 - stage 1, same seed) in each cell; then what each swap does to that change against the bag-of-words cell (a difference of
    differences, paired by seed), and what the compositional features do to full supervision.
    Only seeds that have every file a line needs count; a metric a file lacks (rel_precision
    when no caption states a relation) is skipped for that seed. Returns markdown lines."""
    runs = {name: by_seed(results_dir, name) for _, *names in CELLS for name in names}
    runs.update({name: by_seed(results_dir, name) for name in FULL})

    def minus(a, b):  # None where either value is missing
        return None if a is None or b is None else a - b

    def value(name, seed, m):
        return runs[name][seed].get(m)

    def change(cell, seed, m):  # stage 2 - stage 1 of one cell and seed, or None
        return minus(value(cell[2], seed, m), value(cell[1], seed, m))

    def seeds_of(*names):  # the seeds that have every one of these files
        return sorted(set.intersection(*(set(runs[n]) for n in names)))

    if not any(seeds_of(cell[1], cell[2]) for cell in CELLS):
        raise ValueError(f"no cell of the 2x2 has both its stage-1 and stage-2 score files in {results_dir}; "
                         f"make them with `make results-seed SEED=N` and `make results-2x2 SEED=N`")
    levels = {}  # the cells' own rows first: each stage, then full supervision on either features
    for (cell, one, two), (same_one, same_two) in zip(CELLS, [(" (= (a))", " (= (b))")] + [("", "")] * 3):
        levels[one], levels[two] = f"{cell}: stage 1{same_one}", f"… then stage 2{same_two}"
    levels.update({FULL[0]: "full supervision, bag-of-words features (= (c))",
                   FULL[1]: "full supervision, compositional features"})
    files = [f for name in levels for f in sorted(glob.glob(os.path.join(results_dir, f"{name}.seed*.json")))]
    lines = score_table(files, names=levels) + [""]
    base = CELLS[0]
    lines += ["| stage 2 - stage 1 | seeds | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for cell in CELLS:
        seeds = seeds_of(cell[1], cell[2])
        cells = [_cell([change(cell, s, m) for s in seeds]) for m in metrics]
        lines.append(f"| {cell[0]} | {len(seeds)} | " + " | ".join(cells) + " |")
    lines += ["", "| the swap, against bag-of-words both (paired by seed) | seeds | " + " | ".join(metrics) + " |",
              "|---" * (len(metrics) + 2) + "|"]
    for cell, swap in zip(CELLS[1:], ["features → compositional", "reward → compositional", "both → compositional"]):
        seeds = seeds_of(base[1], base[2], cell[1], cell[2])
        diffs = [[minus(change(cell, s, m), change(base, s, m)) for s in seeds] for m in metrics]
        lines.append(f"| {swap}: its effect on stage 2's change | {len(seeds)} | "
                     + " | ".join(_cell(d) for d in diffs) + " |")
    seeds = seeds_of(*FULL)
    diffs = [[minus(value(FULL[1], s, m), value(FULL[0], s, m)) for s in seeds] for m in metrics]
    lines.append(f"| features → compositional, full supervision (levels, not changes) | {len(seeds)} | "
                 + " | ".join(_cell(d) for d in diffs) + " |")
    return lines


def stage2_changes(prefixes, metrics=("CLIP-S", "fluency", "attr_precision", "attr_recall", "CIDEr")):
    """Stage 2's change, paired by seed: for each prefix (results/small_float32), the score files
    PREFIX_stage2.seedN.json minus PREFIX_stage1.seedN.json, as a markdown row of 'mean ± std
    (seed by seed)' per metric. Returns the lines to print."""
    lines = ["| stage 2 - stage 1 | seeds | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
    for prefix in prefixes:
        n, cells = _paired(f"{prefix}_stage1", f"{prefix}_stage2", metrics)
        name = os.path.basename(prefix)
        lines.append(f"| {ROW_NAMES.get(name, name)} | {n} | " + " | ".join(cells) + " |")
    return lines


def stage2_curves(run_dirs, path, keys=("reward", "kl", "repetition", "gen_len")):
    """Stage 2's training curves of several runs (train.py out_dirs) in one PNG: a panel per logged
    key, a line per run, named by the run's last two folders ("float32/seed1337")."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    fig = Figure(figsize=(4 * len(keys), 3.2))
    axes = fig.subplots(1, len(keys))
    colours = {}  # one colour per last folder (the seed), one line style per folder above it (the world)
    styles = {}
    for run in run_dirs:
        rows = [r for r in read_log(run) if r.get("stage") == 2 and "reward" in r]
        if not rows:
            raise ValueError(f"{run} has no stage-2 log (log.jsonl from train.py --stage 2)")
        world, seed = os.path.normpath(run).split(os.sep)[-2:]
        colour = colours.setdefault(seed, f"C{len(colours)}")
        style = styles.setdefault(world, ["-", "--", ":", "-."][len(styles) % 4])
        for ax, key in zip(axes, keys):
            ax.plot([r["iter"] for r in rows], [r[key] for r in rows], style, color=colour, label=f"{world}/{seed}")
    titles = {"reward": "CLIP-S of the samples (reward CLIP)", "kl": "KL to the stage-1 policy",
              "repetition": "share of samples with a word twice", "gen_len": "sample length (tokens)"}
    for ax, key in zip(axes, keys):
        ax.set_title(titles.get(key, key), fontsize=9)
        ax.set_xlabel("stage-2 step")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"stage 2 of {len(run_dirs)} runs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def draw_grid(path, images, texts, wrap=100):
    """One row per image: the image, then its lines of text (captions), wrapped. Saved as a PNG.
    images: PIL images or (H, W, 3) arrays; texts: one list of strings per image."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    blocks = ["\n".join(textwrap.fill(t, wrap, subsequent_indent="    ") for t in lines) for lines in texts]
    heights = [max(1.3, 0.16 * (b.count("\n") + 1) + 0.3) for b in blocks]  # inches per row
    fig, axes = plt.subplots(len(images), 2, figsize=(12, sum(heights)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 7], "height_ratios": heights})
    for (ax_img, ax_txt), im, block in zip(axes, images, blocks):
        ax_img.imshow(im, interpolation="nearest")
        ax_img.set_xticks([])
        ax_img.set_yticks([])  # keep the frame: a white background would vanish into the page
        ax_txt.text(0, 0.5, block, va="center", fontsize=8.5, family="monospace")
        ax_txt.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
