"""The results table and the claims: score files that differ only in their seed make one row of
mean ± std, and the paper's claims are counted seed by seed."""
import json
import statistics

import pytest

import sample
from nanocap.tools import report
from nanocap.tools.cli import parse_config


def write(path, **scores):
    path.write_text(json.dumps(scores))
    return str(path)


def test_files_differing_only_in_seed_make_one_row_of_mean_and_sample_std(tmp_path):
    a = [write(tmp_path / f"a_run.seed{s}.json", CIDEr=c, R1=0) for s, c in ((1, 100.0), (2, 110.0), (3, 120.0))]
    e = write(tmp_path / "e_refs.json", CIDEr=134.06)
    (tmp_path / "a_run.seed1.captions.json").write_text(json.dumps(["a caption"]))
    lines = report.score_table(a + [e, str(tmp_path / "a_run.seed1.captions.json")], columns=["CIDEr", "CLIP-S"])
    assert lines[0] == "| row | seeds | CIDEr | CLIP-S |"
    assert lines[2] == "| a_run | 3 | 110.0 ± 10.0 | – |"  # stdev with n - 1: 10, not 8.2
    assert lines[3] == "| e_refs | 1 | 134.1 | – |"
    assert len(lines) == 4  # the captions file is skipped
    assert report.run_name("results/b_stage2.seed1338.json") == ("b_stage2", 1338)
    assert report.run_name("results/e_references.json") == ("e_references", None)


def scores(cider, clip_s, r1, precision):
    return dict(CIDEr=cider, **{"CLIP-S": clip_s, "R@1": r1, "attr_precision": precision})


def test_claims_are_checked_and_counted_seed_by_seed(tmp_path):
    for seed, a, b, c in ((1, scores(120, 160, 25, 82.0), scores(150, 180, 45, 79.0), scores(160, 175, 50, 81)),
                          (2, scores(121, 161, 24, 82.5), scores(140, 170, 40, 79.5), scores(160, 175, 38, 81)),
                          (3, scores(119, 162, 26, 81.5), scores(143, 176, 30, 78.5), scores(158, 170, 35, 80))):
        for name, s in (("a_stage1_2pct", a), ("b_stage2", b), ("c_full", c)):
            write(tmp_path / f"{name}.seed{seed}.json", **s)
    lines = report.claims(str(tmp_path))
    assert lines[0] == "| seed (b_stage2 against c_full) | CIDEr(b) ≥ 0.9 × CIDEr(c) | CLIP-S(b) > CLIP-S(c) | R@1(b) > R@1(c) |"
    # the bar of the CIDEr claim is printed as what it is, 0.9 x CIDEr(c), with CIDEr(c) itself
    assert lines[2] == "| 1 | yes: 150.0 ≥ 0.9 × 160.0 = 144.0 | yes: 180.0 > 175.0 | no: 45.0 ≤ 50.0 |"
    assert lines[3].startswith("| 2 | no: 140.0 < 0.9 × 160.0 = 144.0 |")  # 140 < 0.9 x 160
    assert lines[5] == "| held in | 2 of 3 seeds | 2 of 3 seeds | 1 of 3 seeds |"
    drop = [79.0 - 82.0, 79.5 - 82.5, 78.5 - 81.5]  # -3 in every seed, spread 0.5
    assert lines[7].startswith("attr_precision, (b) - (a) by seed: -3.0, -3.0, -3.0; mean change -3.0 ± 0.0 over 3")
    assert lines[7].endswith("the change is larger than the spread.") and statistics.stdev(drop) == 0
    write(tmp_path / "b_stage2.seed3.json", **scores(143, 176, 30, 84.0))  # one seed gains: within the spread
    assert report.claims(str(tmp_path))[7].endswith("the change is within the spread.")
    for seed, b in ((1, 85.0), (2, 85.5), (3, 84.5)):  # +3 in every seed: a gain is a change too
        write(tmp_path / f"b_stage2.seed{seed}.json", **scores(150, 180, 45, b))
    assert report.claims(str(tmp_path))[7].endswith("the change is larger than the spread.")
    write(tmp_path / "c_full_2400.seed2.json", **scores(130, 165, 30, 81))  # another (c): (c') at 4x the steps
    longer = report.claims(str(tmp_path), full="c_full_2400")
    assert longer[2].startswith("| 2 | yes: 150.0 ≥ 0.9 × 130.0 = 117.0 |")
    assert longer[3] == "| held in | 1 of 1 seeds | 1 of 1 seeds | 1 of 1 seeds |"


def test_claims_without_score_files_fail_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no seed has both b_stage2.seedN.json and c_full.seedN.json"):
        sample.main(parse_config(sample.Config, ["--claims", str(tmp_path)]))
    write(tmp_path / "b_stage2.seed1.json", **scores(150, 180, 45, 79))
    write(tmp_path / "c_full.seed1.json", **scores(150, 170, 40, 80))
    assert sample.main(parse_config(sample.Config, ["--claims", str(tmp_path)])) == 0
    assert "| held in | 1 of 1 seeds |" in capsys.readouterr().out


def test_two_by_two_changes_and_swaps_paired_by_seed(tmp_path, capsys):
    """Stage 2's change per cell, and each swap's effect on it, are differences taken within a seed;
    a cell missing a seed counts only the seeds it has, a metric a file lacks is skipped."""
    with pytest.raises(SystemExit, match="no cell of the 2x2 has both"):
        sample.main(parse_config(sample.Config, ["--two_by_two", str(tmp_path)]))
    p = dict(attr_precision=70.0, rel_precision=30.0, attr_recall=60.0)
    for seed, shift in ((1, 0.0), (2, 2.0)):
        def put(name, **changes):
            write(tmp_path / f"{name}.seed{seed}.json", **{m: v + shift for m, v in {**p, **changes}.items()})
        put("a_stage1_2pct"), put("b_stage2", attr_precision=69.0 - shift, attr_recall=78.0)
        put("2x2_comp_reward_stage1"), put("2x2_comp_reward_stage2", attr_precision=66.0)
        put("c_full", attr_precision=76.0), put("2x2_comp_full", attr_precision=65.0)
    put("2x2_comp_stage1")  # seed 2 only, and its stage 2 names no relation
    write(tmp_path / "2x2_comp_stage2.seed2.json", attr_precision=73.0, attr_recall=80.0)
    assert sample.main(parse_config(sample.Config, ["--two_by_two", str(tmp_path)])) == 0
    lines = capsys.readouterr().out.splitlines()
    levels = lines[:lines.index("")]  # first each cell's own scores, named as the docs name them
    assert levels[2].startswith("| bag-of-words features, bag-of-words reward: stage 1 (= (a)) | 2 | ")
    assert levels[3].startswith("| … then stage 2 (= (b)) | 2 | ")
    assert "| full supervision, compositional features | 2 |" in levels[-1]
    lines = lines[lines.index("") + 1:]
    # bag-of-words both: -1 then -3 (69 - 2 + 2 against 70 + 2): mean -2, sample std 1.4
    assert lines[2] == "| bag-of-words features, bag-of-words reward | 2 | -2.0 ± 1.4 (-1.0, -3.0) | +0.0 ± 0.0 " \
                       "(+0.0, +0.0) | +18.0 ± 0.0 (+18.0, +18.0) |"
    assert lines[3] == "| compositional features, bag-of-words reward | 0 | – | – | – |"
    assert lines[4].startswith("| bag-of-words features, compositional reward | 2 | -4.0 ± 0.0 (-4.0, -4.0) |")
    assert lines[5] == "| compositional features, compositional reward | 1 | +1.0 | – | +18.0 |"
    reward = next(line for line in lines if line.startswith("| reward → compositional"))
    assert reward.split(" | ")[1:3] == ["2", "-2.0 ± 1.4 (-3.0, -1.0)"]  # -4 against -1, then -4 against -3
    both = next(line for line in lines if line.startswith("| both → compositional"))
    assert both.split(" | ")[1:3] == ["1", "+4.0"]  # +1 against -3 in seed 2
    assert lines[-1].split(" | ")[1:3] == ["2", "-11.0 ± 0.0 (-11.0, -11.0)"]  # 65 against 76, levels
    assert report._cell([1.0, None, 3.0]) == "+2.0 ± 1.4 (+1.0, +3.0) (2 of 3 seeds)"  # a seed without the metric


def test_stage2_changes_pair_the_stages_by_seed(tmp_path, capsys):
    for seed, (one, two) in {1: (100.0, 112.0), 2: (110.0, 119.0), 3: (90.0, 90.0)}.items():
        write(tmp_path / f"small_x_stage1.seed{seed}.json", **{"CLIP-S": one, "fluency": 50.0})
        write(tmp_path / f"small_x_stage2.seed{seed}.json", **{"CLIP-S": two, "fluency": 50.0 - seed})
    write(tmp_path / "small_x_stage1.seed4.json", **{"CLIP-S": 0.0})  # no stage 2 for seed 4: left out
    lines = report.stage2_changes([str(tmp_path / "small_x")], metrics=("CLIP-S", "fluency"))
    assert lines[2] == "| small_x | 3 | +7.0 ± 6.2 (+12.0, +9.0, +0.0) | -2.0 ± 1.0 (-1.0, -2.0, -3.0) |"
    with pytest.raises(ValueError, match="no seed has both"):
        report.stage2_changes([str(tmp_path / "nothing")])
    assert sample.main(parse_config(sample.Config, ["--changes", str(tmp_path / "small_x")])) == 0
    assert "| small_x | 3 |" in capsys.readouterr().out


def test_stage2_curves_draw_every_run_and_refuse_one_without_a_log(tmp_path):
    for seed in (1, 2):
        run = tmp_path / "float32" / f"seed{seed}"
        run.mkdir(parents=True)
        rows = [dict(stage=2, iter=i, reward=1 + i / 10, kl=0.01 * i, repetition=0.0, gen_len=10) for i in range(3)]
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = tmp_path / "curves.png"
    report.stage2_curves([str(tmp_path / "float32" / "seed1"), str(tmp_path / "float32" / "seed2")], str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="has no stage-2 log"):
        report.stage2_curves([str(tmp_path)], str(tmp_path / "no.png"))
    with pytest.raises(SystemExit, match="--grid"):
        sample.main(parse_config(sample.Config, ["--curves", str(tmp_path / "float32" / "seed1")]))


def test_paired_changes_subtract_within_each_seed_and_name_rows_as_the_docs_do(tmp_path, capsys):
    for seed, (a, f) in {1: (100.0, 110.0), 2: (120.0, 125.0), 3: (90.0, 80.0)}.items():
        write(tmp_path / f"self_a.seed{seed}.json", CIDEr=a)
        write(tmp_path / f"self_f.seed{seed}.json", CIDEr=f)
    lines = report.paired_changes([(str(tmp_path / "self_a"), str(tmp_path / "self_f"))], metrics=("CIDEr",))
    assert lines[2] == "| (f) − (a) | 3 | +1.7 ± 10.4 (+10.0, +5.0, -10.0) |"
    with pytest.raises(SystemExit, match="in pairs"):
        sample.main(parse_config(sample.Config, ["--paired", str(tmp_path / "self_a")]))
    assert sample.main(parse_config(sample.Config, ["--paired", str(tmp_path / "self_a"), str(tmp_path / "self_f")])) == 0
    assert "| (f) − (a) | 3 |" in capsys.readouterr().out


def test_refresh_writes_each_generated_block_from_its_own_command_and_check_catches_an_edit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a block's globs are read from where sample.py runs: the repository root
    (tmp_path / "results").mkdir()
    for seed, c in ((1, 100.0), (2, 110.0)):
        write(tmp_path / "results" / f"c_full.seed{seed}.json", CIDEr=c)
    doc = tmp_path / "page.md"
    marker = "<!-- generated by: python sample.py --table results/c_full.seed*.json -->"
    doc.write_text(f"# A page\n\n{marker}\nan old table, edited by hand\n<!-- /generated -->\n\ntext after\n")
    with pytest.raises(SystemExit, match="generated blocks differ .* page.md"):
        sample.main(parse_config(sample.Config, ["--refresh", "page.md", "--check"]))
    assert sample.main(parse_config(sample.Config, ["--refresh", "page.md"])) == 0
    text = doc.read_text()
    table = "\n".join(report.score_table(["results/c_full.seed1.json", "results/c_full.seed2.json"]))
    assert text == f"# A page\n\n{marker}\n{table}\n<!-- /generated -->\n\ntext after\n"
    assert "| (c) stage 1, 100% of the labels | 2 |" in text  # the docs' row name, not the file's
    assert sample.main(parse_config(sample.Config, ["--refresh", "page.md", "--check"])) == 0
    with pytest.raises(SystemExit, match="error: cannot read nowhere.md"):  # a user's typo: one line
        sample.main(parse_config(sample.Config, ["--refresh", "nowhere.md"]))
