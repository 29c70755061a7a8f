# nanocap: the two commands a newcomer needs.
#   make demo   set up .venv, then run the shapes-world demo (data prep, stage 1, stage 2, captions)
#   make test   set up .venv, then run the test suite (offline)
# Needs only python3 (3.10+) and, for METEOR and the PTB tokenizer, Java.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch and torchvision are installed together, first, so that pip keeps a matching pair.
# Override for another platform, e.g. make TORCH="torch torchvision" test
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test demo results notebooks clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	# the GPT-2 BPE file for offline tiktoken: the openai-whisper sdist ships it as
	# whisper/assets/gpt2.tiktoken (byte-identical to r50k_base); we need only that file
	$(PY) -m pip install -q --no-deps openai-whisper==20250625
	touch $@

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q --nbmake tests notebooks

demo: install
	HF_HUB_OFFLINE=1 $(PY) data_prep.py                        # the shapes world, once (a second run reuses it)
	HF_HUB_OFFLINE=1 $(PY) train.py                            # stage 1 on 2% of the labels, then stage 2 on the unlabeled 98%
	HF_HUB_OFFLINE=1 $(PY) sample.py --split test --compare 8  # stage-1 and stage-2 captions side by side

# Re-execute every notebook in place, outputs and figures saved (commit them: they are read on GitHub).
# The first one makes the small shapes world (about 2 minutes); the whole series takes about 5 minutes.
notebooks: install
	HF_HUB_OFFLINE=1 TQDM_DISABLE=1 $(PY) -m jupyter nbconvert --to notebook --execute --inplace notebooks/*.ipynb

# The README's results table on the shapes test split: the demo's runs (a) and (b) (made first
# if missing), (c) full supervision and (d) lambda = 0 (about 20 minutes), every row scored.
EVAL := HF_HUB_OFFLINE=1 $(PY) sample.py --split test --eval
results: install
	test -f out/shapes/stage2.pt || $(MAKE) demo
	HF_HUB_OFFLINE=1 $(PY) train.py --stage 1 --config configs/shapes_full.json
	HF_HUB_OFFLINE=1 $(PY) train.py --stage 1 --config configs/shapes_clipcap.json
	$(EVAL) --ckpt out/shapes/stage1.pt      --out_json results/a_stage1_2pct.json
	$(EVAL) --ckpt out/shapes/stage2.pt      --out_json results/b_stage2.json
	$(EVAL) --ckpt out/shapes_full/stage1.pt --out_json results/c_full.json
	$(EVAL) --ckpt out/shapes_clipcap/stage1.pt --out_json results/d_clipcap.json
	$(EVAL) --ckpt out/shapes/stage1.pt --references --out_json results/e_references.json
	$(PY) sample.py --table results/a_stage1_2pct.json results/b_stage2.json results/c_full.json \
	    results/d_clipcap.json results/e_references.json
	HF_HUB_OFFLINE=1 $(PY) sample.py --split test --compare 6 --grid assets/examples.png \
	    --ckpts out/shapes/stage1.pt out/shapes/stage2.pt out/shapes_full/stage1.pt

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
