"""launch.report's verdicts and tables for the miniature and for a real run's benchmarks."""

from __future__ import annotations

from launch import report


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
