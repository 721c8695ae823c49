"""What the launch programs share: the run wrapper that turns user errors into one line
(`run`, `UsageError`, `define_config`), input checks made before any work (`check_*`), and
the flags of the programs that use JAX (the mesh and multi-host set-up).

A user error (a bad flag or config value, an unreadable input, an output that cannot be
written) ends the program with exit status 2 and one line on stderr,
``launch.x: error: <what is wrong> (see --help)``; a bug still ends in a traceback.
Ctrl-C (SIGINT) ends it with exit status 130 and one line (`interrupted_exit`)."""

from __future__ import annotations

import math
import os
import pathlib
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT


class UsageError(app.UsageError):
    """A user error: bad flag or config value, unusable input or output path."""


def _program() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None else pathlib.Path(sys.argv[0]).stem


def _one_line(message: str) -> str:
    """absl and ml_collections put whole tracebacks into some messages: keep the first line
    (which names the flag) and the last (the error itself)."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return "invalid arguments"
    if any(ln.startswith("Traceback") for ln in lines) or len(lines) > 3:
        lines = [lines[0].rstrip(":"), lines[-1]] if len(lines) > 1 else lines
    return "; ".join(dict.fromkeys(lines))


def usage_exit(message) -> None:
    """Prints `program: error: message (see --help)` and exits with status 2."""
    sys.stderr.write(f"{_program()}: error: {_one_line(message)} (see --help)\n")
    sys.stderr.flush()
    sys.exit(EXIT_USAGE)


_CONFIG_FLAGS: list = []


def define_config(name: str, default: str | None, help_string: str, *, required: bool = False,
                  **kwargs):
    """`config_flags.DEFINE_config_file`, with one-line errors. When the default file is used,
    ml_collections applies `--name.field=...` overrides at definition time, so a misspelt
    field fails while the program module is imported, before `run` could catch it."""
    try:
        holder = config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
    except (AttributeError, KeyError) as e:  # ml_collections: "'field'\nDid you mean ..."
        inner = e.args[0] if e.args else e
        while isinstance(inner, BaseException) and inner.args:
            inner = inner.args[0]
        usage_exit(f"--{name}.*: no such config field {inner}")
    except (TypeError, ValueError, flags.Error) as e:
        usage_exit(f"--{name}.*: {e}")
    _CONFIG_FLAGS.append((holder, required))
    return holder


def _parse_flags(argv):
    """absl's parser, but a bad flag is one line and exit status 2 (absl: the traceback of a
    config file, or the flag list, then exit 1)."""
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        usage_exit(e)
    for holder, required in _CONFIG_FLAGS:
        # ml_collections reports an unreadable config file only when the value is first used.
        value = holder.value
        if value is None:
            if required:
                usage_exit(f"--{holder.name} is required")
            continue
        try:
            value.to_dict()
        except OSError as e:
            usage_exit(f"--{holder.name}: {e}")
    return rest


def interrupted_exit() -> None:
    """Ctrl-C: one line and exit status 130 (128 + SIGINT, what a shell reports), no
    traceback. The library removes its temporaries while the KeyboardInterrupt unwinds:
    outputs are the old or the new one whole, and resumable ones keep every finished
    record (tests/launch/test_interrupt.py)."""
    sys.stderr.write(f"\n{_program()}: interrupted; rerun the same command to resume or "
                     "redo the work\n")
    sys.stderr.flush()
    sys.exit(EXIT_INTERRUPTED)


def run(main) -> None:
    """`app.run(main)` with user errors (`UsageError`, absl's UsageError and flag
    validation errors) reported in one line with exit status 2, and Ctrl-C (SIGINT)
    with one line and exit status 130."""
    def checked_main(argv):
        try:
            result = _announced(main, argv)
        except (app.UsageError, flags.ValidationError) as e:
            usage_exit(e)
        except KeyboardInterrupt:
            pass
        else:
            # The work is done and its outputs are complete; the interpreter's shutdown can
            # take a second (torch, JAX), and a Ctrl-C then would only print a traceback.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            return result
        # Outside the handler the traceback's frames are freed, so their progress bars
        # close (and print) before the message, which stays the last line.
        interrupted_exit()

    app.run(checked_main, flags_parser=_parse_flags)


def _announced(main, argv):
    """main(argv); with --distributed, an error leaving it is first announced to the job's
    other processes (fdpo.sharding.announce_failure), so that those waiting for this one at
    a barrier stop at once, naming it."""
    if not DISTRIBUTED.value:
        return main(argv)
    from fdpo import sharding  # imports jax: only multi-host runs pay for it here

    with sharding.failures_announced():
        return main(argv)


# ---------------------------------------------------------------- checks made before any work

def check(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def many_errors(lines) -> UsageError:
    """The UsageError for several input errors (bad lines of a file, say): every one but the
    first goes to stderr on its own line, the first (with the count) is the error's one line."""
    lines = [str(ln) for ln in lines]
    for line in lines[1:]:
        sys.stderr.write(f"  {line}\n")
    more = f" (and {len(lines) - 1} more, listed above)" if len(lines) > 1 else ""
    return UsageError(lines[0] + more)


def check_number(name: str, value, *, lo=None, hi=None, lo_open=False, integer=False) -> None:
    """`value` of flag or config field `name` is a finite number (an int with `integer`) in
    [lo, hi] (or (lo, hi] with `lo_open`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and not isinstance(value, int)):
        raise UsageError(f"{name}={value!r}: expected {'an integer' if integer else 'a number'}")
    if not math.isfinite(value):
        raise UsageError(f"{name}={value}: must be a finite number")
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    if low_bad or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise UsageError(f"{name}={value}: must be in {'(' if lo_open else '['}{lo_s}, {hi_s}]")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise UsageError(f"{name}={value!r}: expected one of {tuple(allowed)}")


def check_readable_file(name: str, path) -> None:
    if path is None:
        raise UsageError(f"{name} is required")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise UsageError(f"{name}={path}: cannot read: {e.strerror or e}") from None


def check_dir(name: str, path) -> None:
    if path is None:
        raise UsageError(f"{name} is required")
    if not os.path.isdir(path):
        raise UsageError(f"{name}={path}: no such directory")


def check_output(name: str, path, *, directory: bool = False,
                 make_parents: bool = False) -> None:
    """An output file (or directory) can be written: its parent exists (with
    `make_parents`, for programs that create it: its nearest existing ancestor) and is
    writable, and an existing output is writable too."""
    if path is None:
        raise UsageError(f"{name} is required")
    p = pathlib.Path(path).absolute()
    parent = p.parent
    if make_parents:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{name}={path}: the parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{name}={path}: cannot write in {parent}")
    if p.exists():
        if directory and not p.is_dir():
            raise UsageError(f"{name}={path}: exists and is not a directory")
        if not directory and p.is_dir():
            raise UsageError(f"{name}={path}: is a directory")
        if not os.access(p, os.W_OK):
            raise UsageError(f"{name}={path}: not writable")


# ---------------------------------------------------------------- programs that use JAX

MESH_SHAPE = flags.DEFINE_list(
    "mesh_shape", ["1", "-1", "1"],
    "Device mesh (data, fsdp, tensor); one -1 takes the remaining devices.")
DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() first (multi-host TPU pods and GPU clusters).")
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "With --distributed: host:port of process 0 (default: detected from the cluster).")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "With --distributed: number of processes (default: detected).")
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "With --distributed: this process's index (default: detected).")


def check_mesh_shape(mesh_shape=None) -> None:
    shape = mesh_shape if mesh_shape is not None else MESH_SHAPE.value
    try:
        dims = [int(s) for s in shape]
    except (TypeError, ValueError):
        raise UsageError(f"--mesh_shape={shape}: expected integers") from None
    if len(dims) != 3 or dims.count(-1) > 1 or any(d == 0 or d < -1 for d in dims):
        raise UsageError(f"--mesh_shape={shape}: expected 3 sizes (data, fsdp, tensor), "
                         "positive or one -1")


def init_jax(mesh_shape=None):
    """JAX set-up from the flags (multi-host when --distributed); returns the mesh:
    `mesh_shape` when given (a run config's), else --mesh_shape."""
    from fdpo import runtime  # imports jax: only the programs that use it pay for it

    try:
        return runtime.init(mesh_shape if mesh_shape is not None else MESH_SHAPE.value,
                            distributed=DISTRIBUTED.value,
                            coordinator_address=COORDINATOR.value,
                            num_processes=NUM_PROCESSES.value, process_id=PROCESS_ID.value)
    except runtime.PinError as e:  # the environment's FDPO_CPU_* pins
        raise UsageError(str(e)) from e
    except ValueError as e:
        raise UsageError(f"--mesh_shape: {e}") from e


def model_files(checkpoint: str | None, hf_dir: str | None):
    """`fdpo.policy.ModelFiles` of --checkpoint or --hf_dir (config and tokenizer, no
    weights), with its checks (a tokenizer larger than the embedding table, a missing or
    unreadable model) as usage errors. Pass it to `Policy.load(files=...)`."""
    from fdpo.policy import ModelFiles, VocabError  # imports jax

    quiet_tokenizers()
    try:
        return ModelFiles.read(checkpoint=checkpoint, hf_dir=hf_dir)
    except VocabError as e:
        raise UsageError(str(e)) from None
    except (OSError, ValueError) as e:
        flag = f"--checkpoint={checkpoint}" if checkpoint else f"--hf_dir={hf_dir}"
        raise UsageError(f"{flag}: {e}") from None


def quiet_tokenizers():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
