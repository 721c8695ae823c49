"""Scalars to a JSONL file and to TensorBoard event files (tensorboardX), process 0 only.

Each JSONL line is `{"step": N, "split": "train" | "validation", "time": unix, <name>:
value, ...}`; the TensorBoard tag is `<split>/<name>`. Lines are flushed as written
(`fdpo.jsonl.Appender`), so a killed run keeps everything it logged; a resumed run appends,
after truncating a line the kill cut off.
"""

from __future__ import annotations

import math
import pathlib
import time
from typing import Mapping

from fdpo import jsonl


class MetricWriter:

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True,
                 enabled: bool = True):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        workdir = pathlib.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / "metrics.jsonl"
        self._out = jsonl.Appender(self.path)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"), flush_secs=10)

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
                self._tb.add_scalar(f"{split}/{k}", v, int(step))

    def close(self) -> None:
        if not self.enabled:
            return
        self._out.close()
        if self._tb is not None:
            self._tb.close()
