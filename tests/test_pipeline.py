"""The main job end to end: `launch.pipeline` on the miniature's fast variant.

A few steps per stage: this checks the plumbing (every stage's output exists and agrees
with the others), stage skipping, and resuming an interrupted stage — not the method.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def pipeline(workdir, *extra):
    proc = subprocess.run([sys.executable, "-m", "launch.pipeline", "--config=configs/toy.py:fast",
                           f"--workdir={workdir}", *extra], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def lines(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


@pytest.mark.slow
def test_fast_pipeline_end_to_end_skip_and_resume(tmp_path):
    w = tmp_path / "run"
    out = pipeline(w)
    assert "report: " in out
    cfg = json.loads((w / "pipeline_config.json").read_text())

    # Data stage: prompts split three ways, tests for each prompt.
    prompts = lines(w / "data" / "prompts.jsonl")
    dpo = [p for p in prompts if p["split"] == "dpo"][:cfg["sample"]["max_prompts"]]
    # Sampling: one line per prompt, num_codes programs each, each program = prompt + body.
    samples = lines(w / "samples.jsonl")
    assert [s["id"] for s in samples] == [p["id"] for p in dpo]
    for s in samples:
        assert len(s["codes"]) == len(s["raw"]["code_responses"]) == cfg["sample"]["num_codes"]
        assert all(c == s["raw"]["problem"] + r
                   for c, r in zip(s["codes"], s["raw"]["code_responses"]))
    # Execution: a verdict matrix of codes x tests per problem.
    verdicts = {v["id"]: v for v in lines(w / "verdicts.jsonl")}
    tests = {t["id"]: t for t in lines(w / "data" / "tests.jsonl")}
    assert set(verdicts) == {s["id"] for s in samples}
    for pid, v in verdicts.items():
        assert len(v["passed"]) == cfg["sample"]["num_codes"]
        assert all(len(row) == len(tests[pid]["tests"]) for row in v["passed"])
    # Pairs: every input line used or dropped; records exist and carry reference sums.
    manifest = json.loads((w / "pairs" / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["lines_in"] == len(samples) == c["lines_used"] + c["lines_dropped"]
    assert sum(c["records_out"].values()) == c["lines_used"] > 0
    ref_manifest = json.loads((w / "pairs_ref" / "manifest.json").read_text())
    assert sum(ref_manifest["counts"]["records_out"].values()) == c["lines_used"]
    # Training: every method x seed finished with the configured steps and a final model.
    runs = [f"{m}-s{s}" for m in cfg["methods"] for s in cfg["seeds"]]
    for run in runs:
        metrics = [m for m in lines(w / "train" / run / "metrics.jsonl") if m["split"] == "train"]
        assert metrics[-1]["step"] == cfg["train"]["steps"]
        assert (w / "train" / run / "final" / "fdpo_model.json").is_file()
    # Evaluation: the start and every run, on both splits.
    for model in ["warm_start"] + runs:
        for split in ("seen", "held_out"):
            res = json.loads((w / "eval" / model / split / "results.json").read_text())
            assert 0.0 <= res["pass_at_k"]["base"]["pass@1"] <= 100.0
    # Analysis and report.
    phi = json.loads((w / "analysis" / "phi.json").read_text())
    cont = json.loads((w / "analysis" / "continuation.json").read_text())
    assert cont["problems"] == phi["problems_used"]
    assert cont["chosen"]["programs"] == cont["rejected"]["programs"] == phi["problems_used"]
    report = json.loads((w / "report" / "report.json").read_text())
    assert set(report["summary"]) == {"warm_start", *cfg["methods"]}
    text = (w / "report" / "report.md").read_text()
    assert "## Greedy pass@1" in text and (w / "report" / "pass_at_1.png").is_file()

    # A second run skips every stage.
    out = pipeline(w)
    assert out.count("done earlier, skipped") == len(list((w / "stages").glob("*.json")))

    # Resume: an interrupted training stage (marker missing, one run without its final
    # model) reruns only what is missing; the finished runs are kept as they are.
    (w / "stages" / "train.json").unlink()
    (w / "stages" / "evaluate.json").unlink()
    (w / "stages" / "report.json").unlink()
    kept = (w / "train" / runs[0] / "final" / "fdpo_model.json").stat().st_mtime_ns
    shutil.rmtree(w / "train" / runs[-1] / "final")
    out = pipeline(w)
    assert "[pipeline] train ..." in out and "sample: done earlier, skipped" in out
    assert (w / "train" / runs[-1] / "final" / "fdpo_model.json").is_file()
    assert (w / "train" / runs[0] / "final" / "fdpo_model.json").stat().st_mtime_ns == kept


def test_real_config_is_the_same_pipeline_with_other_values():
    from configs import real, toy

    c = real.get_config("hf_dir=/ckpt/qwen,prompts=/data/p.jsonl")
    t = toy.get_config()
    assert set(c.keys()) == set(t.keys())  # same fields: nothing special-cased
    assert (c.init.hf_dir, c.prompts, c.toy.enabled, c.warm_start.enabled) == (
        "/ckpt/qwen", "/data/p.jsonl", False, False)
    assert (c.tests_source, c.sample.temperature, c.sample.num_codes, c.sample.num_tests) == (
        "model", 1.5, 10, 10)  # the paper's self-generation settings
    assert [b[1] for b in c.evaluate.benchmarks] == ["humaneval+", "mbpp+"]
