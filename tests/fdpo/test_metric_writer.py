"""fdpo.metric_writer: a resumed run appends to metrics.jsonl after the line a kill cut off."""

from __future__ import annotations

import math

from fdpo import jsonl
from fdpo.metric_writer import MetricWriter


def test_resumed_writer_truncates_a_cut_off_line_and_appends(tmp_path):
    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.write(1, "train", {"loss": 0.5, "grad_norm": math.inf})
    writer.close()
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(path.read_bytes() + b'{"step": 2, "split": "tr')  # killed mid-write
    writer = MetricWriter(tmp_path, tensorboard=False)
    writer.write(2, "train", {"loss": 0.25})
    writer.close()
    rows = [rec for _, rec in jsonl.objects(path)]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.5), (2, 0.25)]
    assert rows[0]["grad_norm"] == "inf"
