"""Sandboxed execution of untrusted Python programs against tests, for self-verification
(code x test pass matrices) and benchmark evaluation.

A *cell* is one (code, test) pair: the code is executed, then the test, in one fresh
namespace; the cell passes when neither raises within the time limit. A *problem* is
codes x tests, all cells of one input line.

Threat model, guarantees, what is not guaranteed, and the weaker modes: docs/sandbox.md
(the one description). In short: a read-only view of the interpreter, a wiped size-capped
tmpfs, an unprivileged per-worker uid, no network, PID 1 judge that kills every straggler
before it writes a verdict, rlimits and a cgroup, verdicts from observation (a keyed
message after the test returned plus a clean exit), never from the program's output.
isolation="no_cgroup" drops the cgroup; isolation="none" drops the namespaces (trusted
code only; its scratch directory is made under `scratch_dir`, and it needs a Python
installation other users can read).

Processes and threads. The host never forks Python: sandboxes are started with
`subprocess.Popen` (fork+exec in C, no Python code between them), so this module is safe
to call from a process that has JAX or any other threaded runtime loaded. Worker threads
only wait on pipes. Program processes are forked inside the sandbox from the judge, a
freshly exec'd single-threaded interpreter.

Statuses: pass, fail (AssertionError), error (any other exception, code that does not
compile, a misbehaving verdict channel), timeout, crash (died without a verdict: signal,
os._exit, CPU or memory limit kill), sandbox_error (the sandbox itself failed; never
produced by the program's own behaviour alone except when it exhausts the sandbox).
When the code itself fails to load (exception, crash, or time-out before the code has
finished executing), that verdict is given to all of that code's tests without re-running
it.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import json
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from typing import Iterable, Iterator, Sequence

STATUSES = ("pass", "fail", "error", "timeout", "crash", "sandbox_error")
ISOLATION_MODES = ("full", "no_cgroup", "none")
HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_harness.py")

# Imported by the judge once per sandbox so that cells do not pay for them; the state of
# these modules is copied into each cell by fork, so nothing leaks between cells.
DEFAULT_PRELOAD = (
    "array", "bisect", "cmath", "collections", "copy", "dataclasses", "datetime", "decimal",
    "enum", "fractions", "functools", "hashlib", "heapq", "itertools", "json", "math",
    "numbers", "operator", "random", "re", "statistics", "string", "textwrap", "typing",
)

# Per-worker uids, outside the usual system/user ranges. Spread by host pid so two
# executors on one machine do not share RLIMIT_NPROC counters.
_UID_BASE = 200_000
_INSTANCES = itertools.count()
_MAX_WORKERS = 64
# Memory the judge and the scratch tmpfs may use on top of the program's own.
_JUDGE_MEMORY_MB = 128
_JUDGE_TASKS = 8
# The judge answers each cell within timeout + clean-up; beyond this the host gives up.
_JUDGE_GRACE_S = 30.0
_MAX_STDERR = 16384
_JOBS_PER_SANDBOX = 1000
_PATH = "/usr/local/bin:/usr/bin:/bin"


class IsolationUnavailable(RuntimeError):
    """The requested isolation mode cannot be provided on this machine."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits. `timeout_s` is wall-clock per cell (code load + test)."""

    timeout_s: float = 10.0
    memory_mb: int = 1024  # RLIMIT_AS per process, and the cgroup's memory for the programs
    max_procs: int = 64  # processes + threads of one cell (RLIMIT_NPROC and pids cgroup)
    file_size_mb: int = 16  # RLIMIT_FSIZE
    scratch_mb: int = 64  # size of the writable /tmp
    max_open_files: int = 256  # RLIMIT_NOFILE

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        for name in ("memory_mb", "max_procs", "file_size_mb", "scratch_mb", "max_open_files"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def rlimits(self) -> dict[str, int]:
        mib = 1 << 20
        return {
            "RLIMIT_AS": self.memory_mb * mib,
            # Backstop for the wall-clock limit; CPU seconds are per process.
            "RLIMIT_CPU": int(self.timeout_s) + 1,
            "RLIMIT_FSIZE": self.file_size_mb * mib,
            "RLIMIT_NOFILE": self.max_open_files,
            "RLIMIT_NPROC": self.max_procs,
            "RLIMIT_CORE": 0,
        }


@dataclasses.dataclass
class ProblemResult:
    passed: list[list[bool]]
    status: list[list[str]]
    detail: list[list[str]]
    time_s: list[list[float]]
    wall_s: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def validate_problem(obj, where: str) -> None:
    """Raises ValueError naming `where` (e.g. "in.jsonl:12") when `obj` is not a problem."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    pid = obj.get("id")
    if not isinstance(pid, str) or not pid:
        raise ValueError(f"{where}: 'id' must be a non-empty string, got {pid!r}")
    for key in ("codes", "tests"):
        val = obj.get(key)
        if not isinstance(val, list):
            raise ValueError(f"{where}: '{key}' must be a list of strings (id {pid!r})")
        for k, item in enumerate(val):
            if not isinstance(item, str):
                raise ValueError(
                    f"{where}: '{key}[{k}]' must be a string, got {type(item).__name__} "
                    f"(id {pid!r})"
                )


class _Cgroups:
    """One memory+pids cgroup per worker slot (cgroup v2, or v1 memory and pids
    hierarchies). Created on start, removed on close."""

    def __init__(self, workers: int, limits: Limits, tag: str):
        self.dirs: list[list[str]] = []  # per slot: the cgroup dirs to join
        mem = (limits.memory_mb + limits.scratch_mb + _JUDGE_MEMORY_MB) << 20
        tasks = limits.max_procs + _JUDGE_TASKS
        v2 = "/sys/fs/cgroup"
        try:
            if os.path.exists(os.path.join(v2, "cgroup.controllers")):
                with open(os.path.join(v2, "cgroup.controllers")) as f:
                    have = f.read().split()
                if "memory" not in have or "pids" not in have:
                    raise OSError(f"cgroup v2 at {v2} lacks the memory or pids controller")
                _write(os.path.join(v2, "cgroup.subtree_control"), "+memory +pids")
                for s in range(workers):
                    d = os.path.join(v2, f"{tag}-{s}")
                    os.makedirs(d, exist_ok=True)
                    _write(os.path.join(d, "memory.max"), str(mem))
                    _write_try(os.path.join(d, "memory.swap.max"), "0")
                    _write(os.path.join(d, "pids.max"), str(tasks))
                    self.dirs.append([d])
            else:
                mroot, proot = "/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids"
                for root in (mroot, proot):
                    if not os.path.exists(os.path.join(root, "cgroup.procs")):
                        raise OSError(f"no cgroup v2 and no cgroup v1 hierarchy at {root}")
                for s in range(workers):
                    md = os.path.join(mroot, f"{tag}-{s}")
                    pd = os.path.join(proot, f"{tag}-{s}")
                    os.makedirs(md, exist_ok=True)
                    os.makedirs(pd, exist_ok=True)
                    _write(os.path.join(md, "memory.limit_in_bytes"), str(mem))
                    _write_try(os.path.join(md, "memory.memsw.limit_in_bytes"), str(mem))
                    _write(os.path.join(pd, "pids.max"), str(tasks))
                    self.dirs.append([md, pd])
        except OSError as e:
            self.close()
            raise IsolationUnavailable(
                f"isolation='full' needs writable cgroups (memory and pids): {e}. "
                "Run as root on a machine with cgroups, or choose isolation='no_cgroup' "
                "(--config.isolation=no_cgroup in the programs) to rely on per-process "
                "rlimits only."
            ) from e

    @staticmethod
    def sweep_stale():
        """Removes empty cgroups left by executors whose process died without closing
        (rmdir only succeeds on an empty cgroup, so live ones are never touched)."""
        for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids"):
            try:
                names = os.listdir(root)
            except OSError:
                continue
            for name in names:
                parts = name.split("-")
                if len(parts) != 5 or parts[:2] != ["fdpo", "exec"] or not parts[2].isdigit():
                    continue
                if int(parts[2]) != os.getpid() and not os.path.exists(f"/proc/{parts[2]}"):
                    try:
                        os.rmdir(os.path.join(root, name))
                    except OSError:
                        pass

    def procs_files(self, slot: int) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs[slot]]

    def wait_empty(self, slot: int, timeout: float = 10.0) -> bool:
        """After a forced kill, the namespace dies asynchronously; wait for it so the next
        sandbox of this slot starts with an empty cgroup."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all(not _read(p).strip() for p in self.procs_files(slot)):
                return True
            time.sleep(0.01)
        return False

    def close(self):
        # Sandboxes may still be dying (e.g. at interpreter exit the pool threads end
        # first and take their bwrap processes with them): wait for the cgroups to empty,
        # and kill what is left in them, which can only be this executor's sandboxes.
        for slot, dirs in enumerate(self.dirs):
            if not self.wait_empty(slot, timeout=2.0):
                for pid in {int(x) for p in self.procs_files(slot) for x in _read(p).split()}:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                self.wait_empty(slot, timeout=5.0)
            for d in dirs:
                try:
                    os.rmdir(d)
                except OSError:
                    pass
        self.dirs = []


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _write_try(path, text):
    try:
        _write(path, text)
    except OSError:
        pass


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


SITE_MOUNT = "/fdpo/site-packages"  # where a venv's site-packages appear in the sandbox


def _python_layout(python: str) -> tuple[str, list[str], list[str]]:
    """(interpreter to run in the sandbox, directories to bind at their own paths,
    site-packages directories to bind under SITE_MOUNT).

    The sandbox runs the *base* interpreter, with a virtual environment's site-packages
    bound at a neutral path (the judge puts them on sys.path). A venv may live under /tmp
    (CI clones often do), which the sandbox's scratch tmpfs would hide.
    """
    out = subprocess.run(
        [python, "-I", "-c",
         "import os, site, sys; print(os.path.realpath(sys.executable)); "
         "print(sys.base_prefix); print(sys.base_exec_prefix); print(sys.prefix); "
         "print('\\n'.join(site.getsitepackages()))"],
        capture_output=True, text=True, env={"PATH": _PATH}, check=False,
    )
    if out.returncode != 0:
        raise IsolationUnavailable(f"cannot run the interpreter {python!r}: {out.stderr.strip()}")
    exe, base, base_exec, prefix, *site_dirs = out.stdout.split("\n")
    site_dirs = [d for d in site_dirs if d]
    roots = sorted({os.path.realpath(base), os.path.realpath(base_exec),
                    os.path.dirname(exe)})
    venv_sites = []
    if os.path.realpath(prefix) != os.path.realpath(base):
        venv_sites = [os.path.realpath(d) for d in site_dirs if os.path.isdir(d)]
    return exe, roots, venv_sites


def blocked_for_others(path: str) -> str | None:
    """Why a user that is neither owner nor group member cannot read `path` (a directory):
    the first ancestor without search permission for others, or the directory itself
    without read permission; None when it can."""
    path = os.path.realpath(path)
    parts = path.strip("/").split("/")
    for k in range(len(parts) + 1):
        d = "/" + "/".join(parts[:k])
        mode = os.stat(d).st_mode
        if not mode & 0o001:
            return f"{d} has mode {mode & 0o7777:04o} (others may not enter it)"
    if not os.stat(path).st_mode & 0o004:
        return f"{path} has mode {os.stat(path).st_mode & 0o7777:04o} (others may not list it)"
    return None


def _bwrap_args(python: str, roots: Sequence[str], limits: Limits,
                venv_sites: Sequence[str] = ()) -> list[str]:
    args = [
        "bwrap",
        # Namespaces: no network, own PIDs (judge is PID 1), IPC, hostname, cgroup view.
        "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
        "--unshare-cgroup-try", "--hostname", "sandbox",
        "--die-with-parent", "--as-pid-1", "--new-session",
        "--clearenv", "--setenv", "PATH", _PATH, "--setenv", "HOME", "/tmp",
        "--setenv", "TMPDIR", "/tmp", "--setenv", "LANG", "C.UTF-8",
        "--ro-bind", "/usr", "/usr",
    ]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    for f in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/localtime", "/etc/passwd",
              "/etc/group", "/etc/nsswitch.conf"):
        args += ["--ro-bind-try", f, f]
    made = set()
    for root in roots:
        if root == "/usr" or root.startswith("/usr/") or not os.path.isdir(root):
            continue
        # bwrap would create missing parents with mode 0700, unreadable to the cell's uid.
        parts = root.strip("/").split("/")
        for k in range(1, len(parts)):
            parent = "/" + "/".join(parts[:k])
            if parent not in made:
                args += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        args += ["--ro-bind", root, root]
    args += ["--perms", "0755", "--dir", "/fdpo"]
    for k, site_dir in enumerate(venv_sites):
        args += ["--ro-bind", site_dir, f"{SITE_MOUNT}-{k}"]
    args += [
        "--ro-bind", HARNESS, "/fdpo/harness.py",
        "--proc", "/proc", "--dev", "/dev",
        "--perms", "1777", "--size", str(limits.scratch_mb << 20), "--tmpfs", "/tmp",
        "--chdir", "/tmp",
        # Only for the judge's own set-up; it drops them all before any cell runs.
        "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
        "--cap-add", "CAP_SYS_RESOURCE", "--cap-add", "CAP_SETPCAP",
        python, "-I", "-B", "/fdpo/harness.py",
    ]
    return args


def check_isolation(isolation: str) -> None:
    """Raises IsolationUnavailable with what is missing for `isolation`."""
    if isolation not in ISOLATION_MODES:
        raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
    if isolation == "none":
        return
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the sandbox drops to a per-worker uid itself)")
    if shutil.which("bwrap") is None:
        missing.append("bubblewrap (apt-get install bubblewrap)")
    if isolation == "full" and not (
        os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        or os.path.exists("/sys/fs/cgroup/memory/cgroup.procs")
    ):
        missing.append("cgroups (v2, or v1 memory and pids)")
    if missing:
        raise IsolationUnavailable(
            f"isolation={isolation!r} needs " + ", ".join(missing) + ". Fix that, or ask "
            "explicitly for a weaker mode: isolation='no_cgroup' (bwrap, no cgroup) or "
            "isolation='none' (rlimits only, no namespaces; unsafe for untrusted code)."
        )


class Executor:
    """Runs problems in sandboxes. Use as a context manager (it owns cgroups).

        with Executor(Limits(timeout_s=5), workers=2) as ex:
            for pid, res in ex.map(problems): ...
    """

    def __init__(
        self,
        limits: Limits = Limits(),
        workers: int | None = None,
        isolation: str = "full",
        python: str | None = None,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        scratch_dir: str | None = None,
    ):
        """`scratch_dir`: where isolation="none" makes each sandbox's working directory
        (default: tempfile.gettempdir()); the bwrap modes use the sandbox's own tmpfs."""
        check_isolation(isolation)
        self.limits = limits
        self.workers = int(workers or os.cpu_count() or 1)
        if not 1 <= self.workers <= _MAX_WORKERS:
            raise ValueError(f"workers must be in [1, {_MAX_WORKERS}], got {self.workers}")
        self.isolation = isolation
        self.python = python or sys.executable
        self.preload = list(preload)
        self.scratch_dir = scratch_dir or tempfile.gettempdir()
        if isolation == "none" and not os.path.isdir(self.scratch_dir):
            raise IsolationUnavailable(
                f"isolation='none': the scratch directory {self.scratch_dir!r} does not exist")
        # Unique per executor instance (host pid, instance counter): two executors never
        # share a uid's RLIMIT_NPROC counter or a cgroup.
        instance = next(_INSTANCES)
        block = (os.getpid() * 16 + instance) % 65536
        self._uids = [_UID_BASE + block * _MAX_WORKERS + s for s in range(self.workers)]
        exe, roots, venv_sites = _python_layout(self.python)
        if isolation != "none":
            for root in roots:
                if root == "/tmp" or root.startswith("/tmp/"):
                    raise IsolationUnavailable(
                        f"the Python installation {root} lies under /tmp, which the sandbox "
                        "replaces with its scratch directory; use an interpreter installed "
                        "elsewhere")
            self._bwrap = _bwrap_args(exe, roots, limits, venv_sites)
        else:
            self._bwrap = None
            if os.geteuid() == 0:  # programs run as a per-worker uid that is not the owner
                for path in roots + venv_sites:
                    blocked = blocked_for_others(path)
                    if blocked:
                        raise IsolationUnavailable(
                            f"isolation='none' runs programs as an unprivileged uid, which "
                            f"cannot read the Python installation at {path}: {blocked}. Use "
                            "isolation='no_cgroup' or 'full' (they show the interpreter at "
                            "a neutral path), or python= an interpreter other users can read")
        if isolation == "full":
            _Cgroups.sweep_stale()
        self._cgroups = (
            _Cgroups(self.workers, limits, f"fdpo-exec-{os.getpid()}-{instance}")
            if isolation == "full" else None
        )
        self._sandboxes: list[_Sandbox | None] = [None] * self.workers
        # Sandboxes are only ever started from these threads, which live as long as the
        # executor: bwrap's --die-with-parent is PR_SET_PDEATHSIG, which fires when the
        # *thread* that spawned it exits, not the process. A sandbox started from a
        # caller's short-lived thread would die under the next caller.
        self._pool = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="fdpo-exec")
        self._slots: queue.Queue[int] = queue.Queue()
        for s in range(self.workers):
            self._slots.put(s)
        # An executor that is never closed still releases its sandboxes and cgroups.
        self._finalizer = weakref.finalize(self, Executor._cleanup, self._sandboxes,
                                           self._cgroups, self._pool)
        # Installed is not working (e.g. bwrap in a container without the privileges it
        # needs): check with one trivial cell now rather than report every cell as a
        # sandbox_error later.
        probe = self.run(["x = 1"], ["assert x == 1"])
        if probe.status != [["pass"]]:
            self.close()
            where = (f" (scratch under {self.scratch_dir!r})" if isolation == "none" else "")
            raise IsolationUnavailable(
                f"isolation={isolation!r}: the sandbox does not work on this machine{where} "
                f"({probe.status[0][0]}: {probe.detail[0][0]})"
            )

    @property
    def uids(self) -> list[int]:
        """The uids programs run as (one per worker slot); useful to audit stragglers."""
        return list(self._uids)

    def close(self):
        self._finalizer()

    @staticmethod
    def _cleanup(sandboxes, cgroups, pool):
        for k, sb in enumerate(sandboxes):
            if sb is not None:
                sb.close()
            sandboxes[k] = None
        if cgroups is not None:
            cgroups.close()
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: queued problems never start

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- one problem --------------------------------------------------------------------
    def run(self, codes: Sequence[str], tests: Sequence[str]) -> ProblemResult:
        """Runs all cells of one problem in one sandbox (blocks for a free worker slot).
        Safe to call from any number of threads."""
        return self._pool.submit(self._run_any_slot, list(codes), list(tests)).result()

    def _run_any_slot(self, codes: list[str], tests: list[str]) -> ProblemResult:
        slot = self._slots.get()
        try:
            return self._run_in_slot(codes, tests, slot)
        finally:
            self._slots.put(slot)

    def _run_in_slot(self, codes: list[str], tests: list[str], slot: int) -> ProblemResult:
        n_c, n_t = len(codes), len(tests)
        status = [[None] * n_t for _ in range(n_c)]
        detail = [[""] * n_t for _ in range(n_c)]
        secs = [[0.0] * n_t for _ in range(n_c)]
        start = time.monotonic()
        if n_c and n_t:
            sb = self._sandboxes[slot]
            if (sb is None or sb.jobs >= _JOBS_PER_SANDBOX or sb.proc is None
                    or sb.proc.poll() is not None):
                if sb is not None:
                    sb.close(force=sb.proc is not None and sb.proc.poll() is not None)
                sb = self._sandboxes[slot] = _Sandbox(self, slot)
            if not sb.run(codes, tests, status, detail, secs):
                sb.close(force=True)
                self._sandboxes[slot] = None
            _fill(status, detail, "sandbox_error", "the judge gave no verdict")  # never expected
        return ProblemResult(
            passed=[[s == "pass" for s in row] for row in status],
            status=status, detail=detail, time_s=secs,
            wall_s=round(time.monotonic() - start, 6),
        )

    # -- many problems ------------------------------------------------------------------
    def map(self, problems: Iterable[dict]) -> Iterator[tuple[str, ProblemResult]]:
        """Yields (id, result) as problems finish (not in input order). Problems are
        validated as they are consumed; at most 2 x workers are in flight."""
        pending: dict[cf.Future, str] = {}
        it = iter(problems)
        exhausted = False
        k = 0
        while True:
            while not exhausted and len(pending) < 2 * self.workers:
                try:
                    p = next(it)
                except StopIteration:
                    exhausted = True
                    break
                validate_problem(p, f"problem #{k}")
                k += 1
                fut = self._pool.submit(self._run_any_slot, list(p["codes"]), list(p["tests"]))
                pending[fut] = p["id"]
            if not pending:
                return
            finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                yield pending.pop(fut), fut.result()


class _Sandbox:
    """One judge process (in its bwrap sandbox unless isolation="none") serving the jobs
    of one worker slot, one at a time. Reusing it across problems carries nothing from one
    cell to the next: each cell is a fresh fork of the judge, and after each cell all other
    processes are killed and the scratch directory is wiped. It is replaced after
    _JOBS_PER_SANDBOX jobs and whenever it misbehaves."""

    def __init__(self, ex: "Executor", slot: int):
        self.ex, self.slot, self.jobs = ex, slot, 0
        self.nonce = os.urandom(16).hex()
        self.pid1 = ex.isolation != "none"
        self.scratch = ("/tmp" if self.pid1
                        else tempfile.mkdtemp(prefix="fdpo-exec-", dir=ex.scratch_dir))
        uid = ex._uids[slot] if os.geteuid() == 0 else None
        cfg = {
            "nonce": self.nonce, "timeout": ex.limits.timeout_s, "pid1": self.pid1,
            "scratch": self.scratch, "uid": uid, "gid": uid,
            "limits": ex.limits.rlimits(), "preload": ex.preload,
        }
        if self.pid1:
            cmd = list(ex._bwrap)
            if ex._cgroups is not None:
                # Join the slot's cgroups before exec'ing bwrap, so that every process of
                # the sandbox is accounted from its first instruction.
                cmd = (["/bin/sh", "-c",
                        'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; '
                        'shift; exec "$@"', "fdpo-sandbox"]
                       + ex._cgroups.procs_files(slot) + ["--"] + cmd)
            cwd = "/"
        else:
            cmd = [ex.python, "-I", "-B", HARNESS]
            cwd = self.scratch
        self.stderr_tail = b""
        self.buf = b""
        self.start_error = None
        self.sel = None
        try:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={"PATH": _PATH}, cwd=cwd, close_fds=True, start_new_session=True,
            )
        except OSError as e:
            self.proc = None
            self.start_error = f"cannot start the sandbox: {e}"
            return
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.sel.register(self.proc.stderr, selectors.EVENT_READ)
        self._send(cfg)

    def _send(self, obj) -> bool:
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
            return True
        except OSError:  # BrokenPipeError included: the judge is gone
            return False

    def run(self, codes, tests, status, detail, secs) -> bool:
        """Fills the matrices; False when the sandbox failed (the caller replaces it)."""
        if self.proc is None:
            _fill(status, detail, "sandbox_error", self.start_error)
            return False
        self.jobs += 1
        jid = self.jobs
        ok = self._send({"j": jid, "codes": codes, "tests": tests})
        done = False
        idle = self.ex.limits.timeout_s + _JUDGE_GRACE_S
        last = time.monotonic()
        why = "sandbox exited"
        while ok and not done:
            events = self.sel.select(timeout=max(0.0, last + idle - time.monotonic()))
            if not events:
                why = "judge unresponsive"
                break
            for key, _ in events:
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    ok = False  # the judge is gone
                    break
                if key.fileobj is self.proc.stderr:
                    self.stderr_tail = (self.stderr_tail + chunk)[-_MAX_STDERR:]
                    continue
                last = time.monotonic()
                self.buf += chunk
                *lines, self.buf = self.buf.split(b"\n")
                for line in lines:
                    if _take_line(line, self.nonce, jid, status, detail, secs):
                        done = True
                if len(self.buf) > 1 << 20:  # the judge never writes such lines
                    ok, why = False, "garbage from the judge"
                    break
        if not done:
            self.close(force=True)
            rc = self.proc.returncode
            tail = self.stderr_tail.decode("utf-8", "replace").strip()[-500:]
            _fill(status, detail, "sandbox_error",
                  f"{why} (exit status {rc})" + (f": {tail}" if tail else ""))
            return False
        return True

    def close(self, force: bool = False):
        if self.proc is None or self.sel is None:
            return
        if self.proc.returncode is None:
            try:
                if not force:
                    self.proc.stdin.close()  # EOF: the judge finishes and exits
                    self.proc.wait(timeout=5)
            except (subprocess.TimeoutExpired, OSError):
                pass
            if self.proc.poll() is None:
                force = True
                self.proc.kill()  # bwrap: --die-with-parent takes the namespace down with it
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass
        self.sel.close()
        self.sel = None
        if force and self.ex._cgroups is not None:
            self.ex._cgroups.wait_empty(self.slot)
        if not self.pid1:
            shutil.rmtree(self.scratch, onerror=_force_rm)


def _take_line(line, nonce, jid, status, detail, secs) -> bool:
    """Records one judge line; True on the job's final line. Lines without the nonce or
    of another job are ignored (only the judge holds this pipe; they guard mix-ups)."""
    try:
        msg = json.loads(line)
    except ValueError:
        return False
    if not isinstance(msg, dict) or msg.get("n") != nonce or msg.get("j") != jid:
        return False
    if msg.get("done"):
        return True
    i, j = msg["c"], msg["t"]
    if msg["s"] not in STATUSES:
        return False
    status[i][j], detail[i][j], secs[i][j] = msg["s"], msg["d"], msg["w"]
    return False


def _fill(status, detail, what, why):
    for i, row in enumerate(status):
        for j, s in enumerate(row):
            if s is None:
                status[i][j], detail[i][j] = what, why


def _force_rm(func, path, _exc):
    try:
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        func(path)
    except OSError:
        pass


# -- convenience API -----------------------------------------------------------------------
def run_problems(
    problems: Iterable[dict],
    timeout: float,
    workers: int | None = None,
    memory_mb: int = 1024,
    isolation: str = "full",
    scratch_dir: str | None = None,
    **limits,
) -> Iterator[dict]:
    """Yields {"id", "passed", "status", "detail", "time_s", "wall_s"} per problem, in
    completion order. `limits` are further `Limits` fields (max_procs, file_size_mb, ...)."""
    lim = Limits(timeout_s=timeout, memory_mb=memory_mb, **limits)
    with Executor(lim, workers=workers, isolation=isolation, scratch_dir=scratch_dir) as ex:
        for pid, res in ex.map(problems):
            yield {"id": pid, **res.to_json()}
