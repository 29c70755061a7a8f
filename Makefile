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

.PHONY: install test demo clean

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
	$(PY) data_prep.py                        # the shapes world, once (a second run reuses it)
	$(PY) train.py --stage 1                  # 2% of the labels
	$(PY) train.py --stage 2                  # the unlabeled 98%, CLIP-S reward
	$(PY) sample.py --split test --compare 8  # stage-1 and stage-2 captions side by side

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
