"""Read by every Python process the test suite starts (tests/conftest.py puts this folder
on PYTHONPATH). In the project's programs, `python -m launch.X` and `python -m
data_tools.X`, torch is hidden, as it is in a user's install (requirements.txt has no
torch; only the tests' parity references need it). The programs then run as users run
them, and each start is spared transformers' import of torch (~1.7 s of CPU, measured on
`import fdpo.tokenization`: 2.6 s with torch installed, 1.1 s hidden).

Hidden means not findable, exactly as when it is not installed: `import torch` raises
ModuleNotFoundError, `importlib.util.find_spec("torch")` is None and "torch" is absent from
sys.modules. (A None entry in sys.modules, the usual trick, is not the same: scipy.stats
reads sys.modules["torch"] and fails on None.)"""
import importlib.machinery
import sys


class _PathFinderWithoutTorch:
    """sys.meta_path's PathFinder, blind to torch and its submodules."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    def __getattr__(self, attr):   # invalidate_caches, find_distributions, ...
        return getattr(importlib.machinery.PathFinder, attr)


_argv = list(getattr(sys, "orig_argv", ()))
if "-m" in _argv[:-1] and _argv[_argv.index("-m") + 1].startswith(("launch.", "data_tools.")):
    sys.meta_path[:] = [_PathFinderWithoutTorch() if f is importlib.machinery.PathFinder else f
                        for f in sys.meta_path]
