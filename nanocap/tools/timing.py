"""
Timings as records. A time quoted in the docs is only as good as what is known of it: which command,
on which machine, with which torch. This runs a command, measures its wall time, and keeps the
record under a name in a timings file, beside the record's machine: the CPU model, its cores,
whether it has native bfloat16 (AVX512-BF16 or AMX), the GPU if any, and the versions of Python and
torch. The Makefile runs its long targets through it, into out/timings.json (yours, never
committed); `make ... RECORDS=results` writes the committed results/timings.json that the docs quote:

    python -m nanocap.tools.timing "make demo: data_prep.py" -- python data_prep.py
    python -m nanocap.tools.timing --out results/timings.json "make bench" -- python bench.py
    python sample.py --timings results/timings.json      # the records as a table (docs/performance.md)

A command that fails records nothing, and this exits with its status.
"""

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

from nanocap.base.files import write_json
from nanocap.data.pretrain import cpu_has_bf16

TIMINGS = "out/timings.json"  # a run's own record; the docs quote results/timings.json


def cpu_model():
    """The CPU's model name ('Intel(R) Xeon(R) Processor @ 2.10GHz'), from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine():
    """What a timing depends on, as a dict: CPU, cores, bfloat16, GPU, threads, Python and torch."""
    import torch
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "bf16": cpu_has_bf16(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "python": platform.python_version(), "torch": torch.__version__, "os": platform.system()}


def read(path=TIMINGS):
    """{name: record} of a timings file, or {} when there is none yet."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def record(name, command, wall_s, path=TIMINGS):
    """Keep one measured run under `name` (the newest replaces an older one of the same name)."""
    records = read(path)
    records[name] = {"command": command, "wall_s": round(wall_s, 1), "date": datetime.date.today().isoformat(),
                     "machine": machine()}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_json(path, dict(sorted(records.items())))
    return records[name]


def table(path):
    """The records (results/timings.json) as markdown lines: what ran, how long, and on what."""
    try:
        with open(path) as f:
            records = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read timings from {path}: {e}") from None
    lines = ["| record | wall time | command | CPU | cores | bfloat16 | torch | date |", "|---" * 8 + "|"]
    for name, r in records.items():
        m, minutes, seconds = r["machine"], *divmod(round(r["wall_s"]), 60)
        lines.append(f"| {name} | {minutes} min {seconds:02d} s | `{r['command']}` | {m['cpu']}"
                     f"{', ' + m['gpu'] if m.get('gpu') else ''} | {m['cores']} | {'yes' if m['bf16'] else 'no'} | "
                     f"{m['torch']} | {r['date']} |")
    return lines


def main(argv):
    path = TIMINGS
    if argv[:1] == ["--out"] and len(argv) > 1:
        path, argv = argv[1], argv[2:]
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m nanocap.tools.timing [--out FILE] NAME -- COMMAND [ARGS ...]")
    name, command = argv[0], argv[2:]
    start = time.perf_counter()
    status = subprocess.call(command)
    wall = time.perf_counter() - start
    if status != 0:
        return status
    shown = shlex.join(["python" if i == 0 and os.path.basename(a).startswith("python") else a
                        for i, a in enumerate(command)])  # no machine's venv path in the record
    r = record(name, shown, wall, path)
    print(f"timing: {name} took {wall:.0f} s ({r['machine']['cpu']}, {r['machine']['cores']} cores); "
          f"recorded in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
