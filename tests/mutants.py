"""
Break the method on purpose and check that the fast tests notice: a small mutation test.

Each mutant below is one string replacement in a copy of the repository: a flipped sign, an
index one off, a clamp removed, the bugs a reimplementation of the method is likely to have.
For each, `pytest -x -m "not slow" tests` (the fast tier, `make test-fast`) runs on the copy; the
mutant is killed when a test fails, and survives when the whole tier passes. The copy without a
mutation must pass first, or every kill would mean nothing.

    python tests/mutants.py            # all of them (make mutants): a table, and results/mutants.json
    python tests/mutants.py --only kl  # those whose name contains "kl"

Exit status 1 if any mutant survives (or a replacement no longer matches the code it breaks).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, file, the code as it is, the code broken): each `old` must occur exactly once in `file`
MUTANTS = [
    ("REINFORCE sign flipped", "nanocap/losses.py",
     "return -(advantage * seq_logprob).mean()", "return (advantage * seq_logprob).mean()"),
    ("leave-one-out baseline includes its own sample", "nanocap/losses.py",
     "b = (r.sum(dim=1, keepdim=True) - r) / (k - 1)", "b = r.mean(dim=1, keepdim=True).expand_as(r)"),
    ("KL reversed, KL(ref ‖ policy)", "nanocap/losses.py",
     "kl = (logp.exp() * (logp - logq)).sum(dim=-1)", "kl = (logq.exp() * (logq - logp)).sum(dim=-1)"),
    ("caption loss read one position off", "nanocap/losses.py",
     "pred = logits[:, P - 1:P + T - 1].float()", "pred = logits[:, P:P + T].float()"),
    ("sampling temperature ignored by the log-probs", "nanocap/losses.py",
     "return token_logprobs(logits / temperature if temperature != 1 else logits, tokens)",
     "return token_logprobs(logits, tokens)"),
    ("CLIP-S clamp removed", "nanocap/losses.py",
     "return w * cos.clamp(min=0)", "return w * cos"),
    ("contrastive reward's own-caption index tiled, not repeated", "nanocap/losses.py",
     "own = torch.arange(gen_emb.shape[0], device=gen_emb.device) // k",
     "own = torch.arange(gen_emb.shape[0], device=gen_emb.device) % gt_emb.shape[0]"),
    ("KV-cache positions restart at 0", "nanocap/gpt.py",
     "start = cache.pos if cache is not None else 0", "start = 0"),
    ("beam length penalty dropped", "nanocap/decode.py",
     "final = (scores / lengths.pow(length_penalty)).view(N, K)", "final = scores.view(N, K)"),
    ("λ ignored (stage 1)", "nanocap/losses.py",
     "loss = ce + contrastive_weight * rl", "loss = ce + rl"),
    ("β ignored (stage 2)", "nanocap/losses.py",
     "loss = rl + kl_weight * kl", "loss = rl + 0.1 * kl"),
    ("train.py drops --kl_weight", "train.py",
     "kl_weight=cfg.kl_weight", "kl_weight=0.1"),
    ("the scaffold's baseline dropped (both objectives)", "nanocap/losses.py",
     "b = None if baseline_kind is None else baseline(reward, k, baseline_kind, greedy_reward)",
     "b = torch.zeros_like(reward)"),
    ("train.py drops --contrastive_weight", "train.py",
     "contrastive_weight=cfg.contrastive_weight", "contrastive_weight=0.01"),
]

FAST = ["-m", "pytest", "-x", "-q", "-m", "not slow", "tests", "-p", "no:cacheprovider"]  # make test-fast, stopping at the first failure


def copy_repo(dest):
    """The tracked and untracked-but-not-ignored files of the working tree, as they are now."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for f in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))


def run_fast_tier(copy, timeout):
    """(passed, the first failing test or '', seconds) of the fast tier in `copy`."""
    env = dict(os.environ, PYTHONPATH=copy, HF_HUB_OFFLINE="1")
    t0 = time.time()
    try:
        r = subprocess.run([sys.executable, *FAST], cwd=copy, env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "(timed out)", time.time() - t0
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
    return r.returncode == 0, (failed[0] if failed else f"(exit {r.returncode})"), time.time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="run only the mutants whose name contains this")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per run of the fast tier")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "mutants.json"))
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if args.only.lower() in m[0].lower()]
    with tempfile.TemporaryDirectory(prefix="nanocap-mutants-") as tmp:
        clean = os.path.join(tmp, "repo")
        copy_repo(clean)
        ok, failed, seconds = run_fast_tier(clean, args.timeout)
        if not ok:
            raise SystemExit(f"error: the fast tier fails without a mutation ({failed}); fix that first")
        print(f"unmutated fast tier: passed in {seconds:.0f} s", flush=True)
        rows = []
        for name, path, old, new in chosen:
            copy = os.path.join(tmp, "mutant")
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(clean, copy)
            with open(os.path.join(copy, path)) as f:
                source = f.read()
            if source.count(old) != 1:
                rows.append(dict(mutant=name, file=path, status="stale", killed_by="", seconds=0.0))
                print(f"STALE     {name}: {path} has {source.count(old)} copies of {old!r}", flush=True)
                continue
            with open(os.path.join(copy, path), "w") as f:
                f.write(source.replace(old, new))
            survived, killer, seconds = run_fast_tier(copy, args.timeout)
            status = "survived" if survived else "killed"
            rows.append(dict(mutant=name, file=path, status=status, killed_by=killer, seconds=round(seconds, 1)))
            print(f"{status.upper():9} {name:58} {killer} ({seconds:.0f} s)", flush=True)
    killed = sum(r["status"] == "killed" for r in rows)
    print(f"\n{killed} of {len(rows)} mutants killed by the fast tier")
    if not args.only:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
