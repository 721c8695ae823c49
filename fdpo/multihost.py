"""Several hosts running the same pipeline command: which host this is, a check that they all
see the same work directory, and a barrier through that directory.

The pipeline (fdpo/pipeline.py) coordinates its hosts through files in the shared work
directory, not through jax.distributed. Why files:
- the pipeline process must not hold a jax.distributed client: its JAX stages are
  subprocesses that each call `jax.distributed.initialize` on the job's one coordinator
  port (detected from the cluster or given as --coordinator_address), and process 0's
  subprocess binds that port while the pipeline waits;
- the hosts must share the work directory anyway (every stage reads what the one before
  wrote), so a file they all see is the one channel that is always there;
- it survives restarts: a host that died leaves files saying how far it got, and a barrier
  that waits for a dead host can notice (no heartbeat) instead of hanging;
- it is testable with plain processes on one machine.

Layout in `WORKDIR/hosts/`: `token` (process 0's random session token), `seen-I.json` (process
I read it: the token and I's own random nonce), `ack-I.json` (process 0 saw I's answer),
and per session `SESSION/`: `alive-I` (a heartbeat), `TAG.arrived-I`, `TAG.released`
(process 0's value, JSON), `failed-I` (a host's error, so the others stop at once).

JAX-free (the pipeline and data_tools import it).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import secrets
import shutil
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

from fdpo import atomic


class HostError(RuntimeError):
    """Another host failed, died, or does not see the same work directory."""


@dataclasses.dataclass(frozen=True)
class Hosts:
    """This process's place in the job: `index` of `count`, and the coordinator address
    given on the command line (None: each JAX program detects it from the cluster)."""
    index: int = 0
    count: int = 1
    coordinator: str | None = None

    @property
    def primary(self) -> bool:
        return self.index == 0

    @property
    def tag(self) -> str:
        return f"{self.index:05d}-of-{self.count:05d}"

    def share(self, items: Sequence) -> list:
        """This host's part of `items`: items index, index + count, ... (as launch.build's
        shards read input lines)."""
        return list(items[self.index::self.count])


def detect(coordinator: str | None, num_processes: int | None, process_id: int | None,
           *, timeout: float = 300) -> Hosts:
    """The job's hosts from the flags the JAX programs take; what they leave out is detected
    the way the programs detect it (jax.distributed.initialize on a TPU pod or under SLURM),
    by a short subprocess: every host's pipeline calls this at start, so the cluster sees
    the same number of processes as it does for each JAX stage."""
    if num_processes is not None and process_id is not None:
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                             f"{num_processes})")
        return Hosts(process_id, num_processes, coordinator)
    code = ("import json, sys, jax; a = json.loads(sys.argv[1]); "
            "jax.distributed.initialize(coordinator_address=a[0], num_processes=a[1], "
            "process_id=a[2]); print(json.dumps([jax.process_index(), jax.process_count()]))")
    proc = subprocess.run([sys.executable, "-c", code,
                           json.dumps([coordinator, num_processes, process_id])],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise HostError("jax.distributed.initialize could not detect this process's index "
                        "and the process count (give --coordinator_address, --num_processes "
                        f"and --process_id): {proc.stderr.strip()[-2000:]}")
    index, count = json.loads(proc.stdout.strip().splitlines()[-1])
    return Hosts(index, count, coordinator)


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or not yet complete on a lagging filesystem
        return None


class Sync:
    """The barrier of one session (one run of the pipeline on every host). `host_timeout`:
    how long a host may go without a heartbeat before the others give up on it (a busy host
    keeps beating: a long stage on process 0 alone is no reason to stop waiting)."""

    def __init__(self, root: pathlib.Path, hosts: Hosts, session: str, *,
                 host_timeout: float, poll: float = 0.2):
        self.hosts, self.session = hosts, session
        self.dir = pathlib.Path(root) / session
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host_timeout, self.poll = host_timeout, poll
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        n = 0
        while True:
            n += 1
            atomic.write_text(self.dir / f"alive-{self.hosts.index}", str(n))
            if self._stop.wait(max(self.host_timeout / 10, self.poll)):
                return

    def close(self) -> None:
        self._stop.set()

    def fail(self, message: str) -> None:
        """Tells the other hosts that this one stopped, and why."""
        atomic.write_text(self.dir / f"failed-{self.hosts.index}", message)

    def _check_failed(self) -> None:
        for path in sorted(self.dir.glob("failed-*")):
            who = path.name.split("-", 1)[1]
            if who != str(self.hosts.index):
                raise HostError(f"process {who} failed: {path.read_text()}")

    def _wait(self, ready: Callable[[], Sequence[int]], what: str) -> None:
        """Polls until `ready()` (the hosts still awaited) is empty; raises HostError when
        one of them failed or beat no heartbeat for host_timeout seconds."""
        last: dict[int, tuple[str | None, float]] = {}
        while True:
            self._check_failed()
            missing = ready()
            if not missing:
                return
            now = time.monotonic()
            for i in missing:
                try:
                    beat = (self.dir / f"alive-{i}").read_text()
                except OSError:
                    beat = None
                if i not in last or last[i][0] != beat:
                    last[i] = (beat, now)
                elif now - last[i][1] > self.host_timeout:
                    raise HostError(
                        f"process {self.hosts.index}: waited for process {i} at {what}, "
                        f"which beat no heartbeat ({self.dir / f'alive-{i}'}) for "
                        f"{self.host_timeout:g} s: it died, or does not see this work "
                        "directory; rerun the same command on every host to resume")
            time.sleep(self.poll)

    def sync(self, tag: str, work: Callable[[], Any] | None = None) -> Any:
        """Every host arrives; process 0 then runs `work` (alone: the shared outputs) and
        releases the others with its value (JSON), which every host returns. An error in
        `work` is the others' error too."""
        h = self.hosts
        released = self.dir / f"{tag}.released"
        if not h.primary:
            atomic.write_text(self.dir / f"{tag}.arrived-{h.index}", "")
            self._wait(lambda: [] if released.exists() else [0], f"{released}")
            return json.loads(released.read_text())["value"]
        self._wait(lambda: [i for i in range(1, h.count)
                            if not (self.dir / f"{tag}.arrived-{i}").exists()],
                   f"{self.dir / tag}.arrived-I")
        try:
            value = work() if work is not None else None
        except BaseException as e:
            self.fail(f"{type(e).__name__}: {e}")
            raise
        atomic.write_text(released, json.dumps({"value": value}))
        return value


def connect(workdir: pathlib.Path, hosts: Hosts, *, host_timeout: float,
            poll: float = 0.2) -> Sync:
    """Checks that every host sees the same `workdir` and starts this session's barrier.
    Process 0 writes a fresh random token into WORKDIR/hosts/token; each other process reads
    it and answers with its own random nonce; process 0 acknowledges each answer. A process
    that gets no acknowledgement of its fresh nonce within `host_timeout` seconds (it sees
    no token, or an old one in a directory that only looks the same) raises HostError naming
    the path and its index; so does process 0 for the processes that never answered."""
    root = pathlib.Path(workdir) / "hosts"
    root.mkdir(parents=True, exist_ok=True)
    token_path = root / "token"
    deadline = time.monotonic() + host_timeout
    if hosts.primary:
        token = secrets.token_hex(8)
        for old in root.glob("ack-*.json"):
            old.unlink(missing_ok=True)
        atomic.write_text(token_path, token)
        waiting = set(range(1, hosts.count))
        while waiting:
            for i in sorted(waiting):
                seen = _read_json(root / f"seen-{i}.json")
                if seen and seen.get("token") == token:
                    atomic.write_text(root / f"ack-{i}.json",
                                      json.dumps({"token": token, "nonce": seen["nonce"]}))
                    waiting.discard(i)
            if waiting and time.monotonic() > deadline:
                raise HostError(
                    f"process 0: process(es) {sorted(waiting)} did not read the token at "
                    f"{token_path} within {host_timeout:g} s (their answers belong at "
                    f"{root}/seen-I.json): every host must see the same work directory "
                    "(a shared filesystem) and run the same command")
            time.sleep(poll)
        # Earlier sessions' barrier files are no longer anyone's.
        for old in root.iterdir():
            if old.is_dir() and old.name != token:
                shutil.rmtree(old, ignore_errors=True)
        return Sync(root, hosts, token, host_timeout=host_timeout, poll=poll)
    nonce, answered = secrets.token_hex(8), None
    while True:
        try:
            token = token_path.read_text().strip()
        except OSError:
            token = None
        if token and token != answered:  # a newer token (the old one was an earlier run's)
            atomic.write_text(root / f"seen-{hosts.index}.json",
                              json.dumps({"token": token, "nonce": nonce}))
            answered = token
        ack = _read_json(root / f"ack-{hosts.index}.json")
        if ack and ack.get("nonce") == nonce:
            return Sync(root, hosts, ack["token"], host_timeout=host_timeout, poll=poll)
        if time.monotonic() > deadline:
            seen = (f"it saw only the token {answered!r}, which process 0 never acknowledged"
                    if answered else "no token there")
            raise HostError(
                f"process {hosts.index}: cannot see the work directory of process 0: no "
                f"answer to the token at {token_path} within {host_timeout:g} s ({seen}); "
                "every host must see the same work directory (a shared filesystem)")
        time.sleep(poll)


def write_share_marker(path: pathlib.Path, fingerprint: str) -> None:
    atomic.write_text(path, json.dumps({"fingerprint": fingerprint}) + "\n")


def share_done(path: pathlib.Path, fingerprint: str) -> bool:
    m = _read_json(path)
    return bool(m) and m.get("fingerprint") == fingerprint

