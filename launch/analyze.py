r"""The Phi table of METHOD.md section 1 from sampled codes and their verdicts.

    python -m launch.analyze --samples SAMPLES.jsonl --verdicts VERDICTS.jsonl --out DIR \
        [--config.pair_rule=first --config.unit=line ...]

``SAMPLES.jsonl``: problem records after ``launch.execute`` (fdpo/problem.py, docs/data.md:
the responses of the samples with a program, their verdict rows, and the right tests only
where the record names them in ``tests_correct``; no ``--verdicts``), or
``{"id", "codes": [str, ...]}`` per problem (other fields ignored).
``VERDICTS.jsonl``: ``{"id", "passed": [[bool]]}`` from the executor, ``passed[i][j]`` when
code i passes test j; joined to the samples by id. Without ``--verdicts`` the sample lines
must carry ``passed`` themselves (the ``launch.build`` input format). Writes ``phi.md``,
``phi.png``, ``phi.json``, ``phi_problems.jsonl`` (reference pair, segment lengths and
per-sample containment of every used problem) and ``drops.jsonl`` (every dropped input line
with file, line number and reason). The analysis itself is :mod:`data_tools.analyze`; its
settings are configs/analyze.py's.

``--config.continuation=True --checkpoint CKPT`` adds the paper's second experiment: for
every problem used, the policy continues from prompt + prefix + chosen mid and from prompt +
prefix + rejected mid (:func:`data_tools.analyze.continuation_jobs`, then
:func:`fdpo.continuation.run`), the programs are run in the sandbox against the line's
tests, and pass@1 of each side is reported (paper, Qwen2.5-Coder-7B: 90.02% vs 3.17%).
It needs ``"prompt"`` (the text the samples were generated from) and
``"tests"`` in the sample lines of the problems used (checked, with file:line, before the
model is loaded); a used problem without tests is left out and counted. A program is prompt +
text (``--config.response_format=completion``) or the code block extracted from the text
(``code_block``); the prompt is rendered in the policy's prompt format, as sampling did
(:class:`fdpo.policy.Policy`): the ``prompt_format`` recorded in the problem records
(``--config.prompt_format``, when given, must agree). Writes ``continuation.json`` and ``continuation.md``. Which tests to give: the
right ones where they are known; in a real run, the tests the data stage takes as ground
truth (:func:`data_tools.analyze.judging_tests`; the pipeline's analyze stage does this).
"""
from __future__ import annotations

import json

from absl import app, flags

import configs
from data_tools import analyze
from data_tools import rank as rank_lib
from fdpo import continuation, extract, problem
from fdpo.policy import Policy
from fdpo.tokenization import PROMPT_FORMATS
from launch import common

CONFIG = common.define_config("config", configs.path("analyze.py"),
                              "Analysis settings (configs/analyze.py).",
                              lock_config=True)
SAMPLES = flags.DEFINE_string("samples", None, "JSONL of {'id', 'codes'} (optionally 'passed').",
                              required=True)
VERDICTS = flags.DEFINE_string("verdicts", None, "JSONL of {'id', 'passed'}; default: 'passed' "
                               "in --samples.")
OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Policy (fdpo checkpoint) for "
                                 "--config.continuation.")
HF_DIR = flags.DEFINE_string("hf_dir", None, "Or: the policy as a Hugging Face directory.")
# The settings of configs/analyze.py that name one of a set, and the set.
CHOICES = {"pair_rule": analyze.PAIR_RULES, "verdict": analyze.VERDICTS, "unit": analyze.UNITS,
           "ranker": tuple(sorted(rank_lib.RANKERS)),
           "response_format": extract.RESPONSE_FORMATS,
           "prompt_format": ("", *PROMPT_FORMATS)}


def main(argv):
    del argv
    c = CONFIG.value
    for field, allowed in CHOICES.items():
        if c[field] not in allowed:
            raise app.UsageError(f"--config.{field}={c[field]!r}; expected one of {allowed}")
    if c.continuation and (CHECKPOINT.value is None) == (HF_DIR.value is None):
        raise app.UsageError("--config.continuation needs exactly one of --checkpoint and "
                             "--hf_dir")
    common.check_readable_file("--samples", SAMPLES.value)
    if VERDICTS.value is not None:
        common.check_readable_file("--verdicts", VERDICTS.value)
    common.check_number("--config.lam", c.lam)
    common.check_output("--out", OUT.value, directory=True, make_parents=True)
    options = analyze.Options(pair_rule=c.pair_rule, verdict=c.verdict, unit=c.unit,
                              ranker=c.ranker, lam=c.lam, exclude_reference=c.exclude_reference)
    try:
        result = analyze.analyze_files(SAMPLES.value, VERDICTS.value, OUT.value, options)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e.filename}: no such file")
    except (analyze.DuplicateIdError, problem.RecordError) as e:
        raise SystemExit(f"error: {e}")
    if c.continuation:
        try:
            jobs, skipped = analyze.continuation_jobs(SAMPLES.value, result, options.unit,
                                                      options.ranker)
            prompt_format = analyze.continuation_prompt_format(jobs, c.prompt_format)
        except analyze.ContinuationInputError as e:
            raise SystemExit(f"error: {e}")

        def load_policy():  # the tokenizer against the embedding rows: a one-line error
            return Policy.load(common.init_jax(),
                               files=common.model_files(CHECKPOINT.value, HF_DIR.value),
                               prompt_format=prompt_format or None)

        print(json.dumps(continuation.run(jobs, skipped, load_policy, c, OUT.value)))


if __name__ == "__main__":
    common.run(main)
