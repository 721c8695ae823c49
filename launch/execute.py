r"""Run every code of every problem against every test, in sandboxes.

    python -m launch.execute --input IN.jsonl --output OUT.jsonl --config.timeout=5 \
        [--config.workers=N --config.memory_mb=1024 --config.isolation=full|no_cgroup|none]

Input lines: problem records from `launch.sample` (fdpo/problem.py, docs/data.md), whose
samples' programs are run, or the executor's own {"id": str, "codes": [str], "tests": [str]}.
Output lines, appended as problems finish, the finished file then rewritten in the input's
order (the same input gives the same file): the input record with
{"passed": [[bool]] (sample x test, one row per sample), "status", "detail", "time_s",
"wall_s"} added (for the executor's own format: just "id" and these). The limits and the isolation are configs/execute.py's; see
fdpo/sandbox/executor.py (and docs/sandbox.md) for the isolation model and the statuses.

Resuming, by content: each result holds an `execute_fingerprint` (digests of the codes,
the tests and the rest of the record, and the limits); results whose fingerprint matches
are kept, the others (and those of ids no longer in INPUT) are removed and run again, and
the program says how many of each. A truncated last line (an interrupted write) is cut off
and redone. Malformed input lines are all reported with file:line, the valid
ones still run, and the exit status is 1. The work is `fdpo.sandbox.files.execute_file`.
"""
import sys

from absl import app, flags

import configs
from fdpo.sandbox import executor, files
from launch import common

CONFIG = common.define_config("config", configs.path("execute.py"),
                              "Limits and isolation (configs/execute.py).",
                              lock_config=True)
INPUT = flags.DEFINE_string("input", None, "JSONL problem records (or id, codes, tests).",
                            required=True)
OUTPUT = flags.DEFINE_string("output", None, "JSONL results; appended to and resumed from.",
                             required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    c = CONFIG.value
    if c.timeout is None:
        raise app.UsageError("--config.timeout is required (seconds per (code, test) cell)")
    if c.isolation not in executor.ISOLATION_MODES:
        raise app.UsageError(f"--config.isolation={c.isolation!r}; expected one of "
                             f"{executor.ISOLATION_MODES}")
    common.check_readable_file("--input", INPUT.value)
    common.check_number("--config.timeout", c.timeout)  # the range: executor.Limits
    if c.workers is not None:
        common.check_number("--config.workers", c.workers, lo=1, integer=True)
    common.check_output("--output", OUTPUT.value, make_parents=True)
    try:
        limits = executor.Limits(
            timeout_s=c.timeout, memory_mb=c.memory_mb, max_procs=c.max_procs,
            file_size_mb=c.file_size_mb, scratch_mb=c.scratch_mb,
        )
        result = files.execute_file(INPUT.value, OUTPUT.value, limits, workers=c.workers,
                                    isolation=c.isolation, scratch_dir=c.scratch_dir)
    except files.ResumeError as e:
        raise SystemExit(str(e))
    except executor.IsolationUnavailable as e:
        raise SystemExit(f"--config.isolation={c.isolation}: {e}")
    except ValueError as e:  # a limit or the worker count
        raise app.UsageError(str(e))
    if result["malformed"]:
        sys.exit(1)


if __name__ == "__main__":
    common.run(main)
