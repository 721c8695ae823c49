"""fdpo.runtime's CPU pins (FDPO_CPU_ISA, FDPO_CPU_THREADS): they reach XLA and the thread
pool in a fresh process, bad values and a late pin are errors, and the bits they decide
change with the ISA and stay equal from run to run under one pin. Every case runs in a
subprocess: a pin must come before JAX starts its backend, which this process has done."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_program, without_jax_cache

# Without the session's compilation cache: its key does not cover the thread count.
ENV = {k: v for k, v in without_jax_cache(os.environ).items() if not k.startswith("FDPO_CPU_")}
ENV.update(JAX_PLATFORMS="cpu", XLA_FLAGS="")


def python(code: str, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env={**ENV, **env},
                          capture_output=True, text=True, timeout=300)


def cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def test_the_pins_reach_xla_flags_and_the_affinity_before_the_backend():
    code = """
import os
from fdpo import runtime
for bad in ({"FDPO_CPU_ISA": "AVX3"}, {"FDPO_CPU_THREADS": "two"},
            {"FDPO_CPU_THREADS": "0"}, {"FDPO_CPU_THREADS": "100000"}):
    try:
        runtime.pin_cpu(bad)
        print("accepted", bad)
    except runtime.PinError as e:
        print("error:", e)
print(runtime.pin_cpu())
print(os.environ["XLA_FLAGS"], len(os.sched_getaffinity(0)))
import jax.numpy as jnp
jnp.ones(3).sum()       # the backend starts: a pin now would change nothing
try:
    runtime.pin_cpu({"FDPO_CPU_THREADS": "1"})
except runtime.PinError as e:
    print("late:", e)
"""
    r = python(code, FDPO_CPU_ISA="sse4_2", FDPO_CPU_THREADS="1",
               XLA_FLAGS="--xla_cpu_max_isa=AVX --xla_backend_optimization_level=1")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.splitlines()
    assert out[0].startswith("error: FDPO_CPU_ISA=AVX3: not one of SSE4_2, AVX, AVX2, AVX512")
    assert out[1] == "error: FDPO_CPU_THREADS=two: must be a whole number >= 1"
    assert out[2] == "error: FDPO_CPU_THREADS=0: must be a whole number >= 1"
    assert out[3].startswith("error: FDPO_CPU_THREADS=100000: only ")
    assert out[4] == "{'isa': 'SSE4_2', 'threads': 1}"
    # An earlier --xla_cpu_max_isa is replaced, the other flags kept.
    assert out[5] == "--xla_backend_optimization_level=1 --xla_cpu_max_isa=SSE4_2 1"
    assert out[6].startswith("late: FDPO_CPU_ISA/FDPO_CPU_THREADS must be applied before")


def test_a_pin_this_cpu_cannot_honour_is_an_error():
    have = cpu_flags()
    if not have or "amx_tile" in have:
        pytest.skip("needs a Linux CPU without AMX")
    r = python("from fdpo import runtime; runtime.pin_cpu()", FDPO_CPU_ISA="AMX")
    assert r.returncode != 0 and "FDPO_CPU_ISA=AMX: this CPU lacks " in r.stderr


# sha256 of a matmul, (257, 300) x (300, 129), and of a contraction over 2048 rows, z.T @ z
# for z (2048, 256) (the shape of a weight gradient over a batch). The first changes with
# FMA (AVX against AVX2), the second with the thread pool's size (measured,
# docs/pipeline.md#determinism).
PROBE = """
import hashlib, sys, jax, jax.numpy as jnp, numpy as np
from fdpo import runtime
runtime.pin_cpu()
h = lambda a: hashlib.sha256(np.asarray(a).tobytes()).hexdigest()
x = jax.random.normal(jax.random.key(0), (257, 300))
y = jax.random.normal(jax.random.key(1), (300, 129))
z = jax.random.normal(jax.random.key(2), (2048, 256))
print(h(jax.jit(jnp.matmul)(x, y)) if sys.argv[1] == "matmul" else h(jax.jit(lambda a: a.T @ a)(z)))
"""


@pytest.mark.slow   # three fresh JAX processes: ~36 s on the shared 2-core machine
@pytest.mark.skipif(not {"avx2", "fma"} <= cpu_flags(), reason="needs an x86 CPU with AVX2")
def test_the_isa_pin_decides_the_bits_and_one_pin_repeats_them():
    runs = {}
    for name, isa in (("avx2", "AVX2"), ("avx2 again", "AVX2"), ("avx", "AVX")):
        r = python(PROBE, "matmul", FDPO_CPU_ISA=isa)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = r.stdout.strip()
    assert runs["avx2"] == runs["avx2 again"]
    assert runs["avx2"] != runs["avx"]      # FMA or not: another rounding


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_the_thread_pin_decides_the_bits_of_a_large_contraction():
    runs = [python(PROBE, "contraction", FDPO_CPU_THREADS=n) for n in ("1", "2", "2")]
    assert all(r.returncode == 0 for r in runs), "".join(r.stderr for r in runs)[-3000:]
    one, two, two_again = (r.stdout.strip() for r in runs)
    assert two == two_again and one != two


@pytest.mark.slow   # the data and init stages: ~75 s on the shared 2-core machine
@pytest.mark.skipif(not {"avx2", "fma"} <= cpu_flags(), reason="needs an x86 CPU with AVX2")
def test_the_pipeline_stages_apply_the_pins(tmp_path):
    # The pipeline starts each stage as its own program with the pipeline's environment;
    # each program's runtime.init applies the pins and logs them.
    run_program("launch.pipeline", "--config=configs/toy.py:fast", f"--workdir={tmp_path}",
                "--only=data,init", env={**ENV, "FDPO_CPU_ISA": "AVX2", "FDPO_CPU_THREADS": "1"},
                timeout=600)
    log = (tmp_path / "logs" / "init.log").read_text()
    assert "CPU pinned: FDPO_CPU_ISA=AVX2, FDPO_CPU_THREADS=1" in log


def test_a_program_reports_a_bad_pin_in_one_line(tmp_path):
    r = run_program("launch.init_model", f"--out={tmp_path / 'm'}", check=False,
                    env={**ENV, "FDPO_CPU_THREADS": "many"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "launch.init_model: error: FDPO_CPU_THREADS=many: must be a whole number >= 1 (see --help)")
