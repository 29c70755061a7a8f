"""The ground floor: what every other part of nanocap may import, and which imports none of it.

    files.py    atomic writes (never a half-written file), JSON and JSONL
    system.py   the device, the DDP process group, and one rank's failure stopping every rank
    optim.py    AdamW's parameter groups and the learning-rate schedule

The floors above it: the captioner and its method (nanocap/*.py), the data worlds (nanocap/data),
the tools (nanocap/tools), then the scripts. A floor imports only the floors below it.
"""
