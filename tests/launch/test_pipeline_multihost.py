"""The pipeline on several hosts (`--config.distributed=True`): the workdir check, the file
barrier of fdpo.multihost, and, slow, the miniature run as 2 processes x 4 devices against
1 process x 8 devices.

Hosts here are local processes (or threads, for the barrier's unit tests: the protocol goes
through files only, so a thread is a host as far as it can tell) sharing one directory."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from configs import toy
from fdpo import multihost, pipeline

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


# ---------------------------------------------------------------- the pipeline's stages

class FakeRuns(pipeline.Pipeline):
    """The pipeline with launch.execute replaced by a stand-in that marks every cell passed
    (and, while `crash` names this host, dies instead): the stage logic around it is real."""
    crash: set = set()
    calls: list = []
    executed: list = []  # the problem ids the stand-in ran (it resumes by id, as
    # launch.execute does by content)

    def run(self, stage, module, *args):
        args = [str(a) for a in args]
        self.calls.append((self.hosts.index, module))
        if module != "launch.execute":
            raise AssertionError(f"unexpected program {module}")
        if self.hosts.index in self.crash:
            raise pipeline.StageFailed(f"stage {stage}: host {self.hosts.index} died")
        src, dst = args[args.index("--input") + 1], args[args.index("--output") + 1]
        done = ({json.loads(line)["id"] for line in open(dst)} if os.path.exists(dst)
                else set())
        with open(dst, "a") as f:
            for line in open(src):
                record = json.loads(line)
                if record["id"] not in done:
                    self.executed.append(record["id"])
                    f.write(json.dumps({**record, "passed": [[True]]}) + "\n")


def _execute_on_hosts(workdir, cfg, n=2):
    def host(i):
        p = FakeRuns(cfg, workdir, hosts=multihost.Hosts(i, n), host_timeout=10)
        p.sync = multihost.connect(workdir, p.hosts, host_timeout=10, poll=0.05)
        try:
            p.stage("execute", p.execute)
            return "ok"
        except Exception as e:  # noqa: BLE001 - what a dying host does (Pipeline.all)
            p.sync.fail(str(e))
            raise
        finally:
            p.sync.close()
    return on_hosts(n, host)


def test_execute_is_split_by_process_index_and_a_restart_reruns_only_the_dead_share(tmp_path):
    cfg = toy.get_config("fast")
    cfg.distributed = True
    ids = [f"p{k}" for k in range(5)]
    (tmp_path / "samples.jsonl").write_text(
        "".join(json.dumps({"id": i, "codes": ["pass"], "tests": ["pass"]}) + "\n"
                for i in ids))
    FakeRuns.calls, FakeRuns.crash = [], {1}
    out = _execute_on_hosts(tmp_path, cfg)
    assert isinstance(out[0], multihost.HostError) and "host 1 died" in str(out[0]), out
    assert not (tmp_path / "executed.jsonl").exists()
    marker = json.loads((tmp_path / "stages" / "execute.json").read_text())
    assert marker["state"] == "started"
    shard0 = tmp_path / "execute_shards" / "executed-00000-of-00002.jsonl"
    assert [json.loads(l)["id"] for l in shard0.read_text().splitlines()] == ids[0::2]

    # The job restarts: process 0's share is done (its share marker), only process 1's runs.
    FakeRuns.calls, FakeRuns.crash = [], set()
    assert _execute_on_hosts(tmp_path, cfg) == ["ok", "ok"]
    assert FakeRuns.calls == [(1, "launch.execute")]
    merged = [json.loads(l) for l in (tmp_path / "executed.jsonl").read_text().splitlines()]
    assert [r["id"] for r in merged] == ids and all(r["passed"] == [[True]] for r in merged)
    assert json.loads((tmp_path / "stages" / "execute.json").read_text())["state"] == "done"

    # Once more: the stage is done, nobody runs anything.
    FakeRuns.calls = []
    assert _execute_on_hosts(tmp_path, cfg) == ["ok", "ok"]
    assert FakeRuns.calls == []


def test_distributed_execute_reuses_a_single_host_executed_jsonl(tmp_path):
    """A workdir whose execute ran on one host (executed.jsonl, no shares) rerun on two: each
    host's share starts from executed.jsonl's results, so only the problems it lacks run
    (here the one added since); the merge keeps the others' lines as they were."""
    cfg = toy.get_config("fast")
    cfg.distributed = True
    ids = [f"p{k}" for k in range(5)]
    (tmp_path / "samples.jsonl").write_text(
        "".join(json.dumps({"id": i, "codes": ["pass"], "tests": ["pass"]}) + "\n"
                for i in ids))
    # One host's results for the first four (the fifth problem is new), the last line cut off
    # as an interrupted run leaves it.
    single = [json.dumps({"id": i, "codes": ["pass"], "tests": ["pass"], "passed": [[True]],
                          "by": "one host"}) + "\n" for i in ids[:4]]
    (tmp_path / "executed.jsonl").write_text("".join(single) + single[0][:20])
    FakeRuns.calls, FakeRuns.crash, FakeRuns.executed = [], set(), []
    assert _execute_on_hosts(tmp_path, cfg) == ["ok", "ok"]
    assert FakeRuns.executed == ["p4"]  # host 0's share: p0, p2, p4
    merged = [json.loads(l) for l in (tmp_path / "executed.jsonl").read_text().splitlines()]
    assert [r["id"] for r in merged] == ids
    assert [r.get("by") for r in merged] == ["one host"] * 4 + [None]


# ---------------------------------------------------------------- the program

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _pipeline(workdir, *extra, env=ENV):
    return subprocess.Popen([sys.executable, "-m", "launch.pipeline",
                             "--config=configs/toy.py:fast", f"--workdir={workdir}", *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow  # two program starts (about 25 s on a loaded 2-core machine)
def test_pipeline_on_a_host_without_the_shared_workdir_fails_fast(tmp_path):
    """The same command on two "hosts" whose --workdir are different directories: each
    stops before any stage, naming the path (and process 1 its index)."""
    procs = [_pipeline(tmp_path / f"w{i}", "--config.distributed=True", "--num_processes=2",
                       f"--process_id={i}", "--host_timeout=3") for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode != 0, out + err
    assert "process 1: cannot see the work directory" in outs[1][1]
    assert str(tmp_path / "w1" / "hosts" / "token") in outs[1][1]
    assert "process(es) [1] did not read the token" in outs[0][1]
    for i in range(2):  # no stage started
        assert not list((tmp_path / f"w{i}" / "stages").glob("*.json"))



# ---------------------------------------------------------------- the miniature, 2 x 4 vs 1 x 8

# configs/toy.py:fast, with one method (the pipeline's coordination does not depend on how
# many), a training batch that divides over 8 devices, and one executor worker so that
# executed.jsonl is in input order on one host too (several workers append as problems
# finish; the multi-host merge writes input order).
OVERRIDES = ("--config=configs/toy.py:fast", "--config.execute.workers=1",
             "--config.train.batch_size=8", "--config.methods=('focused_dpo',)")
# The stages the 2-process run takes over from the 1-process run's workdir, as a restarted
# job finds them: their markers match, so it skips them. They are process 0's alone (data,
# init, sft_data) or launch.train (warm_start), whose 2-process run test_train.py compares;
# a warm start trained apart would differ by Adam's rounding noise (see below) and so give
# other samples, and the comparison after it would compare nothing.
TAKEN_OVER = ("data", "init", "sft_data", "warm_start")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices):
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _start(workdir, *extra, devices, umask):
    # Popen's umask is set in C between fork and exec; a preexec_fn would run Python in
    # the forked child of this multithreaded (JAX) process, which JAX warns may deadlock.
    return subprocess.Popen([sys.executable, "-m", "launch.pipeline", *OVERRIDES,
                             f"--workdir={workdir}", *extra], cwd=REPO, env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            umask=umask)


def _finish(procs, timeout=1500):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    one, two = base / "one", base / "two"
    # 1 process x 8 devices up to the warm start, then its copy goes on in both ways.
    _finish([_start(one, "--only=" + ",".join(TAKEN_OVER), devices=8, umask=0o022)])
    two.mkdir()
    for name in TAKEN_OVER:  # each stage's output directory has the stage's name
        shutil.copytree(one / name, two / name, symlinks=True)
    (two / "stages").mkdir()
    for name in TAKEN_OVER:
        shutil.copy2(one / "stages" / f"{name}.json", two / "stages" / f"{name}.json")
    port = _free_port()
    # Process 1 creates its files with mode 0600 (umask 077), process 0 with 0644: what each
    # host wrote can be told apart afterwards.
    hosts = [_start(two, "--config.distributed=True", f"--coordinator_address=localhost:{port}",
                    "--num_processes=2", f"--process_id={i}", "--host_timeout=120",
                    devices=4, umask=0o022 if i == 0 else 0o077) for i in range(2)]
    single = _start(one, devices=8, umask=0o022)
    outs = [p.communicate(timeout=1500) for p in hosts + [single]]
    assert single.returncode == 0, outs[2][0][-3000:] + outs[2][1][-3000:]
    failed = [(i, o) for i, (p, o) in enumerate(zip(hosts, outs)) if p.returncode]
    return one, two, outs, failed


def _two_processes_ran(failed):
    """Fails the test, showing the failing process's output, when a process of the
    2-process run exited with an error."""
    if failed:
        i, (out, err) = failed[0]
        pytest.fail(f"process {i} of the 2-process run failed:\n{out[-2000:]}\n{err[-3000:]}")


def _pairs(dataset):
    """{pair_id: the record's bytes} of every split (the shards' order differs with the
    number of builders, the records must not)."""
    from array_record.python import array_record_data_source

    from fdpo import records

    out = {}
    manifest = dataset / "manifest.json"
    for split in records.read_manifest(manifest)["splits"]:
        src = records.PairDataSource.from_manifest(manifest, split)
        raw = array_record_data_source.ArrayRecordDataSource(src._paths)
        for i in range(len(raw)):
            out[(split, int(src[i]["pair_id"]))] = raw[i]
    return out


def _params(path):
    import jax
    from flax import nnx

    from fdpo import sharding
    from fdpo.models import checkpoint

    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    _, _, state = checkpoint.load_model(path, mesh)
    return jax.device_get(nnx.to_pure_dict(state))


@pytest.mark.slow
@pytest.mark.pod
def test_two_processes_of_4_devices_give_the_pipeline_of_one_of_8(runs):
    import jax
    import numpy as np

    one, two, outs, failed = runs
    _two_processes_ran(failed)
    assert "process 0 of 2" in outs[0][0] and "process 1 of 2" in outs[1][0]
    for name in TAKEN_OVER:
        assert f"[pipeline] {name}: done earlier, skipped" in outs[0][0]
    # Sampling: the same records in the same order.
    assert (two / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()
    # Execution: the shares merged in input order, the same verdicts.
    def verdicts(w):
        return [(r["id"], r["passed"], r["status"])
                for r in map(json.loads, (w / "executed.jsonl").read_text().splitlines())]
    assert verdicts(two) == verdicts(one)
    # Pairs: 2 shards merged hold exactly the records of the 1-shard build, byte for byte.
    want = _pairs(one / "pairs")
    assert want and _pairs(two / "pairs") == want
    # Reference sums (launch.precompute_ref over the two meshes): to float32 rounding.
    from fdpo import records
    for split in ("train", "validation"):
        a, b = (records.PairDataSource.from_manifest(w / "pairs_ref" / "manifest.json", split)
                for w in (one, two))
        by_id = {int(b[i]["pair_id"]): b[i]["ref_logps"] for i in range(len(b))}
        assert len(a) == len(b)
        for i in range(len(a)):
            np.testing.assert_allclose(by_id[int(a[i]["pair_id"])], a[i]["ref_logps"],
                                       rtol=1e-5, atol=1e-5)
    # Training: the same batches (the pairs in the same order), so the same parameters to
    # 1e-5; 4 steps of lr <= 2e-5 (warm-up) move them by up to about 5e-5, so the check is
    # not vacuous: some parameter moved further than the tolerance.
    run = "train/focused_dpo-s0/final"
    start = jax.tree.leaves(_params(one / "warm_start" / "final"))
    want, got = (jax.tree.leaves(_params(w / run)) for w in (one, two))
    assert max(float(np.abs(a - s).max()) for a, s in zip(want, start)) > 1e-5
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, atol=1e-5)
    # Report numbers: pass@1 of every model and split, the Phi table, the data counts and the
    # continuation experiment exactly; the training curves (loss, rewards, mechanism metrics)
    # to float32 rounding: the mechanism metrics are small differences of log-prob sums of
    # size ~30, whose rounding (~2e-6) is their absolute error (config and timings differ:
    # `distributed`, and the clock).
    rep = [json.loads((w / "report" / "report.json").read_text()) for w in (one, two)]
    for key in ("pass_at_1", "summary", "counts", "phi", "continuation"):
        assert rep[1][key] == rep[0][key], key
    for key in ("curves", "mechanism"):
        flat = [jax.tree.leaves(r[key]) for r in rep]
        assert len(flat[0]) == len(flat[1]) > 0
        np.testing.assert_allclose(flat[1], flat[0], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.slow
@pytest.mark.pod
def test_two_processes_write_each_output_once(runs):
    """Process 1 (umask 077) created only its own files: its barrier files, logs, and its
    share of execution and of the pair build; process 0 every shared output."""
    _, two, _, failed = runs
    _two_processes_ran(failed)
    own = []
    for path in sorted(two.rglob("*")):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o077 == 0:
            own.append(str(path.relative_to(two)))
    # Orbax checkpoints (launch.train) are written by every process: each its own part of
    # the arrays (`ocdbt.process_1/`, `array_metadatas/process_1`), process 0 the rest.
    allowed = ("hosts/seen-1.json", "logs/", "-00001-of-00002", "process_1")
    stray = [p for p in own if not any(a in p for a in allowed)
             and not (p.startswith("hosts/") and (p.endswith("-1") or ".arrived-1" in p))]
    assert not stray, stray
    assert any("execute_shards/executed-00001-of-00002.jsonl" == p for p in own), own
    assert any(p.startswith("pairs/pairs-00001-of-00002") for p in own), own
    # Markers, merged files and the report: process 0's (mode 0644).
    for rel in ("stages/execute.json", "executed.jsonl", "pairs/manifest.json",
                "report/report.json", "pipeline_config.json", "timings.json"):
        assert (two / rel).stat().st_mode & 0o077, rel
    # Each host ran every JAX stage's program once (analyze: the continuation experiment),
    # and no program of process 0's stages.
    log1 = {p.name for p in (two / "logs").glob("*.p1.log")}
    assert log1 == {"sample.p1.log", "execute.p1.log", "pairs.p1.log", "reference.p1.log",
                    "train.p1.log", "evaluate.p1.log", "analyze.p1.log"}, log1
