"""fdpo.metric_writer: a resumed run appends to metrics.jsonl after the line a kill cut off,
and logs each step once in metrics.jsonl and TensorBoard."""

from __future__ import annotations

import math

import pytest

from fdpo import jsonl
from fdpo.metric_writer import MetricWriter
from tests.helpers import tensorboard


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


def test_resume_drops_later_steps_in_jsonl_and_tensorboard(tmp_path):
    """A run logs steps 1-5 and is killed (checkpoint at 3, a line cut off); the resumed
    writer drops steps 4-5 from the log and purges them from TensorBoard's view: steps 1-7
    then appear exactly once, with the resumed run's values."""
    writer = MetricWriter(tmp_path)
    for step in range(1, 6):
        writer.write(step, "train", {"loss": float(step)})
    writer.write(3, "validation", {"loss": 30.0})
    writer.write(5, "validation", {"loss": 50.0})
    writer.flush()  # the kill: no close
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(path.read_bytes() + b'{"step": 6, "spl')
    writer = MetricWriter(tmp_path, resume_step=3)
    assert [(r["split"], r["step"]) for r in jsonl.records(path)] == \
        [("train", 1), ("train", 2), ("train", 3), ("validation", 3)]
    for step in range(4, 8):
        writer.write(step, "train", {"loss": 100.0 + step})
    writer.close()
    rows = [(r["split"], r["step"], r["loss"]) for r in jsonl.records(path)]  # as lines
    want = [("train", s, float(s)) for s in (1, 2, 3)] + [("validation", 3, 30.0)] + \
        [("train", s, 100.0 + s) for s in (4, 5, 6, 7)]
    assert sorted(rows) == sorted(want) and len(rows) == len(want)
    assert not list(tmp_path.glob("*.tmp"))
    tb = tensorboard.scalars(tmp_path / "tensorboard")
    assert sorted(tb) == sorted((f"{split}/loss", s, v) for split, s, v in want)
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2


def test_flush_puts_every_event_on_disk(tmp_path):
    writer = MetricWriter(tmp_path)
    writer.write(1, "train", {"loss": 0.5, "lr": 1e-3})
    writer.flush()
    assert sorted(tensorboard.scalars(tmp_path / "tensorboard")) == \
        [("train/loss", 1, 0.5), ("train/lr", 1, pytest.approx(1e-3))]
    writer.close()
