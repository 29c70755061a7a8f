"""
Where a process runs: its device, and, under torchrun, its place in the DDP process group.

One process (python train.py) or several (torchrun --nproc_per_node N train.py, DDP: each rank
trains on its own batches and the gradients are averaged). A rank that fails alone would leave
the others waiting on their next collective until it times out, so the work that can fail on
one rank runs under `together`, which stops every rank with the first failure's one line.
"""

import os
import traceback
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
