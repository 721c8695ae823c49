"""fdpo.replicates (and the launch.replicates program) on hand-made pipeline reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fdpo import replicates

from tests.conftest import REPO


def report(fdpo, dpo, warm, phi=0.9):
    def summ(v):
        return {"held_out": {"mean": v}, "seen": {"mean": v + 5}}
    return {"summary": {"focused_dpo": summ(fdpo), "dpo": summ(dpo), "warm_start": summ(warm)},
            "phi": {"tables": {"common prefix": {"phi": 0.4}, "prefix + chosen mid": {"phi": phi}}},
            "continuation": {"chosen": {"pass@1": 94.0}, "rejected": {"pass@1": 8.0}}}


def write(tmp_path, name, rep):
    d = tmp_path / name / "report"
    d.mkdir(parents=True)
    (d / "report.json").write_text(json.dumps(rep))
    return str(tmp_path / name)


def test_differences_and_verdicts(tmp_path):
    dirs = [write(tmp_path, "a", report(86.0, 79.0, 84.0)),
            write(tmp_path, "b", report(85.0, 76.0, 85.0)),
            write(tmp_path, "c", report(87.0, 80.0, 88.0))]
    s = replicates.summarise(replicates.read_reports(dirs), "focused_dpo")
    held = s["differences"]["held_out"]
    assert held["dpo"]["per_replicate"] == [7.0, 9.0, 7.0] and held["dpo"]["ahead_in_all"]
    assert held["warm_start"]["per_replicate"] == [2.0, 0.0, -1.0]
    assert not held["warm_start"]["ahead_in_all"] and not held["warm_start"]["behind_in_all"]
    assert held["warm_start"]["mean"] == pytest.approx(1 / 3)
    text = replicates.render(s)
    assert "| dpo | +7.0 | +9.0 | +7.0 | +7.7 | ahead in every replicate |" in text
    assert "| warm_start | +2.0 | +0.0 | -1.0 | +0.3 | mixed or tied |" in text


def test_cli_writes_files_and_names_a_missing_report(tmp_path):
    dirs = [write(tmp_path, "a", report(86.0, 79.0, 84.0)),
            write(tmp_path, "b", report(85.0, 76.0, 85.0))]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "launch.replicates", f"--workdirs={','.join(dirs)}",
                           f"--out={out}"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {"replicates.md", "replicates.json", "replicates.png"}
    assert json.loads((out / "replicates.json").read_text())["pass_at_1"]["held_out"]["dpo"] == [79.0, 76.0]
    proc = subprocess.run([sys.executable, "-m", "launch.replicates",
                           f"--workdirs={dirs[0]},{tmp_path / 'nope'}", f"--out={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    # one line naming the missing report (launch/common.py's usage error), not a traceback
    assert proc.returncode == 2
    assert f"{tmp_path / 'nope' / 'report' / 'report.json'}: cannot read" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_split_names_come_from_the_reports():
    # The decision family's splits, the verdict's (test) first; a report without its config
    # (as above) gives its splits alphabetically.
    rep = {"config": {"toy": {"enabled": True, "family": "decision"}},
           "summary": {"dpo": {"validation": {"mean": 1.0}, "test": {"mean": 2.0}}}}
    assert replicates.splits({"a": rep}) == ["test", "validation"]
    s = replicates.summarise({"a": rep, "b": rep}, "dpo")
    assert s["pass_at_1"] == {"test": {"dpo": [2.0, 2.0]}, "validation": {"dpo": [1.0, 1.0]}}
    assert replicates.splits({"a": report(1.0, 2.0, 3.0)}) == ["held_out", "seen"]
