"""The package dependency rules, checked on the source so they cannot rot.

    launch/      programs: may import fdpo, data_tools, configs (and launch.common)
    fdpo/        the library: imports none of data_tools, launch, configs, tests, benchmarks
    data_tools/  the data stage (NumPy, networkx): never JAX; of fdpo only its JAX-free
                 modules (JAX_FREE_FDPO)
    configs/     ml-collections configs: ml_collections, the standard library, configs.*
    benchmarks/  may import fdpo, data_tools, benchmarks; not tests or launch
    nothing outside tests/ imports tests; nothing imports launch (tests run programs as
    subprocesses or call the library)
"""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import REPO

PACKAGES = ("fdpo", "data_tools", "launch", "configs", "benchmarks", "tests")
JAX_LIBS = ("jax", "jaxlib", "flax", "optax", "orbax", "grain")
# fdpo modules the data stage may use: they import no JAX (checked below, in a subprocess).
JAX_FREE_FDPO = ("fdpo.atomic", "fdpo.records", "fdpo.problem", "fdpo.jsonl", "fdpo.sandbox",
                 "fdpo.sandbox.executor",
                 "fdpo.extract", "fdpo.tokenization", "fdpo.stats")
STDLIB = sys.stdlib_module_names


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in PACKAGES:  # `from fdpo import sampling` imports fdpo.sampling
                out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def _is(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(root: pathlib.Path) -> list[str]:
    """Every import in `root`'s packages that breaks a rule, as 'file:line: rule'."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root)
            for line, mod in imports_of(path):
                top = mod.split(".")[0]
                why = None
                if top == "launch" and package not in ("launch",):
                    why = "nothing imports launch (run the program, or call its library)"
                elif top == "launch" and mod not in ("launch", "launch.common"):
                    why = "programs share only launch.common"
                elif top == "tests" and package != "tests":
                    why = "only tests import tests (shared factories live in fdpo.testing)"
                elif package == "fdpo" and top in ("data_tools", "configs", "benchmarks"):
                    why = "the library imports none of data_tools, configs, benchmarks"
                elif package == "data_tools" and top in JAX_LIBS:
                    why = "the data stage never imports JAX"
                elif (package == "data_tools" and top == "fdpo" and mod != "fdpo"
                      and not _is(mod, *JAX_FREE_FDPO)):
                    why = f"the data stage uses only fdpo's JAX-free modules {JAX_FREE_FDPO}"
                elif package == "data_tools" and top in ("configs", "benchmarks"):
                    why = "the data stage imports no configs or benchmarks"
                elif package == "configs" and not (top in ("ml_collections", "configs", "__future__")
                                                   or top in STDLIB):
                    why = "configs import only ml_collections"
                elif package == "benchmarks" and top in ("tests", "launch"):
                    why = "benchmarks import no tests or programs"
                if why:
                    found.append(f"{rel}:{line}: imports {mod}: {why}")
    return found


def test_the_dependency_rules_hold():
    assert violations(REPO) == []


def test_the_rules_catch_a_wrong_way_edge(tmp_path):
    """The check can fail: a copy of the tree with the edges the old layout had."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "fdpo" / "sampling.py").write_text("from data_tools.build import Encoder\n")
    (tmp_path / "data_tools" / "synthesize.py").write_text(
        "def generate():\n    from fdpo import sampling\n    from launch import common\n")
    (tmp_path / "configs" / "focused_dpo.py").write_text("from fdpo.sharding import RULES\n")
    (tmp_path / "benchmarks" / "bench.py").write_text("from tests.helpers import pairs\n")
    (tmp_path / "tests" / "test_x.py").write_text("from launch import report\n")
    (tmp_path / "data_tools" / "ok.py").write_text("from fdpo import records, jsonl\n")
    got = violations(tmp_path)
    assert got == [
        "fdpo/sampling.py:1: imports data_tools.build: the library imports none of "
        "data_tools, configs, benchmarks",
        "data_tools/synthesize.py:2: imports fdpo.sampling: the data stage uses only fdpo's "
        f"JAX-free modules {JAX_FREE_FDPO}",
        "data_tools/synthesize.py:3: imports launch.common: nothing imports launch (run the "
        "program, or call its library)",
        "configs/focused_dpo.py:1: imports fdpo.sharding: configs import only ml_collections",
        "benchmarks/bench.py:1: imports tests.helpers: only tests import tests (shared "
        "factories live in fdpo.testing)",
        "tests/test_x.py:1: imports launch.report: nothing imports launch (run the program, "
        "or call its library)",
    ]


def test_the_data_stage_loads_no_jax():
    """Importing every data_tools module (and so the fdpo modules they use) leaves JAX
    unloaded: the rule above is about the whole import closure, not only direct imports."""
    modules = sorted(".".join(p.relative_to(REPO).with_suffix("").parts)
                     for p in (REPO / "data_tools").rglob("*.py"))
    modules = [m.removesuffix(".__init__") for m in modules] + list(JAX_FREE_FDPO)
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {JAX_LIBS!r})\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.py")
                                          if p.name not in ("__init__.py", "common.py")))
def test_configs_load_without_the_library(config):
    """A config file loads in a process where fdpo, JAX and torch are not importable."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('fdpo', 'jax', 'torch', 'data_tools'):\n"
            "            raise ImportError(f'blocked: {name}')\n"
            "sys.meta_path.insert(0, Block())\n"
            f"import configs.{config[:-3]} as c\n"
            "assert callable(c.get_config)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]


def test_programs_run_without_torch_as_in_a_users_install():
    """The suite's programs start with torch hidden (tests/helpers/no_torch, a user's install
    has no torch), and then print nothing about it: transformers' "PyTorch was not found"
    advice is filtered by fdpo/__init__.py. With the filter removed stderr has that line."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "launch.sample",
                        "--helpshort"], cwd=REPO, capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()
                if line.startswith("import time:")}
    assert {"fdpo.tokenization", "transformers", "jax"} <= imported
    assert "torch" not in imported
    rest = [line for line in r.stderr.splitlines() if not line.startswith("import time:")]
    assert not rest, rest
    # The filter, checked where transformers is imported with torch absent.
    code = ("import sys; sys.modules['torch'] = None\n"
            "import fdpo.tokenization, transformers\n"
            "assert not transformers.is_torch_available()\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr[-3000:]


def test_hidden_torch_looks_uninstalled_to_every_library():
    """The helper hides torch as an uninstalled package looks: not findable, not importable,
    absent from sys.modules, so libraries that probe for it (scipy.stats reads
    sys.modules["torch"], transformers calls find_spec) take their no-torch path."""
    code = ("import importlib.machinery, importlib.util, sys, sitecustomize\n"
            "sys.meta_path[:] = [sitecustomize._PathFinderWithoutTorch()\n"
            "                    if f is importlib.machinery.PathFinder else f\n"
            "                    for f in sys.meta_path]\n"
            "assert importlib.util.find_spec('torch') is None\n"
            "try:\n    import torch\nexcept ModuleNotFoundError:\n    pass\n"
            "else:\n    raise AssertionError('torch imported')\n"
            "assert 'torch' not in sys.modules\n"
            "from scipy import stats\n"
            "assert abs(stats.t.ppf(0.975, 10) - 2.228138851986) < 1e-9\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "helpers" / "no_torch")}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
