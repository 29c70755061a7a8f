"""
Reports: score files as one markdown table (mean ± std over seeds), the paper's claims checked
seed by seed, the features x reward 2x2 read off seed by seed, stage 2's change paired by seed
and its training curves over several runs, and images beside their captions as one PNG.

sample.py --table prints the table, sample.py --claims the claims, sample.py --two_by_two the
2x2's changes and sample.py --changes stage 2's (the README's results are made so); sample.py
--curves --grid, --compare --grid and data_prep.py --grid draw the pictures.
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


def score_table(files, columns=TABLE_COLUMNS):
    """Score files as markdown lines, a row per run: files that differ only in their seed
    (name.seedN.json) make one row of mean ± std over the seeds. The *.captions.json beside each
    are passed over; other files without scores are skipped with a line on stderr."""
    runs = {}  # name -> [scores], in the order given
    for f in files:
        if f.endswith(".captions.json"):
            continue
        scores = read_scores(f)
        if scores is None:
            print(f"skipped: {f} is not a score file of --eval --out_json", file=sys.stderr)
            continue
        runs.setdefault(run_name(f)[0], []).append(scores)
    lines = ["| run | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for name, group in runs.items():
        cells = [mean_std([s[c] for s in group]) if all(c in s for s in group) else "–" for c in columns]
        lines.append(f"| {name} | {len(group)} | " + " | ".join(cells) + " |")
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
    CIDEr(b) ≥ 0.9 × CIDEr(c), CLIP-S(b) > CLIP-S(c) and R@1(b) > R@1(c); then how many seeds each
    held for, and whether stage 2's change of attribute precision ((b) - (a)) is larger than its
    spread over the seeds. Returns the lines to print."""
    b, c, a = by_seed(results_dir, semi), by_seed(results_dir, full), by_seed(results_dir, stage1)
    seeds = sorted(set(b) & set(c))
    if not seeds:
        raise ValueError(f"no seed has both {semi}.seedN.json and {full}.seedN.json in {results_dir}; "
                         f"make them with `make results-seed SEED=N`")
    checks = [("CIDEr", 0.9), ("CLIP-S", 1.0), ("R@1", 1.0)]  # (b) >= 0.9 x (c), or (b) > (c) where 1.0
    names = [f"{m}(b) >= {f} x {m}(c)" if f != 1.0 else f"{m}(b) > {m}(c)" for m, f in checks]
    lines, held = [], [0] * len(checks)
    for seed in seeds:
        cells = []
        for i, (m, f) in enumerate(checks):
            ours, bar = b[seed][m], f * c[seed][m]
            ok = ours >= bar if f != 1.0 else ours > bar
            held[i] += ok
            cells.append(f"{names[i]}: {'yes' if ok else 'no'} ({ours:.1f} vs {bar:.1f})")
        lines.append(f"seed {seed}: " + "; ".join(cells))
    lines += [f"{name}: held in {n} of {len(seeds)} seeds" for name, n in zip(names, held)]
    paired = [s for s in seeds if s in a]
    if len(paired) >= 2:
        drop = [b[s]["attr_precision"] - a[s]["attr_precision"] for s in paired]
        spread = max(statistics.stdev([a[s]["attr_precision"] for s in paired]),
                     statistics.stdev([b[s]["attr_precision"] for s in paired]), statistics.stdev(drop))
        larger = all(d < 0 for d in drop) and -statistics.mean(drop) > spread
        lines.append(f"attr_precision (b) - (a) by seed: {', '.join(f'{d:+.1f}' for d in drop)}, mean "
                     f"{statistics.mean(drop):+.1f}; the largest std over seeds (of (a), (b) or the change) is "
                     f"{spread:.1f}: the drop is {'larger than the spread' if larger else 'within the spread'}")
    return lines


# the 2x2 of features x reward (README, "The reward's blind spots"): each cell's stage-1 and stage-2
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
    """The 2x2 read off seed by seed. Stage 2's change (stage 2 - stage 1, same seed) in each cell;
    then what each swap does to that change against the bag-of-words cell (a difference of
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
    base = CELLS[0]
    lines = ["| stage 2 - stage 1 | seeds | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
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
        folder, name = os.path.split(prefix)
        one, two = by_seed(folder or ".", f"{name}_stage1"), by_seed(folder or ".", f"{name}_stage2")
        seeds = sorted(set(one) & set(two))
        if not seeds:
            raise ValueError(f"no seed has both {prefix}_stage1.seedN.json and {prefix}_stage2.seedN.json")
        cells = [_cell([two[s][m] - one[s][m] if m in one[s] and m in two[s] else None for s in seeds])
                 for m in metrics]
        lines.append(f"| {name} | {len(seeds)} | " + " | ".join(cells) + " |")
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
