r"""Run every code of every problem against every test, in sandboxes.

    python -m launch.execute --input IN.jsonl --output OUT.jsonl --config.timeout=5 \
        [--config.workers=N --config.memory_mb=1024 --config.isolation=full|no_cgroup|none]

Input lines: {"id": str, "codes": [str], "tests": [str], ...}. Output lines, appended as
problems finish (not in input order): {"id", "passed": [[bool]] (code x test), "status",
"detail", "time_s", "wall_s"}. The limits and the isolation are configs/execute.py's; see
fdpo/sandbox/executor.py (and docs/sandbox.md) for the isolation model and the statuses.

Resuming: ids already in OUTPUT are skipped; a truncated last line (an interrupted write)
is cut off and redone. Malformed input lines are all reported with file:line, the valid
ones still run, and the exit status is 1.
"""
import collections
import sys
import time

from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

import configs
from fdpo import jsonl
from fdpo.sandbox import executor

CONFIG = config_flags.DEFINE_config_file("config", configs.path("execute.py"),
                                         "Limits and isolation (configs/execute.py).",
                                         lock_config=True)
INPUT = flags.DEFINE_string("input", None, "JSONL problems: id, codes, tests.", required=True)
OUTPUT = flags.DEFINE_string("output", None, "JSONL results; appended to and resumed from.",
                             required=True)


def read_problems(path):
    """Returns (problems, errors): valid problem dicts in input order, and one message
    per malformed line, each naming path:line."""
    problems, errors, seen = [], [], {}
    for where, obj in jsonl.objects(path, errors):
        try:
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


def done_outputs(path) -> dict[str, tuple[int, int, int | None]]:
    """{id: (line number, codes, tests)} of the results already in the output (tests is
    None when there are no codes), read by `jsonl.resume`: a last line cut off by an
    interrupted write is truncated and redone; any other bad line is an error."""
    done = {}
    try:
        outputs = jsonl.resume(path, key="id")
    except jsonl.JsonlError as e:
        raise SystemExit(str(e))
    for pid, (line, obj) in outputs.items():
        passed = obj.get("passed")
        if not isinstance(passed, list) or not all(isinstance(row, list) for row in passed):
            raise SystemExit(f"{path}:{line}: malformed line in the existing output ('passed' "
                             "is not a list of lists); fix or remove it before resuming")
        done[pid] = (line, len(passed), len(passed[0]) if passed else None)
    return done


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    c = CONFIG.value
    if c.timeout is None:
        raise app.UsageError("--config.timeout is required (seconds per (code, test) cell)")
    if c.isolation not in executor.ISOLATION_MODES:
        raise app.UsageError(f"--config.isolation={c.isolation!r}; expected one of "
                             f"{executor.ISOLATION_MODES}")
    in_path, out_path = INPUT.value, OUTPUT.value
    try:
        problems, errors = read_problems(in_path)
    except OSError as e:
        raise app.UsageError(f"--input: cannot read {in_path}: {e}")
    for msg in errors:
        print(f"malformed input: {msg}", file=sys.stderr)
    done = done_outputs(out_path)
    for p in problems:
        # A result is reused only for the problem it was computed for: a changed input
        # (other codes or tests under the same id) would otherwise keep stale verdicts.
        if p["id"] in done:
            line, codes, tests = done[p["id"]]
            if codes != len(p["codes"]) or (codes and tests != len(p["tests"])):
                raise SystemExit(
                    f"{out_path}:{line}: the result for id {p['id']!r} has {codes} codes x "
                    f"{tests} tests, but {in_path} now has {len(p['codes'])} x "
                    f"{len(p['tests'])}: the input changed since; remove the output (or that "
                    f"line) to run it again")
    todo = [p for p in problems if p["id"] not in done]
    print(f"{len(problems)} problems in {in_path} ({len(errors)} malformed lines), "
          f"{len(problems) - len(todo)} already in {out_path}, {len(todo)} to run",
          file=sys.stderr)
    try:
        limits = executor.Limits(
            timeout_s=c.timeout, memory_mb=c.memory_mb, max_procs=c.max_procs,
            file_size_mb=c.file_size_mb, scratch_mb=c.scratch_mb,
        )
        ex = executor.Executor(limits, workers=c.workers, isolation=c.isolation,
                               scratch_dir=c.scratch_dir)
    except ValueError as e:
        raise app.UsageError(str(e))
    except executor.IsolationUnavailable as e:
        raise SystemExit(f"--config.isolation={c.isolation}: {e}")

    counts = collections.Counter()
    n_cells = 0
    start = time.monotonic()
    with ex, jsonl.Appender(out_path) as out:
        bar = tqdm(total=len(todo), unit="problem", dynamic_ncols=True)
        for pid, res in ex.map(todo):
            out.write({"id": pid, **res.to_json()})
            for row in res.status:
                counts.update(row)
                n_cells += len(row)
            bar.update(1)
            bar.set_postfix(cells=n_cells, passed=counts["pass"], refresh=False)
        bar.close()
    secs = time.monotonic() - start
    print(f"\n{len(todo)} problems, {n_cells} cells in {secs:.1f}s "
          f"({n_cells / max(secs, 1e-9):.1f} verdicts/s, {ex.workers} workers, "
          f"isolation={c.isolation})")
    for status in executor.STATUSES:
        print(f"  {status:14s} {counts[status]:8d}  {100 * counts[status] / max(n_cells, 1):5.1f}%")
    if errors:
        print(f"{len(errors)} malformed input lines were skipped (listed on stderr)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
