"""Running the project's scripts the way a user does: as a command, or as the ranks torchrun starts."""
import os
import socket
import subprocess
import sys

import pytest
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(script, *args, timeout=300, **env):
    """Run `python script args...` from the repository root (script may be "-m"); the
    CompletedProcess, text output. Keyword arguments are extra environment variables."""
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def cli_start(script, *args):
    """Start `python script args...` in the background, output discarded: a Popen to wait on or kill."""
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, script, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, args, nprocs=2, timeout=300):
    """fn(rank, *args) in nprocs spawned processes, as torchrun would start them; fails the test if a
    rank is still running after `timeout` seconds (a rank left waiting on a collective)."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    for _ in range(int(timeout / 0.5)):
        if ctx.join(timeout=0.5):
            return
    for p in ctx.processes:
        p.kill()
    pytest.fail(f"a rank is still running after {timeout} s: left waiting on a collective (or a very slow machine)")


def join_as_rank(rank, port, world=2):
    """The environment torchrun gives rank `rank` of `world` on this machine, one thread each."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
