"""Test-wide set-up. XLA reads the host device count only before JAX initialises its
backend, so it is set here, before any test module imports jax."""
import os
import shutil
import tempfile

# The programs the tests start get the flags the suite was started with, not the 8 devices:
# a user's program on a CPU sees one device, and a test that wants a mesh in a program asks
# for it in the program's env (tests/launch/test_train.py). Besides being the user's path,
# 8 fake devices on 2 cores cost compile and run time and expose XLA CPU's in-process
# collectives, which once aborted a program on a stuck all-gather under the suite's load
# (launch.train's gradient share, CI 2026-12-08; not reproduced in ~3,700 calls alone).
PROGRAM_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = (PROGRAM_XLA_FLAGS + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The programs the tests start run without torch, as in a user's install
# (tests/helpers/no_torch/sitecustomize.py says how and why).
_NO_TORCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers", "no_torch")
if _NO_TORCH not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (_NO_TORCH, os.environ.get("PYTHONPATH", "")) if p)

# One persistent XLA compilation cache per test session, shared by the xdist workers and
# every program a test starts (they inherit this environment): the suite compiles the same
# tiny models' steps in many processes. A fresh directory each session, so no run depends on
# an earlier one's entries; entries of any compile time, as most compiles here are short.
# The cache key does not cover the CPUs a process may use, so tests that vary the thread
# count run their children without it (`without_jax_cache`): what they compare is compiled
# under the count they test. (The thread-pin contraction of tests/fdpo/test_runtime.py keeps
# its per-count bits through a shared cache, so the count acts at run time there.)
# xdist sets PYTEST_XDIST_WORKER before a worker reads this file; workers keep the
# controller's directory. JAX_COMPILATION_CACHE_DIR= (empty) runs the suite without it.
CACHE_VARS = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
if "PYTEST_XDIST_WORKER" not in os.environ and os.environ.get(CACHE_VARS[0]) != "":
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fdpo-tests-jaxcache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
    _OWN_CACHE = None


def without_jax_cache(env: dict) -> dict:
    """`env` less the session's compilation cache: for a process whose compiled code must be
    its own (another CPU count, or a rerun that checks compiling again gives the same bits)."""
    return {k: v for k, v in env.items() if k not in CACHE_VARS}


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    if not SHARED.is_dir():
        pytest.fail(f"expected the shared data folder beside the checkout at {SHARED}")
    return SHARED


def run_program(module: str, *args, env: dict | None = None, cwd=REPO, timeout: float = 300,
                check: bool = True) -> subprocess.CompletedProcess:
    """`python -m module args...` as a user runs it (cwd the checkout, this interpreter,
    the test environment with the suite's starting XLA_FLAGS, so one CPU device, plus `env`),
    output captured as text. With `check`, a non-zero exit fails the test showing the end of
    stderr."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd,
                          env={**os.environ, "XLA_FLAGS": PROGRAM_XLA_FLAGS, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"`{' '.join(cmd[1:])}` exited with {proc.returncode}:\n"
                    f"{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def program():
    """`run_program` as a fixture: `program("launch.build", "--out", d, check=False)`."""
    return run_program


# The files with the longest tests, by their seconds in `make test` on 2026-12-08 (the sum of
# each file's tests among the 80 slowest of `--durations=80`; test_trunk.py less the 4
# presets dropped since; docs/testing.md). xdist's
# `--dist loadfile` hands files to whichever worker is free in collection order, so a long
# file collected last runs alone at the end; these go first, longest first, and the rest
# keep their order behind them. A stale entry only costs time, never a test.
SLOW_FILES = {
    "tests/fdpo/test_study.py": 276,
    "tests/launch/test_pipeline.py": 134,
    "tests/fdpo/test_trunk.py": 130,
    "tests/fdpo/evaluation/test_benchmarks.py": 115,
    "tests/launch/test_train.py": 110,
    "tests/fdpo/test_logprobs.py": 104,
    "tests/fdpo/test_mechanism.py": 94,
    "tests/fdpo/test_sampling_refill.py": 74,
    "tests/launch/test_interrupt.py": 66,
    "tests/launch/test_reference.py": 66,
    "tests/launch/test_train_losses.py": 61,
    "tests/test_portability.py": 60,
    "tests/fdpo/test_tdpo.py": 53,
    "tests/launch/test_pipeline_real.py": 49,
    "tests/launch/test_sample.py": 44,
    "tests/fdpo/evaluation/test_humaneval.py": 42,
    "tests/fdpo/test_sampling.py": 41,
    "tests/launch/test_models.py": 38,
}


def pytest_collection_modifyitems(config, items):
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.nodeid.split("::")[0], i)
    # A stable sort: each file's tests stay together and in their order.
    items.sort(key=lambda item: (-SLOW_FILES.get(item.nodeid.split("::")[0], 0),
                                 first[item.nodeid.split("::")[0]]))
