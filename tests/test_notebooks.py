"""The notebooks are committed executed, so that they read on GitHub without running anything.
pytest --nbmake (the README's test command) re-executes them; these tests check what is on disk:
every code cell ran, in order, without an error; each notebook draws at least one figure, asserts
what it claims, and imports nanocap rather than copying its code; the README lists every one."""
import glob
import json
import os
import re

import pytest

from helpers import ROOT

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def code_cells(path):
    with open(path) as f:
        return [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]


def test_the_series_is_there():
    names = [os.path.basename(p)[:2] for p in NOTEBOOKS]
    assert names == [f"{i:02d}" for i in range(8)], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_committed_executed(path):
    cells = code_cells(path)
    counts = [c["execution_count"] for c in cells]
    assert None not in counts, f"{os.path.basename(path)}: a code cell was never executed (run `make notebooks`)"
    assert counts == list(range(1, len(cells) + 1)), f"{os.path.basename(path)}: not run top to bottom in one go: {counts}"
    outputs = [o for c in cells for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"], f"{os.path.basename(path)} was saved with an error"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{os.path.basename(path)} draws no figure"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_asserts_and_imports(path):
    source = "\n".join("".join(c["source"]) for c in code_cells(path))
    assert re.search(r"^\s*assert ", source, re.M), f"{os.path.basename(path)} asserts nothing"
    assert "from nanocap" in source
    # model code lives in nanocap/: a notebook defines no nn.Module of its own
    assert not re.search(r"class \w+\((nn|torch\.nn)\.Module\)", source)


def test_readme_lists_every_notebook():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for path in NOTEBOOKS:
        assert os.path.basename(path)[:-6] in readme, f"README does not list {os.path.basename(path)}"
