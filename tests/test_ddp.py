"""DDP on 2 CPU processes (gloo): the gradients equal one process's on the same global batch, and
train.py runs under torchrun."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from nanocap.captioner import Captioner, read_checkpoint
from nanocap.gpt import GPT, GPTConfig
from nanocap.losses import caption_loss
from nanocap.mapper import build_mapper
from tests.helpers import cli


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


@pytest.mark.slow
def test_train_py_under_torchrun(tmp_path, tiny_shapes):
    out = tmp_path / "out"
    r = cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",  # both stages
            "--data_dir", tiny_shapes, "--out_dir", out, "--max_iters", "3", "--eval_interval", "1000",
            "--batch_size", "4", "--contrastive_samples", "2", "--contrastive_weight", "0.5",
            "--stage2_iters", "2", "--stage2_batch_size", "2", "--samples_per_image", "2", OMP_NUM_THREADS="1")
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = read_checkpoint(out / "stage1.pt")
    assert ckpt["step"] == 3
    assert not any(k.startswith("module.") for k in ckpt["model"])
    stage2 = read_checkpoint(out / "stage2.pt")  # started from the final stage1.pt, after a barrier
    assert stage2["step"] == 2 and stage2["init_from"].endswith("stage1.pt")
