"""Attack suite for fdpo.sandbox.executor: one or more hostile programs per isolation point.

Each attack is run through the real sandbox (isolation="full"); the assertions are made on
the host (files, listeners, surviving processes) or on the verdicts. A missing mechanism
(no root, no bwrap, no cgroups) fails these tests loudly: CI installs what they need.
"""
import os
import pathlib
import shutil
import socket
import sys
import textwrap
import threading
import time

import psutil
import pytest

from fdpo.sandbox import executor as ex_mod
from fdpo.sandbox.executor import Executor, Limits
from tests.conftest import REPO
from tests.helpers.sandbox import python_others_can_read

pytestmark = pytest.mark.sandbox

TIMEOUT = 1.5


def _src(s):
    return textwrap.dedent(s).strip() + "\n"


@pytest.fixture(scope="module")
def ex():
    try:
        ex_mod.check_isolation("full")
    except ex_mod.IsolationUnavailable as e:
        pytest.fail(f"the full sandbox is unavailable here: {e}")
    with Executor(Limits(timeout_s=TIMEOUT, memory_mb=256, max_procs=32, file_size_mb=8,
                         scratch_mb=32), workers=2) as e:
        yield e


def _survivors(uids):
    """Processes running as a sandbox uid, other than the judges themselves (a judge is
    PID 1 of its namespace; it lives as long as its Executor)."""
    out = []
    for p in psutil.process_iter(["pid", "uids", "cmdline"]):
        try:
            if not (p.info["uids"] and p.info["uids"].real in uids):
                continue
            with open(f"/proc/{p.info['pid']}/status") as f:
                nspid = [ln.split()[1:] for ln in f if ln.startswith("NSpid:")][0]
            if nspid[-1] != "1":
                out.append((p.info["pid"], nspid, p.info["cmdline"]))
        except (psutil.Error, OSError):
            pass
    return out


def run1(ex, code, test="pass"):
    r = ex.run([code], [test])
    return r.status[0][0], r.detail[0][0]


# -- correctness basics -----------------------------------------------------------------------
def test_matrix_of_verdicts(ex):
    codes = ["def f(x):\n    return x + 1\n", "def f(x):\n    return x\n", "def f(:\n"]
    tests = ["assert f(1) == 2", "assert f(0) == 0", "assert f(2) == 3"]
    r = ex.run(codes, tests)
    assert r.status == [
        ["pass", "fail", "pass"],
        ["fail", "pass", "fail"],
        ["error", "error", "error"],
    ]
    assert r.passed[0] == [True, False, True]
    assert "SyntaxError" in r.detail[2][0]
    assert all(t >= 0 for row in r.time_s for t in row) and r.wall_s > 0


def test_exception_in_test_is_error_not_fail(ex):
    assert run1(ex, "def f(): return 1", "f(1)")[0] == "error"
    assert run1(ex, "def f(): return 1", "raise ValueError('x')") == ("error", "ValueError: x")


def test_empty_problem(ex):
    r = ex.run([], ["assert True"])
    assert r.status == [] and r.passed == []
    r = ex.run(["x = 1"], [])
    assert r.status == [[]]


# -- network -----------------------------------------------------------------------------------
def test_no_network(ex):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.1)
    port = srv.getsockname()[1]
    accepted = []

    def accept():
        end = time.time() + 4
        while time.time() < end:
            try:
                accepted.append(srv.accept())
            except socket.timeout:
                pass

    t = threading.Thread(target=accept)
    t.start()
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
    status, detail = run1(ex, code)
    # Also no other interface: only a loopback that is down.
    status2, _ = run1(ex, "import socket\nsocket.getaddrinfo('pypi.org', 443)\n")
    t.join()
    srv.close()
    assert status == "error", detail
    assert ("ConnectionRefused" in detail or "unreachable" in detail.lower()
            or "OSError" in detail), detail
    assert status2 == "error"
    assert accepted == []


# -- file system -------------------------------------------------------------------------------
def test_cannot_touch_files_outside_scratch(ex, tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("original")
    marker = f"fdpo-attack-{os.getpid()}"
    targets = [
        str(sentinel), str(tmp_path / "new.txt"), f"/root/{marker}", f"/work/{marker}",
        os.path.join(sys.prefix, marker), os.path.join(os.path.dirname(ex_mod.HARNESS), marker),
        f"/usr/{marker}", f"/etc/{marker}", f"/{marker}",
    ]
    code = _src(f"""
        import os, shutil
        hits = []
        for path in {targets!r}:
            for act in ("write", "remove", "rmtree"):
                try:
                    if act == "write":
                        with open(path, "w") as f:
                            f.write("pwned")
                    elif act == "remove":
                        os.remove(path)
                    else:
                        shutil.rmtree(os.path.dirname(path))
                    hits.append((act, path))
                except OSError:
                    pass
        try:
            os.remove("/fdpo/harness.py")
            hits.append("harness")
        except OSError:
            pass
        """)
    # Writes to the sandbox's own /tmp and $HOME succeed but live in the tmpfs.
    code += "open(os.path.expanduser('~/home_marker'), 'w').write('x')\n"
    code += f"open('/tmp/{marker}', 'w').write('x')\n"
    status, detail = run1(ex, code, "assert isinstance(hits, list)")
    assert status == "pass", detail
    assert sentinel.read_text() == "original"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sentinel.txt"]
    for path in targets[2:] + [f"/tmp/{marker}", "/root/home_marker", "/tmp/home_marker"]:
        assert not os.path.exists(path), path
    assert os.path.exists(ex_mod.HARNESS)


def test_cannot_see_host_files(ex):
    repo = str(REPO)
    code = _src(f"""
        import os
        def ls(p):
            try:
                return sorted(os.listdir(p))
            except OSError:
                return []
        repo, etc, home = ls({repo!r}), ls("/etc"), ls("/home")
        """)
    test = ("assert 'data_tools' not in repo and 'tests' not in repo, repo\n"
            "assert 'shadow' not in etc and 'hostname' not in etc, etc\n"
            "assert home == [], home\n")
    assert run1(ex, code, test) == ("pass", "")
    status, _ = run1(ex, "open('/etc/shadow').read()")
    assert status == "error"


def test_scratch_is_wiped_between_cells(ex):
    r = ex.run(["import os"], ["open('/tmp/leak', 'w').write('x'); os.mkdir('/tmp/d'); "
                               "os.chmod('/tmp/d', 0)",
                               "assert os.listdir('/tmp') == [], os.listdir('/tmp')"])
    assert r.status == [["pass", "pass"]], r.detail


def test_deep_and_locked_scratch_trees_are_wiped(ex):
    # Deeper than the judge's recursion limit and than PATH_MAX, with locked directories.
    code = _src("""
        import os
        os.chdir("/tmp")
        for k in range(3000):
            os.mkdir("d" * 200)
            os.chdir("d" * 200)
        open("leaf", "w").write("x")
        os.chdir("/tmp")
        os.mkdir("locked")
        open("locked/f", "w").write("x")
        os.chmod("locked", 0)
        """)
    r = ex.run([code, "import os"], ["assert True", "assert os.listdir('/tmp') == []"])
    # Code 0 rebuilds its tree before its own listdir (fail); code 1 starts from empty.
    assert r.status == [["pass", "fail"], ["pass", "pass"]], r.detail


# -- environment, stdin ------------------------------------------------------------------------
def test_no_inherited_secrets(monkeypatch):
    monkeypatch.setenv("FDPO_SECRET_TOKEN", "s3cr3t-value")
    with Executor(Limits(timeout_s=TIMEOUT), workers=1) as ex:
        code = _src("""
            import os
            env = dict(os.environ)
            try:
                judge_env = open("/proc/1/environ", "rb").read()
            except OSError:
                judge_env = b""
            """)
        test = ("assert 'FDPO_SECRET_TOKEN' not in env, env\n"
                "assert all('s3cr3t' not in v for v in env.values())\n"
                "assert b's3cr3t' not in judge_env\n"
                "assert set(env) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'PWD'}, env\n")
        assert run1(ex, code, test) == ("pass", "")


def test_stdin_is_at_eof(ex):
    assert run1(ex, "import sys\ndata = sys.stdin.read()", "assert data == ''") == ("pass", "")
    status, detail = run1(ex, "x = input()")
    assert status == "error" and "EOFError" in detail


# -- resources ---------------------------------------------------------------------------------
def test_memory_bomb_single_process(ex):
    status, detail = run1(ex, "x = b'x' * (2 << 30)")
    assert status == "error" and "MemoryError" in detail
    status, detail = run1(ex, "l = []\nwhile True:\n    l.append(b'x' * (16 << 20))")
    assert status == "error" and "MemoryError" in detail


def test_memory_bomb_many_processes_hits_the_cgroup(ex):
    # Each child stays under RLIMIT_AS (256 MiB) but together they exceed the cgroup.
    code = _src("""
        import os, time
        kids = []
        for _ in range(6):
            pid = os.fork()
            if pid == 0:
                b = b"x" * (150 << 20)
                time.sleep(0.3)
                os._exit(0)
            kids.append(pid)
        statuses = [os.waitpid(k, 0)[1] for k in kids]
        """)
    r = ex.run([code, "x = 1"], ["assert statuses == [0] * 6, statuses", "assert x == 1"])
    # Some children were OOM-killed (signal 9): the cell fails, or times out when reclaim
    # under the cgroup limit is slow on a loaded machine. It never passes.
    assert r.status[0][0] in ("fail", "timeout"), r.detail
    assert r.status[1][1] == "pass"  # the judge survived the OOM killer
    events = ""
    for dirs in ex._cgroups.dirs:
        for d in dirs:
            for name in ("memory.oom_control", "memory.events"):
                events += ex_mod._read(os.path.join(d, name))
    kills = [int(line.split()[1]) for line in events.splitlines() if line.startswith("oom_kill ")]
    assert sum(kills) > 0, events


def test_cpu_spin_times_out(ex):
    status, detail = run1(ex, "while True:\n    pass")
    assert status == "timeout", detail
    r = ex.run(["def f(): return 1"], ["while True: pass"])
    assert r.status == [["timeout"]] and TIMEOUT <= r.time_s[0][0] < TIMEOUT + 1


def test_fork_bomb(ex):
    code = _src("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """)
    r = ex.run(["x = 1", code, "y = 2"], ["assert True"])
    assert [row[0] for row in r.status] == ["pass", "timeout", "pass"], r.detail
    assert _survivors(set(ex.uids)) == []


def test_thread_bomb(ex):
    code = _src("""
        import threading, time
        n = 0
        while True:
            threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
            n += 1
        """)
    status, detail = run1(ex, code)
    assert status == "error" and "thread" in detail.lower(), detail
    assert run1(ex, "import threading\nt = threading.Thread(target=print)\nt.start()\nt.join()")[0] == "pass"


def test_huge_file(ex):
    status, detail = run1(ex, "open('/tmp/big', 'wb').write(b'x' * (64 << 20))")
    assert status == "error" and ("File too large" in detail or "space" in detail), detail
    # Many files under the size limit run into the tmpfs size instead.
    code = _src("""
        for k in range(8):
            with open(f"/tmp/f{k}", "wb") as f:
                f.write(b"x" * (7 << 20))
        """)
    status, detail = run1(ex, code)
    assert status == "error" and "No space" in detail, detail


def test_huge_output_never_reaches_the_host(ex):
    code = _src("""
        import sys, os
        for _ in range(256):
            sys.stdout.write("x" * (1 << 20))
            sys.stderr.write("y" * (1 << 20))
        os.write(1, b"pass\\n" * 100000)
        """)
    r = ex.run([code], ["print('pass')\nassert False"])
    assert r.status == [["fail"]], r.detail
    assert len(r.detail[0][0]) < 400


# -- processes ---------------------------------------------------------------------------------
def test_daemons_are_killed_before_the_verdict(ex):
    code = _src("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                while True:
                    try:
                        open("/tmp/daemon_alive", "w").write(str(time.time()))
                    except OSError:
                        pass
                    time.sleep(0.01)
            os._exit(0)
        time.sleep(0.1)
        """)
    probe = "import time\ntime.sleep(0.3)\nassert not os.path.exists('/tmp/daemon_alive')"
    r = ex.run([code, "import os"], ["assert os.path.exists('/tmp/daemon_alive')", probe])
    # Row 0: the daemon lives during its own cell (its file exists, then the probe sees it
    # again). Row 1 runs after row 0's daemons: a survivor would rewrite the file within
    # the probe's 0.3 s (the scratch was wiped in between).
    assert r.status == [["pass", "fail"], ["fail", "pass"]], r.detail
    assert _survivors(set(ex.uids)) == []


def test_killing_parent_or_group_does_not_hurt_the_executor(ex):
    attacks = [
        "import os\nos.kill(os.getppid(), 9)",
        "import os\nos.killpg(0, 9)",
        "import os\nos.kill(-1, 9)",
        "import os\nos.kill(1, 9)",
        "import os, signal\nos.kill(1, signal.SIGTERM)\nos.kill(1, signal.SIGINT)",
    ]
    problems = [{"id": f"attack{k}", "codes": [a, "z = 3"], "tests": ["assert True", "z = 1"]}
                for k, a in enumerate(attacks)]
    problems.append({"id": "benign", "codes": ["def f(): return 2"], "tests": ["assert f() == 2"]})
    results = dict(ex.map(problems))
    assert results["benign"].status == [["pass"]]
    for k in range(len(attacks)):
        st = results[f"attack{k}"].status
        assert "sandbox_error" not in st[0] + st[1], (k, results[f"attack{k}"].detail)
        assert st[1] == ["pass", "pass"], (k, st)
    assert results["attack1"].status[0][0] == "crash"  # killpg(0) only reaches itself
    # kill(-1) spares the caller and PID 1, and nothing else is left: ESRCH.
    assert results["attack2"].status[0][0] == "error"
    assert "ProcessLookupError" in results["attack2"].detail[0][0]


def test_judge_is_not_reachable_through_proc(ex):
    code = _src("""
        import os
        reached = []
        for path, mode in (("/proc/1/fd/1", "w"), ("/proc/1/mem", "rb"), ("/proc/1/environ", "rb")):
            try:
                open(path, mode)
                reached.append(path)
            except OSError:
                pass
        try:
            fds = os.listdir("/proc/1/fd")
            reached.append("/proc/1/fd")
        except OSError:
            pass
        """)
    assert run1(ex, code, "assert reached == [], reached") == ("pass", "")


def test_cells_run_unprivileged(ex):
    code = _src("""
        import ctypes, os
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
        libc = ctypes.CDLL(None, use_errno=True)
        traced = libc.ptrace(16, 1, 0, 0)  # PTRACE_ATTACH to the judge
        """)
    test = ("assert os.getuid() != 0 and os.getgid() != 0 and os.getgroups() == []\n"
            "assert int(status['CapEff'], 16) == 0 and int(status['CapPrm'], 16) == 0\n"
            "assert int(status['CapBnd'], 16) == 0\n"
            "assert status['NoNewPrivs'].strip() == '1'\n"
            "assert traced == -1\n"
            "import socket\ntry:\n    os.setuid(0)\nexcept PermissionError:\n    pass\n"
            "else:\n    raise RuntimeError('setuid(0) worked')\n")
    assert run1(ex, code, test) == ("pass", "")


# -- forged verdicts ---------------------------------------------------------------------------
FORGERIES = {
    "print_pass": ("print('pass')\nprint('{\"s\": \"pass\"}')", "assert False"),
    "os_exit_0": ("import os", "os._exit(0)\nassert False"),
    "sys_exit_0": ("import sys", "sys.exit(0)\nassert False"),
    "exit_in_code": ("import sys\nsys.exit(0)", "assert False"),
    "assertion_error_rebound": (
        "import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\n"
        "AssertionError = None",
        "assert False",
    ),
    "raise_rebound_assertion_error": (
        "import builtins\nclass Q(BaseException): pass\nbuiltins.AssertionError = Q",
        "raise AssertionError('nope')",
    ),
    "builtins_overwritten": ("__builtins__ = {}", "assert False"),
    "exec_and_compile_rebound": (
        "import builtins\nbuiltins.exec = lambda *a, **k: None\n"
        "builtins.compile = lambda *a, **k: None\nbuiltins.isinstance = lambda *a: True",
        "assert False",
    ),
    "base_exception_rebound": ("import builtins\nbuiltins.BaseException = ()", "assert False"),
    "json_and_os_patched": (
        "import json, os\njson.dumps = lambda *a, **k: 'pass'\nos.write = lambda *a: 0\n"
        "os._exit = lambda *a: None",
        "assert False",
    ),
    "import_main": ("import __main__\n__main__._write = lambda *a: None", "assert False"),
    "spray_all_fds": (
        "import os\nfor fd in range(256):\n    try:\n        os.write(fd, b'pass\\n')\n"
        "    except OSError:\n        pass",
        "assert False",
    ),
    "atexit_and_excepthook": (
        "import atexit, sys, os\natexit.register(lambda: os._exit(0))\n"
        "sys.excepthook = lambda *a: None",
        "assert False",
    ),
    "kill_self_after_fail": ("import os, signal\nsignal.signal(signal.SIGTERM, lambda *a: None)",
                             "os.kill(os.getpid(), 9)"),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_verdicts_do_not_pass(ex, name):
    code, test = FORGERIES[name]
    status, detail = run1(ex, code, test)
    assert status != "pass", (name, detail)
    assert status in ex_mod.STATUSES


def test_honest_code_after_forgery_attempts_still_passes(ex):
    # The same sandbox ran a forgery in earlier cells: later cells are unaffected.
    codes = [FORGERIES["exec_and_compile_rebound"][0], "def f(): return 1"]
    r = ex.run(codes, ["assert False", "assert f() == 1"])
    assert r.status == [["fail", "error"], ["fail", "pass"]], r.detail


# -- per-test independence ---------------------------------------------------------------------
def test_timeouts_are_isolated_per_test(ex):
    code = "def f(x):\n    return x * 2\n"
    tests = ["while True: pass", "assert f(2) == 4", "import time\ntime.sleep(60)",
             "assert f(3) == 6", "assert f(3) == 7"]
    r = ex.run([code, code], tests)
    for row in r.status:
        assert row == ["timeout", "pass", "timeout", "pass", "fail"], r.detail


def test_state_does_not_leak_between_tests(ex):
    code = "import math\nimport functools\ncalls = []\n"
    tests = ["math.pi = 3\ncalls.append(1)\nimport builtins\nbuiltins.len = lambda x: 42",
             "assert math.pi != 3 and calls == [] and len([]) == 0"]
    assert ex.run([code], tests).status == [["pass", "pass"]]


def test_code_that_never_loads_is_not_rerun_per_test(ex):
    r = ex.run(["while True: pass"], ["assert True"] * 4)
    assert r.status == [["timeout"] * 4]
    assert r.wall_s < 3 * TIMEOUT  # the first time-out was inherited, not repeated


def test_no_survivors_and_cgroups_removed():
    with Executor(Limits(timeout_s=TIMEOUT), workers=2) as e:
        r = e.run(["import os\nif os.fork() == 0:\n    os.setsid()\n    import time\n"
                   "    time.sleep(100)"], ["assert True"])
        dirs = [d for ds in e._cgroups.dirs for d in ds]
        uids = set(e.uids)
    assert r.status == [["pass"]]
    assert _survivors(uids) == []
    assert dirs and not any(os.path.exists(d) for d in dirs)


# -- weaker modes, only on request -------------------------------------------------------------
@pytest.mark.parametrize("mode", ["no_cgroup", "none"])
def test_weaker_modes_give_the_same_verdicts(mode, monkeypatch):
    monkeypatch.setenv("FDPO_SECRET_TOKEN", "s3cr3t-value")
    python = python_others_can_read() if mode == "none" else None
    with Executor(Limits(timeout_s=TIMEOUT), workers=1, isolation=mode, python=python) as e:
        r = e.run(["def f(x):\n    return x + 1\n", "while True: pass"],
                  ["assert f(1) == 2", "assert f(1) == 3",
                   "import os\nassert 'FDPO_SECRET_TOKEN' not in os.environ"])
    assert r.status == [["pass", "fail", "pass"], ["timeout"] * 3], r.detail


def test_sandboxes_outlive_the_threads_that_call_the_executor(ex):
    # bwrap's --die-with-parent fires when the spawning *thread* exits: the executor must
    # start sandboxes from its own long-lived threads, not from callers' threads.
    results = []
    for _ in range(3):
        t = threading.Thread(target=lambda: results.append(ex.run(["x = 1"], ["assert x == 1"])))
        t.start()
        t.join()
        results.extend(r for _, r in ex.map([{"id": "p", "codes": ["y = 2"],
                                               "tests": ["assert y == 2"]}]))
    assert [r.status for r in results] == [[["pass"]]] * 6
    started = [sb for sb in ex._sandboxes if sb is not None]
    assert started and all(sb.proc.poll() is None for sb in started)
    assert all(sb.jobs >= 1 for sb in started)
    assert sum(sb.jobs for sb in started) >= 6


def test_a_judge_killed_from_outside_is_replaced(ex):
    assert ex.run(["x = 1"], ["assert x == 1"]).status == [["pass"]]
    for sb in ex._sandboxes:
        if sb is not None:
            sb.proc.kill()
            sb.proc.wait()
    r = ex.run(["x = 1"], ["assert x == 1"])
    assert r.status == [["pass"]], r.detail


def test_weak_mode_survives_a_cell_that_kills_the_judge():
    # Without a PID namespace the judge is an ordinary parent: a cell can kill it. The
    # rest of that problem is a sandbox_error, the next problem gets a new judge.
    with Executor(Limits(timeout_s=TIMEOUT), workers=1, isolation="none",
                  python=python_others_can_read()) as e:
        r1 = e.run(["import os\nos.kill(os.getppid(), 9)", "x = 1"], ["assert True"])
        r2 = e.run(["x = 1"], ["assert x == 1"])
    assert r1.status == [["sandbox_error"], ["sandbox_error"]], r1.detail
    assert r2.status == [["pass"]]


def test_a_sandbox_that_cannot_start_is_a_clear_error(monkeypatch):
    real = ex_mod._bwrap_args
    monkeypatch.setattr(ex_mod, "_bwrap_args",
                        lambda *a: ["bwrap", "--no-such-option"] + real(*a)[1:])
    with pytest.raises(ex_mod.IsolationUnavailable, match="does not work on this machine"):
        Executor(Limits(timeout_s=TIMEOUT), workers=1)


def test_bad_isolation_mode_and_limits_are_clear_errors():
    with pytest.raises(ValueError, match="isolation must be one of"):
        Executor(Limits(), isolation="sandbox")
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        Limits(timeout_s=0)


def test_weak_mode_refuses_an_interpreter_its_uid_cannot_read():
    import tempfile

    bases = [b for b in ("/tmp", "/var/tmp", "/dev/shm") if os.path.isdir(b)
             and os.access(b, os.W_OK) and ex_mod.blocked_for_others(b) is None]
    if not bases:
        pytest.skip("no directory here that other users may enter")
    root = pathlib.Path(tempfile.mkdtemp(dir=bases[0]))
    try:
        root.chmod(0o755)
        python = root / "locked" / "python"
        python.mkdir(parents=True)
        python.parent.chmod(0o700)
        assert "locked has mode 0700" in ex_mod.blocked_for_others(str(python))
        python.chmod(0o750)
        python.parent.chmod(0o755)
        assert "python has mode 0750" in ex_mod.blocked_for_others(str(python))
        python.chmod(0o755)
        assert ex_mod.blocked_for_others(str(python)) is None
    finally:
        shutil.rmtree(root)
    if os.geteuid() == 0 and ex_mod.blocked_for_others(sys.base_prefix):
        with pytest.raises(ex_mod.IsolationUnavailable, match="cannot read the Python"):
            Executor(Limits(timeout_s=TIMEOUT), workers=1, isolation="none")


def test_interpreter_from_a_venv_under_tmp():
    """CI clones (and their .venv) may live under /tmp, which the sandbox covers with its
    scratch tmpfs: the sandbox runs the base interpreter and binds the venv's packages
    elsewhere, so this still works, and the venv's packages stay importable. (Under /tmp
    itself, not the test's temp directory: TMPDIR may point elsewhere.)"""
    import subprocess
    import tempfile

    root = tempfile.mkdtemp(prefix="fdpo-venv-test-", dir="/tmp")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", f"{root}/venv"],
                       check=True)
        site = next((pathlib.Path(root) / "venv" / "lib").glob("python3*/site-packages"))
        (site / "fdpo_probe_pkg.py").write_text("VALUE = 41\n")
        with Executor(Limits(timeout_s=5), workers=1, python=f"{root}/venv/bin/python") as ex:
            res = ex.run(["from fdpo_probe_pkg import VALUE\ndef f(): return VALUE + 1"],
                         ["assert f() == 42"])
    finally:
        shutil.rmtree(root)
    assert res.status == [["pass"]]
