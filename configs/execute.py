r"""The sandboxed executor (`python -m launch.execute`): limits per cell and isolation.

    python -m launch.execute --input=IN.jsonl --output=OUT.jsonl --config.timeout=5 \
        [--config.workers=8 --config.memory_mb=1024 --config.isolation=no_cgroup]

The limits are `fdpo.sandbox.executor.Limits`' (timeout is its timeout_s; the defaults must
agree, a test checks); workers, isolation and scratch_dir are the Executor's. docs/sandbox.md
says what each one bounds and what the weaker isolation modes give up.
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.timeout = config_dict.placeholder(float)  # seconds (wall clock) per (code, test); required
    c.memory_mb = 1024  # address space per process; the programs' share of the memory cgroup
    c.max_procs = 64  # processes + threads per cell
    c.file_size_mb = 16  # largest file a program may write
    c.scratch_mb = 64  # size of the writable /tmp in the sandbox
    c.workers = config_dict.placeholder(int)  # parallel sandboxes; None: all cores
    # full: bwrap namespaces + cgroups (needs root); weaker only when asked for: no_cgroup (no
    # total memory/task cap), none (no sandbox). fdpo.sandbox.executor.ISOLATION_MODES.
    c.isolation = "full"
    # isolation=none: where each sandbox's working directory is made; None: the temp
    # directory (TMPDIR honoured).
    c.scratch_dir = config_dict.placeholder(str)
    c.lock()
    return c
