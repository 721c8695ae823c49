"""Evaluates code samples on HumanEval(+), MBPP(+) or LiveCodeBench, in the sandbox.

    python -m launch.evaluate --benchmark humaneval+ --samples samples.jsonl --out eval/
    python -m launch.evaluate --benchmark mbpp+ --checkpoint CKPT --n 1 --temperature 0 --out eval/
    python -m launch.evaluate --benchmark livecodebench --dataset lcb.jsonl --samples s.jsonl --out eval/

Samples (EvalPlus format): one JSON line per sample, {"task_id", "solution"} (a whole
program) or {"task_id", "completion"} (appended to the task's prompt). With --checkpoint or
--hf_dir the samples are generated first by the policy (`fdpo.policy.Policy`) and written
to OUT/samples.jsonl in that format; --response_format says what the model is asked for. Outputs in --out: results.json (pass@k, status counts, settings, dataset
hash, per-sample verdicts), tasks.md and tasks.csv (one row per task). See
fdpo/evaluation/ and docs/evaluation.md for oracles and time limits.
"""
from __future__ import annotations

import json
import logging as pylogging
import pathlib

from absl import app, flags, logging
from tqdm import tqdm

from fdpo.evaluation import runner as rn
from fdpo.evaluation import tasks as tk
from fdpo.extract import RESPONSE_FORMATS
from fdpo.policy import Policy
from launch import common  # --mesh_shape, --distributed (used with --checkpoint)

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
N = flags.DEFINE_integer("n", 1, "Samples per task (--checkpoint).")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature (--checkpoint); "
                                 "0 = greedy.")
TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling (--checkpoint).")
MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 768, "Generation length.")
SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Rows per compiled generation call.")
KS = flags.DEFINE_list("k", ["1", "10", "100"], "pass@k values (those with n >= k).")
WORKERS = flags.DEFINE_integer("workers", None, "Parallel sandboxes (default: all cores).")
ISOLATION = flags.DEFINE_enum("isolation", "full", ["full", "no_cgroup", "none"],
                              "Executor isolation (see docs/sandbox.md).")
MEMORY_MB = flags.DEFINE_integer("memory_mb", 4096, "Memory per program (EvalPlus: 4 GB).")
FLOOR_S = flags.DEFINE_float("min_time_limit", 4.0, "Per-input time limit floor, seconds.")
FACTOR = flags.DEFINE_float("time_limit_factor", 4.0,
                            "Per-input limit = max(floor, factor x reference time).")
BUDGET_S = flags.DEFINE_float("split_budget", 60.0,
                              "Cap on a sample's summed time on one split, seconds.")
LCB_TIMEOUT = flags.DEFINE_float("lcb_timeout", 6.0, "LiveCodeBench seconds per test.")
PARTIAL = flags.DEFINE_bool("partial", False, "Allow samples for only some tasks.")
RESPONSE_FORMAT = flags.DEFINE_enum(
    "response_format", "code_block", list(RESPONSE_FORMATS),
    "With a model: 'code_block' asks for a whole program in a fenced block and extracts it; "
    "'completion' gives the task's prompt as it is and appends the model's continuation to "
    "it (base models, the miniature). The prompt is rendered in the policy's prompt format "
    "(chat template when the tokenizer has one).")


def generate(tasks: dict[str, tk.Task], benchmark: str, n: int) -> tuple[list[rn.Sample], str]:
    """`n` samples per task from the policy, and the prompt format they were asked in."""
    common.quiet_tokenizers()
    policy = Policy.load(common.init_jax(), checkpoint=CHECKPOINT.value, hf_dir=HF_DIR.value)
    ids = list(tasks)
    completion = RESPONSE_FORMAT.value == "completion"
    prompts = [tasks[t].prompt if completion else prompt_for(tasks[t], benchmark) for t in ids]
    outs = policy.generate(prompts, num_samples=n, temperature=TEMPERATURE.value,
                           top_p=TOP_P.value, max_new_tokens=MAX_NEW_TOKENS.value,
                           batch_size=BATCH_SIZE.value, seed=SEED.value)
    samples = [rn.Sample(t, tasks[t].prompt + c.text if completion else rn.extract_code(c.text))
               for t, cs in zip(ids, outs) for c in cs]
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
        samples, prompt_format = generate(tasks, bench, N.value)
        samples_path = out / "samples.jsonl"
        with open(samples_path, "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps({"task_id": s.task_id, "solution": s.solution}) + "\n")
        logging.info("wrote %d samples to %s", len(samples), samples_path)
    cfg = rn.RunConfig(
        policy=tk.TimePolicy(floor_s=FLOOR_S.value, factor=FACTOR.value,
                             budget_s=BUDGET_S.value, lcb_timeout_s=LCB_TIMEOUT.value),
        workers=WORKERS.value, isolation=ISOLATION.value, memory_mb=MEMORY_MB.value)
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
                ks=[int(k) for k in KS.value], partial=PARTIAL.value, progress=bar.update)
        except rn.SampleError as e:
            raise app.UsageError(str(e)) from e
    meta["samples"] = str(samples_path)
    if model is not None:
        meta["generation"] = {"model": model, "n": N.value, "temperature": TEMPERATURE.value,
                              "top_p": TOP_P.value, "max_new_tokens": MAX_NEW_TOKENS.value,
                              "response_format": RESPONSE_FORMAT.value,
                              "prompt_format": prompt_format,
                              "seed": SEED.value}
    paths = rn.write_outputs(out, summary, records, meta)
    for name, scores in summary["pass_at_k"].items():
        logging.info("%s %s: %s", bench, name,
                     ", ".join(f"{k} {100 * v:.1f}" for k, v in scores.items()))
    for sp, counts in summary["status_counts"].items():
        logging.info("%s statuses: %s", sp, {k: v for k, v in counts.items() if v})
    logging.info("wrote %s", ", ".join(paths.values()))


if __name__ == "__main__":
    app.run(main)
