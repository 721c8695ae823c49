"""A benchmark evaluated into a directory, from a samples file or from samples the policy
generates first: what ``launch.evaluate`` does, as one call.

    from fdpo.evaluation import generation
    generation.evaluate_dir("humaneval+", "eval/", configs.evaluate.get_config(),
                            samples_path="samples.jsonl")
    generation.evaluate_dir("mbpp+", "eval/", c, model="CKPT",
                            load_policy=lambda: Policy.load(mesh, checkpoint="CKPT"))

The evaluation itself is `fdpo.evaluation.runner` (NumPy only); this module adds the
policy (JAX).
"""
from __future__ import annotations

import json
import logging
import pathlib
from typing import Callable

from tqdm import tqdm

from fdpo import extract, sharding
from fdpo.evaluation import runner as rn
from fdpo.evaluation import tasks as tk
from fdpo.policy import Policy


WAIT_FOR_WRITER_S = 7 * 24 * 3600


def generate(policy: Policy, tasks: dict[str, tk.Task], benchmark: str,
             c) -> list[rn.Sample]:
    """`c.n` samples per task from the policy (`c`: configs/evaluate.py's fields)."""
    ids = list(tasks)
    completion = c.response_format == "completion"
    prompts = [tasks[t].prompt if completion else prompt_for(tasks[t], benchmark) for t in ids]
    # Every prompt measured before the first is sampled (PromptTooLong names each task).
    policy.check_prompt_lengths(prompts, c.max_new_tokens, [f"task {t}" for t in ids])
    outs = policy.generate(prompts, num_samples=c.n, temperature=c.temperature,
                           top_p=c.top_p, max_new_tokens=c.max_new_tokens,
                           batch_size=c.batch_size, seed=c.seed)
    return [rn.Sample(t, solution(o.text, tasks[t], c.response_format, c.sanitize))
            for t, task_outs in zip(ids, outs) for o in task_outs]


def solution(text: str, task: tk.Task, response_format: str, sanitize: bool) -> str:
    """The program a generated response stands for: the data stage's extractor
    (`fdpo.extract.program_from_response`, told the task's entry point), then with
    `sanitize` EvalPlus's post-processing (`fdpo.extract.sanitize`) where the task has an
    entry point (LiveCodeBench stdin programs have none: their top-level code is the
    program)."""
    program = extract.program_from_response(text, task.prompt, response_format,
                                            task.entry_point or None)
    if sanitize and task.entry_point:
        program = extract.sanitize(program, task.entry_point)
    return program


def prompt_for(task: tk.Task, benchmark: str) -> str:
    """The user message: the task and a request for a complete program in a code block."""
    if benchmark == "livecodebench":
        extra = (f"\n\nUse this starter code:\n```python\n{task.starter_code}\n```"
                 if task.starter_code else "\n\nRead the input from stdin and write the "
                 "answer to stdout.")
        return task.prompt + extra + "\nAnswer with the complete program in one ```python block."
    return ("Complete the following Python function. Answer with the complete, "
            f"self-contained program in one ```python block.\n```python\n{task.prompt}```")


def evaluate_dir(benchmark: str, out_dir, c, *, samples_path=None, model: str | None = None,
                 load_policy: Callable[[], Policy] | None = None, dataset=None,
                 data_dir=None) -> dict:
    """Evaluates `samples_path`, or (with `model`, its name for the report, and
    `load_policy`) `c.n` samples per task generated first and written to
    OUT/samples.jsonl. Writes results.json, tasks.md and tasks.csv to `out_dir` and
    returns the summary. With several processes (jax.distributed) every process generates
    with the others over the global mesh; process 0 alone writes the samples, runs them in
    the sandbox and writes the outputs, while the others wait for it (up to
    `WAIT_FOR_WRITER_S`) and return None. Raises tk.DataError (the benchmark file),
    rn.SampleError (the samples: unreadable, malformed, or missing tasks without
    `c.partial`) and policy.PromptTooLong (task prompts longer than the sampler has room
    for, before any generation)."""
    tasks, _ = tk.load_tasks(benchmark, dataset, data_dir)
    out = pathlib.Path(out_dir)
    samples = None
    if model is not None:
        policy = load_policy()
        samples = generate(policy, tasks, benchmark, c)
        if not sharding.is_writer():
            # Held until process 0 is done: a process that ended now would wait for the
            # others in jax.distributed's shutdown, which times out long before a real
            # benchmark's executions are finished.
            sharding.sync("evaluate_dir: results written", timeout_s=WAIT_FOR_WRITER_S)
            return None
        out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no --out
        samples_path = out / "samples.jsonl"
        with open(samples_path, "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps({"task_id": s.task_id, "solution": s.solution}) + "\n")
        logging.info("wrote %d samples to %s", len(samples), samples_path)
    cfg = rn.RunConfig(
        policy=tk.TimePolicy(floor_s=c.min_time_limit, factor=c.time_limit_factor,
                             budget_s=c.split_budget, lcb_timeout_s=c.lcb_timeout),
        workers=c.workers, isolation=c.isolation, memory_mb=c.memory_mb)
    if samples is None:
        try:
            samples = rn.read_samples(samples_path, tasks, benchmark)
        except OSError as e:
            raise rn.SampleError(str(e)) from e
    with tqdm(total=len(samples), unit="sample") as bar:
        summary, records, meta = rn.evaluate(
            benchmark, dataset=dataset, data_dir=data_dir, samples=samples, cfg=cfg,
            ks=list(c.k), partial=c.partial, progress=bar.update)
    meta["samples"] = str(samples_path)
    if model is not None:
        meta["generation"] = {"model": model, "n": c.n, "temperature": c.temperature,
                              "top_p": c.top_p, "max_new_tokens": c.max_new_tokens,
                              "response_format": c.response_format, "sanitize": c.sanitize,
                              "prompt_format": policy.prompt_format,
                              "seed": c.seed}
    paths = rn.write_outputs(out, summary, records, meta)
    for name, scores in summary["pass_at_k"].items():
        logging.info("%s %s: %s", benchmark, name,
                     ", ".join(f"{k} {100 * v:.1f}" for k, v in scores.items()))
    for sp, counts in summary["status_counts"].items():
        logging.info("%s statuses: %s", sp, {k: v for k, v in counts.items() if v})
    logging.info("wrote %s", ", ".join(paths.values()))
    if model is not None:
        sharding.sync("evaluate_dir: results written", timeout_s=WAIT_FOR_WRITER_S)
    return summary
