"""TensorBoard event files read back the way TensorBoard reads a run directory: files in
name order, TFRecord framing around Event protos, a truncated last record (a killed writer)
ignored, and a `SessionLog.START` event at step S discarding the scalars of step >= S read
before it (TensorBoard's purge of orphaned data after a restart)."""
from __future__ import annotations

import pathlib
import struct

from tensorboardX.proto import event_pb2


def events(logdir):
    for f in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
        data = f.read_bytes()
        off = 0
        while off + 12 <= len(data):
            (n,) = struct.unpack_from("<Q", data, off)
            if off + 12 + n + 4 > len(data):
                break  # cut off by a kill
            yield event_pb2.Event.FromString(data[off + 12:off + 12 + n])
            off += 12 + n + 4


def scalars(logdir) -> list[tuple[str, int, float]]:
    """(tag, step, value) for every scalar TensorBoard shows, in file order."""
    out = []
    for e in events(logdir):
        if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START:
            out = [s for s in out if s[1] < e.step]
        for v in e.summary.value:
            value = v.simple_value if v.HasField("simple_value") else v.tensor.float_val[0]
            out.append((v.tag, e.step, value))
    return out
