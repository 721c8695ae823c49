"""`python -m launch.execute`: output format, malformed-line reporting, resuming, and
use from a process that has JAX (threads) loaded."""
import dataclasses
import inspect
import json
import os
import subprocess
import sys

import pytest

from configs import execute as execute_config
from fdpo.sandbox import executor

from tests.conftest import REPO, run_program

pytestmark = pytest.mark.sandbox


def _run(args, timeout=120):
    return run_program("launch.execute", *args, timeout=timeout, check=False)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


GOOD = [
    json.dumps({"id": "a", "codes": ["def f(x): return x + 1", "def f(x): return x"],
                "tests": ["assert f(1) == 2", "assert f(0) == 0"], "extra": 1}),
    json.dumps({"id": "b", "codes": ["while True: pass"], "tests": ["assert True"]}),
    json.dumps({"id": "c", "codes": ["x = 1"], "tests": ["assert x == 1"]}),
]


def _read(path):
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_outputs_matrices_and_summary(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, GOOD)
    r = _run(["--input", str(inp), "--output", str(out), "--config.timeout=1",
              "--config.workers=2"])
    assert r.returncode == 0, r.stderr
    res = _read(out)
    assert set(res) == {"a", "b", "c"}
    assert res["a"]["passed"] == [[True, False], [False, True]]
    assert res["a"]["status"] == [["pass", "fail"], ["fail", "pass"]]
    assert res["b"]["status"] == [["timeout"]]
    assert len(res["a"]["time_s"]) == 2 and res["a"]["wall_s"] > 0
    assert "3 problems, 6 cells" in r.stdout
    assert "pass" in r.stdout and "timeout" in r.stdout


def test_malformed_lines_are_all_reported_with_line_numbers(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, [GOOD[0], "{not json", json.dumps({"id": "x", "codes": "nope", "tests": []}),
                 "", json.dumps({"id": "a", "codes": [], "tests": []}),
                 json.dumps({"codes": [], "tests": []}), GOOD[2]])
    with open(inp, "ab") as f:
        f.write(b'{"id": "\xff"}\n')  # bad bytes: was a bare UnicodeDecodeError
    r = _run(["--input", str(inp), "--output", str(out), "--config.timeout=1"])
    assert r.returncode == 1
    for lineno in (2, 3, 5, 6, 8):
        assert f"{inp}:{lineno}:" in r.stderr, r.stderr
    assert f"{inp}:4:" not in r.stderr  # blank lines are skipped (they were errors)
    assert f"{inp}:8: not valid UTF-8" in r.stderr
    assert "duplicate id 'a'" in r.stderr
    assert "5 malformed input lines" in r.stderr
    assert set(_read(out)) == {"a", "c"}  # the valid lines still ran


def test_resume_skips_done_ids_and_redoes_a_truncated_line(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, GOOD)
    assert _run(["--input", str(inp), "--output", str(out), "--config.timeout=1"]).returncode == 0
    first = _read(out)
    # A result of this input under these limits (its fingerprint matches) is kept as it is:
    # a sentinel in place of its verdicts shows it was not run again.
    done = {**first["a"], "passed": [[True, True], [True, True]]}
    out.write_text(json.dumps(done) + "\n" + '{"id": "c", "passed": [[tr')
    r = _run(["--input", str(inp), "--output", str(out), "--config.timeout=1"])
    assert r.returncode == 0, r.stderr
    assert "truncated last line" in r.stderr
    assert f"{out}: 1 records kept, 0 redone, 2 new" in r.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    res = _read(out)
    assert res["a"] == done
    assert res["c"]["status"] == [["pass"]] and res["b"]["status"] == [["timeout"]]
    r = _run(["--input", str(inp), "--output", str(out), "--config.timeout=1"])
    assert "0 to run" in r.stderr and len(out.read_text().splitlines()) == 3


def test_resume_redoes_a_result_without_a_fingerprint(tmp_path):
    """Same id, a result written before fingerprints (or by hand): what produced it is
    unknown, so it is run again rather than trusted."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, GOOD)
    old = {"id": "a", "passed": [], "status": [], "detail": [], "time_s": [], "wall_s": 0.0}
    out.write_text(json.dumps(old) + "\n")
    r = _run(["--input", str(inp), "--output", str(out), "--config.timeout=1"])
    assert r.returncode == 0, r.stderr
    assert f"{out}: 0 records kept, 1 redone (1: no fingerprint), 2 new" in r.stderr
    res = _read(out)
    assert len(out.read_text().splitlines()) == 3
    assert res["a"]["passed"] == [[True, False], [False, True]]


def test_corrupt_output_in_the_middle_is_an_error(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, GOOD)
    out.write_text("garbage\n" + json.dumps({"id": "a"}) + "\n" + '{"id": "c", "pa')
    r = _run(["--input", str(inp), "--output", str(out), "--config.timeout=1"])
    assert r.returncode != 0
    assert f"{out}:1: malformed line in the existing output" in r.stderr
    assert out.read_text().endswith('{"id": "c", "pa')  # refused before any repair


def test_bad_flags_are_clear(tmp_path):
    r = _run(["--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o"),
              "--config.timeout=1"])
    assert r.returncode != 0 and "--input" in r.stderr and "missing.jsonl" in r.stderr
    r = _run(["--input", "x", "--output", "y"])
    assert r.returncode != 0 and "--config.timeout is required" in r.stderr
    r = _run(["--input", "x", "--output", "y", "--config.timeout=1", "--config.isolation=bwrap"])
    assert r.returncode != 0 and "--config.isolation='bwrap'; expected one of" in r.stderr
    inp = tmp_path / "in.jsonl"
    _write(inp, GOOD[2:])
    r = _run(["--input", str(inp), "--output", str(tmp_path / "o"), "--config.timeout=-1"])
    assert r.returncode != 0 and "timeout_s must be > 0" in r.stderr


def test_execute_config_defaults_agree_with_the_library():
    """configs/execute.py spells the limits out (configs import only ml_collections); they
    must be Limits' (the timeout has none: it is required), the rest the Executor's."""
    c = execute_config.get_config()
    limits = dataclasses.asdict(executor.Limits())
    del limits["timeout_s"], limits["max_open_files"]  # required here; not a setting
    assert {k: c[k] for k in limits} == limits and c.timeout is None
    params = inspect.signature(executor.Executor).parameters
    assert all(c[k] == params[k].default for k in ("workers", "isolation", "scratch_dir"))


def test_library_is_safe_in_a_process_with_jax_threads():
    # JAX starts thread pools; the executor must only spawn (fork+exec in C), never fork
    # Python. A deadlock here would hit the subprocess timeout.
    script = (
        "import jax, jax.numpy as jnp\n"
        "jnp.ones(4).sum().block_until_ready()\n"
        "import threading; assert threading.active_count() >= 1\n"
        "from fdpo.sandbox.executor import run_problems\n"
        "ps = [{'id': str(k), 'codes': ['def f(): return %d' % k], 'tests': ['assert f() == %d' % k]}"
        " for k in range(20)]\n"
        "res = list(run_problems(ps, timeout=2, workers=2))\n"
        "assert len(res) == 20 and all(r['passed'] == [[True]] for r in res), res\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_problem_records_come_back_extended_by_their_verdicts(tmp_path):
    """A launch.sample record: its samples' programs run (an empty one fails every test),
    and the output is the whole record with `passed` added, one row per sample."""
    record = {"version": 1, "id": "r", "problem": "p", "prompt": "Write f.",
              "response_format": "code_block", "note": {"kept": True},
              "samples": [{"response": "```python\ndef f(x): return x + 1\n```",
                           "response_ids": [1, 2], "program": "def f(x): return x + 1\n",
                           "finish": "eos"},
                          {"response": "No.", "response_ids": [3], "program": "",
                           "finish": "length"}],
              "tests": ["assert f(1) == 2"]}
    old = {"id": "o", "prompt": "p", "codes": ["x = 1"], "tests": [], "raw": {}}
    unsampled = {k: v for k, v in record.items() if k != "samples"} | {"id": "s"}
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(inp, [json.dumps(record), json.dumps(old), json.dumps(unsampled)])
    r = _run(["--input", str(inp), "--output", str(out), "--config.timeout=2",
              "--config.workers=1"])
    assert r.returncode == 1  # the malformed lines are reported; the good one still ran
    assert f"{inp}:2: missing field 'version'" in r.stderr
    assert f"{inp}:3: missing field 'samples'" in r.stderr
    (res,) = _read(out).values()
    assert {k: res[k] for k in record} == record
    assert res["passed"] == [[True], [False]]
