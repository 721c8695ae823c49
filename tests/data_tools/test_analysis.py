"""The Phi statistic and table: hand-computed 2x2 tables, degenerate margins, known samples."""
import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from configs import analyze as analyze_config
from data_tools import analyze as A

from tests.conftest import REPO


@pytest.mark.parametrize("n11,n10,n01,n00,expected", [
    # (10*15 - 2*3) / sqrt((10+2) (3+15) (10+3) (2+15)) = 144 / sqrt(12*18*13*17) = 144 / sqrt(47736)
    (10, 2, 3, 15, 144 / math.sqrt(47736)),
    (5, 0, 0, 5, 1.0),  # perfect association
    (0, 5, 5, 0, -1.0),
    (3, 3, 3, 3, 0.0),  # independent
    # (1*1 - 2*4) / sqrt(3 * 5 * 5 * 3) = -7 / 15
    (1, 2, 4, 1, -7 / 15),
])
def test_phi_hand_computed(n11, n10, n01, n00, expected):
    assert A.phi(n11, n10, n01, n00) == pytest.approx(expected, abs=1e-12)


def test_phi_equals_pearson_of_binary_vectors():
    # Phi is Pearson's r of the two 0/1 variables: an independent check.
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = rng.integers(1, 30, size=4)
        contains = np.repeat([1, 1, 0, 0], n)
        correct = np.repeat([1, 0, 1, 0], n)
        r = np.corrcoef(contains, correct)[0, 1]
        assert A.phi(*map(int, n)) == pytest.approx(r, abs=1e-12)


@pytest.mark.parametrize("table", [
    (0, 0, 0, 0),  # empty
    (4, 6, 0, 0),  # every sample contains the segment (e.g. an empty prefix)
    (0, 0, 4, 6),  # no sample contains it
    (4, 0, 6, 0),  # no incorrect sample
    (0, 4, 0, 6),  # no correct sample
    (7, 0, 0, 0),
])
def test_phi_degenerate_margins_are_undefined(table):
    with np.errstate(all="raise"):
        assert A.phi(*table) is None
    t = A.Table(*table)
    assert t.phi is None
    assert "undefined" in A._fmt(t.phi)


def test_phi_rejects_negative_counts():
    with pytest.raises(ValueError):
        A.phi(-1, 0, 0, 0)


def test_frequencies_with_empty_columns():
    t = A.Table(0, 3, 0, 1)
    assert t.in_correct is None and t.in_incorrect == 0.75


# Problem "a": reference pair (first rule) is codes 0 and 1.
#   prefix "def f(x):\n    return x ", mids "+" / "-", suffix " 1\n".
A_CODES = ["def f(x):\n    return x + 1\n",   # correct
           "def f(x):\n    return x - 1\n",   # incorrect
           "def f(x):\n    return x + 1\n",   # correct (same as 0)
           "def g(x):\n    return x - 1\n"]   # incorrect, other prefix
A_PASSED = [[True, True], [True, False], [True, True], [False, False]]


def test_known_table_first_rule():
    problems = [("a", A_CODES, np.array(A_PASSED)),
                ("all-correct", ["x", "y"], np.array([[True], [True]])),
                ("none-correct", ["x", "y"], np.array([[False], [False]])),
                ("no-tests", ["x", "y"], np.zeros((2, 0), bool))]
    res = A.phi_tables(problems, A.Options(pair_rule="first", exclude_reference=False))
    assert res.problems_used == 1 and res.samples_counted == 4
    assert res.skipped == {"no_correct_code": 2, "no_incorrect_code": 1}
    t = res.tables
    # Hand-computed: contains x correct over the 4 samples (correct: 0, 2; incorrect: 1, 3).
    assert (t["common prefix"].n11, t["common prefix"].n10, t["common prefix"].n01, t["common prefix"].n00) == (2, 1, 0, 1)
    assert t["common prefix"].phi == pytest.approx(2 / math.sqrt(12))  # (2*1 - 1*0) / sqrt(3*1*2*2)
    assert (t["common suffix"].n11, t["common suffix"].n10) == (2, 2)
    assert t["common suffix"].phi is None  # every sample ends with " 1\n": a zero margin
    assert t["common suffix"].in_correct == 1.0 and t["common suffix"].in_incorrect == 1.0
    assert (t["prefix + chosen mid"].n11, t["prefix + chosen mid"].n10,
            t["prefix + chosen mid"].n01, t["prefix + chosen mid"].n00) == (2, 0, 0, 2)
    assert t["prefix + chosen mid"].phi == pytest.approx(1.0)
    assert (t["prefix + rejected mid"].n11, t["prefix + rejected mid"].n10,
            t["prefix + rejected mid"].n01, t["prefix + rejected mid"].n00) == (0, 1, 2, 1)
    assert t["prefix + rejected mid"].phi == pytest.approx(-2 / math.sqrt(12))
    p = res.per_problem[0]
    assert (p["chosen"], p["rejected"], p["prefix_len"], p["suffix_len"]) == (0, 1, 23, 3)
    assert p["mid_chosen_len"] == 1 and p["mid_rejected_len"] == 1
    # Leaving the reference pair out: samples 2 (correct) and 3 (incorrect) remain.
    # (the default): samples 2 (correct) and 3 (incorrect) remain; both settings reported.
    assert res.samples_counted_other == 2
    excluded = A.phi_tables(problems, A.Options(pair_rule="first"))
    assert A.Options().exclude_reference
    assert excluded.samples_counted == 2 and excluded.samples_counted_other == 4
    t = excluded.tables["prefix + chosen mid"]
    assert (t.n11, t.n10, t.n01, t.n00) == (1, 0, 0, 1) and t.phi == pytest.approx(1.0)
    # Neither remaining sample has "-" right after f's prefix.
    t = excluded.tables["prefix + rejected mid"]
    assert (t.n11, t.n10, t.n01, t.n00) == (0, 0, 1, 1) and t.phi is None
    for name in A.SEGMENTS:
        assert excluded.tables[name].to_dict() == res.tables_other[name].to_dict()
        assert excluded.tables_other[name].to_dict() == res.tables[name].to_dict()


def test_diff_rule_picks_the_builders_pair():
    # First rule: (0, 1), nothing in common. Diff rule (pass-count ranks 0, 2 | 3 | 1):
    # (0,1): 1 + 0 = 1.0; (2,3): 1/3 + 29/30 = 1.3 -> picks (2, 3).
    codes = ["A" * 30, "B" * 30, "C" * 29 + "D", "C" * 29 + "E"]
    passed = np.array([[1, 1], [0, 0], [1, 1], [1, 0]], bool)
    first = A.phi_tables([("p", codes, passed)], A.Options(pair_rule="first", ranker="pass_count"))
    diff = A.phi_tables([("p", codes, passed)], A.Options(pair_rule="diff", ranker="pass_count"))
    assert (first.per_problem[0]["chosen"], first.per_problem[0]["rejected"]) == (0, 1)
    assert (diff.per_problem[0]["chosen"], diff.per_problem[0]["rejected"]) == (2, 3)
    assert diff.per_problem[0]["prefix_len"] == 29
    # First rule: empty prefix and suffix -> every sample contains them -> undefined Phi.
    assert first.tables["common prefix"].phi is None and first.tables["common suffix"].phi is None


def test_ranked_verdicts_follow_the_data_stage():
    # Sampled tests: test 1 is wrong (only the bad code passes it). all_tests calls nothing
    # correct; the ranked verdict takes the top code's tests as ground truth.
    codes = ["def f():\n    return 1\n", "def f():\n    return 1\n", "def f():\n    return 2\n"]
    passed = np.array([[1, 0], [1, 0], [0, 1]], bool)
    res = A.phi_tables([("p", codes, passed)], A.Options(verdict="all_tests"))
    assert res.skipped == {"no_correct_code": 1}
    res = A.phi_tables([("p", codes, passed)],
                       A.Options(verdict="ranked", exclude_reference=False))
    assert res.problems_used == 1
    assert res.tables["prefix + chosen mid"].n11 == 2 and res.tables["prefix + chosen mid"].n10 == 0


def test_line_unit_and_continuation_prefixes():
    codes = ["a = 1\nb = a + 1\nprint(b)\n", "a = 1\nb = a - 1\nprint(b)\n"]
    res = A.phi_tables([("p", codes, np.array([[1], [0]], bool))], A.Options(pair_rule="first", unit="line"))
    p = res.per_problem[0]
    assert (p["prefix_len"], p["mid_chosen_len"], p["suffix_len"]) == (1, 1, 1)
    seg = A.problem_segments("p", codes, [True, False], [0, 1], A.Options(pair_rule="first", unit="line"))
    assert A.continuation_prefixes(codes, seg, "line") == ("a = 1\nb = a + 1\n", "a = 1\nb = a - 1\n")
    seg = A.problem_segments("p", codes, [True, False], [0, 1], A.Options(pair_rule="first", unit="char"))
    assert A.continuation_prefixes(codes, seg, "char") == ("a = 1\nb = a +", "a = 1\nb = a -")


def test_options_validated():
    with pytest.raises(ValueError, match="unit='token'"):
        A.phi_tables([], A.Options(unit="token"))


def test_cli_end_to_end(tmp_path):
    samples = tmp_path / "samples.jsonl"
    verdicts = tmp_path / "verdicts.jsonl"
    samples.write_text("\n".join([
        json.dumps({"id": "a", "codes": A_CODES}),
        "{not json",
        json.dumps({"id": "no-verdict", "codes": ["x"]}),
        json.dumps({"id": "bad-rows", "codes": ["x", "y"]}),
    ]) + "\n")
    verdicts.write_text("\n".join([
        json.dumps({"id": "a", "passed": A_PASSED}),
        json.dumps({"id": "bad-rows", "passed": [[True]]}),
    ]) + "\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "launch.analyze", "--samples", str(samples), "--verdicts",
                        str(verdicts), "--out", str(out), "--config.pair_rule=first"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    md = (out / "phi.md").read_text()
    # Default: the reference pair (codes 0 and 1) left out, codes 2 and 3 counted.
    assert "| common suffix | 1.000 | 1.000 | undefined | 1 | 1 | 0 | 0 |" in md
    assert "| prefix + chosen mid | 1.000 | 0.000 | 1.000 | 1 | 0 | 0 | 1 |" in md
    assert "With the reference pair's samples counted (4 samples): Phi common prefix" in md
    assert (out / "phi.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "phi.json").read_text())
    assert summary["lines_dropped"] == {"malformed": 2, "no_verdicts": 1}
    assert summary["tables"]["common suffix"]["phi"] is None
    assert summary["tables_other_reference_samples"] == "counted"
    assert summary["tables_other"]["prefix + chosen mid"]["n11"] == 2
    # The sample pass rate over every problem read: codes 0 and 2 of "a" pass all tests.
    assert (summary["samples_in"], summary["samples_correct"]) == (4, 2)
    drops = [json.loads(x) for x in (out / "drops.jsonl").read_text().splitlines()]
    assert {(d["line"], d["reason"]) for d in drops} == {(2, "malformed"), (3, "no_verdicts"), (2, "malformed")}
    assert any(d["file"] == str(verdicts) and d["id"] == "bad-rows" for d in drops)
    # The continuation experiment needs a policy to sample from.
    r = subprocess.run([sys.executable, "-m", "launch.analyze", "--samples", str(samples), "--out", str(out),
                        "--config.continuation=True"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "--config.continuation needs exactly one of --checkpoint" in r.stderr
    r = subprocess.run([sys.executable, "-m", "launch.analyze", "--samples", str(samples), "--out", str(out),
                        "--config.unit=token"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--config.unit='token'; expected one of ('char', 'line')" in r.stderr


def test_duplicate_ids_are_an_error_naming_both_lines(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "codes": A_CODES, "passed": A_PASSED},
        {"id": "b", "codes": ["x"], "passed": [[True]]},
        {"id": "a", "codes": ["y"], "passed": [[False]]}]) + "\n")
    with pytest.raises(A.DuplicateIdError, match=f"^{samples}:3: id 'a' repeats {samples}:1$"):
        A.read_inputs(str(samples), None)
    verdicts = tmp_path / "verdicts.jsonl"
    verdicts.write_text('{"id": "b", "passed": [[true]]}\n{"id": 7, "passed": []}\n'
                        '{"id": "7", "passed": []}\n')
    samples.write_text(json.dumps({"id": "b", "codes": ["x"]}) + "\n")
    with pytest.raises(A.DuplicateIdError, match=f"{verdicts}:3: id '7' repeats {verdicts}:2"):
        A.read_inputs(str(samples), str(verdicts))
    r = subprocess.run([sys.executable, "-m", "launch.analyze", "--samples", str(samples),
                        "--verdicts", str(verdicts), "--out", str(tmp_path / "out")], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and f"error: {verdicts}:3: id '7' repeats {verdicts}:2" in r.stderr


def test_analyze_config_defaults_agree_with_the_library():
    """configs/analyze.py spells the table's defaults out (configs import only ml_collections);
    they must be Options'."""
    options = dataclasses.asdict(A.Options())
    assert {k: analyze_config.get_config()[k] for k in options} == options


def test_module_imports_no_jax():
    r = subprocess.run([sys.executable, "-c", "import sys, data_tools.analyze; "
                        "assert 'jax' not in sys.modules"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
