"""The tools around the captioner: command lines, training helpers, metrics and reports.

    cli.py       a command line generated from a config dataclass
    checks.py    train.py's checks of a user's flags, each failing in one line
    training.py  device, optimizer, learning-rate schedule, the training log and its plot
    metrics.py   BLEU, METEOR, ROUGE-L, CIDEr, SPICE, CLIP-S, RefCLIP-S, retrieval, attributes
    report.py    score files as one table (mean ± std over seeds), the claims by seed, image grids
"""
