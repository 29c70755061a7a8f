import os

# Never touch the network in tests: a failing hub call would otherwise retry for ~46 s.
# (The Makefile and .ci/run export it before Python starts; this is the safety net for a bare `pytest`.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_WORLD = os.path.join(ROOT, "data", "shapes_small")  # the notebooks' world (configs/shapes_small_data.json)


def pytest_addoption(parser):
    # The test worlds pretrain in float32 by default, whether or not the CPU has bfloat16; a learned effect that
    # a test asserts must hold in a bfloat16 world too: `make test PRETRAIN_DTYPE=bfloat16` checks it.
    parser.addoption("--pretrain-dtype", default="float32", choices=["float32", "bfloat16"],
                     help="dtype the test worlds' toy models pretrain in (data_prep.py --pretrain_dtype)")


def pytest_configure(config):
    dtype = config.getoption("--pretrain-dtype")
    meta = os.path.join(SMALL_WORLD, "meta.json")
    made = None
    if os.path.exists(meta):
        with open(meta) as f:
            made = json.load(f).get("pretrain_dtype")
    if made and made != dtype:  # the notebooks would run on the other world
        pytest.exit(f"data/shapes_small was pretrained in {made}, not {dtype}: delete data/shapes_small, or "
                    f"run with PRETRAIN_DTYPE={made}", returncode=4)


@pytest.fixture(scope="session")
def pretrain_dtype(request):
    return request.config.getoption("--pretrain-dtype")


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory, pretrain_dtype):
    """A miniature shapes world made by the real data_prep code path, in seconds: a few hundred
    images, CLIPs and GPT trained for a handful of steps. Returns its data_dir."""
    import data_prep

    root = tmp_path_factory.mktemp("tiny") / "shapes"
    cfg = data_prep.ShapesConfig(data_dir=str(root), n_web=128, n_train=120, n_val=16, n_test=16,
                                 clip_steps=2, eval_clip_steps=2, lm_steps=40, seed=7, pretrain_dtype=pretrain_dtype)
    data_prep.prepare_shapes(cfg)
    return str(root)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_shapes):
    """A stage-1 checkpoint (4 steps, λ = 0) on the miniature shapes world, for the sample.py tests.
    Returns its out_dir."""
    import train

    out = tmp_path_factory.mktemp("run")
    train.main(train.Config(stage=1, data_dir=tiny_shapes, out_dir=str(out), max_iters=4, eval_interval=1000,
                            batch_size=4, contrastive_weight=0.0))
    return str(out)
