"""bench.py runs at tiny sizes and writes every ratio the README's performance table quotes.
(Speed targets are checked by reading bench.py's output, never by a timed test.)"""
import json

import bench


def test_bench_quick_writes_every_ratio(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(bench.Config(quick=True, out=str(out), repeats=1))
    r = json.loads(out.read_text())
    for key in ("train_step_vs_hf", "greedy_vs_hf", "greedy_vs_nocache", "beam5_vs_hf", "precompute_vs_bare"):
        assert r[key] > 0
    assert r["device"] and r["decoding_small"]["greedy_tokens_agree"] == 1.0  # same weights, same greedy tokens
    s2 = r["stage2_step"]  # one real losses.stage2_loss step on 4 images
    assert s2["step_s"] > 0 and abs(s2["images_per_s"] * s2["step_s"] - 4) < 1e-6
