"""
Command lines generated from a config dataclass, the one place each script's defaults live.

Every script (data_prep.py, train.py, sample.py) declares `@dataclass class Config` at its top;
`parse_config(Config)` turns each field into a flag (`--stage 1`, `--lr 3e-4`, `--compile true`),
with the field's default and its `help=` metadata in `-h`. `--config FILE.json` loads a preset
first; flags given on the command line win over it. Unknown keys in a preset are an error, so
a typo never silently does nothing. A renamed flag keeps its old name for one release
(`renamed={"old": "new"}`): on the command line or in a preset, the old name sets the new field
and prints a one-line note.
"""

import argparse
import dataclasses
import json
import os
import sys


def _bool(s):
    if s.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if s.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _type_of(field):
    t = field.type if not isinstance(field.type, str) else {"int": int, "float": float, "bool": bool, "str": str}[field.type]
    return _bool if t is bool else t


def _is_list(field):
    return getattr(field.type, "__origin__", None) is list or str(field.type).startswith("list")


def parse_config(cls, argv=None, description=None, renamed=None):
    """Build `cls` (a dataclass) from --config FILE.json and --field value flags. renamed: {old
    flag name: new field name}, the old names still accepted."""
    renamed = renamed or {}
    parser = argparse.ArgumentParser(description=description or cls.__doc__, allow_abbrev=False,  # no --clip for --clip_lr
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="a JSON preset; flags override it")
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kw = dict(default=argparse.SUPPRESS, help=f.metadata.get("help", " ") + f" (default: {default})")
        if _is_list(f):
            kw.update(nargs="+", type=str)  # `--image a.jpg b.png photos/`
        elif _type_of(f) is _bool:
            kw.update(nargs="?", const=True, type=_bool)  # `--compile` alone means true
        else:
            kw.update(type=_type_of(f))
        parser.add_argument(f"--{f.name}", **kw)
        for old in (o for o, name in renamed.items() if name == f.name):  # hidden from -h
            parser.add_argument(f"--{old}", **{**kw, "dest": f"renamed:{old}", "help": argparse.SUPPRESS})
    args = vars(parser.parse_args(sys.argv[1:] if argv is None else argv))
    values = {}
    preset = args.pop("config", None)
    if preset:
        with open(preset) as fh:
            values = json.load(fh)
        for old in [k for k in values if k in renamed]:
            deprecated(old, renamed[old], preset)
            value = values.pop(old)
            values.setdefault(renamed[old], value)  # the new name wins if both are given
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            parser.error(f"{preset}: unknown keys {unknown}; valid keys are the flags in -h")
    for key in [k for k in args if k.startswith("renamed:")]:
        old = key.removeprefix("renamed:")
        deprecated(old, renamed[old], "the command line")
        value = args.pop(key)
        args.setdefault(renamed[old], value)  # the new name wins if both are given
    values.update(args)  # command-line flags win over the preset
    return cls(**values)


def deprecated(old, new, where):
    """The one line that says an old flag name still works, and what to write instead (once under
    torchrun: rank 0's)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {where}: --{old} is now --{new}; the old name works until the next release", file=sys.stderr)


def print_config(config):
    """Print the resolved config at start-up, one `name = value` per line."""
    print(f"{type(config).__module__}.{type(config).__name__}:")
    for k, v in dataclasses.asdict(config).items():
        print(f"  {k} = {v!r}")
