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
import sys
import time

from absl import app, flags
from tqdm import tqdm

from fdpo import jsonl
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
    with ex, jsonl.Appender(FLAGS.output) as out:
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
          f"isolation={FLAGS.isolation})")
    for status in executor.STATUSES:
        print(f"  {status:14s} {counts[status]:8d}  {100 * counts[status] / max(n_cells, 1):5.1f}%")
    if errors:
        print(f"{len(errors)} malformed input lines were skipped (listed on stderr)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
