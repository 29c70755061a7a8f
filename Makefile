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

.PHONY: install test demo results results-seed results-score results-long results-table results-2x2 results-2x2-score results-2x2-table notebooks clean

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

# The README's results table on the shapes test split: rows (a) to (d), and (c) at 2,400 steps,
# trained and scored for each of 3 seeds (the seed chooses the labeled 2%, the batches and the
# samples), (e) once, then the table (mean ± std over the seeds) and the paper's claims seed by seed.
# Each target below takes about an hour or less on a 2-core CPU: make results-seed SEED=1338 (rows (a)-(d)),
# make results-long SEED=1338 (the 2,400-step row), make results-table.
# One thread per run (OMP_NUM_THREADS=1), so that a rerun on the same CPU gives the same figures:
# the thread count changes the order of float sums, and a run drifts from there. Two seeds side by
# side use both cores of a 2-core CPU: make results-seed SEED=1337 & make results-seed SEED=1338 & wait
SEEDS ?= 1337 1338 1339
EVAL  := HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) sample.py --split test --eval
TRAIN := HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) train.py
RUN    = out/results/seed$(SEED)
results: install
	for s in $(SEEDS); do $(MAKE) results-seed SEED=$$s && $(MAKE) results-long SEED=$$s || exit 1; done
	$(MAKE) results-table

results-seed: install
	$(TRAIN) --seed $(SEED) --out_dir $(RUN)/shapes
	$(TRAIN) --stage 1 --config configs/shapes_full.json --seed $(SEED) --out_dir $(RUN)/shapes_full
	$(TRAIN) --stage 1 --config configs/shapes_clipcap.json --seed $(SEED) --out_dir $(RUN)/shapes_clipcap
	$(MAKE) results-score SEED=$(SEED)

# score one seed's trained rows again, without training (after a metric changes): a few minutes
results-score: install
	$(EVAL) --ckpt $(RUN)/shapes/stage1.pt         --out_json results/a_stage1_2pct.seed$(SEED).json
	$(EVAL) --ckpt $(RUN)/shapes/stage2.pt         --out_json results/b_stage2.seed$(SEED).json
	$(EVAL) --ckpt $(RUN)/shapes_full/stage1.pt    --out_json results/c_full.seed$(SEED).json
	$(EVAL) --ckpt $(RUN)/shapes_clipcap/stage1.pt --out_json results/d_clipcap.seed$(SEED).json
	# the last stage-1 states (step 600), beside the best-val-loss checkpoints that the rows use
	$(EVAL) --ckpt $(RUN)/shapes/stage1.last.pt         --out_json results/a_stage1_2pct_last.seed$(SEED).json
	$(EVAL) --ckpt $(RUN)/shapes_clipcap/stage1.last.pt --out_json results/d_clipcap_last.seed$(SEED).json
	test ! -f $(RUN)/shapes_full_2400/stage1.pt || \
	    $(EVAL) --ckpt $(RUN)/shapes_full_2400/stage1.pt --out_json results/c_full_2400.seed$(SEED).json

results-long: install
	$(TRAIN) --stage 1 --config configs/shapes_full.json --max_iters 2400 --eval_interval 400 \
	    --seed $(SEED) --out_dir $(RUN)/shapes_full_2400
	$(EVAL) --ckpt $(RUN)/shapes_full_2400/stage1.pt --out_json results/c_full_2400.seed$(SEED).json

# the reward's blind spots (README): features from the bag-of-words (bow) or the compositional
# (comp) CLIP, times the reward from either; bow x bow is rows (a) and (b). Needs data_prep.py --compositional.
results-2x2: install
	test -f data/shapes/models/clip_comp.safetensors || HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) data_prep.py --compositional
	$(TRAIN) --config configs/shapes_comp_features.json --seed $(SEED) --out_dir $(RUN)/shapes_comp_features
	$(TRAIN) --config configs/shapes_comp_reward.json --seed $(SEED) --out_dir $(RUN)/shapes_comp_reward
	$(TRAIN) --config configs/shapes_comp.json --seed $(SEED) --out_dir $(RUN)/shapes_comp
	$(TRAIN) --stage 1 --config configs/shapes_comp_full.json --seed $(SEED) --out_dir $(RUN)/shapes_comp_full
	$(MAKE) results-2x2-score SEED=$(SEED)

results-2x2-score: install
	for run in comp_features comp_reward comp; do for s in 1 2; do \
	    $(EVAL) --ckpt $(RUN)/shapes_$$run/stage$$s.pt --out_json results/2x2_$${run}_stage$$s.seed$(SEED).json || exit 1; \
	done; done
	$(EVAL) --ckpt $(RUN)/shapes_comp_full/stage1.pt --out_json results/2x2_comp_full.seed$(SEED).json

results-2x2-table: install
	$(PY) sample.py --table results/a_stage1_2pct.seed*.json results/b_stage2.seed*.json \
	    results/2x2_comp_features_stage1.seed*.json results/2x2_comp_features_stage2.seed*.json \
	    results/2x2_comp_reward_stage1.seed*.json results/2x2_comp_reward_stage2.seed*.json \
	    results/2x2_comp_stage1.seed*.json results/2x2_comp_stage2.seed*.json \
	    results/c_full.seed*.json results/2x2_comp_full.seed*.json
	$(PY) sample.py --two_by_two results

results-table: install
	$(EVAL) --references --ckpt out/results/seed1337/shapes/stage1.pt --out_json results/e_references.json
	$(PY) sample.py --table results/a_stage1_2pct.seed*.json results/b_stage2.seed*.json results/c_full.seed*.json \
	    results/c_full_2400.seed*.json results/d_clipcap.seed*.json results/e_references.json \
	    results/a_stage1_2pct_last.seed*.json results/d_clipcap_last.seed*.json
	$(PY) sample.py --claims results
	$(PY) sample.py --claims results --claims_full c_full_2400
	HF_HUB_OFFLINE=1 $(PY) sample.py --split test --compare 6 --grid assets/examples.png --ckpts \
	    out/results/seed1337/shapes/stage1.pt out/results/seed1337/shapes/stage2.pt out/results/seed1337/shapes_full/stage1.pt

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
