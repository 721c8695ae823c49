"""A problems JSONL run through the executor into a results JSONL, resumably (standard
library and tqdm only; no JAX). `launch.execute` is this with flags:

    from fdpo.sandbox import executor, files
    files.execute_file("in.jsonl", "out.jsonl", executor.Limits(timeout_s=5), workers=8)

The formats are described in launch/execute.py and docs/sandbox.md.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import sys
import time

from tqdm import tqdm

from fdpo import atomic, fingerprint, jsonl, problem
from fdpo.sandbox import executor


# The result field holding what produced the result (`problem_fingerprint`).
FINGERPRINT_FIELD = "execute_fingerprint"


class ResumeError(RuntimeError):
    """The existing output cannot be resumed from (a malformed line)."""


def read_problems(path):
    """Returns (problems, errors): valid problem dicts in input order, and one message
    per malformed line, each naming path:line. A problem record (fdpo.problem) becomes the
    executor's problem {"id", "codes": its samples' programs, "tests"} with the record kept
    under "record", so the output can extend it; a line in the executor's own format
    ({"id", "codes", "tests"}) is run as it is."""
    problems, errors, seen = [], [], {}
    for where, obj in jsonl.objects(path, errors):
        try:
            if problem.is_record(obj) or (isinstance(obj, dict) and "raw" in obj):
                # ("raw": a samples line of the format before problem records.)
                problem.check(obj, where, problem.SAMPLED)
                obj = {"id": obj["id"], "codes": problem.programs(obj),
                       "tests": obj["tests"], "record": obj}
            executor.validate_problem(obj, where)
        except ValueError as e:
            errors.append(e)
            continue
        if obj["id"] in seen:
            errors.append(f"{where}: duplicate id {obj['id']!r} (first on line "
                          f"{seen[obj['id']]})")
            continue
        seen[obj["id"]] = where.rpartition(":")[2]
        problems.append(obj)
    return problems, [str(e) for e in errors]


def _in_input_order(out_path, ids: list[str]) -> None:
    """Rewrites a complete output (a result for every input id) in the input's order. The
    results are appended as they finish, in an order that moves with the machine's load,
    and launch.build numbers pairs and orders training data by line: the same input must
    give the same file (docs/pipeline.md#determinism)."""
    lines = {}
    with open(out_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                lines[json.loads(line)["id"]] = line
    if set(lines) != set(ids) or list(lines) == ids:
        return
    atomic.write_text(out_path, "".join(lines[pid] for pid in ids))


def done_outputs(path) -> dict[str, tuple[int, dict]]:
    """{id: (line number, result)} of the results already in the output, read by
    `jsonl.resume`: a last line cut off by an interrupted write is truncated and redone; any
    other bad line, or a line whose 'passed' is not a list of lists, is a ResumeError."""
    try:
        outputs = jsonl.resume(path, key="id")
    except jsonl.JsonlError as e:
        raise ResumeError(str(e)) from e
    for pid, (line, obj) in outputs.items():
        passed = obj.get("passed")
        if not isinstance(passed, list) or not all(isinstance(row, list) for row in passed):
            raise ResumeError(f"{path}:{line}: malformed line in the existing output ('passed' "
                              "is not a list of lists); fix or remove it before resuming")
    return outputs


def problem_fingerprint(p: dict, limits: executor.Limits, isolation: str) -> dict:
    """What a result is computed from: the codes, the tests, the rest of the input line
    (passed through into the output) and the limits and isolation they ran under. The
    worker count and scratch directory are left out: they do not change a verdict."""
    line = p.get("record", p)
    return {"codes": fingerprint.digest(p["codes"]), "tests": fingerprint.digest(p["tests"]),
            "record": fingerprint.digest({k: v for k, v in line.items()
                                          if k not in ("codes", "tests")}),
            "limits": {**dataclasses.asdict(limits), "isolation": isolation}}


def execute_file(in_path, out_path, limits: executor.Limits, *, workers: int | None = None,
                 isolation: str = "full", scratch_dir: str | None = None,
                 progress: bool = True) -> dict:
    """Runs every valid problem of `in_path` whose result is not yet in `out_path`, or was
    computed from other codes, tests, record fields or limits (its `execute_fingerprint`
    differs: `problem_fingerprint`), appending one result line per problem as it finishes;
    stale results and those of ids no longer in the input are removed first (the output
    is rewritten without them), and the finished output is put in the input's order.
    Malformed input lines are reported on stderr and skipped. Prints a summary by status.
    Raises OSError (unreadable input), ResumeError, executor.IsolationUnavailable and
    ValueError (bad `workers`). Returns {"problems", "malformed", "done" (kept), "redone",
    "new", "dropped", "run", "cells", "counts" (cells by status), "seconds"}."""
    problems, errors = read_problems(in_path)
    for msg in errors:
        print(f"malformed input: {msg}", file=sys.stderr)
    existing = done_outputs(out_path)
    expected = {p["id"]: problem_fingerprint(p, limits, isolation) for p in problems}
    plan = fingerprint.plan(existing, expected, FINGERPRINT_FIELD)
    fingerprint.drop_stale(out_path, existing, plan)
    todo_ids = plan.todo()
    todo = [p for p in problems if p["id"] in todo_ids]
    print(f"{len(problems)} problems in {in_path} ({len(errors)} malformed lines), "
          f"{len(plan.keep)} already in {out_path}, {len(todo)} to run", file=sys.stderr)
    print(plan.summary(out_path), file=sys.stderr)
    ex = executor.Executor(limits, workers=workers, isolation=isolation,
                           scratch_dir=scratch_dir)

    counts = collections.Counter()
    n_cells = 0
    start = time.monotonic()
    records = {p["id"]: p["record"] for p in todo if "record" in p}
    with ex, jsonl.Appender(out_path) as out:
        bar = tqdm(total=len(todo), unit="problem", dynamic_ncols=True, disable=not progress)
        for pid, res in ex.map(todo):
            # A problem record comes back whole, extended by the verdicts: the next stage
            # (launch.build, launch.analyze) reads this file alone.
            out.write({**records.get(pid, {}), "id": pid, **res.to_json(),
                       FINGERPRINT_FIELD: expected[pid]})
            for row in res.status:
                counts.update(row)
                n_cells += len(row)
            bar.update(1)
            bar.set_postfix(cells=n_cells, passed=counts["pass"], refresh=False)
        bar.close()
    _in_input_order(out_path, [p["id"] for p in problems])
    secs = time.monotonic() - start
    print(f"\n{len(todo)} problems, {n_cells} cells in {secs:.1f}s "
          f"({n_cells / max(secs, 1e-9):.1f} verdicts/s, {ex.workers} workers, "
          f"isolation={isolation})")
    for status in executor.STATUSES:
        print(f"  {status:14s} {counts[status]:8d}  {100 * counts[status] / max(n_cells, 1):5.1f}%")
    if errors:
        print(f"{len(errors)} malformed input lines were skipped (listed on stderr)",
              file=sys.stderr)
    return {"problems": len(problems), "malformed": len(errors),
            "done": len(plan.keep), "redone": len(plan.redo), "new": len(plan.new),
            "dropped": len(plan.dropped), "run": len(todo), "cells": n_cells,
            "counts": dict(counts), "seconds": secs}
