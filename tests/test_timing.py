"""nanocap/tools/timing.py: a command's wall time kept as a record with its machine, none for a
command that fails, and no machine's path in what is kept."""
import json
import sys

import pytest

import sample
from nanocap.tools import timing
from nanocap.tools.cli import parse_config


def test_a_timed_command_is_recorded_with_its_machine_and_a_failed_one_is_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert timing.main(["sleepy", "--", sys.executable, "-c", "import time; time.sleep(0.2)"]) == 0
    r = json.loads((tmp_path / "out" / "timings.json").read_text())["sleepy"]  # a run's own record, not the docs'
    assert not (tmp_path / "results").exists()
    assert r["wall_s"] >= 0.2 and r["command"] == "python -c 'import time; time.sleep(0.2)'"  # no venv path
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"] and isinstance(r["machine"]["bf16"], bool)
    assert timing.main(["broken", "--", sys.executable, "-c", "raise SystemExit(3)"]) == 3
    assert set(json.loads((tmp_path / "out" / "timings.json").read_text())) == {"sleepy"}
    assert timing.main(["--out", "results/timings.json", "kept", "--", sys.executable, "-c", "pass"]) == 0
    assert set(json.loads((tmp_path / "results" / "timings.json").read_text())) == {"kept"}  # the committed one
    with pytest.raises(SystemExit, match="usage"):
        timing.main(["no-command"])


def test_the_records_print_as_one_table_row_each(tmp_path, capsys):
    path = tmp_path / "timings.json"
    timing.record("make demo: train.py", "python train.py", 321.3, path=str(path))
    lines = timing.table(str(path))
    assert lines[0].startswith("| record | wall time | command | CPU |")
    assert lines[2].startswith("| make demo: train.py | 5 min 21 s | `python train.py` | ")
    assert sample.main(parse_config(sample.Config, ["--timings", str(path)])) == 0
    assert "| make demo: train.py | 5 min 21 s |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot read timings"):
        sample.main(parse_config(sample.Config, ["--timings", str(tmp_path / "none.json")]))
