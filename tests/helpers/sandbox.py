"""Interpreters for the executor's weak mode in tests."""
import os
import shutil
import sys

import pytest

from fdpo.sandbox import executor


def python_others_can_read() -> str:
    """An interpreter whose installation a non-owner uid can read: isolation="none" runs
    programs as such a uid. This one if it qualifies (a Python under /usr or /opt), else
    the system's python3 (a pyenv Python under a 0700 /root does not qualify); skips the
    test, naming why, on a machine that has neither."""
    why = []
    for python in (sys.executable, shutil.which("python3", path="/usr/bin:/bin")):
        if not python:
            continue
        exe, roots, _ = executor._python_layout(python)
        blocked = [b for b in map(executor.blocked_for_others, roots) if b]
        if not blocked:
            return python
        why.append(f"{python}: {blocked[0]}")
    if os.geteuid() != 0:
        return sys.executable  # without root the weak mode keeps the host's uid
    pytest.skip("no Python installation here is readable by other users: " + "; ".join(why))
