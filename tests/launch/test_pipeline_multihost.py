"""The pipeline on several hosts (`--config.distributed=True`): the workdir check, the file
barrier of fdpo.multihost, and, slow, the miniature run as 2 processes x 4 devices against
1 process x 8 devices.

Hosts here are local processes (or threads, for the barrier's unit tests: the protocol goes
through files only, so a thread is a host as far as it can tell) sharing one directory."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from fdpo import multihost

from tests.conftest import REPO


def on_hosts(n, fn, *, timeout=60):
    """fn(index) on n threads at once; their results (or exceptions), by index."""
    with cf.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(fn, i) for i in range(n)]
        out = []
        for f in futures:
            try:
                out.append(f.result(timeout=timeout))
            except Exception as e:  # noqa: BLE001 - returned for the test to check
                out.append(e)
        return out


def test_hosts_share_is_every_nth_item():
    items = list(range(7))
    shares = [multihost.Hosts(i, 3).share(items) for i in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shares, [])) == items


def test_connect_gives_every_host_process_0s_fresh_session(tmp_path):
    # An earlier run's token is still there: a host that starts before process 0 reads it
    # first, and must still end up in the new session.
    (tmp_path / "hosts").mkdir()
    (tmp_path / "hosts" / "token").write_text("stale")

    def host(i):
        if i == 0:
            time.sleep(0.5)
        sync = multihost.connect(tmp_path, multihost.Hosts(i, 3), host_timeout=10, poll=0.05)
        sync.close()
        return sync.session

    sessions = on_hosts(3, host)
    assert len(set(sessions)) == 1 and sessions[0] != "stale", sessions
    assert (tmp_path / "hosts" / "token").read_text() == sessions[0]


def test_host_that_cannot_see_the_workdir_fails_naming_path_and_index(tmp_path):
    # Two "hosts" whose work directories differ: neither sees the other's files.
    dirs = [tmp_path / "host0", tmp_path / "host1"]
    start = time.monotonic()
    out = on_hosts(2, lambda i: multihost.connect(dirs[i], multihost.Hosts(i, 2),
                                                  host_timeout=1.5, poll=0.05))
    assert time.monotonic() - start < 10
    assert all(isinstance(e, multihost.HostError) for e in out), out
    assert "process 1" in str(out[1]) and str(dirs[1] / "hosts" / "token") in str(out[1])
    assert "process(es) [1]" in str(out[0]) and str(dirs[0] / "hosts") in str(out[0])


def test_sync_runs_process_0s_work_once_after_everyone_arrived(tmp_path):
    arrived = tmp_path / "arrived"
    arrived.mkdir()

    def host(i):
        sync = multihost.connect(tmp_path, multihost.Hosts(i, 3), host_timeout=10, poll=0.05)
        try:
            values = []
            for step in range(3):
                time.sleep(0.1 * i)  # hosts arrive at different times
                (arrived / f"{step}-{i}").write_text("")
                # process 0's work sees every host's file of this step, and no later one
                values.append(sync.sync(f"step{step}", lambda: sorted(
                    p.name for p in arrived.iterdir())))
            return values
        finally:
            sync.close()

    out = on_hosts(3, host)
    assert out[0] == out[1] == out[2], out
    for step, seen in enumerate(out[0]):
        assert seen == sorted(f"{s}-{i}" for s in range(step + 1) for i in range(3))


def test_a_failed_host_stops_the_others_at_once(tmp_path):
    def host(i):
        sync = multihost.connect(tmp_path, multihost.Hosts(i, 2), host_timeout=30, poll=0.05)
        try:
            if i == 1:
                sync.fail("StageFailed: stage execute: boom")
                return "failed"
            return sync.sync("execute.end")
        finally:
            sync.close()

    start = time.monotonic()
    out = on_hosts(2, host)
    assert time.monotonic() - start < 10  # not the 30 s of host_timeout
    assert isinstance(out[0], multihost.HostError)
    assert "process 1 failed: StageFailed: stage execute: boom" in str(out[0])


def test_work_that_fails_on_process_0_is_every_hosts_error(tmp_path):
    def host(i):
        sync = multihost.connect(tmp_path, multihost.Hosts(i, 2), host_timeout=30, poll=0.05)
        try:
            return sync.sync("merge", lambda: 1 / 0)
        finally:
            sync.close()

    out = on_hosts(2, host)
    assert isinstance(out[0], ZeroDivisionError)
    assert isinstance(out[1], multihost.HostError) and "process 0 failed" in str(out[1])


def test_a_dead_host_is_named_after_host_timeout_without_heartbeat(tmp_path):
    def host(i):
        sync = multihost.connect(tmp_path, multihost.Hosts(i, 2), host_timeout=1.0, poll=0.05)
        if i == 1:
            sync.close()  # killed: no heartbeat, never arrives
            return "dead"
        try:
            return sync.sync("train.end")
        finally:
            sync.close()

    start = time.monotonic()
    out = on_hosts(2, host)
    assert 1.0 <= time.monotonic() - start < 10
    assert isinstance(out[0], multihost.HostError)
    assert "process 1" in str(out[0]) and "alive-1" in str(out[0])


def test_a_busy_host_with_a_heartbeat_is_waited_for(tmp_path):
    # Process 0's work takes several host_timeouts (a long stage it runs alone): the
    # others keep waiting because its heartbeat goes on.
    def host(i):
        sync = multihost.connect(tmp_path, multihost.Hosts(i, 2), host_timeout=0.5, poll=0.05)
        try:
            return sync.sync("report.end", lambda: time.sleep(2.0) or "done")
        finally:
            sync.close()

    assert on_hosts(2, host) == ["done", "done"]


# ---------------------------------------------------------------- the program

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _pipeline(workdir, *extra, env=ENV):
    return subprocess.Popen([sys.executable, "-m", "launch.pipeline",
                             "--config=configs/toy.py:fast", f"--workdir={workdir}", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_pipeline_on_a_host_without_the_shared_workdir_fails_fast(tmp_path):
    """The same command on two "hosts" whose --workdir are different directories: each
    stops before any stage, naming the path (and process 1 its index)."""
    procs = [_pipeline(tmp_path / f"w{i}", "--config.distributed=True", "--num_processes=2",
                       f"--process_id={i}", "--host_timeout=3") for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode != 0, out + err
    assert f"process 1: cannot see the work directory" in outs[1][1]
    assert str(tmp_path / "w1" / "hosts" / "token") in outs[1][1]
    assert "process(es) [1] did not read the token" in outs[0][1]
    for i in range(2):  # no stage started
        assert not list((tmp_path / f"w{i}" / "stages").glob("*.json"))


def test_pipeline_refuses_the_distributed_flag_for_the_config_field(tmp_path):
    proc = _pipeline(tmp_path / "w", "--distributed")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--config.distributed=True" in err
