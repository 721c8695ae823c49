"""In-sandbox judge for `fdpo.sandbox.executor`. Standard library only; never imported by the
host, only executed by a fresh interpreter (`python -I -B _harness.py`).

Protocol. The host writes JSON lines on stdin: first the configuration
    {"nonce", "timeout", "pid1", "scratch", "uid", "gid", "limits", "preload"}
then one job per problem, {"j": job_id, "codes": [...], "tests": [...]}, and closes stdin
to stop the judge. For each job the judge answers on stdout with one line per cell (code i,
test j), in order,
    {"n": nonce, "j": job_id, "c": i, "t": j, "s": status, "d": detail, "w": seconds}
and finally {"n": nonce, "j": job_id, "done": true}. Nothing else is written to stdout.

Each cell runs in a fresh child forked from this single-threaded, pre-loaded interpreter:
the child compiles and executes the code, then the test, in one namespace, and reports on a
per-cell pipe with a per-cell random key. Before user code runs the child drops stdin,
stdout and stderr to /dev/null, closes every other descriptor, and takes hard rlimits.
The parent observes the pipe, the child's exit status (through a pidfd) and a wall-clock
deadline, then kills every other process in the sandbox (`kill(-1)` from PID 1 in "pid1"
mode) and wipes the scratch directory before it writes the verdict. So a cell never
inherits processes, files or interpreter state from an earlier cell.

In "pid1" mode (the bwrap sandbox) this process is PID 1 of its own PID namespace:
signals from inside the namespace cannot kill it (the kernel drops them for an init with
default dispositions), it is not dumpable (so /proc/1/fd, /proc/1/mem and ptrace are closed
to the unprivileged cells), and when it exits the kernel kills whatever is left.
"""
import glob
import sys

# A virtual environment's site-packages, bound here by the host (the sandbox runs the base
# interpreter, see executor._python_layout), so programs can import what the venv has.
sys.path.extend(sorted(glob.glob("/fdpo/site-packages-*")))

import builtins  # noqa: E402
import ctypes
import gc
import json
import os
import resource
import select
import signal
import time

# Captured once, before any user code exists anywhere, so a cell that rebinds these names
# in builtins or os only affects itself.
_BaseException = BaseException
_AssertionError = AssertionError
_write = os.write
_exit = os._exit

PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
MAX_DETAIL = 300
MAX_CHANNEL_BYTES = 65536
STATUSES = ("pass", "fail", "error")  # what a child may report; the judge adds the rest

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option, arg):
    return _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0)


def _drop_privileges(uid, gid):
    """Root inside the sandbox becomes an unprivileged uid with no capabilities, so DAC,
    RLIMIT_NPROC (not enforced for root) and the ptrace rules all apply to the cells."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            # The cgroup OOM killer must pick the memory hog, never the judge.
            f.write("-1000")
    except OSError:
        pass
    for cap in range(64):
        _prctl(PR_CAPBSET_DROP, cap)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _child(wfd, key, code, test, limits, devnull, oom_adj):
    """Runs in the forked child; never returns (the caller also wraps it in os._exit)."""
    # Everything used after user code starts is a local of this frame or of the closures
    # below: rebinding builtins (exec, isinstance, str, ...), `os`, `json`, or this
    # module's globals cannot change what is reported. The message is built from str and
    # bytes methods only, which cannot be monkeypatched.
    exec_, compile_, isinstance_, type_, str_ = exec, compile, isinstance, type, str
    write, exit_ = _write, _exit
    base_exc, assertion_error = _BaseException, _AssertionError
    max_detail = MAX_DETAIL

    def report(stage, status, detail):
        line = key + " " + stage + " " + status + " " + detail.encode("utf-8", "replace").hex()
        write(wfd, (line + "\n").encode())

    def describe(e):
        # Exceptions with a hostile __str__ only cost this cell its detail text.
        try:
            name = "" + type_(e).__name__
        except base_exc:
            name = "?"
        try:
            msg = "" + str_(e)
        except base_exc:
            msg = "<unprintable>"
        return (name + ": " + msg if msg else name)[:max_detail]

    try:
        os.setsid()
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.closerange(3, wfd)
        os.closerange(wfd + 1, 65536)
        if oom_adj:
            # The judge set -1000 for itself; a cell must be the OOM killer's first choice.
            # A non-dumpable task's /proc files are root-owned, hence the toggle.
            _prctl(PR_SET_DUMPABLE, 1)
            try:
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write("1000")
            except OSError:
                pass
            _prctl(PR_SET_DUMPABLE, 0)
        for name, value in limits.items():
            resource.setrlimit(getattr(resource, name), (value, value))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.modules.pop("__main__", None)  # `import __main__` would reach the judge
        ns = {"__name__": "__candidate__", "__builtins__": builtins}
    except base_exc as e:
        report("setup", "error", "harness setup: " + describe(e))
        exit_(0)

    try:
        exec_(compile_(code, "<code>", "exec"), ns)
    except base_exc as e:
        report("code", "error", "in code: " + describe(e))
        exit_(0)
    report("code_ok", "-", "")
    try:
        exec_(compile_(test, "<test>", "exec"), ns)
    except base_exc as e:
        report("test", "fail" if isinstance_(e, assertion_error) else "error", describe(e))
        exit_(0)
    report("test", "pass", "")
    exit_(0)


def _kill_everything_else(pid1, child):
    """PID 1: kill(-1) reaches every process in the namespace but us, daemons included;
    loop until nothing is left to signal and every zombie (re-parented to us) is reaped."""
    if pid1:
        while True:
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                break
            _reap(block=True)
        _reap(block=True)
    else:
        # Weak mode: only the cell's session/process group can be found and killed.
        if child is not None:
            try:
                os.killpg(child, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.waitpid(child, 0)
            except ChildProcessError:
                pass
        _reap(block=False)


def _reap(block):
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _wipe(root_fd):
    """Empty the scratch directory between cells. Iterative and relative (chdir down and
    back up with a stack of names), so arbitrarily deep trees cannot exhaust the judge's
    recursion limit or PATH_MAX. Entries without permissions are ours (same uid): chmod
    them. Each descent is checked against the entry's inode, so a directory swapped for a
    symlink (possible only in the weak mode, where stragglers may survive) is not
    followed. `root_fd` is the scratch directory, opened before privileges were dropped."""
    os.fchdir(root_fd)
    names = []
    while True:
        descended = False
        with os.scandir(".") as it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        os.chmod(e.name, 0o700)
                        os.chdir(e.name)
                        here = os.stat(".")
                        if (here.st_ino, here.st_dev) != (st.st_ino, st.st_dev):
                            raise OSError(f"scratch entry {e.name!r} changed under the judge")
                        names.append(e.name)
                        descended = True
                        break
                    os.unlink(e.name)
                except FileNotFoundError:
                    pass
        if descended:
            continue
        if not names:
            return
        os.chdir("..")
        os.rmdir(names.pop())


def _run_cell(cfg, code, test, devnull):
    """Returns (status, detail, seconds, code_loaded)."""
    pid1 = cfg["pid1"]
    timeout = cfg["timeout"]
    key = os.urandom(16).hex()
    r, w = os.pipe()
    start = time.monotonic()
    try:
        pid = os.fork()
    except OSError as e:  # e.g. EAGAIN while the kernel still tears down a fork bomb
        os.close(r)
        os.close(w)
        _kill_everything_else(pid1, None)
        return "sandbox_error", f"judge could not fork: {e}", 0.0, True
    if pid == 0:
        try:
            os.close(r)
            _child(w, key, code, test, cfg["limits"], devnull, cfg["oom_adj"])
        finally:
            _exit(70)  # whatever happens, a child never runs judge code after this point
    os.close(w)
    pidfd = os.pidfd_open(pid)
    deadline = start + timeout
    buf = b""
    eof = False
    exited = None  # wait status once the child is gone
    poller = select.poll()
    poller.register(r, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    while exited is None or not eof:
        now = time.monotonic()
        if now >= deadline:
            break
        events = poller.poll(max(1, int((deadline - now) * 1000)))
        for fd, _ in events:
            if fd == r and not eof:
                chunk = os.read(r, 65536)
                if not chunk:
                    eof = True
                    poller.unregister(r)
                elif len(buf) < MAX_CHANNEL_BYTES:
                    buf += chunk
            elif fd == pidfd and exited is None:
                _, exited = os.waitpid(pid, 0)
                poller.unregister(pidfd)
        if exited is not None and not eof:
            # The child is gone; whatever it wrote is in the pipe unless a surviving
            # descendant holds the write end. Drain what is there without blocking.
            while select.select([r], [], [], 0)[0]:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                if len(buf) < MAX_CHANNEL_BYTES:
                    buf += chunk
            break
    elapsed = time.monotonic() - start
    timed_out = exited is None
    _kill_everything_else(pid1, pid)
    if exited is None:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    os.close(r)
    os.close(pidfd)
    _wipe(cfg["scratch_fd"])

    code_loaded = False
    verdicts = []
    junk = False
    for line in buf.split(b"\n"):
        if not line:
            continue
        parts = line.split(b" ")
        if len(parts) != 4 or parts[0] != key.encode():
            junk = True
            continue
        try:
            stage, status = parts[1].decode(), parts[2].decode()
            detail = bytes.fromhex(parts[3].decode()).decode("utf-8", "replace")
        except ValueError:  # includes UnicodeDecodeError
            junk = True
            continue
        if stage == "code_ok":
            code_loaded = True
        elif stage in ("setup", "code", "test") and status in STATUSES:
            verdicts.append({"stage": stage, "s": status, "d": detail})
        else:
            junk = True
    if timed_out:
        return "timeout", f"no verdict within {timeout:g}s", elapsed, code_loaded
    if junk:
        return "error", "unexpected data on the verdict channel", elapsed, code_loaded
    if len(verdicts) > 1:
        return "error", "more than one verdict on the verdict channel", elapsed, code_loaded
    if os.WIFSIGNALED(exited):
        sig = os.WTERMSIG(exited)
        hint = " (possibly out of memory)" if sig == signal.SIGKILL else ""
        hint = " (CPU time limit)" if sig == signal.SIGXCPU else hint
        return "crash", f"killed by signal {sig}{hint}", elapsed, code_loaded
    code = os.WEXITSTATUS(exited)
    if not verdicts:
        return "crash", f"exited with code {code} before a verdict", elapsed, code_loaded
    if code != 0:
        return "crash", f"exited with code {code} after its verdict", elapsed, code_loaded
    v = verdicts[0]
    if v["stage"] in ("code", "setup"):
        return v["s"], v["d"], elapsed, False
    return v["s"], v["d"], elapsed, code_loaded


class _Lines:
    """Newline-delimited reader on a raw fd (no Python buffering shared with anything)."""

    def __init__(self, fd):
        self.fd, self.buf = fd, b""

    def readline(self):
        while b"\n" not in self.buf:
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line


def main():
    # The host's pipes move to private descriptors; 0 and 1 become /dev/null so that
    # stray prints (ours or a preloaded module's) never reach the host.
    devnull = os.open(os.devnull, os.O_RDWR)
    inp, out = os.dup(0), os.dup(1)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    lines = _Lines(inp)
    cfg = json.loads(lines.readline())
    if cfg["pid1"]:
        # PID 1 only ignores in-namespace signals whose disposition is SIG_DFL.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    cfg["oom_adj"] = cfg["uid"] is not None and os.getuid() == 0
    # Before privileges are dropped (no user code exists yet): the modules stay importable
    # from sys.modules whatever the unprivileged uid may read.
    for name in cfg["preload"]:
        try:
            __import__(name)
        except ImportError:
            pass
    # Entered, and held as a descriptor, before privileges are dropped: the unprivileged
    # uid never resolves the scratch path again, so parents it cannot traverse (a /tmp at
    # 0700 in the weak mode) do not matter.
    os.chdir(cfg["scratch"])
    cfg["scratch_fd"] = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    if cfg["oom_adj"]:
        if not cfg["pid1"]:  # the sandbox's /tmp is already 1777; a host temp dir is not
            os.chown(".", cfg["uid"], cfg["gid"])
            os.chmod(".", 0o700)
        _drop_privileges(cfg["uid"], cfg["gid"])
    _prctl(PR_SET_DUMPABLE, 0)
    gc.collect()
    gc.freeze()  # keeps forked children from touching (and copying) the judge's pages

    nonce = cfg["nonce"]
    # One job (problem) per line until the host closes the pipe. Jobs share nothing: each
    # cell is a fresh fork of this process, and everything else is killed and wiped after it.
    while True:
        line = lines.readline()
        if line is None:
            return
        job = json.loads(line)
        jid = job["j"]
        for i, code in enumerate(job["codes"]):
            inherited = None  # a verdict that holds for every test of a code that never loads
            for j, test in enumerate(job["tests"]):
                if inherited is not None:
                    status, detail, secs = inherited[0], inherited[1], 0.0
                else:
                    status, detail, secs, loaded = _run_cell(cfg, code, test, devnull)
                    if status != "pass" and not loaded:
                        inherited = (status, detail)
                msg = {"n": nonce, "j": jid, "c": i, "t": j, "s": status, "d": detail,
                       "w": round(secs, 6)}
                _write_all(out, (json.dumps(msg) + "\n").encode())
        _write_all(out, (json.dumps({"n": nonce, "j": jid, "done": True}) + "\n").encode())


def _write_all(fd, data):
    while data:
        n = os.write(fd, data)
        data = data[n:]


if __name__ == "__main__":
    main()
