"""The accelerator check script runs end to end (at its --tiny shapes, on CPU), so that a
lent device's few minutes are not lost to a broken script."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_device_check_runs_at_tiny_shapes(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--tiny"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "device_check.json").read_text())
    rows = out["rows"]
    assert [(r["part"], r.get("refill")) for r in rows] == [
        ("train", None), ("sampler", False), ("sampler", True)]
    train = rows[0]
    # Policy == reference at the start: the focused_dpo loss starts at ln 2 and moves little
    # in 3 steps at lr 1e-6.
    assert abs(train["loss"] - math.log(2)) < 0.05
    assert 0 < train["mfu"] and train["tokens_per_s"] > 0
    assert all(r["tokens_per_s"] > 0 for r in rows[1:])
    assert "| train | tiny" in proc.stdout and "| sampler refill | tiny" in proc.stdout
