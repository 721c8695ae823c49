"""Scalars to a JSONL file and to TensorBoard event files (tensorboardX), process 0 only.

Each JSONL line is `{"step": N, "split": "train" | "validation", "time": unix, <name>:
value, ...}`; the TensorBoard tag is `<split>/<name>`. Lines are flushed as written
(`fdpo.jsonl.Appender`), so a killed run keeps everything it logged.

A run resumed from a checkpoint of step M passes `resume_step=M`: the lines with step > M
(logged by the killed run after its last checkpoint, and about to be logged again) are
dropped first, by writing the kept lines to a temporary file and renaming it over the log;
a new TensorBoard event file starts with a purge event at step M+1 (what tensorboardX's
`purge_step` writes), which tells TensorBoard to discard the events of step M+1 on that it
read before it. So each (split, step) is logged exactly once.

Events are written synchronously (tensorboardX's record writer, not its queue-and-thread
`SummaryWriter`, whose `flush` does not wait for queued events), so `flush` - called before
every checkpoint - puts every event logged so far on disk.
"""

from __future__ import annotations

import math
import os
import pathlib
import time
from typing import Mapping

from absl import logging

from fdpo import jsonl


def truncate_after(path: str | os.PathLike, step: int) -> int:
    """Drops the lines of a metrics log with step > `step` (atomically: temporary file +
    rename; a line cut off by a kill is dropped too); returns how many were dropped."""
    path = pathlib.Path(path)
    if not path.exists():
        return 0
    jsonl.resume(path, key=None)  # repairs an interrupted last line
    lines = path.read_bytes().splitlines(keepends=True)
    keep = [raw for raw, (_, rec) in zip([x for x in lines if x.strip()], jsonl.objects(path))
            if int(rec["step"]) <= step]
    dropped = sum(1 for x in lines if x.strip()) - len(keep)
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


FLUSH_SECS = 10


class _EventFile:
    """One TensorBoard event file, written in the caller's thread."""

    def __init__(self, logdir: pathlib.Path, purge_step: int | None):
        from tensorboardX.event_file_writer import EventsWriter

        logdir.mkdir(parents=True, exist_ok=True)
        # Names hold the start second; nanoseconds keep two files of one second apart and in
        # order (TensorBoard reads files in name order, and purges by that order).
        self._file = EventsWriter(str(logdir / "events"), f".{time.time_ns()}")
        if purge_step is not None:
            self._event(step=purge_step, session_log=self._pb.SessionLog(
                status=self._pb.SessionLog.START))

    @property
    def _pb(self):
        from tensorboardX.proto import event_pb2
        return event_pb2

    def _event(self, **fields) -> None:
        self._file.write_event(self._pb.Event(wall_time=time.time(), **fields))

    def scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.summary import scalar
        self._event(step=step, summary=scalar(tag, value))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricWriter:

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True,
                 enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self._tb = None
        self._flushed = time.monotonic()
        if not enabled:
            return
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / "metrics.jsonl"
        if resume_step is not None:
            dropped = truncate_after(self.path, resume_step)
            if dropped:
                logging.info("%s: dropped %d lines after step %d (logged again from the "
                             "checkpoint on)", self.path, dropped, resume_step)
        self._out = jsonl.Appender(self.path)
        if tensorboard:
            self._tb = _EventFile(workdir / "tensorboard",
                                  None if resume_step is None else resume_step + 1)

    def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        line = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        # JSON has no NaN/inf: write them as strings so the line stays valid JSON.
        line.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
        self._out.write(line)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.scalar(f"{split}/{k}", v, int(step))
            if time.monotonic() - self._flushed > FLUSH_SECS:  # for a live TensorBoard
                self.flush()

    def flush(self) -> None:
        """TensorBoard events to disk (JSONL lines are flushed as written)."""
        if self.enabled and self._tb is not None:
            self._tb.flush()
            self._flushed = time.monotonic()

    def close(self) -> None:
        if not self.enabled:
            return
        self._out.close()
        if self._tb is not None:
            self._tb.close()
