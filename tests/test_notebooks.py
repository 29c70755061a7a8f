"""The notebooks are committed executed, so that they read on GitHub without running anything.
pytest --nbmake (the README's test command) re-executes them; these tests check what is on disk:
every code cell ran, in order, without an error; each notebook draws at least one figure, asserts
what it claims, and imports nanocap rather than copying its code; the README lists every one."""
import base64
import glob
import json
import os
import re
import struct

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


def markdown_cells(path):
    with open(path) as f:
        return ["".join(c["source"]) for c in json.load(f)["cells"] if c["cell_type"] == "markdown"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_teaches_with_math_and_ends_with_exercises(path):
    name = os.path.basename(path)
    markdown = markdown_cells(path)
    assert any(re.search(r"\$[^$\n]+\$", m) for m in markdown), f"{name}: no LaTeX math in its prose"
    headings = [line for m in markdown for line in m.splitlines() if line.startswith("## ")]
    assert headings and headings[-1].startswith("## Exercises"), f"{name}: its last section is not `## Exercises`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_no_setup_noise(path):
    """One helper (nanocap/tools/notebook.py) gives a notebook its world and runs: no notebook moves its
    working directory or sys.path, or reaches for a folder by `../` (it runs from the root and from
    notebooks/ alike), and nothing lands on the page's stderr or names this machine's folders."""
    name = os.path.basename(path)
    cells = code_cells(path)
    source = "\n".join("".join(c["source"]) for c in cells)
    for bad in ("os.chdir", "sys.path", "../"):
        assert bad not in source, f"{name}: {bad} in a code cell (use nanocap.tools.notebook)"
    streams = [o for c in cells for o in c["outputs"] if o["output_type"] == "stream"]
    stderr = ["".join(o["text"])[:200] for o in streams if o["name"] == "stderr"]
    assert not stderr, f"{name}: stderr on the page: {stderr}"
    text = "".join("".join(o["text"]) for o in streams)
    assert ROOT not in text, f"{name}: prints a path of this machine ({ROOT})"


def png_width(b64):
    head = base64.b64decode(b64[:64])
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", head[16:20])[0]   # the IHDR chunk: width, then height


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_figures_fit_githubs_width(path):
    # GitHub shows a notebook about 900 px wide: a 10-inch figure at 100 dpi fits; an 18-inch one is shrunk to half
    widths = [png_width(o["data"]["image/png"]) for c in code_cells(path) for o in c["outputs"]
              if "image/png" in o.get("data", {})]
    assert max(widths) <= 1000, f"{os.path.basename(path)}: a figure {max(widths)} px wide (at most 10 in at 100 dpi)"


def test_the_notebook_helper_reuses_a_run_and_names_a_failed_command(tmp_path, monkeypatch):
    from nanocap.tools import notebook
    world = tmp_path / "world"
    world.mkdir()
    (world / "meta.json").write_text("{}")
    monkeypatch.setattr(notebook, "WORLD", world)
    ran = []
    monkeypatch.setattr(notebook, "command", lambda *args: ran.append(args))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stage1.pt").write_bytes(b"")
    assert notebook.world() == world and notebook.train(out=str(tmp_path / "run")) == tmp_path / "run"
    assert ran == []                                   # the world and the run are there: nothing is made again
    notebook.train(out=str(tmp_path / "new"))
    assert ran == [("train.py", "--config", notebook.RUN_PRESET, "--out_dir", str(tmp_path / "new"), "--stage", "1")]
    monkeypatch.undo()
    script = tmp_path / "fails.py"
    script.write_text("import sys; print('error: no dataset in x; make one first', file=sys.stderr); sys.exit(2)")
    with pytest.raises(RuntimeError, match=r"`python .*fails.py --flag` failed \(exit 2\):\nerror: no dataset in x"):
        notebook.command(str(script), "--flag")
    assert notebook.shown(notebook.WORLD) == os.path.join("data", "shapes_small")
