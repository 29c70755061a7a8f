"""
What train.py does around its loop, kept out of it so that the loop reads straight through:
which file holds a stage's checkpoint and its last state, resuming from it (--resume) with every
rank's random streams (rng_states, set_rng_states), the one line that stops a run gone NaN, and
the training log (log.jsonl) with its plot. `cfg` is train.py's Config and `stage` its Stage
(the log's functions take the stage's number).
The device, DDP and optimizer helpers are on the ground floor (nanocap/base): the data worlds
use them too.
"""

import json
import os

import torch
import torch.distributed as dist

from nanocap.base.files import write_jsonl
from nanocap.captioner import checkpoint_step, read_checkpoint
from nanocap.tools.checks import check_checkpoint, check_pools, check_reference


# -----------------------------------------------------------------------------
# checkpoints and resuming


def checkpoint_files(cfg, stage):
    """(path, last): the stage's checkpoint and the file its last state goes to. Stage 1 with
    --keep_best keeps its lowest val loss in stage1.pt and its last state in stage1.last.pt;
    otherwise both are stage<N>.pt."""
    path = os.path.join(cfg.out_dir, f"stage{stage.n}.pt")
    return path, os.path.join(cfg.out_dir, f"stage{stage.n}.last.pt") if cfg.keep_best and stage.tracks_best else path


def last_state_file(cfg, stage):
    """The stage's last state, whatever --keep_best was when it was written: of stage<N>.pt and
    stage<N>.last.pt (a --keep_best run's, whose stage<N>.pt is its best), the one of the later step."""
    path, last = (os.path.join(cfg.out_dir, f"stage{stage.n}{s}.pt") for s in ("", ".last"))
    if not os.path.isfile(last) or os.path.isfile(path) and checkpoint_step(path) > checkpoint_step(last):
        return path
    return last


def not_finite(cfg, stage, what, value, step):
    """The one line that stops a run whose `what` (the loss, a val figure) became `value` (NaN, inf),
    naming the checkpoint to resume from."""
    path = last_state_file(cfg, stage)
    return SystemExit(f"error: the {what} became {value} at step {step}; the last good checkpoint is "
                      f"{path if os.path.isfile(path) else 'none yet'}. Lower {stage.lr_flag} and resume with --resume")


def finish_stage(cfg, stage, best, system):
    """Rank 0 plots the stage's curves and says what it saved."""
    if not system.master:
        return
    plot_log(cfg.out_dir, stage.n)
    path, last_path = checkpoint_files(cfg, stage)
    kept = f" (step {best['step']}, the lowest val loss; the last state is {last_path})" if last_path != path else ""
    print(f"saved {path}{kept} and {os.path.join(cfg.out_dir, f'stage{stage.n}.png')}")


def resume_from(cfg, stage, info, model, optimizer, gen, system):
    """With --resume, load the stage's last state into model, optimizer and this rank's random
    streams, and return (its step, the best val loss so far) (step 0: start afresh). With both
    stages (no --stage), a stage without a checkpoint starts afresh."""
    best = {"val_loss": float("inf"), "step": 0}
    path = last_state_file(cfg, stage)
    if not cfg.resume or (cfg.stage == 0 and not os.path.isfile(path)):
        if system.master:
            restart_log(cfg.out_dir, stage.n)
        return 0, best
    try:
        ckpt = read_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    check_checkpoint(cfg, path, ckpt, info["clip"], model)
    check_pools(path, ckpt, info["pools"])
    check_reference(path, ckpt, info)
    if ckpt["step"] > stage.iters:
        raise SystemExit(f"error: {path} is at step {ckpt['step']}, past {stage.iters_flag} {stage.iters}; resume "
                         f"with at least {ckpt['step']} steps, or start afresh in a new --out_dir")
    model.load_state_dict(ckpt["model"], strict=True)
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_states(ckpt, path, system, gen, cfg.seed)  # after CLIP's construction, which draws from torch's
    if system.master:
        restart_log(cfg.out_dir, stage.n, ckpt["step"])  # the records of steps after it, from the run it stopped
        print(f"resuming stage {stage.n} from {path}, step {ckpt['step']}")
    return ckpt["step"], ckpt.get("best", best)

# -----------------------------------------------------------------------------
# random streams


def rng_states(system, gen):
    """The random streams of every rank (the batch-and-sampling generator, and torch's global one),
    gathered on every rank: each rank draws its own batches, so each must get its own back."""
    mine = (gen.get_state(), torch.get_rng_state())
    every = [mine]
    if system.ddp:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    return {"generators": [g for g, _ in every], "torch_rngs": [r for _, r in every]}


def set_rng_states(ckpt, path, system, gen, seed):
    """rng_states' inverse on --resume: this rank's streams from the checkpoint at `path`. A run
    resumes with as many ranks as wrote it, or one line says so. A checkpoint written before every
    rank's streams were saved holds rank 0's alone: the other ranks start theirs again from the seed."""
    world = dist.get_world_size() if system.ddp else 1
    if "generators" in ckpt:
        n = len(ckpt["generators"])
        if n != world:
            raise SystemExit(f"error: {path} was written by a run of {n} process(es), and this run has {world}: "
                             f"each continues its own random stream, so resume with {n} (torchrun --nproc_per_node "
                             f"{n}, or no torchrun for 1), or start afresh in a new --out_dir")
        gen.set_state(ckpt["generators"][system.rank])
        torch.set_rng_state(ckpt["torch_rngs"][system.rank])
        return
    gen.set_state(ckpt["generator"])
    torch.set_rng_state(ckpt["torch_rng"])
    if system.rank > 0:  # another rank must not repeat rank 0's draws
        gen.manual_seed(seed + system.rank)
        torch.manual_seed(seed + system.rank)
    if world > 1 and system.master:
        print(f"note: {path} holds rank 0's random stream only; ranks 1 to {world - 1} start theirs from --seed "
              f"again, so this run departs from what an uninterrupted one would have drawn")

# -----------------------------------------------------------------------------
# the training log


def log_jsonl(out_dir, record):
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(out_dir):
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def restart_log(out_dir, stage, step=0):
    """A stage that starts at `step` drops from log.jsonl what it will write again. Afresh (step 0):
    its own and every later stage's records, so that a rerun in the same out_dir plots one run, not
    two on top of each other. Resumed: its evaluation at `step` (a record with captions) and its
    steps after it, so that a resumed run logs what an uninterrupted one does."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return
    before = lambda r: r["iter"] < step or (r["iter"] == step and "captions" not in r)  # this stage's to keep
    keep = lambda r: r["stage"] < stage or (r["stage"] == stage and before(r)) or (r["stage"] > stage and step > 0)
    write_jsonl(path, [r for r in read_log(out_dir) if keep(r)])


def plot_log(out_dir, stage):
    """Plot a stage's training and validation curves to out_dir/stage<N>.png."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (a notebook's) alone
    rows = [r for r in read_log(out_dir) if r.get("stage") == stage]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "captions" in r]
    keys = ["loss", "ce", "contrastive_reward"] if stage == 1 else ["reward", "kl", "gen_len", "repetition"]
    keys = [k for k in keys if train and k in train[-1]]
    fig = Figure(figsize=(4 * (len(keys) + 1), 3.2))
    axes = fig.subplots(1, len(keys) + 1, squeeze=False)[0]  # a list even with one panel (a run of 0 steps)
    for ax, k in zip(axes, keys):
        ax.plot([r["iter"] for r in train if k in r], [r[k] for r in train if k in r])
        ax.set_title(k)
        ax.set_xlabel("step")
    vk = "val_loss" if stage == 1 else "val_reward"
    axes[-1].plot([r["iter"] for r in evals], [r[vk] for r in evals], marker="o")
    axes[-1].set_title(vk)
    axes[-1].set_xlabel("step")
    fig.suptitle(f"stage {stage}")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"stage{stage}.png"), dpi=100)
