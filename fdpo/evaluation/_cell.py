"""Code that runs *inside* the sandbox, in the test phase of an executor cell.

Never imported by the host's evaluation path: `fdpo.evaluation.tests` reads this file's
source and embeds it in each test; the test `exec`s it in a namespace of its own (so no
name here can clobber the candidate's globals) and calls `run_evalplus` or `run_lcb`.
Standard library only, plus numpy for EvalPlus's `np.allclose` float comparison (the
evaluator preloads numpy in the judge, so that import is free in a cell). The host tests
import this module directly to check the oracles.

EvalPlus semantics (evalplus/eval/__init__.py `unsafe_execute`, evalplus 0.3.x, read
for the facts, re-implemented here):
  * the expected output of input i is the canonical solution's output on a deep copy of
    input i, computed here, in the same cell, right before the candidate's call (the
    judge's single interpreter: same hash seed, same machine load);
  * the candidate gets its own deep copy; inputs run in order and the first failing input
    ends the split ("fast check", EvalPlus's default);
  * per-input time limit max(floor, factor x reference seconds) and a budget for the
    candidate's summed time on the split (EvalPlus: min(60, sum of limits) + 1 for the
    whole process); going over raises `EvalTimeout`, which the host reports as a
    timeout (EvalPlus reports a per-input time-out as a plain failure);
  * oracles, in EvalPlus's order: MBPP `are_equivalent` (Mbpp/164) accepts any output,
    `sum_div` (Mbpp/295) also accepts 0, `surface_Area` (Mbpp/581) also accepts the
    slant-height formula within atol, `digit_distance_nums` (Mbpp/558) also accepts the
    zero-padded digit distance, eight tasks compare `set(out) == set(exp)`, three tasks
    only check "not None" (a bool output is compared with the expected bool); HumanEval
    `find_zero` (HumanEval/32) checks |poly(xs, out)| <= atol instead of comparing; then
    if atol is 0 and the expected output is a float or a non-empty list/tuple of floats,
    atol becomes 1e-6 (and, as in EvalPlus, stays so for the later inputs of the split);
    a non-exact output with atol != 0 must have the same type (and length for
    lists/tuples) and satisfy np.allclose(out, exp, rtol=1e-7, atol=atol); otherwise
    `out == exp`.
"""
import copy
import io
import json
import math
import signal
import sys
import time

MBPP_SET_EQ = ("similar_elements", "find_char_long", "common_in_nested_lists",
               "extract_singly", "larg_nnum", "intersection_array", "find_dissimilar", "Diff")
MBPP_NOT_NONE = ("check_str", "text_match_three", "text_starta_endb")


class EvalTimeout(BaseException):
    """A BaseException, so `except Exception` in the candidate cannot swallow it."""


# ----------------------------------------------------------------------------- decoding
def _hook(obj):
    if len(obj) == 1:
        (tag, val), = obj.items()
        if tag == "t":
            return tuple(val)
        if tag == "s":
            return set(val)
        if tag == "f":
            return frozenset(val)
        if tag == "c":
            return complex(val[0], val[1])
        if tag == "d":
            return {k: v for k, v in val}
        if tag == "l":
            return val
    raise ValueError(f"bad tagged value {obj!r}")


def decode(text):
    """Inverse of `fdpo.evaluation.tasks.encode` (tagged JSON; NaN/Infinity allowed)."""
    return json.loads(text, object_hook=_hook)


# ------------------------------------------------------------------------------ oracles
def poly(xs, x):
    """sum_i xs[i] * x**i, with math.pow as EvalPlus's HumanEval/32 oracle."""
    return sum(c * math.pow(x, i) for i, c in enumerate(xs))


def surface_area_slant(base_edge, height):
    """Mbpp/581's accepted alternative: the height is the pyramid's perpendicular height."""
    slant = math.sqrt((base_edge / 2) ** 2 + height ** 2)
    return round(base_edge ** 2 + 2 * base_edge * slant)


def digit_distance_padded(a, b):
    """Mbpp/558's accepted alternative: the shorter number is left-padded with zeros."""
    sa, sb = str(a), str(b)
    width = max(len(sa), len(sb))
    return sum(abs(int(x) - int(y)) for x, y in zip(sa.zfill(width), sb.zfill(width)))


def is_floats(x):
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(v, float) for v in x)
    if type(x).__module__ == "numpy" and hasattr(x, "dtype"):
        return str(x.dtype) in ("float64", "float32")
    return False


def check_output(dataset, entry_point, inp, out, exp, atol):
    """Raises AssertionError (or another exception) when `out` is wrong for input `inp`
    with expected `exp`. Returns the atol to use for the next input (EvalPlus keeps the
    1e-6 it enforces for floats for the rest of the split)."""
    exact = out == exp
    if dataset == "mbpp":
        if entry_point == "are_equivalent":
            exact = True
        elif entry_point == "sum_div":
            exact = exact or out == 0
        elif entry_point == "surface_Area":
            exact = exact or abs(out - surface_area_slant(*inp)) <= atol
        elif entry_point == "digit_distance_nums":
            exact = exact or out == digit_distance_padded(*inp)
        elif entry_point in MBPP_SET_EQ:
            exact = set(out) == set(exp)
        elif entry_point in MBPP_NOT_NONE:
            exact = out == exp if isinstance(out, bool) else exp == (out is not None)
    if dataset == "humaneval" and entry_point == "find_zero":
        assert abs(poly(*inp, out)) <= atol, "|poly(xs, x)| > atol"
        return atol
    if atol == 0 and is_floats(exp):
        atol = 1e-6
    if not exact and atol != 0:
        assert type(out) == type(exp), f"type {type(out).__name__} != {type(exp).__name__}"
        if isinstance(exp, (list, tuple)):
            assert len(out) == len(exp), "length differs"
        import numpy as np
        assert np.allclose(out, exp, rtol=1e-07, atol=atol), "not within atol"
    else:
        assert exact, "wrong output"
    return atol


# ------------------------------------------------------------------------------- timing
def _on_alarm(signum, frame):
    raise EvalTimeout("time limit")


class _Limit:
    """Per-call wall-clock limit by ITIMER_REAL -> EvalTimeout."""

    def __init__(self, seconds, what):
        self.seconds, self.what = seconds, what

    def __enter__(self):
        if self.seconds <= 0:
            raise EvalTimeout(f"{self.what}: the split's time budget is spent")
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)


def _short(x, n=60):
    s = repr(x)
    return s if len(s) <= n else s[:n] + "..."


# ---------------------------------------------------------------------------- EvalPlus
def run_evalplus(cand_globals, spec_text):
    """Runs one split (base or plus) of one EvalPlus task against the candidate whose
    globals are `cand_globals`. Raises on the first failing input."""
    spec = json.loads(spec_text)
    dataset, entry, split = spec["dataset"], spec["entry_point"], spec["split"]
    inputs = decode(spec["inputs"])
    floor, factor, budget = spec["floor_s"], spec["factor"], spec["budget_s"]
    atol = spec["atol"]
    ref_ns = {"__name__": "__reference__"}
    exec(compile(spec["reference"], "<reference>", "exec"), ref_ns)
    ref = ref_ns[entry]
    if entry not in cand_globals:
        raise NameError(f"the solution defines no {entry!r}")
    cand = cand_globals[entry]
    clock = time.perf_counter
    used = 0.0
    for i, inp in enumerate(inputs):
        where = f"{split} input {i}"
        t0 = clock()
        try:
            exp = ref(*copy.deepcopy(inp))
        except BaseException as e:
            raise RuntimeError(f"{where}: the reference solution failed in this cell "
                               f"({type(e).__name__})") from None
        ref_s = clock() - t0
        if entry in MBPP_NOT_NONE and dataset == "mbpp":
            exp = exp is not None
        limit = min(max(floor, factor * ref_s), budget - used)
        args = copy.deepcopy(inp)
        t0 = clock()
        try:
            with _Limit(limit, where):
                out = cand(*args)
        except EvalTimeout:
            raise EvalTimeout(f"{where}: over {limit:.3g}s (reference {ref_s:.3g}s)") from None
        finally:
            used += clock() - t0
        try:
            atol = check_output(dataset, entry, inp, out, exp, atol)
        except AssertionError as e:
            raise AssertionError(f"{where} {_short(inp)}: {e}; got {_short(out)}, "
                                 f"expected {_short(exp)}") from None


# ------------------------------------------------------------------------ LiveCodeBench
# LiveCodeBench prepends these imports to every program (lcb_runner/evaluation/testing_util.py).
LCB_IMPORTS = (
    "from string import *\nfrom re import *\nfrom datetime import *\nfrom collections import *\n"
    "from heapq import *\nfrom bisect import *\nfrom copy import *\nfrom math import *\n"
    "from random import *\nfrom statistics import *\nfrom itertools import *\n"
    "from functools import *\nfrom operator import *\nfrom io import *\nfrom sys import *\n"
    "from json import *\nfrom builtins import *\nfrom typing import *\nimport string\nimport re\n"
    "import datetime\nimport collections\nimport heapq\nimport bisect\nimport copy\nimport math\n"
    "import random\nimport statistics\nimport itertools\nimport functools\nimport operator\n"
    "import io\nimport sys\nimport json\nsys.setrecursionlimit(50000)\n"
)


def _decimals(line):
    from decimal import Decimal, InvalidOperation
    try:
        return [Decimal(x) for x in line.split()]
    except (InvalidOperation, ValueError):
        return None


def stdout_matches(got, want):
    """LiveCodeBench's rule: strip both, compare line by line (each stripped); a line that
    differs still matches when both parse as the same list of Decimals."""
    g = [ln.strip() for ln in got.strip().split("\n")]
    w = [ln.strip() for ln in want.strip().split("\n")]
    if len(g) != len(w):
        return False
    for a, b in zip(g, w):
        if a == b:
            continue
        da, db = _decimals(a), _decimals(b)
        if da is None or db is None or da != db:
            return False
    return True


def run_lcb(cand_globals, spec_text):
    spec = json.loads(spec_text)
    tests, limit = spec["tests"], spec["timeout_s"]
    if spec["testtype"] == "functional":
        name = spec["func_name"]
        if "class Solution" in spec["source"]:
            method = getattr(cand_globals["Solution"](), name)
        else:
            if name not in cand_globals:
                raise NameError(f"the solution defines no {name!r}")
            method = cand_globals[name]
        for i, (inp, want) in enumerate(tests):
            args = [json.loads(line) for line in inp.split("\n")]
            exp = json.loads(want)
            with _Limit(limit, f"test {i}"):
                out = method(*args)
            if isinstance(out, tuple):
                out = list(out)
            assert out == exp, f"test {i}: got {_short(out)}, expected {_short(exp)}"
        return
    code = compile(LCB_IMPORTS + spec["source"], "<solution>", "exec")
    real_in, real_out = sys.stdin, sys.stdout
    for i, (inp, want) in enumerate(tests):
        sin = io.TextIOWrapper(io.BytesIO(inp.encode()), encoding="utf-8")
        raw = io.BytesIO()
        sout = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
        sys.stdin, sys.stdout = sin, sout
        try:
            with _Limit(limit, f"test {i}"):
                try:
                    exec(code, {"__name__": "__main__"})
                except SystemExit as e:
                    if e.code not in (None, 0):
                        raise RuntimeError(f"test {i}: exit status {e.code}") from None
            sout.flush()
        finally:
            sys.stdin, sys.stdout = real_in, real_out
        got = raw.getvalue().decode("utf-8", "replace")
        assert stdout_matches(got, want), f"test {i}: got {_short(got)}, expected {_short(want)}"
