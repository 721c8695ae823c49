"""Samples codes and tests for prompts from the policy itself (self-generation).

    python -m launch.sample (--checkpoint CKPT | --hf_dir HF) --input PROMPTS.jsonl \
        --output SAMPLES.jsonl [--config=configs/sample.py[:greedy]] [--config.num_codes=10]

Input lines: `{"id": str or int, "prompt": str, ...}`. Malformed lines (bad JSON or
UTF-8, a missing or non-string prompt, a missing or repeated id) are all reported with
their file:line and nothing runs (exit status 2). So is every prompt longer than the
sampler has room for (the model's max_position_embeddings less --config.max_new_tokens,
in steps of --config.length_bucket), found after the model is loaded and before anything
is sampled, and a tokenizer with more tokens than the model's embedding rows, found
before the weights are read.

Output lines, one per prompt: problem records (fdpo/problem.py, docs/data.md), which
`launch.execute` extends with verdicts and `launch.build` / `launch.analyze` read:

    {"version": 1, "id", "problem", "prompt", "prompt_format", "prompt_ids",
     "response_format",
     "samples": [{"response", "response_ids", "program", "finish"}, ...],
     "tests": [assertion, ...], "test_prompt", "test_samples": [{"response", "finish"}],
     ...the input line's other fields, passed through}

`prompt` is the user message the codes were sampled from (the code template applied to
the input prompt), so DPO later conditions on exactly what the policy saw; the input
prompt is kept as `problem`. `prompt_format` (--config.prompt_format, resolved: e.g.
"chat_template") and `prompt_ids` (the code prompt's token ids as the policy was fed them)
let launch.build check that it renders the same prompt. Every code sample is kept: its text, its token ids (the
stopping EOS excluded), its program (`--config.response_format`: the fenced block, or input
prompt + response; "" when there is none) and its finish reason (`eos`, `stop`, `length`).
`tests` holds every distinct assertion extracted from the test responses (`fdpo.extract`);
in code-only mode no test prompt is rendered and `tests` is the input line's, or []. The model, its tokenizer, prompt
format and EOS set come from `fdpo.policy.Policy`; the work is `fdpo.selfgen.sample_file`.

Resuming, by content: each record holds a `sample_fingerprint` (digests of the prompt,
the other input fields, the model's weights and tokenizer, and the sampling settings;
docs/sampling.md). Records of OUTPUT whose fingerprint matches are kept; the others, and
those of ids no longer in INPUT, are removed and sampled again; the program prints how
many were kept, redone (and what changed), new and dropped. `fdpo.jsonl.resume` reads
OUTPUT: a cut-off last line is dropped and redone, any other malformed line is refused,
naming it, the file unchanged and nothing run, exit status 2. Lines are appended as
prompts finish. Each sample's random stream is fixed by
(--config.seed, id, code/test, sample index), so a resumed run writes what an
uninterrupted one would have.

Many hosts: the same command on every host with `--distributed`. Every process samples
every prompt with the others over the global mesh and gets every token back; process 0
alone repairs, rewrites and appends to OUTPUT (the same lines as one process writes).
"""

from __future__ import annotations

import pathlib

from absl import app, flags

from fdpo import extract, jsonl, sampling, selfgen
from fdpo.policy import Policy, PromptTooLong
from fdpo.tokenization import PROMPT_FORMATS
from launch import common

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "fdpo checkpoint directory.")
HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory.")
INPUT = flags.DEFINE_string("input", None, "Prompts JSONL.", required=True)
OUTPUT = flags.DEFINE_string("output", None, "Samples JSONL (appended to, resumed from).",
                             required=True)
CONFIG = common.define_config(
    "config", str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "sample.py"),
    "Sampling config (configs/sample.py[:greedy]).", lock_config=True)


def main(argv):
    del argv
    cfg_s = CONFIG.value
    if (CHECKPOINT.value is None) == (HF_DIR.value is None):
        raise app.UsageError("give exactly one of --checkpoint and --hf_dir")
    if cfg_s.response_format not in extract.RESPONSE_FORMATS:
        raise app.UsageError(f"--config.response_format={cfg_s.response_format!r}; expected "
                             f"one of {extract.RESPONSE_FORMATS}")
    common.check_choice("--config.prompt_format", cfg_s.prompt_format, ("", *PROMPT_FORMATS))
    if cfg_s.mode not in selfgen.MODES:
        raise app.UsageError(f"--config.mode={cfg_s.mode!r}; expected one of {selfgen.MODES}")
    if not pathlib.Path(INPUT.value).is_file():
        raise app.UsageError(f"--input={INPUT.value}: no such file")
    num = common.check_number
    for field in ("num_codes", "num_tests", "num_asserts", "top_k", "seed"):
        num(f"--config.{field}", cfg_s[field], lo=0, integer=True)
    for field in ("max_new_tokens", "batch_size", "length_bucket", "stop_check_steps"):
        num(f"--config.{field}", cfg_s[field], lo=1, integer=True)
    num("--config.temperature", cfg_s.temperature, lo=0)
    num("--config.top_p", cfg_s.top_p, lo=0, hi=1, lo_open=True)
    common.check_choice("--config.compute_dtype", cfg_s.compute_dtype,
                        ("", "float32", "bfloat16"))
    common.check_output("--output", OUTPUT.value, make_parents=True)
    common.check_mesh_shape()
    if not sum(selfgen.samples_per_prompt(cfg_s).values()):
        raise app.UsageError("nothing to sample: num_codes and num_tests are both 0 here")

    files = common.model_files(CHECKPOINT.value, HF_DIR.value)
    positions = files.cfg.max_position_embeddings
    common.check(sampling.prompt_room(positions, cfg_s.max_new_tokens, cfg_s.length_bucket) > 0,
                 f"--config.max_new_tokens={cfg_s.max_new_tokens} leaves no room for a prompt "
                 f"in the model's {positions} positions (max_position_embeddings of "
                 f"{files.source}, prompts padded to --config.length_bucket="
                 f"{cfg_s.length_bucket})")

    # JAX (and jax.distributed) first: with several processes, sample_file coordinates
    # reading and writing the output before the weights are read.
    mesh = common.init_jax()

    def load_policy():
        return Policy.load(mesh, files=files, compute_dtype=cfg_s.compute_dtype,
                           prompt_format=cfg_s.prompt_format or None,
                           length_bucket=cfg_s.length_bucket,
                           stop_check_steps=cfg_s.stop_check_steps, refill=cfg_s.refill)

    try:
        selfgen.sample_file(INPUT.value, OUTPUT.value, cfg_s, load_policy)
    except selfgen.InputError as e:
        raise common.many_errors(str(e).splitlines()) from None
    except PromptTooLong as e:
        raise common.many_errors(e.lines) from None
    except jsonl.JsonlError as e:
        raise common.UsageError(str(e)) from None


if __name__ == "__main__":
    common.run(main)
