import os

# Never touch the network in tests: a failing hub call would otherwise retry for ~46 s.
# (The Makefile and .ci/run export it before Python starts; this is the safety net for a bare `pytest`.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
