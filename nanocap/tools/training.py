"""
Small helpers that training needs and that would only clutter train.py: the device (and the DDP
process group), one rank's failure stopping every rank (together), every rank's random streams
for an exact resume (rng_states, set_rng_states), the AdamW parameter groups (one weight-decay
rule for the captioner and the toy CLIPs and GPT), the learning-rate schedule, and the training
log with its plot.
"""

import json
import math
import os
import traceback
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from nanocap.data.layout import write_jsonl


def pick_device(name="auto", local_rank=None):
    """auto: CUDA if present, else Apple MPS, else CPU. Under DDP on CUDA, the process's own GPU.
    A device nanocap does not run on, or one this torch does not see, is one line."""
    available = {"cuda": torch.cuda.is_available(),  # in auto's order of preference
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
                 "cpu": True}
    if name == "auto":
        name = next(kind for kind, present in available.items() if present)
    if name == "cuda" and local_rank is not None:
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in available:
        raise SystemExit(f"error: --device {name} is not a device nanocap runs on; use auto, cpu, cuda, cuda:N or mps")
    if not available[device.type]:
        raise SystemExit(f"error: --device {name}, but this torch sees no {device.type.upper()} device; use "
                         f"--device auto or cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


@dataclass
class System:
    """Where this process runs: one process, or one rank of DDP under torchrun."""
    ddp: bool
    rank: int
    device: torch.device
    dtype: torch.dtype

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()


def setup_system(device="auto", dtype="auto"):
    """The System of this process: under torchrun (RANK set) it joins the DDP process group, nccl
    on CUDA, gloo on CPU. dtype auto: bfloat16 autocast on CUDA, float32 elsewhere."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank = int(os.environ["RANK"]) if ddp else 0
    device = pick_device(device, int(os.environ.get("LOCAL_RANK", 0)) if ddp else None)
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    return System(ddp, rank, device, dtype)


def agree(error):
    """Every rank calls this at the same point with its error message, or None. If any rank failed,
    every rank stops: rank 0 prints the first failure as one line, naming its rank, and all exit
    with status 1; a rank that exits alone would leave the others waiting on their next collective
    until it times out. One all_reduce when all is well; the messages are gathered only on failure."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    failed = torch.tensor([0.0 if error is None else 1.0], device=device)
    dist.all_reduce(failed)  # the number of ranks that failed
    if failed.item() == 0:
        return
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    rank = dist.get_rank()
    dist.destroy_process_group()
    first, why = next((r, e) for r, e in enumerate(errors) if e is not None)
    why = why.removeprefix("error: ")
    raise SystemExit(f"error: rank {first} of {len(errors)}: {why}" if rank == 0 else 1)


def together(ddp, fn, *args, **kwargs):
    """fn(*args, **kwargs) on every rank, stopping every rank if it fails on any (agree). A one-line
    error (SystemExit) travels as it is; another exception, a bug, also prints its traceback on the
    rank where it happened. Without DDP, fn runs as it is."""
    if not ddp:
        return fn(*args, **kwargs)
    result, error = None, None
    try:
        result = fn(*args, **kwargs)
    except SystemExit as e:
        error = str(e.code) if e.code not in (None, 0) else None
    except Exception as e:
        traceback.print_exc()
        error = f"{type(e).__name__}: {e}"
    agree(error)
    return result


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


def param_groups(model, weight_decay):
    """AdamW groups over the trainable parameters: weight decay on weight matrices and conv
    kernels; none on biases, norms, gains, embedding tables (token, position, class) or
    logit_scale. Embeddings are not decayed (CLIP's and minGPT's rule): a rare token's row gets
    few gradients, and decay would pull it to zero between them. The one rule for every model."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in tables or "embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, lr, weight_decay):
    """AdamW on the trainable parameters, grouped by param_groups."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98))


def lr_at(step, total, peak, warmup, floor=0.1):
    """Linear warmup to `peak`, then cosine decay to floor * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


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
