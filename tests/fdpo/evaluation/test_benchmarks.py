"""End-to-end evaluation in the sandbox on the shared EvalPlus files: canonical solutions
score 100%, wrong ones 0%, correct non-canonical solutions of the special-oracle tasks
pass, a base-only solution passes HumanEval and fails HumanEval+, loops are timeouts.
The whole-dataset runs are slow (minutes on 2 cores) and marked so."""
import pytest

from fdpo.evaluation import runner as rn
from fdpo.evaluation import tasks as tk
from tests.conftest import SHARED

pytestmark = pytest.mark.sandbox

FAST = rn.RunConfig(policy=tk.TimePolicy(floor_s=1.0, factor=4.0, budget_s=20.0), workers=2)
HE_FAST = [f"HumanEval/{i}" for i in (0, 1, 2, 3, 4, 7, 11, 12, 22, 28, 32, 53)]
MBPP_FAST = [f"Mbpp/{i}" for i in (2, 3, 4, 6, 7, 8, 11, 12, 737, 787, 794)]


@pytest.fixture(scope="module")
def humaneval(shared_dir):
    return tk.load_evalplus(shared_dir / "data/evalplus/HumanEvalPlus-v0.1.10.jsonl.gz",
                            "humaneval+")


@pytest.fixture(scope="module")
def mbpp(shared_dir):
    return tk.load_evalplus(shared_dir / "data/evalplus/MbppPlus-v0.2.0.jsonl.gz", "mbpp+")


def wrong_solutions(task):
    """Programs that cannot pass: a None stub, an exception, a constant of the wrong type."""
    e = task.entry_point
    return [f"def {e}(*args, **kwargs):\n    return None\n",
            f"def {e}(*args, **kwargs):\n    raise NotImplementedError\n",
            f"def {e}(*args, **kwargs):\n    return object()\n"]


def base_only(task):
    """The canonical answer on the base inputs, None on any other input."""
    e = task.entry_point
    return (f"_ns = {{}}\nexec({task.reference!r}, _ns)\n"
            f"_BASE = {{repr(x) for x in {task.base_input!r}}}\n"
            f"def {e}(*args):\n"
            f"    return _ns[{e!r}](*args) if repr(list(args)) in _BASE else None\n")


FIND_ZERO_ALT = """\
import math
def poly(xs, x):
    return sum(c * math.pow(x, i) for i, c in enumerate(xs))
def find_zero(xs):
    dxs = [i * c for i, c in enumerate(xs)][1:]
    def newton(x):
        for _ in range(1000):
            fx = poly(xs, x)
            if abs(fx) < 1e-5:
                return x
            d = poly(dxs, x)
            if d == 0:
                return None
            x -= fx / d
        return None
    x = newton(10.0)
    return newton(0.0) if x is None else x
"""


def sub(tasks, ids):
    return {t: tasks[t] for t in ids}


def evaluate(tasks, samples, bench, cfg=FAST):
    recs = rn.run(tasks, samples, bench, cfg)
    return recs, rn.summarize(tasks, recs, bench, ks=(1,))


@pytest.mark.parametrize("bench", ["humaneval+", "mbpp+"])
def test_fast_subset_canonical_all_pass_wrong_none(bench, humaneval, mbpp):
    tasks = sub(humaneval, HE_FAST) if bench == "humaneval+" else sub(mbpp, MBPP_FAST)
    good = [rn.Sample(t, tasks[t].reference) for t in tasks]
    recs, s = evaluate(tasks, good, bench)
    bad = [(r["task_id"], r["base_detail"], r["plus_detail"]) for r in recs
           if not rn.correct(r, bench)]
    assert bad == []
    assert s["pass_at_k"] == {"base": {"pass@1": 1.0}, "plus": {"pass@1": 1.0}}
    wrong = [rn.Sample(t, code) for t in tasks for code in wrong_solutions(tasks[t])]
    # Mbpp/737, 787, 794 only check "not None" vs None:
    # EvalPlus's oracles make some stubs right there, so those are left out here.
    wrong = [w for w in wrong if w.task_id not in ("Mbpp/737", "Mbpp/787",
                                                    "Mbpp/794")]
    recs, s = evaluate(tasks, wrong, bench)
    assert s["pass_at_k"] == {"base": {"pass@1": 0.0}, "plus": {"pass@1": 0.0}}
    assert sum(s["status_counts"]["base"].values()) == len(wrong)
    assert s["status_counts"]["base"]["sandbox_error"] == 0


def test_special_oracles_accept_non_canonical_solutions(humaneval, mbpp):
    he = {
        # another root than the canonical Newton-from-0: Newton from 10 (from 0 if that fails)
        "HumanEval/32": FIND_ZERO_ALT,
        # float output off by 1e-9: within the enforced atol 1e-6
        "HumanEval/4": (
            "def mean_absolute_deviation(numbers):\n"
            "    m = sum(numbers) / len(numbers)\n"
            "    return sum(abs(x - m) for x in numbers) / len(numbers) + 1e-9\n"),
    }
    mb = {
        # same elements, another order: set comparison
        "Mbpp/2": ("def similar_elements(a, b):\n"
                   "    return tuple(sorted(set(a) & set(b), reverse=True))\n"),
        # a bool instead of a match object: "not None" oracle
        "Mbpp/737": ("import re\ndef check_str(s):\n"
                     "    return bool(re.match('[aeiouAEIOU][A-Za-z0-9_]*', s))\n"),
        "Mbpp/787": "def text_match_three(t):\n    return 'abbb' in t\n",
    }
    for tasks, sols, bench in ((humaneval, he, "humaneval+"), (mbpp, mb, "mbpp+")):
        ts = sub(tasks, sols)
        recs, _ = evaluate(ts, [rn.Sample(t, c) for t, c in sols.items()], bench)
        assert [(r["task_id"], r["base_status"], r["plus_status"]) for r in recs] == [
            (t, "pass", "pass") for t in sols], [r["plus_detail"] for r in recs]
    # the same alternatives, made wrong, fail
    broken = {"HumanEval/4": he["HumanEval/4"].replace("1e-9", "1e-3"),
              "HumanEval/32": he["HumanEval/32"].replace("return newton(0.0) if x is None else x",
                                                         "return 0.123")}
    recs, _ = evaluate(sub(humaneval, broken), [rn.Sample(t, c) for t, c in broken.items()],
                       "humaneval+")
    assert [r["base_status"] for r in recs] == ["fail", "fail"]


def test_find_zero_alternative_differs_from_canonical(humaneval):
    """The non-canonical find_zero above really returns other roots on many inputs."""
    t = humaneval["HumanEval/32"]
    ref, alt = {}, {}
    exec(t.reference, ref)
    exec(FIND_ZERO_ALT, alt)
    differ = sum(abs(alt["find_zero"](list(xs)) - ref["find_zero"](list(xs))) > 1e-3
                 for (xs,) in t.base_input)
    assert differ >= 10


def test_base_only_solution_passes_plain_fails_plus(humaneval, mbpp):
    for tasks, tid, bench in ((humaneval, "HumanEval/0", "humaneval+"),
                              (mbpp, "Mbpp/3", "mbpp+")):
        ts = sub(tasks, [tid])
        recs, s = evaluate(ts, [rn.Sample(tid, base_only(ts[tid]))], bench)
        assert (recs[0]["base_status"], recs[0]["plus_status"]) == ("pass", "fail")
        assert s["pass_at_k"] == {"base": {"pass@1": 1.0}, "plus": {"pass@1": 0.0}}
        plain = bench.rstrip("+")
        recs, s = evaluate(ts, [rn.Sample(tid, base_only(ts[tid]))], plain)
        assert "plus_status" not in recs[0] and s["pass_at_k"] == {"base": {"pass@1": 1.0}}


def test_loops_are_timeouts_and_slow_inputs_use_the_floor(humaneval):
    ts = sub(humaneval, ["HumanEval/0", "HumanEval/2"])
    loop = "def has_close_elements(numbers, threshold):\n    while True:\n        pass\n"
    swallow = ("def truncate_number(number):\n    while True:\n        try:\n"
               "            while True:\n                pass\n"
               "        except Exception:\n            pass\n")
    samples = [rn.Sample("HumanEval/0", loop), rn.Sample("HumanEval/2", swallow)]
    recs, s = evaluate(ts, samples, "humaneval+")
    assert [r["base_status"] for r in recs] == ["timeout", "timeout"]
    assert s["status_counts"]["base"]["timeout"] == 2
    assert s["status_counts"]["base"]["fail"] == 0
    # under the 1 s floor: a solution that sleeps 0.3 s per input still passes
    slow = ("import time\ndef truncate_number(number):\n    time.sleep(0.3)\n"
            "    return number % 1.0\n")
    recs, _ = evaluate(sub(humaneval, ["HumanEval/2"]), [rn.Sample("HumanEval/2", slow)],
                       "humaneval")
    assert recs[0]["base_status"] == "pass"


def test_completion_and_solution_samples(tmp_path, humaneval):
    t = humaneval["HumanEval/0"]
    body = t.reference[len(t.prompt):]
    path = tmp_path / "s.jsonl"
    import json
    path.write_text(
        json.dumps({"task_id": "HumanEval/0", "completion": body}) + "\n"
        + json.dumps({"task_id": "HumanEval/0", "solution": t.reference}) + "\n"
        + json.dumps({"task_id": "HumanEval/999", "solution": "x"}) + "\n")
    samples = rn.read_samples(path, humaneval, "humaneval+")
    assert [s.solution for s in samples] == [t.reference, t.reference]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0"}\n')
    with pytest.raises(rn.SampleError, match="bad.jsonl:1"):
        rn.read_samples(bad, humaneval, "humaneval+")
    with pytest.raises(rn.SampleError, match="have no samples"):
        rn.evaluate("humaneval+", path, data_dir=SHARED / "data")


@pytest.mark.slow
@pytest.mark.parametrize("bench", ["humaneval+", "mbpp+"])
def test_whole_dataset_canonical_100_wrong_0(bench, humaneval, mbpp):
    tasks = humaneval if bench == "humaneval+" else mbpp
    cfg = rn.RunConfig(workers=2)  # EvalPlus's time limits
    recs, s = evaluate(tasks, [rn.Sample(t, tasks[t].reference) for t in tasks], bench, cfg)
    bad = [(r["task_id"], r["base_status"], r["base_detail"], r["plus_status"],
            r["plus_detail"]) for r in recs if not rn.correct(r, bench)]
    assert bad == []
    # HumanEval / MBPP (base) and HumanEval+ / MBPP+ (base and plus) are all 100%
    assert s["pass_at_k"] == {"base": {"pass@1": 1.0}, "plus": {"pass@1": 1.0}}
    assert s["num_tasks"] == len(tasks) == (164 if bench == "humaneval+" else 378)
    wrong = [rn.Sample(t, wrong_solutions(tasks[t])[0]) for t in tasks]
    recs, s = evaluate(tasks, wrong, bench, cfg)
    passing = sorted(r["task_id"] for r in recs if r["base_status"] == "pass")
    # a None stub is right only where EvalPlus's oracle accepts None or any output:
    # Mbpp/164 accepts anything; the "not None" tasks accept None where no match is expected
    # on every input of a split
    assert set(passing) <= {"Mbpp/164", "Mbpp/737", "Mbpp/787", "Mbpp/794"}
    assert s["pass_at_k"]["base"]["pass@1"] <= 4 / len(tasks)
