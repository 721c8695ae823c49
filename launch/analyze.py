"""The Phi table of METHOD.md section 1 from sampled codes and their verdicts.

    python -m launch.analyze --samples SAMPLES.jsonl --verdicts VERDICTS.jsonl --out DIR

``SAMPLES.jsonl``: ``{"id", "codes": [str, ...]}`` per problem (other fields ignored).
``VERDICTS.jsonl``: ``{"id", "passed": [[bool]]}`` from the executor, ``passed[i][j]`` when
code i passes test j; joined to the samples by id. Without ``--verdicts`` the sample lines
must carry ``passed`` themselves (the ``data_tools.build`` input format). Writes ``phi.md``,
``phi.png``, ``phi.json``, ``phi_problems.jsonl`` (reference pair, segment lengths and
per-sample containment of every used problem) and ``drops.jsonl`` (every dropped input line
with file, line number and reason). The analysis itself is :mod:`data_tools.analyze`.

``--continuation`` (the paper's second experiment: sample continuations from prompt + prefix
+ chosen mid and from prompt + prefix + rejected mid, execute them, report pass@1 for each)
needs the KV-cache sampler and the code executor; until both are in the tree it stops with an
error saying so. :func:`data_tools.analyze.continuation_prefixes` already gives the two texts.
"""
from __future__ import annotations

import json

from absl import app, flags, logging

from data_tools import analyze
from data_tools import rank as rank_lib

SAMPLES = flags.DEFINE_string("samples", None, "JSONL of {'id', 'codes'} (optionally 'passed').", required=True)
VERDICTS = flags.DEFINE_string("verdicts", None, "JSONL of {'id', 'passed'}; default: 'passed' in --samples.")
OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
PAIR_RULE = flags.DEFINE_enum("pair_rule", "diff", list(analyze.PAIR_RULES),
                              "Reference pair: the builder's Diff rule, or the first correct/incorrect.")
VERDICT = flags.DEFINE_enum("verdict", "all_tests", list(analyze.VERDICTS),
                            "Correct = passes all tests, or the data stage's ranked verdict.")
UNIT = flags.DEFINE_enum("unit", "char", list(analyze.UNITS), "Segment unit.")
RANKER = flags.DEFINE_enum("ranker", "mutual", sorted(rank_lib.RANKERS), "Ranker (ranks for Diff; 'ranked' verdicts).")
LAM = flags.DEFINE_float("lam", analyze.seg_lib.DEFAULT_LAMBDA, "lambda of the Diff rule.")
EXCLUDE_REFERENCE = flags.DEFINE_bool("exclude_reference", False,
                                      "Leave the reference pair's two samples out of the counts.")
CONTINUATION = flags.DEFINE_bool("continuation", False,
                                 "Also run the continuation experiment (needs fdpo.sampler and the executor).")


def main(argv):
    del argv
    if CONTINUATION.value:
        missing = []
        for mod in ("fdpo.sampler", "data_tools.executor"):
            try:
                __import__(mod)
            except ImportError:
                missing.append(mod)
        if missing:
            raise SystemExit(f"--continuation needs {' and '.join(missing)}, not in this checkout yet; "
                             "run without --continuation for the Phi table")
        raise SystemExit("--continuation: the sampler and executor exist but the experiment is not wired "
                         "up yet (see data_tools.analyze.continuation_prefixes)")
    options = analyze.Options(pair_rule=PAIR_RULE.value, verdict=VERDICT.value, unit=UNIT.value,
                              ranker=RANKER.value, lam=LAM.value, exclude_reference=EXCLUDE_REFERENCE.value)
    try:
        inputs = analyze.read_inputs(SAMPLES.value, VERDICTS.value)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e.filename}: no such file")
    result = analyze.phi_tables(inputs.problems, options)
    paths = analyze.write_report(OUT.value, result, options, inputs)
    logging.info("wrote %s", ", ".join(paths.values()))
    print(analyze.markdown(result, options, paper=False))
    print(json.dumps({"lines_dropped": inputs.dropped, "problems_used": result.problems_used,
                      "problems_skipped": result.skipped}))


if __name__ == "__main__":
    app.run(main)
