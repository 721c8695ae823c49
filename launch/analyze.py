r"""The Phi table of METHOD.md section 1 from sampled codes and their verdicts.

    python -m launch.analyze --samples SAMPLES.jsonl --verdicts VERDICTS.jsonl --out DIR \
        [--config.pair_rule=first --config.unit=line ...]

``SAMPLES.jsonl``: ``{"id", "codes": [str, ...]}`` per problem (other fields ignored).
``VERDICTS.jsonl``: ``{"id", "passed": [[bool]]}`` from the executor, ``passed[i][j]`` when
code i passes test j; joined to the samples by id. Without ``--verdicts`` the sample lines
must carry ``passed`` themselves (the ``launch.build`` input format). Writes ``phi.md``,
``phi.png``, ``phi.json``, ``phi_problems.jsonl`` (reference pair, segment lengths and
per-sample containment of every used problem) and ``drops.jsonl`` (every dropped input line
with file, line number and reason). The analysis itself is :mod:`data_tools.analyze`; its
settings are configs/analyze.py's.

``--config.continuation=True --checkpoint CKPT`` adds the paper's second experiment: for
every problem used, the policy continues from prompt + prefix + chosen mid and from prompt +
prefix + rejected mid (:func:`data_tools.analyze.continuation_prefixes`), the programs are run in the
sandbox against the line's tests, and pass@1 of each side is reported (paper, Qwen2.5-Coder-7B:
90.02% vs 3.17%). It needs ``"prompt"`` (the text the samples were generated from) and
``"tests"`` in the sample lines of the problems used (checked, with file:line, before the
model is loaded); a used problem without tests is left out and counted. A program is prompt +
text (``--config.response_format=completion``) or the code block extracted from the text
(``code_block``); the prompt is rendered in the policy's prompt format, as sampling did
(:class:`fdpo.policy.Policy`). Writes ``continuation.json`` and ``continuation.md``. Which tests to give: the
right ones where they are known; in a real run, the tests the data stage takes as ground
truth (:func:`data_tools.analyze.judging_tests`; the pipeline's analyze stage does this).
"""
from __future__ import annotations

import collections
import json
import pathlib

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

import configs
from data_tools import analyze
from data_tools import rank as rank_lib
from fdpo import extract, jsonl
from fdpo.policy import Policy
from fdpo.sandbox.executor import Executor, Limits
from launch import common

CONFIG = config_flags.DEFINE_config_file("config", configs.path("analyze.py"),
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
           "response_format": extract.RESPONSE_FORMATS}


def continuation_lines(samples_path: str, ids) -> dict[str, tuple[int, dict]]:
    """{id: (line number, record)} of the sample lines the Phi table used, checked for what
    a continuation needs. Lines that ``read_inputs`` dropped (bad JSON, no id) are already
    counted in drops.jsonl and are skipped here; lines of problems the table did not use need
    no prompt or tests."""
    needed = set(ids)
    found: dict[str, tuple[int, dict]] = {}
    for where, rec in jsonl.objects(samples_path, errors=[]):  # bad lines: counted already
        if str(rec.get("id")) not in needed:
            continue
        pid, lineno = str(rec["id"]), int(where.rpartition(":")[2])
        if pid in found:
            # Two used problems under one id: their continuations could not be told apart.
            raise SystemExit(f"error: {where}: id {pid!r} repeats line {found[pid][0]}; "
                             "--config.continuation needs unique ids")
        tests = rec.get("tests")
        if not isinstance(rec.get("prompt"), str) or not isinstance(tests, list) or \
                not all(isinstance(t, str) for t in tests):
            raise SystemExit(f"error: {where}: --config.continuation needs 'prompt' (str) and "
                             "'tests' (list of str) in every sample line it uses")
        found[pid] = (lineno, rec)
    return found


def continuation(samples_path, result, options, c: ml_collections.ConfigDict, out_dir):
    """pass@1 of continuations from prefix + chosen mid and prefix + rejected mid (`c`: the
    continuation settings of configs/analyze.py)."""
    lines = {pid: rec for pid, (_, rec) in
             continuation_lines(samples_path, [s.id for s in result.segments]).items()}
    skipped: collections.Counter = collections.Counter()
    segments = []
    for seg in result.segments:
        if lines[seg.id]["tests"]:
            segments.append(seg)
        else:
            # No test would pass every continuation (all([]) is True): not evidence.
            skipped["no_tests"] += 1
            logging.warning("%s: problem %r has no tests; left out of the continuation",
                            samples_path, seg.id)

    common.quiet_tokenizers()
    policy = Policy.load(common.init_jax(), checkpoint=CHECKPOINT.value, hf_dir=HF_DIR.value)
    rows = []  # (problem id, side, started text, token ids)
    for seg in segments:
        rec = lines[seg.id]
        [prompt_ids] = policy.encode_prompts([rec["prompt"]])
        for side, text in zip(("chosen", "rejected"),
                              analyze.continuation_prefixes(rec["codes"], seg, options.unit)):
            rows += [(seg.id, side, text, prompt_ids + policy.encode_text(text))] * \
                c.num_continuations
    done = policy.generate([r[3] for r in rows], seed=0, row_seeds=range(len(rows)),
                           max_new_tokens=c.max_new_tokens, temperature=c.temperature)
    programs: dict[tuple[str, str], list[str]] = {}
    for (pid, side, started, _), (cont,) in zip(rows, done):
        program = extract.program_from_response(started + cont.text, lines[pid]["prompt"],
                                                c.response_format)
        programs.setdefault((pid, side), []).append(program)
    passed = {"chosen": [], "rejected": []}
    per_problem = []
    with Executor(Limits(timeout_s=c.timeout)) as ex:
        for seg in segments:
            codes = programs[(seg.id, "chosen")] + programs[(seg.id, "rejected")]
            res = ex.run(codes, lines[seg.id]["tests"])
            ok = [all(row) for row in res.passed]
            n = c.num_continuations
            passed["chosen"] += ok[:n]
            passed["rejected"] += ok[n:]
            per_problem.append({"id": seg.id, "chosen_passed": sum(ok[:n]),
                                "rejected_passed": sum(ok[n:]), "continuations": n,
                                "tests": len(lines[seg.id]["tests"])})
    summary = {side: {"pass@1": 100.0 * sum(v) / len(v) if v else None, "programs": len(v),
                      "passed": sum(v)}
               for side, v in passed.items()}
    summary["problems"] = len(segments)
    summary["problems_skipped"] = dict(skipped)
    summary["settings"] = {"num_continuations": c.num_continuations,
                           "temperature": c.temperature,
                           "response_format": c.response_format,
                           "prompt_format": policy.prompt_format}
    summary["per_problem"] = per_problem
    out = pathlib.Path(out_dir)
    (out / "continuation.json").write_text(json.dumps(summary, indent=2) + "\n")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    skipped_text = json.dumps(summary["problems_skipped"]) if skipped else "none"
    (out / "continuation.md").write_text(
        "| continue from | pass@1 (%) | passed | programs |\n|---|---|---|---|\n"
        f"| prompt + prefix + chosen mid | {fmt(summary['chosen']['pass@1'])} | "
        f"{summary['chosen']['passed']} | {summary['chosen']['programs']} |\n"
        f"| prompt + prefix + rejected mid | {fmt(summary['rejected']['pass@1'])} | "
        f"{summary['rejected']['passed']} | {summary['rejected']['programs']} |\n\n"
        f"{summary['problems']} problems x {c.num_continuations} continuations per side; "
        f"problems left out: {skipped_text}.\n"
        "Paper (Qwen2.5-Coder-7B): 90.02 vs 3.17.\n")
    return summary


def main(argv):
    del argv
    c = CONFIG.value
    for field, allowed in CHOICES.items():
        if c[field] not in allowed:
            raise app.UsageError(f"--config.{field}={c[field]!r}; expected one of {allowed}")
    if c.continuation and (CHECKPOINT.value is None) == (HF_DIR.value is None):
        raise app.UsageError("--config.continuation needs exactly one of --checkpoint and "
                             "--hf_dir")
    options = analyze.Options(pair_rule=c.pair_rule, verdict=c.verdict, unit=c.unit,
                              ranker=c.ranker, lam=c.lam, exclude_reference=c.exclude_reference)
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
    if c.continuation:
        print(json.dumps(continuation(SAMPLES.value, result, options, c, OUT.value)))


if __name__ == "__main__":
    app.run(main)
