"""The tools around the captioner: command lines, training helpers, metrics and reports.

    cli.py       a command line generated from a config dataclass (old flag names kept for a release)
    checks.py    train.py's checks of a user's flags, each failing in one line
    training.py  around train.py's loop: checkpoint files, --resume, random streams, the log and its plot
    metrics.py   BLEU, METEOR, ROUGE-L, CIDEr, SPICE, CLIP-S, RefCLIP-S, retrieval, attributes
    report.py    score files as one table (mean ± std over seeds), the claims by seed, image grids
    notebook.py  the notebooks' setup: their small world and their runs, made by the README's commands
"""
