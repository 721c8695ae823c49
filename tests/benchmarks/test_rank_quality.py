"""benchmarks.ranking.quality: corruption, test construction, metrics on hand-made matrices, and a
small end-to-end run on the first HumanEval+ tasks through the sandboxed executor."""
import ast
import collections
import json
import math
import random

import numpy as np
import pytest

from benchmarks.ranking import quality as rq

DATASET_NAME = "evalplus/HumanEvalPlus-v0.1.10.jsonl.gz"


@pytest.mark.parametrize("value", [True, False, 0, 7, -3, 0.5, 1e300, "", "abc", [], [1, 2],
                                   (), ("a", 2.5), {}, {"a": [1]}, set(), {1, 2}, None,
                                   [[1, 2], [3]]])
def test_corrupt_changes_the_value_under_the_tests_comparison(value):
    bad = rq.corrupt(value, random.Random(0))
    assert bad is not None
    assert bad != value
    assert not rq._close(bad, value, 1e-6)
    # Still a literal, so it can be written into a test.
    assert ast.literal_eval(repr(bad)) == bad


def test_corrupt_refuses_unknown_types():
    assert rq.corrupt(object(), random.Random(0)) is None
    assert rq.corrupt([object()], random.Random(0)) is None


def _exec_test(code, test):
    ns = {}
    exec(code, ns)
    exec(test, ns)


def test_assertion_source_exact_and_float_tolerance():
    code = "def f(x, y):\n    return [x / y, x]\n"
    exact = rq.assertion_source("f", [1, 4], repr([0.25, 1]), None)
    _exec_test(code, exact)
    with pytest.raises(AssertionError):
        _exec_test(code, rq.assertion_source("f", [1, 4], repr([0.25, 2]), None))
    # Within atol passes, beyond fails; a list is not a tuple.
    _exec_test(code, rq.assertion_source("f", [1, 3], repr([0.3333334, 1]), 1e-6))
    for wrong in ([0.334, 1], (1 / 3, 1)):
        with pytest.raises(AssertionError):
            _exec_test(code, rq.assertion_source("f", [1, 3], repr(wrong), 1e-6))


def test_make_tests_counts_and_labels():
    task = {"entry_point": "f", "atol": 0, "base_input": [[i] for i in range(12)]}
    outputs = [{"ok": True, "repr": repr(i * 2)} for i in range(11)] + [
        {"ok": False, "why": "unrepresentable"}]
    cfg = rq.Config(dataset="", tests=10, wrong_test_fraction=0.3)
    counts = collections.Counter()
    tests = rq.make_tests(task, outputs, cfg, random.Random(0), counts)
    correct = [t for t in tests if t["correct"]]
    wrong = [t for t in tests if not t["correct"]]
    assert len(correct) == 7 and len(wrong) == 3
    assert counts["inputs_unrepresentable"] == 1
    # Wrong tests use inputs no correct test uses while there are such (11 usable > 7).
    assert not {t["input"] for t in wrong} & {t["input"] for t in correct}
    code = "def f(x):\n    return 2 * x\n"
    for t in correct:
        _exec_test(code, t["source"])
    for t in wrong:
        with pytest.raises(AssertionError):
            _exec_test(code, t["source"])
        assert t["corruption"]
    # Few inputs: fewer tests, same proportion, wrong ones reuse inputs.
    tests = rq.make_tests(task, outputs[:3], cfg, random.Random(0), collections.Counter())
    assert sum(t["correct"] for t in tests) == 3 and sum(not t["correct"] for t in tests) == 1


def _record(A, truth):
    return {"A": np.array(A, bool), "truth": np.array(truth, bool)}


def test_evaluate_on_hand_made_matrices():
    # Task 1: code 1 is correct and passes the most tests; everybody finds it.
    # Task 2: two wrong codes agree with each other (and with the wrong tests); the correct
    # code 0 passes 2 of 4 tests, the twins pass 3 each: every ranker picks a twin.
    recs = [
        _record([[1, 0, 0], [1, 1, 1], [0, 0, 0]], [False, True, False]),
        _record([[1, 1, 0, 0], [1, 0, 1, 1], [1, 0, 1, 1]], [True, False, False]),
        # Task 3: all codes tie (no test passed): Spearman undefined.
        _record([[0, 0], [0, 0]], [True, False]),
    ]
    m = rq.evaluate(recs)
    for name in rq.RANKERS:
        r = m[name]
        assert r["top1_correct"] == pytest.approx(2 / 3)  # task 3: index tie-break picks code 0
        assert r["top1_correct_strict"] == pytest.approx(1 / 3)  # task 3's top tie is mixed
        assert r["spearman_defined"] == 2 and r["spearman_undefined"] == 1
        assert -1 <= r["spearman"] <= 1
        # Verdicts: exact on task 1 only (task 3: top passes nothing -> none called correct).
        assert r["gt_exact"] == pytest.approx(1 / 3)
    # pass_count Spearman: task 1 rho(scores [1,3,0], truth [0,1,0]) = 0.866, task 2 = -1.
    assert m["pass_count"]["spearman"] == pytest.approx((math.sqrt(3) / 2 - 1) / 2)
    assert m["random"]["top1_correct"] == pytest.approx((1 / 3 + 1 / 3 + 1 / 2) / 3)


@pytest.fixture(scope="module")
def small_run(shared_dir, tmp_path_factory):
    path = shared_dir / "data" / DATASET_NAME
    cfg = rq.Config(dataset=str(path), tasks=5, mutants=5, seed=0, workers=2)
    report, records = rq.build(cfg, log=lambda *a: None)
    out = tmp_path_factory.mktemp("rq")
    rq.write(report, records, str(out))
    return cfg, report, records, out


def test_end_to_end_invariants(small_run):
    cfg, report, records, out = small_run
    assert report["tasks_in"] == 5
    excluded = sum(v["count"] for v in report["excluded"].values())
    assert report["tasks_used"] == len(records) == 5 - excluded >= 4
    for r in records:
        n_codes, n_tests = r["A"].shape
        # Every code is labelled; the canonical solution is the one truly correct code.
        assert len(r["truth"]) == len(r["sources"]) == len(r["descriptions"]) == n_codes
        assert 2 <= n_codes <= 1 + cfg.mutants
        c = r["canonical_index"]
        assert r["descriptions"][c] == "canonical" and r["truth"][c]
        assert r["truth"].sum() == 1
        # The canonical solution passes exactly the correct tests ...
        correct_t = np.array([t["correct"] for t in r["tests"]])
        assert correct_t.any() and (r["A"][c] == correct_t).all()
        # ... and every kept mutant behaves differently: it fails some correct test.
        for i in range(n_codes):
            if i != c:
                assert not r["A"][i, correct_t].all()
                assert r["sources"][i] != r["sources"][c]
        assert len(r["tests"]) == n_tests <= cfg.tests
    c = report["counts"]
    assert c["codes"] == sum(len(r["truth"]) for r in records)
    assert c["codes_truly_correct"] == len(records)


def test_end_to_end_report_fields(small_run):
    cfg, report, records, out = small_run
    m = report["metrics"]
    for name in rq.RANKERS:
        r = m[name]
        for key in ("top1_correct", "top1_correct_strict", "gt_exact", "label_accuracy"):
            assert 0.0 <= r[key] <= 1.0
        assert r["top1_correct_strict"] <= r["top1_correct"]
        assert r["spearman_defined"] + r["spearman_undefined"] == report["tasks_used"]
        assert r["spearman"] is None or -1.0 <= r["spearman"] <= 1.0
    assert 0.0 < m["random"]["top1_correct"] <= 0.5
    by = report["top1_by_output"]
    assert by["bool"]["tasks"] + by["other"]["tasks"] == report["tasks_used"]
    assert by["bool"]["tasks"] >= 1  # HumanEval/0 and /3 return bools
    for v in by.values():
        assert all(0.0 <= x <= 1.0 for x in v["metrics"].values())
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["metrics"] == m
    table = (out / "report.md").read_text()
    assert all(f"`{name}`" in table for name in rq.RANKERS)
    lines = (out / "tasks.jsonl").read_text().splitlines()
    assert len(lines) == report["tasks_used"]
    first = json.loads(lines[0])
    assert set(first["rank"]) == set(rq.RANKERS)
    # A float task (HumanEval/2, truncate_number) is among them and uses the tolerance test.
    assert any("_fdpo_close" in t["source"] for r in records if r["id"] == "HumanEval/2"
               for t in r["tests"])


def test_deterministic_for_a_seed(small_run, shared_dir):
    cfg, report, records, _ = small_run
    again, records2 = rq.build(rq.Config(**{**cfg.__dict__, "tasks": 2}), log=lambda *a: None)
    for a, b in zip(records[:2], records2):
        assert a["id"] == b["id"]
        assert a["sources"] == b["sources"] and a["canonical_index"] == b["canonical_index"]
        assert [t["source"] for t in a["tests"]] == [t["source"] for t in b["tests"]]
        assert (a["A"] == b["A"]).all()
