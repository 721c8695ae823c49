"""Read by every Python process the test suite starts (tests/conftest.py puts this folder
on PYTHONPATH). In the project's programs, `python -m launch.X` and `python -m
data_tools.X`, torch is hidden, as it is in a user's install (requirements.txt has no
torch; only the tests' parity references need it). The programs then run as users run
them, and each start is spared transformers' import of torch (~1.7 s of CPU, measured on
`import fdpo.tokenization`: 2.6 s with torch installed, 1.1 s hidden)."""
import sys

_argv = list(getattr(sys, "orig_argv", ()))
if "-m" in _argv[:-1] and _argv[_argv.index("-m") + 1].startswith(("launch.", "data_tools.")):
    sys.modules["torch"] = None  # `import torch` raises ImportError; find_spec gives None
