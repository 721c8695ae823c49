"""Ranker quality on real data (issue 5, item 2): labelled code x test matrices built from
HumanEval+ (or any file of its format), run through the sandboxed executor, ranked by every
ranker of :mod:`data_tools.rank`, and scored against the truth.

Per task:

* **Codes.** The canonical solution (``prompt + canonical_solution``) and up to ``mutants``
  single-point mutants of its completion (:mod:`benchmarks.ranking.mutate`; the prompt, i.e. the
  signature, docstring and any helper it defines, is never mutated). A pool of
  ``pool_factor x mutants`` mutants is screened first: each runs one cell holding all the
  correct tests; mutants that pass it behave like the canonical solution on the task's
  inputs and are dropped (``equivalent``), unless ``keep_equivalent`` is set, in which case
  they stay as additional truly correct codes. The first ``mutants`` survivors (in the seeded
  generation order) are used. Code order is then shuffled per task (seeded), so the
  index tie-break of the rankers cannot favour the canonical solution.
* **Expected outputs.** The canonical solution is the dataset's trusted reference, so it is
  evaluated on the host, not in the sandbox: one fresh ``python -I`` subprocess per task, with
  an empty environment, a temporary working directory, a 2 GiB address-space limit and a
  wall-clock timeout, calls the entry point on a deep copy of each ``base_input`` and returns
  ``repr`` of each output. (The executor discards program output by design, so it cannot
  report values.) An output is used only when ``ast.literal_eval(repr(v))`` reproduces it
  exactly, types included and no NaN; others are counted as ``unrepresentable``. Inputs that
  raise are counted as ``raises``. The canonical solution is afterwards run through the
  executor on every test like any other code, and any test it disagrees with is dropped and
  counted (``canonical_disagrees``), so the labels never rest on the host run alone.
* **Tests.** ``tests`` tests in all (fewer when the task has fewer usable inputs): about
  ``(1 - wrong_test_fraction)`` of them correct, ``assert f(*args) == expected`` with the
  canonical output, the rest *wrong*: the same assertion with a corrupted expected value, on
  inputs not used by a correct test where there are such, else on one that is. Outputs that
  contain a float are compared with absolute tolerance ``atol`` (the task's, or 1e-6 when it
  is 0, as evalplus does), recursively through lists and tuples. Corruption (seeded):
  bool -> ``not``; int -> ``+-1``; float -> ``+1.0`` (or ``x2 + 1`` for huge values); str -> drop
  the last character (``''`` -> ``'x'``); list / tuple -> corrupt the last element (empty ->
  ``[0]`` / ``(0,)``); dict -> corrupt the value of the last key (empty -> ``{0: 0}``); set ->
  drop one element (empty -> ``{0}``); None -> ``0``. A corruption that still compares equal
  (under the test's own comparison) is discarded and counted.
* **Truth.** After the full code x test run, a code is truly correct when it passes every
  correct test. Mutants that turn out truly correct although the screen said otherwise
  (e.g. a time-out in the screen) are dropped as ``equivalent_late`` (unless
  ``keep_equivalent``). Tasks with no behaviour-changing mutant left, or no correct test
  left, are excluded and counted.

Metrics per ranker, over the tasks used: ``top1_correct`` (the ranker's top code, ties broken
by the ranker's own ordering, is truly correct), ``top1_correct_strict`` (every code tied with
the top score is truly correct, i.e. no tie-break luck), ``spearman`` (mean over tasks of
``scipy.stats.spearmanr(code_scores, truth)``; tasks where it is undefined -- constant scores
or constant truth -- are counted in ``spearman_undefined`` and excluded), ``gt_exact`` (the
ranker's verdicts, :func:`data_tools.rank.classify`, call exactly the truly correct codes
correct) and ``label_accuracy`` (mean fraction of codes whose verdict matches the truth).
A ``random`` row gives the expected top-1 rate of a uniformly random pick.
"""
from __future__ import annotations

import ast
import collections
import concurrent.futures as cf
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
from scipy import stats as sstats

from benchmarks.ranking import mutate
from data_tools import rank as rank_lib
from fdpo import jsonl
from fdpo.sandbox.executor import Executor, Limits

RANKERS = ("mutual", "codet", "pass_count")
_MARK = "\n@@FDPO-REF@@"
_DEFAULT_FLOAT_ATOL = 1e-6

# Comparison used inside float tests (and on the host to check corruptions): same source.
_CLOSE_SRC = '''
import math
def _fdpo_close(a, b, atol):
    if isinstance(a, float) or isinstance(b, float):
        return (isinstance(a, (int, float)) and isinstance(b, (int, float))
                and math.isclose(a, b, rel_tol=0.0, abs_tol=atol))
    if isinstance(a, (list, tuple)) and type(a) is type(b):
        return len(a) == len(b) and all(_fdpo_close(x, y, atol) for x, y in zip(a, b))
    return a == b
'''
_ns: dict = {}
exec(_CLOSE_SRC, _ns)
_close = _ns["_fdpo_close"]

_REF_SCRIPT = r'''
import ast, copy, json, math, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
sys.setrecursionlimit(10000)
job = json.load(sys.stdin)

def same(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b  # NaN != NaN
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b

ns = {"__name__": "__fdpo_ref__"}
exec(compile(job["program"], "<canonical>", "exec"), ns)
f = ns[job["entry_point"]]
out = []
for args in job["inputs"]:
    try:
        v = f(*copy.deepcopy(args))
    except BaseException as e:  # noqa
        out.append({"ok": False, "why": "raises"})
        continue
    try:
        r = repr(v)
        ok = same(ast.literal_eval(r), v)
    except Exception:
        ok = False
    out.append({"ok": True, "repr": r} if ok else {"ok": False, "why": "unrepresentable"})
sys.stdout.write(''' + repr(_MARK) + r''' + json.dumps(out))
'''


@dataclasses.dataclass
class Config:
    dataset: str
    tasks: int = 0  # 0 = all
    mutants: int = 9
    tests: int = 10
    wrong_test_fraction: float = 0.3
    seed: int = 0
    workers: int = 2
    timeout: float = 1.0  # per cell of the code x test run
    screen_timeout: float = 3.0  # per screening cell (all correct tests in one cell)
    ref_timeout: float = 30.0  # host reference run, per task
    pool_factor: int = 3
    keep_equivalent: bool = False
    isolation: str = "full"


# -- expected outputs (trusted reference, host subprocess) ---------------------------------
def reference_outputs(task: dict, timeout: float) -> list[dict]:
    """[{ok, repr} | {ok: False, why}] per base input; see the module docstring."""
    job = {"program": task["prompt"] + task["canonical_solution"],
           "entry_point": task["entry_point"], "inputs": task["base_input"]}
    with tempfile.TemporaryDirectory(prefix="fdpo-ref-") as tmp:
        try:
            proc = subprocess.run([sys.executable, "-I", "-c", _REF_SCRIPT], input=json.dumps(job),
                                  capture_output=True, text=True, timeout=timeout, cwd=tmp,
                                  env={"PATH": "/usr/bin:/bin"})
        except subprocess.TimeoutExpired:
            return [{"ok": False, "why": "reference_timeout"}] * len(task["base_input"])
    if _MARK not in proc.stdout:
        why = "reference_failed"
        return [{"ok": False, "why": why}] * len(task["base_input"])
    return json.loads(proc.stdout.rsplit(_MARK, 1)[1])


# -- tests ---------------------------------------------------------------------------------
def _has_float(v) -> bool:
    if isinstance(v, float):
        return True
    if isinstance(v, (list, tuple, set)):
        return any(_has_float(x) for x in v)
    if isinstance(v, dict):
        return any(_has_float(x) for x in v.values())
    return False


def corrupt(v, rng: random.Random):
    """A wrong expected value (module docstring), or None when the type is not handled."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + rng.choice((1, -1))
    if isinstance(v, float):
        return v + 1.0 if abs(v) < 1e15 else v * 2 + 1
    if isinstance(v, str):
        return v[:-1] if v else "x"
    if isinstance(v, (list, tuple)):
        if not v:
            return type(v)([0])
        last = corrupt(v[-1], rng)
        if last is None:
            return None
        return type(v)([*v[:-1], last])
    if isinstance(v, dict):
        if not v:
            return {0: 0}
        k = list(v)[-1]
        new = corrupt(v[k], rng)
        return None if new is None else {**v, k: new}
    if isinstance(v, (set, frozenset)):
        if not v:
            return type(v)({0})
        drop = sorted(v, key=repr)[0]
        return type(v)(x for x in v if x != drop)
    if v is None:
        return 0
    return None


def assertion_source(entry_point: str, args, expected_repr: str, atol: float | None) -> str:
    call = f"{entry_point}(*_fdpo_args)"
    head = f"_fdpo_args = {args!r}\n_fdpo_expected = {expected_repr}\n"
    if atol is None:
        return head + f"assert {call} == _fdpo_expected\n"
    return _CLOSE_SRC + head + f"assert _fdpo_close({call}, _fdpo_expected, {atol!r})\n"


def make_tests(task: dict, outputs: list[dict], cfg: Config, rng: random.Random, counts) -> list[dict]:
    """[{source, correct, input, corruption}] for one task."""
    usable = [i for i, o in enumerate(outputs) if o["ok"]]
    for o in outputs:
        if not o["ok"]:
            counts[f"inputs_{o['why']}"] += 1
    rng.shuffle(usable)
    f = cfg.wrong_test_fraction
    n_correct = min(len(usable), cfg.tests - int(round(f * cfg.tests)))
    n_wrong = min(len(usable), int(round(f * n_correct / (1 - f)))) if f < 1 else 0
    tests = []
    task_atol = float(task.get("atol") or 0.0)

    def atol_for(value):
        return (task_atol or _DEFAULT_FLOAT_ATOL) if _has_float(value) else None

    for i in usable[:n_correct]:
        value = ast.literal_eval(outputs[i]["repr"])
        tests.append({"source": assertion_source(task["entry_point"], task["base_input"][i],
                                            outputs[i]["repr"], atol_for(value)),
                      "correct": True, "input": i, "corruption": None})
    # Wrong tests: unused inputs first, then reuse the correct tests' inputs.
    candidates = usable[n_correct:] + usable[:n_correct]
    made = 0
    for i in candidates:
        if made >= n_wrong:
            break
        value = ast.literal_eval(outputs[i]["repr"])
        bad = corrupt(value, rng)
        atol = atol_for(value)
        if bad is None or _close(bad, value, atol if atol is not None else 0.0) \
                or (atol is None and bad == value):
            counts["wrong_tests_uncorruptible"] += 1
            continue
        tests.append({"source": assertion_source(task["entry_point"], task["base_input"][i],
                                            repr(bad), atol),
                      "correct": False, "input": i,
                      "corruption": f"{outputs[i]['repr'][:60]} -> {repr(bad)[:60]}"})
        made += 1
    return tests


# -- the pipeline --------------------------------------------------------------------------
def _task_rng(cfg: Config, task_id: str) -> random.Random:
    return random.Random(f"fdpo-rank-quality:{cfg.seed}:{task_id}")


def build(cfg: Config, log=print) -> dict:
    """Runs everything; returns (report, per-task records). See :func:`markdown`, :func:`write`."""
    t0 = time.monotonic()
    tasks = jsonl.records(cfg.dataset)
    if cfg.tasks:
        tasks = tasks[: cfg.tasks]
    counts: collections.Counter = collections.Counter()
    mut_counts: collections.Counter = collections.Counter()
    excluded: dict[str, list[str]] = collections.defaultdict(list)

    with cf.ThreadPoolExecutor(cfg.workers) as pool:
        refs = list(pool.map(lambda t: reference_outputs(t, cfg.ref_timeout), tasks))
    t_ref = time.monotonic() - t0
    log(f"reference outputs: {len(tasks)} tasks in {t_ref:.1f} s")

    prepared = []
    for task, outs in zip(tasks, refs):
        rng = _task_rng(cfg, task["task_id"])
        tests = make_tests(task, outs, cfg, rng, counts)
        if not any(t["correct"] for t in tests):
            excluded["no_usable_input"].append(task["task_id"])
            continue
        canonical = task["prompt"] + task["canonical_solution"]
        muts, mstats = mutate.mutants(canonical, cfg.pool_factor * cfg.mutants,
                                      seed=rng.randrange(1 << 30), start=len(task["prompt"]))
        for k in ("candidates", "produced", "identical", "duplicate", "compile_error"):
            mut_counts[k] += getattr(mstats, k)
        prepared.append({"task": task, "tests": tests, "canonical": canonical, "mutants": muts,
                         "rng": rng, "outputs": outs})

    # Stage 1: screen canonical + pool against one cell holding all correct tests.
    t1 = time.monotonic()
    screen_jobs = [{"id": p["task"]["task_id"],
                    "codes": [p["canonical"]] + [m for m, _ in p["mutants"]],
                    "tests": ["\n".join(t["source"] for t in p["tests"] if t["correct"])]}
                   for p in prepared]
    with Executor(Limits(timeout_s=cfg.screen_timeout), workers=cfg.workers,
                  isolation=cfg.isolation) as ex:
        screened = dict(ex.map(screen_jobs))
    t_screen = time.monotonic() - t1
    log(f"screen: {sum(len(j['codes']) for j in screen_jobs)} cells in {t_screen:.1f} s")

    jobs = []
    for p in prepared:
        tid = p["task"]["task_id"]
        res = screened[tid]
        if not res.passed[0][0]:
            excluded["canonical_fails_screen"].append(tid)
            continue
        chosen = []
        for (src, desc), ok, st in zip(p["mutants"], (r[0] for r in res.passed[1:]),
                                       (r[0] for r in res.status[1:])):
            if ok:
                mut_counts["equivalent"] += 1  # kept as a correct code with keep_equivalent
                if not cfg.keep_equivalent:
                    continue
            if len(chosen) < cfg.mutants:
                chosen.append((src, desc))
                mut_counts[f"screen_status_{st}"] += 1
        p["chosen"] = chosen
        jobs.append(p)

    # Stage 2: the code x test matrix.
    t2 = time.monotonic()
    matrix_jobs = [{"id": p["task"]["task_id"],
                    "codes": [p["canonical"]] + [m for m, _ in p["chosen"]],
                    "tests": [t["source"] for t in p["tests"]]} for p in jobs]
    with Executor(Limits(timeout_s=cfg.timeout), workers=cfg.workers,
                  isolation=cfg.isolation) as ex:
        results = dict(ex.map(matrix_jobs))
    t_matrix = time.monotonic() - t2
    n_cells = sum(len(j["codes"]) * len(j["tests"]) for j in matrix_jobs)
    log(f"matrix: {n_cells} cells in {t_matrix:.1f} s")

    records = []
    status_counts: collections.Counter = collections.Counter()
    for p in jobs:
        tid = p["task"]["task_id"]
        res = results[tid]
        A = np.array(res.passed, bool).reshape(len(res.passed), len(p["tests"]))
        for row in res.status:
            status_counts.update(row)
        is_correct_test = np.array([t["correct"] for t in p["tests"]], bool)
        agree = A[0] == is_correct_test
        counts["tests_canonical_disagrees"] += int((~agree).sum())
        keep_t = agree
        A = A[:, keep_t]
        tests = [t for t, k in zip(p["tests"], keep_t) if k]
        correct_t = is_correct_test[keep_t]
        if not correct_t.any():
            excluded["no_correct_test_left"].append(tid)
            continue
        truth = A[:, correct_t].all(-1)
        descs = ["canonical"] + [d for _, d in p["chosen"]]
        sources = [p["canonical"]] + [s for s, _ in p["chosen"]]
        keep_c = np.ones(len(sources), bool)
        if not cfg.keep_equivalent:
            keep_c[1:] = ~truth[1:]
            mut_counts["equivalent_late"] += int(truth[1:].sum())
        if keep_c.sum() < 2:
            excluded["no_behaviour_changing_mutant"].append(tid)
            continue
        A, truth = A[keep_c], truth[keep_c]
        descs = [d for d, k in zip(descs, keep_c) if k]
        sources = [s for s, k in zip(sources, keep_c) if k]
        perm = list(range(len(sources)))
        p["rng"].shuffle(perm)
        records.append({
            "id": tid, "A": A[perm], "truth": truth[perm],
            "descriptions": [descs[i] for i in perm], "sources": [sources[i] for i in perm],
            "tests": tests, "canonical_index": perm.index(0),
            # Every correct test expects a bool: a wrong test then expects the negation, which
            # an answer-flipping mutant produces, so wrong codes and wrong tests agree.
            "bool_outputs": all(isinstance(ast.literal_eval(p["outputs"][t["input"]]["repr"]), bool)
                                for t in tests if t["correct"]),
        })
        counts["tests_correct"] += int(correct_t.sum())
        counts["tests_wrong"] += int((~correct_t).sum())
        counts["codes"] += len(sources)
        counts["codes_truly_correct"] += int(truth.sum())

    by_output = {
        kind: {"tasks": len(sub), "metrics": {k: v["top1_correct"] for k, v in evaluate(sub).items()}}
        for kind, sub in (("bool", [r for r in records if r["bool_outputs"]]),
                          ("other", [r for r in records if not r["bool_outputs"]]))}
    metrics = evaluate(records)  # again, so the records keep the all-task scores
    report = {
        "config": dataclasses.asdict(cfg),
        "tasks_in": len(tasks), "tasks_used": len(records),
        "excluded": {k: {"count": len(v), "ids": v} for k, v in sorted(excluded.items())},
        "counts": dict(sorted(counts.items())),
        "mutants": dict(sorted(mut_counts.items())),
        "cell_status": dict(sorted(status_counts.items())),
        "metrics": metrics,
        "top1_by_output": by_output,
        "seconds": {"reference": round(t_ref, 2), "screen": round(t_screen, 2),
                    "matrix": round(t_matrix, 2), "total": round(time.monotonic() - t0, 2)},
        "matrix_cells": n_cells,
    }
    return report, records


def evaluate(records: list[dict]) -> dict:
    """Per-ranker metrics (module docstring) over the labelled tasks."""
    out = {}
    if not records:
        return out
    A, cm, tm = rank_lib.pad_batch([r["A"] for r in records])
    B, C = cm.shape
    truth = np.zeros((B, C), bool)
    for b, r in enumerate(records):
        truth[b, : len(r["truth"])] = r["truth"]
    for name in RANKERS:
        res = rank_lib.rank(A, cm, tm, method=name)
        ver = rank_lib.classify(A, res, cm, tm)
        top = ver.top_code
        top1 = truth[np.arange(B), top]
        rounded = np.round(res.code_scores, 12)
        tied = cm & (rounded == rounded[np.arange(B), top][:, None])
        strict = ~(tied & ~truth).any(-1)
        rhos = []
        undefined = 0
        for b in range(B):
            s, t = res.code_scores[b, cm[b]], truth[b, cm[b]]
            if np.ptp(s) == 0 or t.all() or not t.any():
                undefined += 1
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rho = sstats.spearmanr(s, t.astype(float)).statistic
            if not np.isfinite(rho):
                undefined += 1
                continue
            rhos.append(float(rho))
        gt_exact = ((ver.correct == truth) | ~cm).all(-1)
        acc = ((ver.correct == truth) & cm).sum(-1) / cm.sum(-1)
        out[name] = {
            "top1_correct": float(top1.mean()),
            "top1_correct_strict": float(strict.mean()),
            "spearman": float(np.mean(rhos)) if rhos else None,
            "spearman_defined": len(rhos),
            "spearman_undefined": undefined,
            "gt_exact": float(gt_exact.mean()),
            "label_accuracy": float(acc.mean()),
        }
        for b, r in enumerate(records):
            r.setdefault("rank", {})[name] = {
                "scores": res.code_scores[b, : len(r["truth"])].tolist(),
                "top": int(top[b]), "predicted_correct": ver.correct[b, : len(r["truth"])].tolist()}
    n_codes = cm.sum(-1)
    out["random"] = {"top1_correct": float((truth.sum(-1) / n_codes).mean())}
    return out


def markdown(report: dict) -> str:
    m = report["metrics"]
    c = report["counts"]
    mu = report["mutants"]
    lines = [
        "| ranker | top-1 truly correct | top-1 correct, no tie | mean Spearman (tasks) | "
        "verdicts = truth | verdict accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for name in RANKERS:
        r = m.get(name)
        if r is None:
            continue
        rho = "n/a" if r["spearman"] is None else f"{r['spearman']:.3f}"
        lines.append(f"| `{name}` | {r['top1_correct']:.3f} | {r['top1_correct_strict']:.3f} | "
                     f"{rho} ({r['spearman_defined']}; {r['spearman_undefined']} undefined) | "
                     f"{r['gt_exact']:.3f} | {r['label_accuracy']:.3f} |")
    if "random" in m:
        lines.append(f"| random pick | {m['random']['top1_correct']:.3f} | - | - | - | - |")
    by = report.get("top1_by_output", {})
    if by:
        lines.append("")
        lines.append("Top-1 truly correct by output type: " + "; ".join(
            f"{kind} outputs ({v['tasks']} tasks): " + ", ".join(
                f"{k} {x:.3f}" for k, x in v["metrics"].items())
            for kind, v in by.items() if v["tasks"]) + ".")
    used = report["tasks_used"]
    excl = ", ".join(f"{k} {v['count']}" for k, v in report["excluded"].items()) or "none"
    lines += [
        "",
        f"Tasks: {report['tasks_in']} in, {used} used (excluded: {excl}). "
        f"Codes: {c.get('codes', 0)} ({c.get('codes_truly_correct', 0)} truly correct, "
        f"{c.get('codes', 0) / max(used, 1):.1f} per task). "
        f"Tests: {c.get('tests_correct', 0)} correct + {c.get('tests_wrong', 0)} wrong; "
        f"{c.get('tests_canonical_disagrees', 0)} dropped where the canonical solution disagreed. "
        f"Mutants: {mu.get('produced', 0)} generated, {mu.get('equivalent', 0)} "
        f"+ {mu.get('equivalent_late', 0)} behaviourally equivalent on the inputs "
        f"({'kept as correct codes' if report['config']['keep_equivalent'] else 'dropped'}); "
        f"skipped: {mu.get('identical', 0)} identical, {mu.get('duplicate', 0)} duplicate, "
        f"{mu.get('compile_error', 0)} not compiling. "
        f"Inputs not usable: {c.get('inputs_unrepresentable', 0)} unrepresentable, "
        f"{c.get('inputs_raises', 0)} raising. "
        f"Executor: {report['matrix_cells']} cells, {report['cell_status']}; "
        f"{report['seconds']['total']:.0f} s in all.",
    ]
    return "\n".join(lines) + "\n"


def write(report: dict, records: list[dict], out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(report))
    with open(os.path.join(out_dir, "tasks.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps({**r, "A": r["A"].astype(int).tolist(),
                                "truth": r["truth"].tolist()}) + "\n")
