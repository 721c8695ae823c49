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
docs/evaluation.md for oracles and time limits. The work is
`fdpo.evaluation.generation.evaluate_dir`.

Refused with exit status 2 and one line, before any generation: a malformed samples or
benchmark line (FILE:LINE), a model whose tokenizer has more tokens than its embedding rows,
and task prompts longer than the sampler has room for (each named by task id).

Many hosts (with --checkpoint/--hf_dir): the same command on every host with
`--distributed`; every process generates with the others over the global mesh, process 0
alone writes OUT and runs the samples in the sandbox while the others wait for it.
"""
from __future__ import annotations

import logging as pylogging
import pathlib

from absl import app, flags

import configs
from fdpo.evaluation import generation
from fdpo.evaluation import runner as rn
from fdpo.evaluation import tasks as tk
from fdpo.extract import RESPONSE_FORMATS
from fdpo.policy import Policy, PromptTooLong
from fdpo.sandbox.executor import ISOLATION_MODES
from fdpo.tokenization import PROMPT_FORMATS
from launch import common  # --mesh_shape, --distributed (used with --checkpoint)

CONFIG = common.define_config("config", configs.path("evaluate.py"),
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
                           ("prompt_format", ("", *PROMPT_FORMATS)),
                           ("isolation", ISOLATION_MODES)):
        if c[field] not in allowed:
            raise app.UsageError(f"--config.{field}={c[field]!r}; expected one of {allowed}")
    # Cheap checks before any generation or grading.
    ks = c.k if isinstance(c.k, (tuple, list)) else (c.k,)
    common.check(len(ks) > 0 and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1
                                     for k in ks),
                 f"--config.k={c.k!r}: expected positive integers, e.g. --config.k='(1, 10)'")
    num = common.check_number
    num("--config.n", c.n, lo=1, integer=True)
    num("--config.temperature", c.temperature, lo=0)
    num("--config.top_p", c.top_p, lo=0, hi=1, lo_open=True)
    num("--config.max_new_tokens", c.max_new_tokens, lo=1, integer=True)
    num("--config.batch_size", c.batch_size, lo=1, integer=True)
    num("--config.memory_mb", c.memory_mb, lo=1, integer=True)
    if c.workers is not None:
        num("--config.workers", c.workers, lo=1, integer=True)
    for field in ("min_time_limit", "time_limit_factor", "split_budget", "lcb_timeout"):
        num(f"--config.{field}", c[field], lo=0, lo_open=True)
    # The benchmark file and --samples are read (and named in errors) by evaluate_dir
    # before any generation or grading.
    common.check_output("--out", OUT.value, directory=True, make_parents=True)

    # The model's tokenizer against its embedding table, before the benchmark is read.
    files = common.model_files(CHECKPOINT.value, HF_DIR.value) if model else None

    def load_policy():
        return Policy.load(common.init_jax(), files=files,
                           prompt_format=c.prompt_format or None, refill=c.refill)

    try:
        generation.evaluate_dir(BENCHMARK.value, OUT.value, c, samples_path=SAMPLES.value,
                                model=model, load_policy=load_policy, dataset=DATASET.value,
                                data_dir=DATA_DIR.value)
    except (tk.DataError, rn.SampleError) as e:
        raise app.UsageError(str(e)) from e
    except PromptTooLong as e:
        raise common.many_errors(e.lines) from None


if __name__ == "__main__":
    common.run(main)
