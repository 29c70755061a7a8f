"""
Files that are either the old version or the whole new one, never half of one; and JSON.

A killed run (kill -9, a full disk, a lost node) must not leave a checkpoint, a feature file or a
dataset's meta.json half-written, because the next run would read it. Every such file goes
through atomic_write: a temporary file, flushed to disk (fsync), then renamed over the old one,
which a POSIX rename does in one step.
"""

import json
import os


def atomic_write(path, write):
    """Write `path` so that it is either the old file or the whole new one, never half of it:
    write(tmp) writes a temporary file, which is flushed to disk (fsync) and renamed over path.
    The dataset's json files and features, feature shards, checkpoints and the toy models' weights
    go through here; small side files (a model's config.json, the vocab) are written before their
    weights, whose presence is what a rerun checks."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # write() failed: leave no temporary file behind
            os.remove(tmp)


def atomic_write_bytes(path, data):
    """`data` (bytes) to `path`, atomically."""
    atomic_write(path, lambda tmp: _write_bytes(tmp, data))


def _write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path):
    with open(path) as f:
        return json.load(f)


def write_jsonl(path, records):
    """One JSON record a line, atomically (a rewrite of the whole file)."""
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())

