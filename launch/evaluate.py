r"""Evaluates code samples on HumanEval(+), MBPP(+) or LiveCodeBench, in the sandbox.

    python -m launch.evaluate --benchmark humaneval+ --samples samples.jsonl --out eval/
    python -m launch.evaluate --benchmark mbpp+ --checkpoint CKPT --out eval/ \
        [--config.n=10 --config.temperature=0.8]
    python -m launch.evaluate --benchmark livecodebench --dataset lcb.jsonl --samples s.jsonl --out eval/

Samples (EvalPlus format): one JSON line per sample, {"task_id", "solution"} (a whole
program) or {"task_id", "completion"} (appended to the task's prompt). With --checkpoint or
--hf_dir the samples are generated first by the policy (`fdpo.policy.Policy`) and written
to OUT/samples.jsonl in that format; --config.response_format says what the model is asked
for. The settings (generation, pass@k, sandbox, time limits) are configs/evaluate.py's.
Outputs in --out: results.json (pass@k, status counts, settings, dataset hash, per-sample
verdicts), tasks.md and tasks.csv (one row per task). See fdpo/evaluation/ and
docs/evaluation.md for oracles and time limits.
"""
from __future__ import annotations

import json
import logging as pylogging
import pathlib

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

import configs
from fdpo.evaluation import runner as rn
from fdpo.evaluation import tasks as tk
from fdpo.extract import RESPONSE_FORMATS
from fdpo.policy import Policy
from fdpo.sandbox.executor import ISOLATION_MODES
from launch import common  # --mesh_shape, --distributed (used with --checkpoint)

CONFIG = config_flags.DEFINE_config_file("config", configs.path("evaluate.py"),
                                         "Evaluation settings (configs/evaluate.py).",
                                         lock_config=True)
BENCHMARK = flags.DEFINE_enum("benchmark", None, list(tk.BENCHMARKS), "Benchmark.",
                              required=True)
SAMPLES = flags.DEFINE_string("samples", None, "EvalPlus samples JSONL to evaluate.")
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "fdpo checkpoint to sample from.")
HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory to sample from.")
DATASET = flags.DEFINE_string(
    "dataset", None, "Benchmark file (EvalPlus .jsonl[.gz], or LiveCodeBench JSONL); "
    "default: the EvalPlus release file under --data_dir.")
DATA_DIR = flags.DEFINE_string(
    "data_dir", str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"),
    "Where the EvalPlus release files are (evalplus/HumanEvalPlus-v0.1.10.jsonl.gz, ...); "
    "default: the shared/data folder beside the checkout.")
OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)


def generate(tasks: dict[str, tk.Task], benchmark: str,
             c: ml_collections.ConfigDict) -> tuple[list[rn.Sample], str]:
    """`c.n` samples per task from the policy, and the prompt format they were asked in."""
    common.quiet_tokenizers()
    policy = Policy.load(common.init_jax(), checkpoint=CHECKPOINT.value, hf_dir=HF_DIR.value)
    ids = list(tasks)
    completion = c.response_format == "completion"
    prompts = [tasks[t].prompt if completion else prompt_for(tasks[t], benchmark) for t in ids]
    outs = policy.generate(prompts, num_samples=c.n, temperature=c.temperature,
                           top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                           batch_size=c.batch_size, seed=c.seed)
    samples = [rn.Sample(t, tasks[t].prompt + o.text if completion else rn.extract_code(o.text))
               for t, task_outs in zip(ids, outs) for o in task_outs]
    return samples, policy.prompt_format


def prompt_for(task: tk.Task, benchmark: str) -> str:
    """The user message: the task and a request for a complete program in a code block."""
    if benchmark == "livecodebench":
        extra = (f"\n\nUse this starter code:\n```python\n{task.starter_code}\n```"
                 if task.starter_code else "\n\nRead the input from stdin and write the "
                 "answer to stdout.")
        return task.prompt + extra + "\nAnswer with the complete program in one ```python block."
    return ("Complete the following Python function. Answer with the complete, "
            f"self-contained program in one ```python block.\n```python\n{task.prompt}```")


def main(argv):
    del argv
    pylogging.getLogger().setLevel(pylogging.INFO)
    model = CHECKPOINT.value or HF_DIR.value
    if (SAMPLES.value is None) == (model is None):
        raise app.UsageError("give exactly one of --samples and --checkpoint/--hf_dir")
    if CHECKPOINT.value and HF_DIR.value:
        raise app.UsageError("give only one of --checkpoint and --hf_dir")
    c = CONFIG.value
    for field, allowed in (("response_format", RESPONSE_FORMATS),
                           ("isolation", ISOLATION_MODES)):
        if c[field] not in allowed:
            raise app.UsageError(f"--config.{field}={c[field]!r}; expected one of {allowed}")
    bench = BENCHMARK.value
    try:
        tasks, _ = tk.load_tasks(bench, DATASET.value, DATA_DIR.value)
    except tk.DataError as e:
        raise app.UsageError(str(e)) from e
    out = pathlib.Path(OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    samples = None
    samples_path = SAMPLES.value
    if model is not None:
        samples, prompt_format = generate(tasks, bench, c)
        samples_path = out / "samples.jsonl"
        with open(samples_path, "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps({"task_id": s.task_id, "solution": s.solution}) + "\n")
        logging.info("wrote %d samples to %s", len(samples), samples_path)
    cfg = rn.RunConfig(
        policy=tk.TimePolicy(floor_s=c.min_time_limit, factor=c.time_limit_factor,
                             budget_s=c.split_budget, lcb_timeout_s=c.lcb_timeout),
        workers=c.workers, isolation=c.isolation, memory_mb=c.memory_mb)
    total = None
    if samples is None:
        try:
            samples = rn.read_samples(samples_path, tasks, bench)
        except (OSError, rn.SampleError) as e:
            raise app.UsageError(str(e)) from e
    total = len(samples)
    with tqdm(total=total, unit="sample") as bar:
        try:
            summary, records, meta = rn.evaluate(
                bench, dataset=DATASET.value, data_dir=DATA_DIR.value, samples=samples, cfg=cfg,
                ks=list(c.k), partial=c.partial, progress=bar.update)
        except rn.SampleError as e:
            raise app.UsageError(str(e)) from e
    meta["samples"] = str(samples_path)
    if model is not None:
        meta["generation"] = {"model": model, "n": c.n, "temperature": c.temperature,
                              "top_p": c.top_p, "max_new_tokens": c.max_new_tokens,
                              "response_format": c.response_format,
                              "prompt_format": prompt_format,
                              "seed": c.seed}
    paths = rn.write_outputs(out, summary, records, meta)
    for name, scores in summary["pass_at_k"].items():
        logging.info("%s %s: %s", bench, name,
                     ", ".join(f"{k} {100 * v:.1f}" for k, v in scores.items()))
    for sp, counts in summary["status_counts"].items():
        logging.info("%s statuses: %s", sp, {k: v for k, v in counts.items() if v})
    logging.info("wrote %s", ", ".join(paths.values()))


if __name__ == "__main__":
    app.run(main)
