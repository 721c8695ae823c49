"""The comparisons that depend on float32 summation order, rerun with XLA's CPU thread
count forced to 1 and to 2: another machine's core count must not turn them red.

XLA sizes its CPU thread pool from the process's CPU affinity, and Eigen's matmuls run
multi-threaded unless told otherwise; the child runs the tests with its affinity set to
1 or 2 CPUs (and, for 1, Eigen single-threaded)."""
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, without_jax_cache

MESH_TESTS = [
    "tests/fdpo/test_models.py::test_mesh_2x2x2_matches_one_device",
    "tests/fdpo/test_sampling.py::test_mesh_2x2x2_greedy_matches_one_device",
    "tests/fdpo/test_train.py::test_sharded_step_on_8_devices_matches_one_device",
    "tests/fdpo/test_train.py::test_shared_prompt_rows_on_8_devices",
]


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_mesh_comparisons_with_xla_cpu_threads(threads):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < threads:
        pytest.skip(f"this process may use {len(cpus)} CPU(s), fewer than {threads}")
    if len(cpus) == threads:
        pytest.skip(f"this process may use exactly {threads} CPUs: the suite's own run of "
                    f"{MESH_TESTS} is the {threads}-thread run")
    # The session's compilation cache holds code compiled under this process's CPUs.
    env = without_jax_cache(os.environ)
    if threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    probe = ("import os, jax, jax.numpy as jnp; x = jnp.ones((256, 256)); "
             "(x @ x).block_until_ready(); print(sorted(os.sched_getaffinity(0)))")
    run = ("import os, sys; os.sched_setaffinity(0, set(map(int, sys.argv[1].split(',')))); "
           "os.execv(sys.executable, [sys.executable] + sys.argv[2:])")
    affinity = ",".join(map(str, cpus[:threads]))
    seen = subprocess.run([sys.executable, "-c", run, affinity, "-c", probe], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert seen.stdout.strip() == str(cpus[:threads]), seen.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", run, affinity, "-m", "pytest", "-q",
                          "-p", "no:cacheprovider", *MESH_TESTS],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert f"{len(MESH_TESTS)} passed" in out.stdout
