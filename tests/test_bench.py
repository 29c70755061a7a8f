"""bench.py runs at tiny sizes and writes every ratio docs/performance.md quotes.
(Speed targets are checked by reading bench.py's output, never by a timed test.)"""
import json
import math

import torch

import bench


def test_bench_quick_writes_every_ratio(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(bench.Config(quick=True, out=str(out), repeats=1))
    r = json.loads(out.read_text())
    for key in ("train_step_vs_hf", "greedy_vs_hf", "greedy_vs_nocache", "beam5_vs_hf", "precompute_vs_bare"):
        assert isinstance(r[key], float) and math.isfinite(r[key]), key  # a figure the docs can quote
    assert set(r["stage2_step"]) == {"images_per_s", "step_s"} and math.isfinite(r["stage2_step"]["step_s"])
    # a speed ratio means something only when both sides compute the same thing: same weights, same tokens
    assert r["device"] and r["decoding_small"]["greedy_tokens_agree"] == 1.0
    # the record says where and with what it ran, and how long, but not where it was written
    assert r["wall_s"] > 0 and r["machine"]["cpu"] and r["machine"]["cores"] >= 1 and "bf16" in r["machine"]
    assert r["machine"]["torch"] == torch.__version__ and r["versions"]["transformers"] and "out" not in r["config"]
