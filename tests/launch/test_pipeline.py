"""The pipeline (`fdpo.pipeline`, run by `launch.pipeline`): its two configs, the commands
its stages give the programs, and, slow, the miniature's fast variant end to end.

The end-to-end run checks the plumbing (every stage's output exists and agrees with the
others), stage skipping, and resuming an interrupted stage — not the method.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs import real, toy
from fdpo import pipeline

from tests.conftest import REPO

pytestmark = pytest.mark.sandbox
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
# The config file a program reads when the pipeline names none (the program's --config default).
DEFAULT_CONFIGS = {"launch.build": "configs/build.py", "launch.toy_data": "configs/toy_data.py",
                   "launch.init_model": "configs/init_model.py",
                   "launch.execute": "configs/execute.py",
                   "launch.evaluate": "configs/evaluate.py",
                   "launch.analyze": "configs/analyze.py"}
# The stages whose commands stage_calls records.
STAGES = ("data", "init", "sft_data", "warm_start", "sample", "execute", "pairs", "reference",
          "train", "evaluate", "analyze", "report")


def run_program(workdir, *extra):
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
    out = run_program(w)
    assert "report: " in out
    cfg = json.loads((w / "pipeline_config.json").read_text())

    # Data stage: prompts split three ways, tests for each prompt.
    prompts = lines(w / "data" / "prompts.jsonl")
    dpo = [p for p in prompts if p["split"] == "dpo"][:cfg["sample"]["max_prompts"]]
    # Sampling: one line per prompt, num_codes programs each, each program = prompt + body.
    samples = lines(w / "samples.jsonl")
    assert [s["id"] for s in samples] == [p["id"] for p in dpo]
    tests = {t["id"]: t for t in lines(w / "data" / "tests.jsonl")}
    for s in samples:
        assert len(s["samples"]) == cfg["sample"]["num_codes"]
        assert all(x["program"] == s["problem"] + x["response"] for x in s["samples"])
        # The oracle's tests rode along from the sampler's input (code-only sampling).
        assert s["tests"] == tests[s["id"]]["tests"]
    # Execution: the same records, extended by a verdict matrix of samples x tests.
    executed = {v["id"]: v for v in lines(w / "executed.jsonl")}
    assert set(executed) == {s["id"] for s in samples}
    for s in samples:
        v = executed[s["id"]]
        assert {k: v[k] for k in s} == s  # every field passed through
        assert len(v["passed"]) == cfg["sample"]["num_codes"]
        assert all(len(row) == len(tests[s["id"]]["tests"]) for row in v["passed"])
    # No glue between the stages: the only JSONL files the pipeline itself writes.
    assert sorted(x.name for x in w.glob("*.jsonl")) == [
        "executed.jsonl", "sample_prompts.jsonl", "samples.jsonl"]
    # Pairs: every input line used or dropped; records exist and carry reference sums.
    manifest = json.loads((w / "pairs" / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["lines_in"] == len(samples) == c["lines_used"] + c["lines_dropped"]
    assert sum(c["records_out"].values()) == c["lines_used"] > 0
    assert c["selection"]["train"]["cut"] == c["selection"]["validation"]["cut"] == 0
    ref_manifest = json.loads((w / "pairs_ref" / "manifest.json").read_text())
    assert sum(ref_manifest["counts"]["records_out"].values()) == c["lines_used"]
    # Training: every method x seed finished with the configured steps and a final model.
    runs = [f"{m}-s{s}" for m in cfg["methods"] for s in cfg["seeds"]]
    for run in runs:
        metrics = [m for m in lines(w / "train" / run / "metrics.jsonl") if m["split"] == "train"]
        assert metrics[-1]["step"] == cfg["train"]["steps"]
        assert (w / "train" / run / "final" / "fdpo_model.json").is_file()
    # Evaluation: the start and every run, on both of the task family's splits.
    splits = pipeline.TOY_EVAL_SPLITS[cfg["toy"]["family"]]
    for model in ["warm_start"] + runs:
        for split in splits:
            res = json.loads((w / "eval" / model / split / "results.json").read_text())
            tasks = [t["task_id"] for t in lines(w / "data" / f"eval_{split}.jsonl")]
            rows = {r["task_id"]: r for r in res["tasks"]}
            # Every task, one greedy sample each; pass@1 is the fraction of tasks it solved.
            assert set(rows) == set(tasks) and all(r["n"] == 1 for r in rows.values())
            solved = sum(r["base_correct"] for r in rows.values()) / len(rows)
            assert res["pass_at_k"]["base"]["pass@1"] == pytest.approx(solved)
    # Analysis and report.
    phi = json.loads((w / "analysis" / "phi.json").read_text())
    cont = json.loads((w / "analysis" / "continuation.json").read_text())
    assert cont["problems"] == phi["problems_used"]
    assert cont["chosen"]["programs"] == cont["rejected"]["programs"] == phi["problems_used"]
    report = json.loads((w / "report" / "report.json").read_text())
    assert set(report["summary"]) == {"warm_start", *cfg["methods"]}
    for model in ["warm_start"] + runs:  # in percent, as the report speaks
        for split in splits:
            res = json.loads((w / "eval" / model / split / "results.json").read_text())
            assert report["pass_at_1"][model][split] == pytest.approx(
                100 * res["pass_at_k"]["base"]["pass@1"])
    text = (w / "report" / "report.md").read_text()
    assert "## Greedy pass@1" in text and (w / "report" / "pass_at_1.png").is_file()

    # A second run skips every stage.
    out = run_program(w)
    assert out.count("done earlier, skipped") == len(list((w / "stages").glob("*.json")))

    # Resume: an interrupted training stage (marker missing, one run without its final
    # model) reruns only what is missing; the finished runs are kept as they are.
    (w / "stages" / "train.json").unlink()
    (w / "stages" / "evaluate.json").unlink()
    (w / "stages" / "report.json").unlink()
    kept = (w / "train" / runs[0] / "final" / "fdpo_model.json").stat().st_mtime_ns
    shutil.rmtree(w / "train" / runs[-1] / "final")
    out = run_program(w)
    assert "[pipeline] train ..." in out and "sample: done earlier, skipped" in out
    assert (w / "train" / runs[-1] / "final" / "fdpo_model.json").is_file()
    assert (w / "train" / runs[0] / "final" / "fdpo_model.json").stat().st_mtime_ns == kept


def config(name: str, tmp_path: pathlib.Path):
    if name == "real":
        return real.get_config(f"hf_dir={tmp_path / 'hf'},prompts={tmp_path / 'prompts.jsonl'}")
    return toy.get_config(name.partition(":")[2] or None)  # "toy:fast,decision"


def field_types(c: ml_collections.ConfigDict, prefix: str = "") -> dict[str, type]:
    """{dotted field: declared type}; a placeholder (None until set) has its declared type."""
    out = {}
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(field_types(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = c.get_type(k)
    return out


def test_toy_and_real_configs_have_the_same_fields(tmp_path):
    # Written apart, so that a real run inherits none of the miniature's tuning; one program
    # reads both, so a field one of them lacks (or types differently) breaks the other.
    toy_cfg, real_cfg = (config(name, tmp_path) for name in ("toy", "real"))
    for c in (toy_cfg, real_cfg):
        # method_train is a map {method: {lr, nll_weight}}: its keys are the config's choice.
        own = c.method_train.to_dict()
        with c.unlocked():
            del c["method_train"]
        assert set(c.methods) | set(own) <= set(pipeline.METHOD_PRESETS)
        assert all(set(v) <= {"lr", "nll_weight"} for v in own.values())
    assert field_types(toy_cfg) == field_types(real_cfg)


def stage_calls(cfg, w: pathlib.Path) -> list[tuple[str, str, list[str]]]:
    """(stage, program, arguments) of every program the stages in STAGES run, recorded
    instead of run; the files a stage reads are written by hand."""
    p = pipeline.Pipeline(cfg, w)
    calls = []

    def run(stage, module, *args):
        args = [str(a) for a in args]
        calls.append((stage, module, args))
        if module == "launch.build":  # the pairs stage reads the build's counts
            out = pathlib.Path(args[args.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "manifest.json").write_text(json.dumps({"counts": {
                "records_out": {"train": cfg.train.batch_size}}}))

    p.run = run
    for name in STAGES:
        if name == "data" and not cfg.toy.enabled or \
                name in ("sft_data", "warm_start") and not cfg.warm_start.enabled:
            continue
        if name == "sample":
            prompts = p.toy_dir / "prompts.jsonl" if cfg.toy.enabled else pathlib.Path(cfg.prompts)
            prompts.parent.mkdir(parents=True, exist_ok=True)
            prompts.write_text(json.dumps({"id": "t0", "prompt": "p", "split": cfg.sample.split})
                               + "\n")
            if cfg.toy.enabled:  # the miniature's oracle tests, read into the sampler's input
                (p.toy_dir / "tests.jsonl").write_text(json.dumps(
                    {"id": "t0", "tests": ["t"], "tests_correct": [True]}) + "\n")
        getattr(p, name)()
    return calls


def program_config(module: str, args: list[str]):
    """The config `python -m module *args` runs with: its --config file (or the program's
    default) with the --config.FIELD=VALUE overrides, parsed as the program parses them
    (locked: a field the config lacks, or a value of another type, is an error)."""
    argv = [module] + [a for a in args if a.startswith("--config")]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIGS.get(module), flag_values=values,
                                    lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


@pytest.mark.parametrize("name", ["toy", "toy:fast", "toy:decision", "toy:fast,decision",
                                  "real"])
def test_every_config_override_a_stage_passes_names_a_field_of_its_program(name, tmp_path,
                                                                           monkeypatch):
    # Without this, a renamed field of configs/focused_dpo.py (say) stops a run at its train
    # stage, after sampling and execution.
    calls = stage_calls(config(name, tmp_path), tmp_path / "run")
    monkeypatch.chdir(REPO)  # config paths are the checkout's
    checked = set()
    for stage, module, args in calls:
        if any(a.startswith("--config") for a in args):
            program_config(module, args)
            checked.add(module)
    expected = {"launch.train", "launch.sample", "launch.build", "launch.execute",
                "launch.precompute_ref", "launch.evaluate", "launch.analyze"}
    if name != "real":
        expected |= {"launch.toy_data", "launch.init_model"}
    assert checked == expected


def test_reference_sums_are_computed_as_the_train_stage_computes_them(tmp_path, monkeypatch):
    # launch.train refuses ref_logps of another reference, dtype or chunk; a mismatch here
    # would stop the run at its train stage, after sampling and execution.
    calls = stage_calls(config("toy:fast", tmp_path), tmp_path / "run")
    monkeypatch.chdir(REPO)

    def what(c):
        return (c.init_checkpoint, c.reference.checkpoint, c.model.compute_dtype,
                c.model.param_dtype, c.train.logprob_chunk, tuple(c.mesh_shape))

    seen = {stage: {what(program_config(module, args)) for s, module, args in calls
                    if s == stage}
            for stage in ("reference", "train")}
    assert len(seen["reference"]) == 1 and seen["reference"] == seen["train"]


def test_real_run_starts_from_the_checkpoint_and_prompts_given_at_one_learning_rate(
        tmp_path, monkeypatch):
    cfg = config("real", tmp_path)
    w = tmp_path / "run"
    calls = stage_calls(cfg, w)
    monkeypatch.chdir(REPO)
    (init,) = [(module, args) for stage, module, args in calls if stage == "init"]
    assert init[0] == "launch.import_hf" and init[1][:2] == ["--hf_dir", str(tmp_path / "hf")]
    assert lines(w / "sample_prompts.jsonl") == lines(tmp_path / "prompts.jsonl")
    trains = {args[0]: program_config(module, args) for stage, module, args in calls
              if stage == "train"}
    assert sorted(trains) == [f"--workdir={w / 'train' / m}-s0" for m in ("dpo", "focused_dpo")]
    # lr and NLL matched across methods (METHOD.md): none of the miniature's per-method tuning.
    (matched,) = {(c.optimizer.lr, c.loss.nll_weight) for c in trains.values()}
    assert matched[0] == cfg.train.lr
    assert {c.init_checkpoint for c in trains.values()} == {str(w / "init")}


def test_only_runs_the_stages_named_and_ignores_their_markers(tmp_path):
    ran = []
    for only in ((), ("b",)):
        p = pipeline.Pipeline(toy.get_config(), tmp_path, only=only)
        for name in ("a", "b", "c"):
            p.stage(name, lambda name=name: ran.append(name))
    # First every stage, leaving markers; then only b, although its marker exists.
    assert ran == ["a", "b", "c", "b"]
    assert sorted(f.name for f in (tmp_path / "stages").iterdir()) == ["a.json", "b.json",
                                                                       "c.json"]


def test_a_misspelt_override_stops_the_program_before_any_stage(tmp_path):
    w = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "launch.pipeline", "--config=configs/toy.py",
                           "--config.train.stepz=4", f"--workdir={w}"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "stepz" in proc.stderr
    assert not w.exists()


@pytest.mark.parametrize("fmt", ["", "magicoder"])
def test_one_prompt_format_reaches_every_program_that_renders_prompts(fmt, tmp_path,
                                                                       monkeypatch):
    cfg = real.get_config(f"hf_dir={tmp_path / 'hf'},prompts={tmp_path / 'prompts.jsonl'},"
                          f"prompt_format={fmt}")
    assert cfg.prompt_format == fmt
    calls = stage_calls(cfg, tmp_path / "run")
    monkeypatch.chdir(REPO)
    seen = {}
    for stage, module, args in calls:
        if module in ("launch.sample", "launch.build", "launch.evaluate", "launch.analyze"):
            seen.setdefault(module, set()).add(program_config(module, args).prompt_format)
    # "": each program's own default (the tokenizer's; build and analyze: the recorded one).
    assert seen == {m: {fmt} for m in ("launch.sample", "launch.build", "launch.evaluate",
                                       "launch.analyze")}
    cfg.prompt_format = "alpaca"
    with pytest.raises(ValueError, match="config.prompt_format='alpaca'"):
        pipeline.check_inputs(cfg)
