"""The tools around the captioner: command lines, training helpers, metrics and reports.

    cli.py       a command line generated from a config dataclass (old flag names kept for a release)
    checks.py    train.py's checks of a user's flags, each failing in one line
    training.py  around train.py's loop: checkpoint files, --resume, random streams, the log and its plot
    metrics.py   BLEU, METEOR, ROUGE-L, CIDEr, SPICE, CLIP-S, RefCLIP-S, retrieval, attributes
    report.py    score files as one table (mean ± std over seeds), the claims by seed, image grids,
                 and the docs' generated blocks
    timing.py    a command's wall time as a record, with its machine and versions (results/timings.json)
    poolbench.py what a web-scale unlabeled pool costs stage 2 (docs/web-pool.md)
    notebook.py  the notebooks' setup: their small world and their runs, made by the docs' commands
"""
