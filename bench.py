"""
Benchmarks: nanocap against what a user would reach for instead.

    python bench.py                        # full sizes (GPT-2 124M shape), table + bench.json
    python bench.py --quick                # tiny sizes, under a minute (the tests run this)
    python bench.py --profile              # also where the time goes (torch.profiler, top ops)

Each comparison runs both sides in this one process on the same weights and inputs, warms both
up, then interleaves them `--repeats` times; the reported ratio is the median over the repeats of
(their time / our time), so > 1 means nanocap is faster. Contenders:

  train step      nanocap.gpt.GPT vs transformers.GPT2LMHeadModel, forward + backward, tokens/s
  greedy, beam 5  nanocap.decode vs transformers `generate` (its KV cache on), and greedy vs a
                  loop without a cache that re-runs the whole sequence each step (ClipCap's
                  predict.py, batched here so only the cache differs), captions/s; 10-token
                  prefix, exactly 20 new tokens (EOS never stops either side), batch 32
  precompute      data_prep's image encoding (read PNG files, preprocess, DataLoader, CLIP) vs
                  the bare CLIP forward on tensors already in memory, images/s: the I/O overhead
  stage-2 step    images/s of one real stage-2 step (losses.stage2_loss: K samples, CLIP-S,
                  baseline, KL, then the backward)
  MFU (CUDA only) model FLOPs utilization of a stage-1 step at the real shape (GPT-2 124M, bf16)
"""

import copy
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from nanocap import losses
from nanocap.base.files import write_json
from nanocap.base.system import pick_device
from nanocap.captioner import Captioner
from nanocap.clip_encoder import CLIPEncoder
from nanocap.data import pretrain
from nanocap.decode import beam_search, greedy
from nanocap.gpt import GPT, GPTConfig
from nanocap.mapper import build_mapper
from nanocap.tokenizer import EOT_ID, VOCAB_SIZE, get_tokenizer
from nanocap.tools import timing
from nanocap.tools.cli import parse_config, print_config


# GPU peak bf16 dense FLOP/s, for MFU (from the vendors' data sheets)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class Config:
    """Time nanocap against transformers and against ClipCap-style code."""
    quick: bool = field(default=False, metadata={"help": "tiny sizes, under a minute"})
    out: str = field(default="bench.json", metadata={"help": "write the ratios and absolute figures here"})
    repeats: int = field(default=5, metadata={"help": "interleaved timed runs per side"})
    profile: bool = field(default=False, metadata={"help": "print torch.profiler's top ops of each of our sides"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, mps"})
    seed: int = field(default=0, metadata={"help": "weights and inputs"})


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def compare(ours, theirs, work, repeats, device):
    """Warm up both, interleave `repeats` timed runs; median speed (work/s) of each, median ratio."""
    ours(), theirs()
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        t_ours.append(timed(ours, device))
        t_theirs.append(timed(theirs, device))
    return {"ours": work / statistics.median(t_ours), "theirs": work / statistics.median(t_theirs),
            "ratio": statistics.median(t / o for o, t in zip(t_ours, t_theirs))}


def profile(name, fn, rows=8):
    """Where the time of `fn` goes: the top ops by self time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=acts) as prof:
        fn()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(f"\n--- profile: {name}")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def gpt_pair(shape, device):
    """The same random GPT-2 weights as a transformers GPT2LMHeadModel and as our GPT."""
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2LMHeadModel(GPT2Config(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                                    vocab_size=shape["vocab_size"], n_positions=shape["block_size"],
                                    bos_token_id=shape["vocab_size"] - 1, eos_token_id=shape["vocab_size"] - 1,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, safe_serialization=True)
        ours = GPT.from_pretrained(d)
    return ours.to(device), hf.to(device)


# -----------------------------------------------------------------------------------------------
# the benchmarks

def bench_train_step(shape, batch, seq, cfg, device):
    ours, hf = gpt_pair(shape, device)
    ours.train(), hf.train()
    idx = torch.randint(0, shape["vocab_size"], (batch, seq), device=device)
    targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -100)], 1)  # next token, as HF shifts

    def step_ours():
        _, loss = ours(idx, targets=targets)
        loss.backward()
        ours.zero_grad(set_to_none=True)

    def step_hf():
        hf(input_ids=idx, labels=idx).loss.backward()
        hf.zero_grad(set_to_none=True)

    r = compare(step_ours, step_hf, batch * seq, cfg.repeats, device)
    if cfg.profile:
        profile(f"train step {shape['n_layer']}x{shape['n_embd']}, ours", step_ours)
    return r


@torch.no_grad()
def bench_decoding(shape, batch, cfg, device, prefix_len=10, new_tokens=20):
    ours, hf = gpt_pair(shape, device)
    ours.eval(), hf.eval()
    g = torch.Generator().manual_seed(cfg.seed)
    prefix = (0.1 * torch.randn(batch, prefix_len, shape["n_embd"], generator=g)).to(device)  # (B, P, C)
    mask = torch.ones(batch, prefix_len, dtype=torch.long, device=device)
    no_eos = -1  # an id that is never produced: both sides make exactly `new_tokens` tokens
    hf_kw = dict(inputs_embeds=prefix, attention_mask=mask, max_new_tokens=new_tokens,
                 min_new_tokens=new_tokens, pad_token_id=0, do_sample=False)

    def nocache_greedy():  # ClipCap's predict.py: the whole sequence again at every step
        x = prefix
        for _ in range(new_tokens):
            nxt = ours(inputs_embeds=x)[:, -1].argmax(-1)  # (B,)
            x = torch.cat([x, ours.embed(nxt[:, None])], 1)

    # same tokens first: a speed comparison of two different computations would mean nothing
    a = greedy(ours, prefix, new_tokens, no_eos).tokens
    b = hf.generate(**hf_kw)[:, -new_tokens:]
    agree = (a == b).float().mean().item()
    out = {"greedy_tokens_agree": agree,
           "greedy_vs_hf": compare(lambda: greedy(ours, prefix, new_tokens, no_eos),
                                   lambda: hf.generate(**hf_kw), batch, cfg.repeats, device),
           "greedy_vs_nocache": compare(lambda: greedy(ours, prefix, new_tokens, no_eos), nocache_greedy,
                                        batch, cfg.repeats, device),
           "beam5_vs_hf": compare(lambda: beam_search(ours, prefix, 5, new_tokens, no_eos, length_penalty=1.0),
                                  lambda: hf.generate(**hf_kw, num_beams=5, length_penalty=1.0, early_stopping=False),
                                  batch, cfg.repeats, device)}
    if cfg.profile:
        profile("greedy, ours", lambda: greedy(ours, prefix, new_tokens, no_eos))
        profile("beam 5, ours", lambda: beam_search(ours, prefix, 5, new_tokens, no_eos))
    return out


def bench_precompute(n_images, clip_name, cfg, device):
    """data_prep's pipeline from PNG files vs the bare forward on in-memory tensors, images/s."""
    from nanocap.data.real import encode_images
    from nanocap.data.shapes import make_split, render
    clip = CLIPEncoder(clip_name, None, device=device)
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i, scene in enumerate(make_split(n_images, seed=cfg.seed)):
            paths.append(os.path.join(d, f"{i}.png"))
            render(scene, size=64).save(paths[-1])
        from PIL import Image
        x = torch.stack([clip.preprocess(Image.open(p).convert("RGB")) for p in paths]).to(device)  # (N, 3, H, W)
        pipeline = lambda: encode_images(clip, paths, batch_size=64, num_workers=0, desc="encode")
        bare = lambda: [clip.encode_image(x[i : i + 64]) for i in range(0, len(x), 64)]
        return compare(pipeline, bare, n_images, cfg.repeats, device)


def bench_stage2(shape, batch, k, cfg, device):
    """One real stage-2 step, losses.stage2_loss and its backward, on a small captioner; images/s."""
    torch.manual_seed(cfg.seed)
    # the shapes world's CLIP on CPU; the real recipe's ViT-B-32 (random weights) on a GPU
    clip = CLIPEncoder("ViT-B-32" if device.type == "cuda" else _tiny_clip_json(), None, device=device)
    gpt = GPT(GPTConfig(**shape)).to(device)
    model = Captioner(build_mapper("mlp", clip.embed_dim, 10, gpt.config.n_embd), gpt).to(device)
    reference = copy.deepcopy(model).eval().requires_grad_(False)  # the frozen stage-1 policy
    small = shape["vocab_size"] < VOCAB_SIZE  # a renumbered vocabulary, as the shapes world's GPT has
    tok = get_tokenizer("gpt2", list(range(shape["vocab_size"] - 1)) + [EOT_ID] if small else None)
    feats = torch.nn.functional.normalize(torch.randn(batch, clip.embed_dim), dim=-1).to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    def step():
        loss, _ = losses.stage2_loss(model, reference, feats, clip, tok, k=k, max_new_tokens=20, generator=gen)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    t = statistics.median(timed(step, device) for _ in range(cfg.repeats))
    return {"images_per_s": batch / t, "step_s": t}


def _tiny_clip_json():
    """A tiny open_clip config (the shapes world's reward CLIP), written to a temp file."""
    path = os.path.join(tempfile.gettempdir(), "nanocap_bench_clip.json")
    write_json(path, pretrain.REWARD_CLIP_CFG)
    return path


def bench_mfu(batch, seq, device):
    """Stage-1 training at the real recipe shape: GPT-2 124M fine-tuned, prefix 10, bf16."""
    gpt = GPT(GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768)).to(device)
    model = Captioner(build_mapper("mlp", 512, 10, 768), gpt).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    feats = torch.randn(batch, 512, device=device)
    idx = torch.randint(0, 50257, (batch, seq), device=device)
    T = seq + 10
    flops_per_step = 6 * gpt.num_params() * batch * T + 12 * 12 * 768 * T * T * batch  # PaLM appendix B

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(feats, idx)
            loss = torch.nn.functional.cross_entropy(logits[:, 9:-1].flatten(0, 1).float(), idx.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    t = statistics.median(timed(step, device) for _ in range(10))
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return {"tokens_per_s": batch * T / t, "mfu": flops_per_step / t / peak if peak else None}


# -----------------------------------------------------------------------------------------------

def main(cfg):
    print_config(cfg)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    if device.type == "cpu":
        name = f"CPU, {torch.get_num_threads()} threads"
    else:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    small = dict(pretrain.LM_CFG, vocab_size=68)  # the shapes world's GPT: the demo's own shape
    gpt2 = dict(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768)
    if cfg.quick:
        small = dict(block_size=64, vocab_size=1000, n_layer=2, n_head=2, n_embd=64)
        cfg.repeats = min(cfg.repeats, 3)
    import open_clip
    import transformers
    # what the figures depend on: the machine, the versions, the flags (not where the file went)
    results = {"device": name, "machine": timing.machine(), "torch": torch.__version__,
               "versions": {"transformers": transformers.__version__, "open_clip": open_clip.__version__},
               "quick": cfg.quick, "config": {k: v for k, v in asdict(cfg).items() if k != "out"}}
    print(f"device: {name}")

    results["train_small"] = bench_train_step(small, 16, 64, cfg, device)
    if not cfg.quick:
        results["train_gpt2"] = bench_train_step(gpt2, 4 if device.type == "cpu" else 16, 128, cfg, device)
    results["decoding_small"] = bench_decoding(small, 32, cfg, device)
    if not cfg.quick:
        results["decoding_gpt2"] = bench_decoding(gpt2, 32, cfg, device)
    results["precompute"] = bench_precompute(64 if cfg.quick else 128, _tiny_clip_json() if cfg.quick else "ViT-B-32", cfg, device)
    results["stage2_step"] = bench_stage2(small, 4 if cfg.quick else 16, 5, cfg, device)
    if device.type == "cuda":
        results["mfu_stage1"] = bench_mfu(64, 30, device)

    # the headline ratios: at GPT-2 124M, the real recipe's shape (the small shape with --quick)
    train_key = "train_small" if cfg.quick else "train_gpt2"
    dec = results["decoding_small" if cfg.quick else "decoding_gpt2"]
    results.update(train_step_vs_hf=results[train_key]["ratio"], greedy_vs_hf=dec["greedy_vs_hf"]["ratio"],
                   greedy_vs_nocache=dec["greedy_vs_nocache"]["ratio"], beam5_vs_hf=dec["beam5_vs_hf"]["ratio"],
                   precompute_vs_bare=results["precompute"]["ratio"])
    rows = []
    for shape, tag in (("small", "shapes GPT"), ("gpt2", "GPT-2 124M")):
        if f"train_{shape}" not in results:
            continue
        d = results[f"decoding_{shape}"]
        rows += [(f"train step, {tag} (tokens/s)", results[f"train_{shape}"], "1.1"),
                 (f"greedy vs transformers, {tag} (captions/s)", d["greedy_vs_hf"], "1.5"),
                 (f"greedy vs no-cache loop, {tag}", d["greedy_vs_nocache"], "5"),
                 (f"beam 5 vs transformers, {tag}", d["beam5_vs_hf"], "1.2")]
    rows.append(("precompute vs bare forward (images/s)", results["precompute"], "0.8"))
    print(f"\n| {'benchmark':<44} | nanocap | other | ratio | target |\n|---|---|---|---|---|")
    for label, r, target in rows:
        print(f"| {label:<44} | {r['ours']:.1f} | {r['theirs']:.1f} | {r['ratio']:.2f}x | >= {target}x |")
    s2 = results["stage2_step"]
    print(f"\nstage-2 step (losses.stage2_loss + backward): {s2['images_per_s']:.1f} images/s, {s2['step_s']:.3f} s")
    print(f"greedy tokens identical to transformers': {100 * dec['greedy_tokens_agree']:.1f}%")
    if "mfu_stage1" in results:
        print(f"stage-1 MFU at GPT-2 124M, bf16: {results['mfu_stage1']}")
    results["wall_s"] = round(time.perf_counter() - start, 1)
    print(f"bench.py took {results['wall_s']:.0f} s")
    if cfg.out:
        write_json(cfg.out, results)
        print(f"wrote {cfg.out}")
    return results


if __name__ == "__main__":
    main(parse_config(Config))
