"""
Two training runs, bit for bit: the check that a refactor changed nothing.

Train the same command with the old code and the new, one thread each (the thread count changes
the order of float sums), into two out_dirs, then compare them:

    git worktree add /tmp/old <the commit before the change>
    (cd /tmp/old && OMP_NUM_THREADS=1 python train.py --seed 1337 --out_dir /tmp/run_old)
    OMP_NUM_THREADS=1 python train.py --seed 1337 --out_dir /tmp/run_new
    python tests/compare_runs.py /tmp/run_old /tmp/run_new

Every checkpoint both hold: the weights, the optimizer state, every rank's random streams, the step
and the best val loss; and log.jsonl record by record (the val captions included), wall time
aside. Exit status 0 when all are equal, 1 otherwise.
"""

import json
import os
import sys

import torch


def streams(ckpt):
    """Every rank's random streams (a checkpoint from before they were all saved holds rank 0's)."""
    if "generators" in ckpt:
        return ckpt["generators"] + ckpt["torch_rngs"]
    return [ckpt["generator"], ckpt["torch_rng"]]


def same_tensors(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def compare_checkpoints(a_path, b_path):
    a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (a_path, b_path))
    checks = {
        "weights": same_tensors(a["model"], b["model"]),
        "optimizer": a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
        and all(same_tensors(a["optimizer"]["state"][i], b["optimizer"]["state"][i]) for i in a["optimizer"]["state"]),
        "random streams": len(streams(a)) == len(streams(b))
        and all(torch.equal(x, y) for x, y in zip(streams(a), streams(b))),
        "step": a["step"] == b["step"],
        "best": a.get("best") == b.get("best"),
    }
    print(f"{os.path.basename(a_path)} (step {a['step']}): "
          + ", ".join(f"{k} {'equal' if v else 'DIFFERENT'}" for k, v in checks.items()))
    return all(checks.values())


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in f if line.strip()]


def main(old, new):
    names = sorted(n for n in os.listdir(old) if n.endswith(".pt") and os.path.isfile(os.path.join(new, n)))
    if not names:
        raise SystemExit(f"error: {old} and {new} hold no checkpoint of the same name")
    same = [compare_checkpoints(os.path.join(old, n), os.path.join(new, n)) for n in names]
    la, lb = read_log(old), read_log(new)
    print(f"log.jsonl: {len(la)} and {len(lb)} records, {'equal' if la == lb else 'DIFFERENT'} (wall time aside)")
    ok = all(same) and la == lb
    print("IDENTICAL" if ok else "DIFFERENT")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python tests/compare_runs.py OLD_OUT_DIR NEW_OUT_DIR")
    sys.exit(main(sys.argv[1], sys.argv[2]))
