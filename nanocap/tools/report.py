"""
Reports: score files as one markdown table, and images beside their captions as one PNG.

sample.py --table prints the table (the README's results are made so), sample.py --compare
--grid and data_prep.py --grid draw the pictures.
"""

import json
import os
import sys
import textwrap

TABLE_COLUMNS = ["BLEU-4", "METEOR", "CIDEr", "CLIP-S", "RefCLIP-S", "R@1", "attr_precision", "attr_recall", "distinct"]


def score_table(files, columns=TABLE_COLUMNS):
    """Score files (written by sample.py --eval --out_json) as markdown lines, a row per file.
    Files that hold no scores (such as the *.captions.json beside each) are skipped with a line
    on stderr; an unreadable file raises ValueError."""
    rows = []
    for f in files:
        try:
            with open(f) as fh:
                scores = json.load(fh)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read scores from {f}: {e}") from None
        if not isinstance(scores, dict) or not any(c in scores for c in columns):
            print(f"skipped: {f} is not a score file of --eval --out_json", file=sys.stderr)
            continue
        name = os.path.basename(f)[:-5] if f.endswith(".json") else f
        rows.append([name] + [f"{scores[c]:.1f}" if c in scores else "–" for c in columns])
    lines = ["| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


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
