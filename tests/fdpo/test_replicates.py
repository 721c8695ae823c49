"""fdpo.replicates (and the launch.replicates program) on hand-made pipeline reports."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
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


def eval_results(workdir, model, split, passed):
    """eval/MODEL/SPLIT/results.json as launch.evaluate writes it (greedy: n = 1 per task)."""
    d = pathlib.Path(workdir) / "eval" / model / split
    d.mkdir(parents=True)
    rows = [{"task_id": t, "n": 1, "base_correct": int(p), "plus_correct": 0}
            for t, p in passed.items()]
    (d / "results.json").write_text(json.dumps(
        {"benchmark": "evalplus", "pass_at_k": {"base": {"pass@1": 0.5}}, "tasks": rows}))


def study(tmp_path, lead):
    """Three warm starts, 40 held-out tasks: dpo passes the first 20; focused_dpo's two
    seeds pass the first 20 + lead[i] and 20 + lead[i] - 2; sft passes the first 19."""
    dirs = []
    for i, k in enumerate(lead):
        w = write(tmp_path, f"w{i}", report(80.0, 79.0, 70.0))
        tasks = [f"T/{j}" for j in range(40)]
        eval_results(w, "dpo-s0", "held_out", {t: j < 20 for j, t in enumerate(tasks)})
        eval_results(w, "sft-s0", "held_out", {t: j < 19 for j, t in enumerate(tasks)})
        for seed, extra in ((0, k), (1, k - 2)):
            eval_results(w, f"focused_dpo-s{seed}", "held_out",
                         {t: j < 20 + extra for j, t in enumerate(tasks)})
        dirs.append(w)
    return dirs


def test_statistics_pair_tasks_average_seeds_and_state_a_claim(tmp_path):
    dirs = study(tmp_path, lead=[6, 8, 7])
    st = replicates.run_statistics(dirs, "focused_dpo", "dpo", n_boot=2000)
    assert st["split"] == "held_out"
    # Per warm start: the seeds' mean lead is (k + k - 2) / 2 tasks of 40, in points.
    expect = [100 * (k - 1) / 40 for k in (6, 8, 7)]
    p = st["primary"]
    assert list(p["per_warm_start"].values()) == pytest.approx(expect)
    assert p["estimate"] == pytest.approx(sum(expect) / 3)
    assert p["ci"][0] > 0 and p["claim"] and p["outcome"].startswith("claim (ahead)")
    (sec,) = st["secondary"]
    assert sec["b"] == "sft" and sec["p_holm"] == pytest.approx(sec["p_value"])
    text = replicates.render_statistics(st)
    assert "**Primary** (focused_dpo vs dpo): claim (ahead): focused_dpo - dpo: +" in text
    assert "| focused_dpo - sft | secondary |" in text


def test_statistics_state_no_claim_when_a_warm_start_disagrees(tmp_path):
    dirs = study(tmp_path, lead=[6, 8, 0])   # the third warm start: focused_dpo behind by 1
    st = replicates.run_statistics(dirs, "focused_dpo", "dpo", n_boot=2000)
    p = st["primary"]
    assert p["per_warm_start"][dirs[2]] == pytest.approx(-2.5)
    assert not p["claim"] and p["outcome"].startswith("no claim: ")
    with pytest.raises(replicates.ReportError,
                       match=f"no per-task results for split 'test' in {dirs[0]}, {dirs[1]}, "):
        replicates.run_statistics(dirs, "focused_dpo", "dpo", split="test")
    st = replicates.run_statistics(dirs, "focused_dpo", "rpo", n_boot=100)
    assert st["primary"] is None and "no primary comparison: rpo not evaluated" in st["note"]


def test_the_interval_is_chosen_and_named(tmp_path):
    dirs = study(tmp_path, lead=[6, 8, 7])
    t = replicates.run_statistics(dirs, "focused_dpo", "dpo", n_boot=2000)
    pct = replicates.run_statistics(dirs, "focused_dpo", "dpo", n_boot=2000,
                                    interval="percentile")
    assert (t["interval"], pct["interval"]) == ("cluster_t", "percentile")
    # cluster_t: the hull of mean +- t(0.975, 2 df) sd(means) / sqrt(3) over the warm-start
    # means (12.5, 17.5, 15 points) and the task-noise floor; the t bound binds below here
    means = [100 * (k - 1) / 40 for k in (6, 8, 7)]
    half = 4.302652729911275 * float(np.std(means, ddof=1)) / np.sqrt(3)
    lo, hi = t["primary"]["ci"]
    assert lo == pytest.approx(np.mean(means) - half, abs=1e-9)
    assert hi >= np.mean(means) + half - 1e-9
    # the same estimate, another interval
    assert pct["primary"]["estimate"] == pytest.approx(np.mean(means))
    assert pct["primary"]["ci"] != pytest.approx(t["primary"]["ci"], abs=1e-3)
    assert "percentile interval over warm" in replicates.render_statistics(pct)
    # one warm start: cluster_t cannot estimate the spread; percentile can be asked for
    with pytest.raises(replicates.ReportError, match="at least 2 warm starts"):
        replicates.run_statistics(dirs[:1], "focused_dpo", "dpo", n_boot=100)
    one = replicates.run_statistics(dirs[:1], "focused_dpo", "dpo", n_boot=100,
                                    interval="percentile")
    assert one["primary"]["estimate"] == pytest.approx(means[0])


def test_cli_writes_statistics_and_names_an_unpaired_task(tmp_path):
    dirs = study(tmp_path, lead=[6, 8, 7])
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "launch.replicates", f"--workdirs={','.join(dirs)}",
           f"--out={out}", "--n_boot=1000"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {"replicates.md", "replicates.json",
                                               "replicates.png", "statistics.json", "forest.png"}
    st = json.loads((out / "statistics.json").read_text())
    assert st["primary"]["claim"] and st["n_boot"] == 1000
    assert "![forest](forest.png)" in (out / "replicates.md").read_text()
    assert "claim (ahead): focused_dpo - dpo" in proc.stdout
    # dpo lacks a task in one warm start: an error naming the workdir and the task
    bad = json.loads((tmp_path / "w1/eval/dpo-s0/held_out/results.json").read_text())
    bad["tasks"] = [r for r in bad["tasks"] if r["task_id"] != "T/3"]
    (tmp_path / "w1/eval/dpo-s0/held_out/results.json").write_text(json.dumps(bad))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert (f"warm start '{dirs[1]}': task 'T/3' has a result for focused_dpo but not for dpo"
            in proc.stderr)


def test_split_names_come_from_the_reports():
    # The decision family's splits, in KNOWN_SPLITS order, beside the list family's.
    rep = {"config": {"toy": {"enabled": True, "family": "decision"}},
           "summary": {"dpo": {"validation": {"mean": 1.0}, "test": {"mean": 2.0}}}}
    assert replicates.splits_of({"a": rep}) == ["validation", "test"]
    s = replicates.summarise({"a": rep, "b": rep}, "dpo")
    assert s["pass_at_1"] == {"test": {"dpo": [2.0, 2.0]}, "validation": {"dpo": [1.0, 1.0]}}
    assert replicates.splits_of({"a": report(1.0, 2.0, 3.0)}) == ["held_out", "seen"]
