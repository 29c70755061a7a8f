"""
The notebooks' setup in one place: the small shapes world, and the training runs they read.

Every notebook in notebooks/ starts with

    from nanocap.tools import notebook
    WORLD = notebook.world()                      # data/shapes_small, made once (about 2 minutes)
    RUN = notebook.train()                        # out/shapes_small after stage 1, trained once

and reads what it needs from those two folders. Both are absolute paths from the repository
root, so a notebook runs the same from the root (`jupyter lab`) and from notebooks/ (a
double-click); no notebook changes its working directory or sys.path.

The scripts run as the commands the README shows, in the repository root:

    python data_prep.py --config configs/shapes_small_data.json
    python train.py --config configs/shapes_small.json --stage 1 [more flags]

as child processes, so that nothing here imports them (they sit a floor above nanocap/, which
they import), and so that their progress bars and warnings stay off the notebook's page. A run
is trained once and then reused: `make notebooks` and `make test` delete the runs first, so
that a committed notebook never shows a run of older code.
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]          # the repository root: nanocap/tools/ -> ../..
WORLD_PRESET = "configs/shapes_small_data.json"     # data_prep.py's preset for the notebooks' world
RUN_PRESET = "configs/shapes_small.json"            # train.py's preset: the world above, short schedules
WORLD = ROOT / "data" / "shapes_small"


@dataclass
class Printout:
    command: str        # the command line, as typed in the repository root
    text: str           # what it printed on stdout
    seconds: float      # its wall time, start-up included


def command(script: str, *flags: str) -> Printout:
    """Run `python SCRIPT FLAGS` in the repository root, offline and without progress bars.
    A failure raises with the end of the script's stderr, its own one-line error included."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, script, *flags], cwd=ROOT, env=env, capture_output=True, text=True)
    line = " ".join(["python", script, *flags])
    if done.returncode != 0:
        raise RuntimeError(f"`{line}` failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return Printout(line, done.stdout, time.perf_counter() - t0)


def world() -> Path:
    """The notebooks' small world, data/shapes_small: made by data_prep.py the first time
    (about 2 minutes on 2 CPU cores; 3,000 web and 2,000 train images), then reused."""
    if not (WORLD / "meta.json").is_file():
        command("data_prep.py", "--config", WORLD_PRESET)
    return WORLD


def train(*flags: str, out: str = "out/shapes_small", needs: str = "stage1.pt") -> Path:
    """The folder of `python train.py --config configs/shapes_small.json --out_dir OUT FLAGS`,
    trained now if OUT/NEEDS is missing, and reused if it is there. The default is the
    notebooks' stage-1 captioner (`--stage 1`, 200 steps on 40 labelled images); pass
    needs="stage2.pt" and --stage 2 for stage 2. train.py's own log (OUT/log.jsonl) records what
    it printed and how long each step took: tools.training.read_log reads it."""
    world()
    if not (ROOT / out / needs).is_file():
        if not flags:
            flags = ("--stage", "1")
        command("train.py", "--config", RUN_PRESET, "--out_dir", out, *flags)
    return ROOT / out


def shown(path) -> str:
    """A path as the README writes it, from the repository root (no machine's folders on the page)."""
    return os.path.relpath(path, ROOT)
