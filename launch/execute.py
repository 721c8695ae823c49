"""Run every code of every problem against every test, in sandboxes.

    python -m launch.execute --input IN.jsonl --output OUT.jsonl --timeout 5 \
        [--workers N] [--memory_mb 1024] [--isolation full|no_cgroup|none]

Input lines: {"id": str, "codes": [str], "tests": [str], ...}. Output lines, appended as
problems finish (not in input order): {"id", "passed": [[bool]] (code x test), "status",
"detail", "time_s", "wall_s"}. See fdpo/sandbox/executor.py (and docs/sandbox.md) for the isolation model and the
statuses.

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
from tqdm import tqdm

from fdpo.sandbox import executor

FLAGS = flags.FLAGS
flags.DEFINE_string("input", None, "JSONL problems: id, codes, tests.")
flags.DEFINE_string("output", None, "JSONL results; appended to and resumed from.")
flags.DEFINE_float("timeout", None, "Wall-clock seconds per (code, test) cell.")
flags.DEFINE_integer("workers", None, "Parallel sandboxes (default: all cores).")
flags.DEFINE_integer("memory_mb", 1024, "Address-space limit per process, and the "
                     "programs' share of the sandbox memory cgroup.")
flags.DEFINE_integer("max_procs", 64, "Processes + threads per cell.")
flags.DEFINE_integer("file_size_mb", 16, "Largest file a program may write.")
flags.DEFINE_integer("scratch_mb", 64, "Size of the writable /tmp in the sandbox.")
flags.DEFINE_enum("isolation", "full", list(executor.ISOLATION_MODES),
                  "full: bwrap namespaces + cgroups (needs root). Weaker modes only when "
                  "asked for: no_cgroup (no total memory/task cap), none (no sandbox).")
flags.DEFINE_string("scratch_dir", None, "isolation=none: where each sandbox's working "
                    "directory is made (default: the temp directory, TMPDIR honoured).")
flags.mark_flags_as_required(["input", "output", "timeout"])


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
    try:
        problems, errors = read_problems(FLAGS.input)
    except OSError as e:
        raise app.UsageError(f"--input: cannot read {FLAGS.input}: {e}")
    for msg in errors:
        print(f"malformed input: {msg}", file=sys.stderr)
    done = done_outputs(FLAGS.output)
    for p in problems:
        # A result is reused only for the problem it was computed for: a changed input
        # (other codes or tests under the same id) would otherwise keep stale verdicts.
        if p["id"] in done:
            line, codes, tests = done[p["id"]]
            if codes != len(p["codes"]) or (codes and tests != len(p["tests"])):
                raise SystemExit(
                    f"{FLAGS.output}:{line}: the result for id {p['id']!r} has {codes} codes x "
                    f"{tests} tests, but {FLAGS.input} now has {len(p['codes'])} x "
                    f"{len(p['tests'])}: the input changed since; remove the output (or that "
                    f"line) to run it again")
    todo = [p for p in problems if p["id"] not in done]
    print(f"{len(problems)} problems in {FLAGS.input} ({len(errors)} malformed lines), "
          f"{len(problems) - len(todo)} already in {FLAGS.output}, {len(todo)} to run",
          file=sys.stderr)
    try:
        limits = executor.Limits(
            timeout_s=FLAGS.timeout, memory_mb=FLAGS.memory_mb, max_procs=FLAGS.max_procs,
            file_size_mb=FLAGS.file_size_mb, scratch_mb=FLAGS.scratch_mb,
        )
        ex = executor.Executor(limits, workers=FLAGS.workers, isolation=FLAGS.isolation,
                               scratch_dir=FLAGS.scratch_dir)
    except ValueError as e:
        raise app.UsageError(str(e))
    except executor.IsolationUnavailable as e:
        raise SystemExit(f"--isolation={FLAGS.isolation}: {e}")

    counts = collections.Counter()
    n_cells = 0
    start = time.monotonic()
    with ex, open(FLAGS.output, "a", encoding="utf-8") as out:
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
          f"isolation={FLAGS.isolation})")
    for status in executor.STATUSES:
        print(f"  {status:14s} {counts[status]:8d}  {100 * counts[status] / max(n_cells, 1):5.1f}%")
    if errors:
        print(f"{len(errors)} malformed input lines were skipped (listed on stderr)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
