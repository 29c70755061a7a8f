"""DDP on 2 CPU processes (gloo): the gradients equal one process's on the same global batch,
train.py runs under torchrun, a failure in rank 0's own work stops both ranks, and the resumed
2-rank run equals the uninterrupted one bit for bit."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import train
from nanocap.captioner import Captioner, read_checkpoint
from nanocap.gpt import GPT, GPTConfig
from nanocap.losses import caption_loss
from nanocap.mapper import build_mapper
from tests.helpers import cli, free_port, join_as_rank, run_ranks


def make_model():
    torch.manual_seed(0)
    return Captioner(build_mapper("mlp", 16, 3, 32), GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=32)))


def global_batch():
    g = torch.Generator().manual_seed(1)
    feats, idx = torch.randn(4, 16, generator=g), torch.randint(0, 50, (4, 6), generator=g)
    return feats, idx


def worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model = DDP(make_model())
    feats, idx = global_batch()
    part = slice(2 * rank, 2 * rank + 2)  # each process takes half of the global batch
    caption_loss(model(feats[part], idx[part]), idx[part], 3).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters()}, out_file)
    dist.barrier()  # without it a rank can tear gloo down under its peer (seen as SIGABRT in CI)
    dist.destroy_process_group()


def test_ddp_gradients_match_single_process(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(worker, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    ddp_grads = torch.load(out, weights_only=True)
    model = make_model()
    feats, idx = global_batch()
    # DDP averages the two processes' gradients: the mean of the two half-batch losses
    loss = 0.5 * (caption_loss(model(feats[:2], idx[:2]), idx[:2], 3) + caption_loss(model(feats[2:], idx[2:]), idx[2:], 3))
    loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ddp_grads[n], atol=1e-6), n


# both stages on 2 ranks, a few steps: checkpoints at stage-1 steps 2 and 4, and at stage 2's end
RUN = dict(max_iters=4, eval_interval=2, log_interval=1, batch_size=4, contrastive_weight=0.5, stage1_samples=2,
           stage2_iters=2, stage2_batch_size=2, stage2_samples=2)


def two_rank_run(rank, port, data_dir, out_dir, resume, full_disk_at, result_dir):
    """One rank of a 2-rank run of both stages, as torchrun starts it. With full_disk_at, rank 0's
    checkpoint write at that stage-1 step fails (a full disk), rank-0-only work that every rank
    must hear of; each rank writes what it exited with to result_dir."""
    join_as_rank(rank, port)
    torch.set_num_threads(1)
    save = train.save_checkpoint

    def save_until_the_disk_is_full(path, model, **info):
        if info["stage"] == 1 and info["step"] == full_disk_at:
            raise OSError(28, "No space left on device")
        save(path, model, **info)
    train.save_checkpoint = save_until_the_disk_is_full
    try:
        train.main(train.Config(data_dir=data_dir, out_dir=out_dir, resume=resume, **RUN))
        code = 0
    except SystemExit as e:
        code = e.code
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(code, f)


@pytest.mark.slow
def test_ddp_rank0_failure_stops_both_and_resume_equals_the_uninterrupted_run(tmp_path, tiny_shapes):
    """train.py under torchrun trains both stages. Then the same run again, as torchrun would start it,
    but rank 0's checkpoint write fails at step 4: both ranks stop with one line (none is left waiting
    on a collective). Resumed from step 2, the run equals the uninterrupted one bit for bit: each
    rank draws its own batches and samples, so each must get its own random stream back."""
    whole, resumed, codes = str(tmp_path / "whole"), str(tmp_path / "resumed"), tmp_path
    flags = [str(x) for k, v in RUN.items() for x in (f"--{k}", v)]
    r = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",  # as a user runs it
            "--data_dir", tiny_shapes, "--out_dir", whole, *flags, OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr[-2000:]
    stage1, stage2 = (read_checkpoint(os.path.join(whole, f"stage{s}.pt")) for s in (1, 2))
    assert stage1["step"] == 4 and not any(k.startswith("module.") for k in stage1["model"])
    assert stage2["step"] == 2 and stage2["init_from"].endswith("stage1.pt")  # the final stage1.pt, after a barrier
    run_ranks(two_rank_run, (free_port(), tiny_shapes, resumed, False, 4, str(codes)))
    rank0, rank1 = (json.loads((codes / f"rank{r}.json").read_text()) for r in range(2))
    assert rank1 == 1 and "\n" not in rank0
    assert rank0.startswith("error: rank 0 of 2: OSError: [Errno 28] No space left on device"), rank0
    assert read_checkpoint(os.path.join(resumed, "stage1.last.pt"))["step"] == 2
    assert not os.path.exists(os.path.join(resumed, "stage2.pt"))
    run_ranks(two_rank_run, (free_port(), tiny_shapes, resumed, True, None, str(codes)))
    for name in ("stage1.last.pt", "stage1.pt", "stage2.pt"):
        a, b = read_checkpoint(os.path.join(whole, name)), read_checkpoint(os.path.join(resumed, name))
        assert a["step"] == b["step"]
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (name, k)
        assert all(torch.equal(x, y) for x, y in zip(a["generators"], b["generators"])), name
    assert len(a["generators"]) == 2 and not torch.equal(*a["generators"])  # one stream per rank
    # the same log, wall time aside: the resume dropped the records the failed run wrote after step 2
    log = lambda d: [{k: v for k, v in json.loads(line).items() if k != "time"}
                     for line in open(os.path.join(d, "log.jsonl"))]
    assert log(whole) == log(resumed) and [r["iter"] for r in log(whole) if "loss" in r] == [1, 2, 3, 4, 1, 2]
