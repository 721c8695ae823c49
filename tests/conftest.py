"""Test-wide set-up. XLA reads the host device count only before JAX initialises its
backend, so it is set here, before any test module imports jax."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
    the test environment plus `env`), output captured as text. With `check`, a non-zero
    exit fails the test showing the end of stderr."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"`{' '.join(cmd[1:])}` exited with {proc.returncode}:\n"
                    f"{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def program():
    """`run_program` as a fixture: `program("launch.build", "--out", d, check=False)`."""
    return run_program
