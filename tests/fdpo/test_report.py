"""fdpo.report's verdicts and tables for the miniature and for a real run's benchmarks."""

from __future__ import annotations

import json

from fdpo import report


def data_for(toy: bool, pass_at_1: dict) -> dict:
    cfg = {"name": "x", "toy": {"enabled": toy, "corrupt_fraction": 0.25,
                                "held_out_fraction": 0.2},
           "sample": {"temperature": 1.0}, "warm_start": {"enabled": toy},
           "evaluate": {"benchmarks": [["humaneval+", "humaneval+", ""],
                                       ["mbpp+", "mbpp+", ""]]}}
    return {"config": cfg, "timings": {}, "curves": {}, "pass_at_1": pass_at_1, "counts": {}}


def test_real_run_reports_every_benchmark_in_config_order():
    data = data_for(False, {"init": {"mbpp+": 50.0, "humaneval+": 40.0},
                            "focused_dpo-s0": {"mbpp+": 55.0, "humaneval+": 39.0},
                            "dpo-s0": {"mbpp+": 52.0, "humaneval+": 41.0}})
    summary = report.summarise(data)
    assert report.evaluations(data, summary) == ["humaneval+", "mbpp+"]
    text = report.render(data, summary, [])
    assert "| method | seeds | humaneval+ (mean, min-max) | mbpp+ (mean, min-max) |" in text
    assert "| focused_dpo | 1 | 39.0 (39.0-39.0) | 55.0 (55.0-55.0) |" in text
    assert "Focused-DPO lost to dpo on humaneval+ pass@1: 39.0 vs 41.0" in text
    assert "Focused-DPO beat init on mbpp+ pass@1: 55.0 vs 50.0" in text


def test_miniature_verdict_is_on_held_out_tasks_only():
    data = data_for(True, {"warm_start": {"seen": 80.0, "held_out": 70.0},
                           "focused_dpo-s0": {"seen": 90.0, "held_out": 72.0},
                           "focused_dpo-s1": {"seen": 91.0, "held_out": 74.0}})
    summary = report.summarise(data)
    lines = report.verdicts(summary, report.verdict_evaluations(data, summary))
    assert lines == ["Focused-DPO beat warm_start on held-out pass@1: 73.0 vs 70.0 (difference "
                     "+3.0 points; Focused-DPO seeds 72.0-74.0, warm_start 70.0-70.0)."]
    text = report.render(data, summary, [])
    assert "| method | seeds | seen (mean, min-max) | held-out (mean, min-max) |" in text
    missing = report.verdicts({"dpo": {"held_out": summary["warm_start"]["held_out"]}},
                              ["held_out"])
    assert missing == ["Focused-DPO was not evaluated on held-out."]


def test_decision_family_reports_validation_and_test_with_the_verdict_on_test():
    data = data_for(True, {"warm_start": {"test": 60.0, "validation": 62.0},
                           "focused_dpo-s0": {"test": 70.0, "validation": 75.0},
                           "dpo-s0": {"test": 65.0, "validation": 80.0}})
    data["config"]["toy"].update(family="decision", trap_rate=0.65, noise_rate=0.05)
    summary = report.summarise(data)
    assert report.evaluations(data, summary) == ["validation", "test"]
    lines = report.verdicts(summary, report.verdict_evaluations(data, summary))
    assert [line.split(":")[0] for line in lines] == [
        "Focused-DPO beat dpo on test pass@1", "Focused-DPO beat warm_start on test pass@1"]
    text = report.render(data, summary, [])
    assert "| method | seeds | validation (mean, min-max) | test (mean, min-max) |" in text
    assert "| dpo | 1 | 80.0 (80.0-80.0) | 65.0 (65.0-65.0) |" in text
    assert "wrong operator in 65% of the warm start's data, the others in 5%" in text


def test_write_reads_what_the_stages_left(tmp_path):
    cfg = data_for(True, {})["config"]
    (tmp_path / "pipeline_config.json").write_text(json.dumps(cfg))
    (tmp_path / "timings.json").write_text(json.dumps({"train": 12.0, "evaluate": 3.0}))
    for model, frac in (("warm_start", 0.5), ("focused_dpo-s0", 0.75), ("focused_dpo-s1", 0.625)):
        d = tmp_path / "eval" / model / "held_out"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"pass_at_k": {"base": {"pass@1": frac}}}))
    metrics = tmp_path / "train" / "focused_dpo-s0" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    rows = [{"split": s, "step": i, "loss": 1.0 / i, "rewards/margins": 0.1 * i}
            for i, s in ((1, "train"), (2, "eval"), (3, "train"))]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = report.write(tmp_path)
    out = tmp_path / "report"
    assert path == out / "report.md"
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "loss.png",
                                               "margins.png", "pass_at_1.png"}
    written = json.loads((out / "report.json").read_text())
    # results.json holds fractions; the report speaks in percent, per method over seeds.
    assert written["summary"]["focused_dpo"]["held_out"]["values"] == [75.0, 62.5]
    assert written["curves"]["focused_dpo-s0"]["loss"] == [[1, 1.0], [3, 1 / 3]]
    text = path.read_text()
    assert "Focused-DPO beat warm_start on held-out pass@1: 68.8 vs 50.0" in text
    assert "| total | 15 |" in text and "![pass_at_1.png](pass_at_1.png)" in text
