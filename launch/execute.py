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
import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

import configs
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
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                errors.append(f"{where}: empty line")
                continue
            try:
                obj = json.loads(line)
                executor.validate_problem(obj, where)
            except json.JSONDecodeError as e:
                errors.append(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            except ValueError as e:
                errors.append(str(e))
                continue
            if obj["id"] in seen:
                errors.append(f"{where}: duplicate id {obj['id']!r} (first on line "
                              f"{seen[obj['id']]})")
                continue
            seen[obj["id"]] = lineno
            problems.append(obj)
    return problems, errors


def done_outputs(path) -> dict[str, tuple[int, int, int | None]]:
    """{id: (line number, codes, tests)} of the results already in the output (tests is
    None when there are no codes). A last line without its newline that does not parse is
    an interrupted write: it is truncated away. Any other bad line is an error."""
    ids = {}
    if not os.path.exists(path):
        return ids
    with open(path, "rb") as f:
        data = f.read()
    offset = 0
    lines = data.split(b"\n")
    for k, raw in enumerate(lines):
        is_last = k == len(lines) - 1
        if is_last and not raw:
            break
        try:
            obj = json.loads(raw)
            passed = obj["passed"]
            ids[obj["id"]] = (k + 1, len(passed), len(passed[0]) if passed else None)
        except (ValueError, KeyError, TypeError) as e:
            if is_last:  # no trailing newline: a partial write
                with open(path, "r+b") as f:
                    f.truncate(offset)
                print(f"{path}:{k + 1}: truncated last line dropped; it will be redone",
                      file=sys.stderr)
                break
            raise SystemExit(f"{path}:{k + 1}: malformed line in the existing output "
                             f"({e!r}); fix or remove it before resuming")
        if is_last:  # complete JSON but the newline was lost
            with open(path, "ab") as f:
                f.write(b"\n")
        offset += len(raw) + 1
    return ids


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
    with ex, open(out_path, "a", encoding="utf-8") as out:
        bar = tqdm(total=len(todo), unit="problem", dynamic_ncols=True)
        for pid, res in ex.map(todo):
            out.write(json.dumps({"id": pid, **res.to_json()}) + "\n")
            out.flush()
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
