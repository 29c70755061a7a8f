# nanocap: the two commands a newcomer needs.
#   make demo   set up .venv, then run the shapes-world demo (data prep, stage 1, stage 2, captions)
#   make test   set up .venv, then run the test suite (offline), notebooks included: what CI runs
#   make test-fast   the unit and property tests alone (no notebooks, no CLI runs): the inner loop
# Needs only python3 (3.10+) and, for METEOR and the PTB tokenizer, Java.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch and torchvision are installed together, first, so that pip keeps a matching pair.
# Override for another platform, e.g. make TORCH="torch torchvision" test
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-fast mutants demo bench docs results results-small results-small-world results-small-report results-seed results-score results-long results-table results-2x2 results-2x2-score results-2x2-table results-self-seed results-self-table notebooks clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	# the GPT-2 BPE file for offline tiktoken: the openai-whisper sdist ships it as
	# whisper/assets/gpt2.tiktoken (byte-identical to r50k_base); we need only that file
	$(PY) -m pip install -q --no-deps openai-whisper==20250625
	touch $@

# The test worlds (the tests' tiny one, the notebooks' data/shapes_small) pretrain in float32 whether or not
# the CPU has bfloat16 (float32 still differs in the last digits between CPUs). Their learned effects must
# hold in a bfloat16 world too; check with
#   rm -rf data/shapes_small && make test PRETRAIN_DTYPE=bfloat16
PRETRAIN_DTYPE ?= float32
# Long targets run through the timer, which keeps each one's wall time, command, CPU, cores, bfloat16
# and torch version in $(RECORDS)/timings.json: out/ by default (your machine's, never committed).
# The records the docs quote were made with RECORDS=results, then `make docs` (docs/performance.md):
#   make bench RECORDS=results && make docs
RECORDS ?= out
TIMED  := HF_HUB_OFFLINE=1 $(PY) -m nanocap.tools.timing --out $(RECORDS)/timings.json
# (the world's own summary.json records its wall time and machine; a timing record here would change
# results/timings.json before the tests that check the docs against it)
SMALL_WORLD := HF_HUB_OFFLINE=1 $(PY) data_prep.py --config configs/shapes_small_data.json --pretrain_dtype $(PRETRAIN_DTYPE)

NOTEBOOK_RUNS := out/shapes_small out/shapes_small_*   # every run the notebooks train (nanocap/tools/notebook.py)

test: install
	rm -rf $(NOTEBOOK_RUNS)   # the notebooks' runs are made afresh, never taken from an older world or code
	test -f data/shapes_small/meta.json || $(SMALL_WORLD)   # the notebooks' world, made once (docs/testing.md: its time)
	$(TIMED) "make test: pytest" -- $(PY) -m pytest -q --pretrain-dtype $(PRETRAIN_DTYPE) --nbmake tests notebooks

test-fast: install
	$(TIMED) "make test-fast: pytest" -- $(PY) -m pytest -q --pretrain-dtype $(PRETRAIN_DTYPE) -m "not slow" tests

# Break the method on purpose (a sign, an index, a clamp: tests/mutants.py) and check that make test-fast fails
mutants: install
	$(TIMED) "make mutants" -- $(PY) tests/mutants.py

demo: install
	$(TIMED) "make demo: data_prep.py" -- $(PY) data_prep.py  # the shapes world, once (a second run reuses it)
	$(TIMED) "make demo: train.py" -- $(PY) train.py          # stage 1 on 2% of the labels, then stage 2 on the unlabeled 98%
	HF_HUB_OFFLINE=1 $(PY) sample.py --split test --compare 8  # stage-1 and stage-2 captions side by side

# nanocap against transformers and ClipCap-style decoding on this CPU (bench.py; docs/performance.md)
bench: install
	$(TIMED) "make bench" -- $(PY) bench.py --profile --out $(RECORDS)/bench_cpu.json

# Re-execute every notebook in place, outputs and figures saved (commit them: they are read on GitHub).
# The small shapes world is made first when missing; the times are kept in results/timings.json.
notebooks: install
	rm -rf $(NOTEBOOK_RUNS)
	test -f data/shapes_small/meta.json || $(SMALL_WORLD)
	TQDM_DISABLE=1 $(TIMED) "make notebooks: nbconvert" -- $(PY) -m jupyter nbconvert --to notebook --execute \
	    --inplace notebooks/*.ipynb

# Every generated block of the README and docs/ (tables, claims) written again from results/ by the
# sample.py command its marker names; make test checks that none differs (tests/test_docs.py)
docs: install
	$(PY) sample.py --refresh README.md docs/*.md

# The results table (README, docs/results.md) on the shapes test split: rows (a) to (d), and (c) at 2,400 steps,
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

# the reward's blind spots (docs/blind-spots.md): features from the bag-of-words (bow) or the compositional
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
	$(PY) sample.py --two_by_two results
	$(MAKE) docs   # docs/blind-spots.md's block of the same command

# The notebooks' small world, pretrained in each dtype, 3 seeds of both stages each: stage 2's change over
# stage 1 paired by seed (beam 3, as notebook 07 decodes) and the stage-2 curves. About 10 minutes a dtype;
# side by side on 2 cores: make results-small-world DT=float32 & make results-small-world DT=bfloat16 & wait
# Another stage-2 recipe beside the preset's: make results-small-world DT=float32 TAG=_beta0.1 FLAGS="--kl_weight 0.1"
SMALL_DTYPES ?= float32 bfloat16
DT ?= float32
TAG ?=
FLAGS ?=
results-small: install
	for dt in $(SMALL_DTYPES); do $(MAKE) results-small-world DT=$$dt || exit 1; done
	$(MAKE) results-small-report

results-small-world: install
	test -f data/shapes_small_$(DT)/meta.json || HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) data_prep.py \
	    --config configs/shapes_small_data.json --pretrain_dtype $(DT) --data_dir data/shapes_small_$(DT)
	for s in $(SEEDS); do \
	    $(TRAIN) --config configs/shapes_small.json --data_dir data/shapes_small_$(DT) --seed $$s \
	        --out_dir out/small$(TAG)/$(DT)/seed$$s $(FLAGS) || exit 1; \
	    for st in 1 2; do $(EVAL) --method beam --beam_size 3 --ckpt out/small$(TAG)/$(DT)/seed$$s/stage$$st.pt \
	        --out_json results/small$(TAG)_$(DT)_stage$$st.seed$$s.json || exit 1; done; \
	done

results-small-report: install
	$(PY) sample.py --changes $(foreach dt,$(SMALL_DTYPES),results/small$(TAG)_$(dt))
	$(MAKE) docs   # docs/testing.md's block of the same command
	$(PY) sample.py --curves $(foreach dt,$(SMALL_DTYPES),$(foreach s,$(SEEDS),out/small$(TAG)/$(dt)/seed$(s))) \
	    --grid assets/small$(TAG)_stage2.png

# Row (f), stage 2 by self-training (--stage2_objective self_training), beside rows (a) and (b), paired by
# seed, in a world pretrained in float32 (float32 on any CPU, though it differs in the last digits between
# CPUs). One seed: stage 1 and stage 2 as in (a) and (b), then stage 2 by self-training from the same stage-1
# checkpoint, then the three scored. The world is made once. Five seeds, two at a time on 2 cores:
#   make results-self-seed SEED=1337 & make results-self-seed SEED=1338 & wait   (and so on to 1341)
#   make results-self-table
SELF_WORLD ?= data/shapes_float32
SELF = out/self/seed$(SEED)
results-self-seed: install
	test -f $(SELF_WORLD)/meta.json || HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) data_prep.py --pretrain_dtype float32 \
	    --data_dir $(SELF_WORLD)
	$(TRAIN) --seed $(SEED) --data_dir $(SELF_WORLD) --out_dir $(SELF)/ab
	$(TRAIN) --stage 2 --stage2_objective self_training --seed $(SEED) --data_dir $(SELF_WORLD) \
	    --init_from $(SELF)/ab/stage1.pt --out_dir $(SELF)/f
	$(EVAL) --ckpt $(SELF)/ab/stage1.pt --out_json results/self_a.seed$(SEED).json
	$(EVAL) --ckpt $(SELF)/ab/stage2.pt --out_json results/self_b.seed$(SEED).json
	$(EVAL) --ckpt $(SELF)/f/stage2.pt --out_json results/self_f.seed$(SEED).json

results-self-table: install
	$(PY) sample.py --table results/self_a.seed*.json results/self_b.seed*.json results/self_f.seed*.json
	$(PY) sample.py --paired results/self_a results/self_f results/self_f results/self_b
	$(MAKE) docs   # docs/results.md's blocks of the same commands
	HF_HUB_OFFLINE=1 $(PY) sample.py --split test --compare 6 --grid assets/self_training.png --ckpts \
	    out/self/seed1337/ab/stage1.pt out/self/seed1337/ab/stage2.pt out/self/seed1337/f/stage2.pt

results-table: install
	$(EVAL) --references --ckpt out/results/seed1337/shapes/stage1.pt --out_json results/e_references.json
	$(PY) sample.py --table results/a_stage1_2pct.seed*.json results/b_stage2.seed*.json results/c_full.seed*.json \
	    results/c_full_2400.seed*.json results/d_clipcap.seed*.json results/e_references.json \
	    results/a_stage1_2pct_last.seed*.json results/d_clipcap_last.seed*.json
	$(PY) sample.py --claims results
	$(PY) sample.py --claims results --claims_full c_full_2400
	$(MAKE) docs   # the README's and docs/results.md's blocks of the same commands
	HF_HUB_OFFLINE=1 $(PY) sample.py --split test --compare 6 --grid assets/examples.png --ckpts \
	    out/results/seed1337/shapes/stage1.pt out/results/seed1337/shapes/stage2.pt out/results/seed1337/shapes_full/stage1.pt

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
