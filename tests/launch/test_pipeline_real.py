"""`configs/real.py` through the pipeline on a tiny random Hugging Face model.

No real weights exist here, so this checks the real configuration's wiring, not results:
instruct-style sampling with a chat template and model-written tests, a clear stop when
the policy yields too few pairs, and (with hand-written samples standing in for a capable
policy) execution, ranking, pairs, the reference, shared-prompt training and the analysis
with continuations judged by the ranked tests, all reading the one problem record the
sampler wrote, with no glue file; truncated samples are never chosen (nor rejected), and the
global top-N keeps the configured number of training pairs. Evaluation on HumanEval+/MBPP+ is left out
(minutes on CPU); the miniature's pipeline test covers that stage.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from fdpo import extract, records
from fdpo.testing import build_tiny_tokenizer, make_hf_model

from tests.conftest import REPO

pytestmark = [pytest.mark.torch, pytest.mark.sandbox]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def pipeline(workdir, hf, prompts, *extra):
    return subprocess.run(
        [sys.executable, "-m", "launch.pipeline",
         f"--config=configs/real.py:hf_dir={hf},prompts={prompts}", f"--workdir={workdir}",
         "--config.sample.max_new_tokens=24", "--config.execute.timeout=2",
         "--config.execute.workers=2", "--config.max_len=256", "--config.train.batch_size=4",
         "--config.train.steps=3", *extra],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1200)


def hand_written_records(n):
    """What a capable instruct policy would have written at T = 1.5, as launch.sample records
    it: prose around fenced programs, an unclosed fence, two samples cut by the token limit
    (a correct one that would rank first, and a wrong one), and a response with no program.
    The programs are the data stage's extractor's, as the sampler writes them. No
    `response_ids`: the builder then tokenises the texts (recorded empty ids would make every
    response the same empty sequence)."""
    rows = []
    for i in range(n):
        k = i % 3 + 1
        problem = f"Write a Python function add{i}(a, b) that returns a + b + {k}."
        good = f"def add{i}(a, b):\n    total = a + b\n    return total + {k}\n"
        good2 = f"def add{i}(a, b):\n    s = a + b\n    return s + {k}\n"
        bad = f"def add{i}(a, b):\n    total = a - b\n    return total + {k}\n"
        cut_good = f"def add{i}(a, b):\n    result = a + b\n    return result + {k}\n"
        cut_bad = f"def add{i}(a, b):\n    diff = a - b\n    return diff + {k}\n"
        responses = [  # (text, finish)
            (f"```python\n{cut_good}", "length"),  # correct, but cut: never chosen
            (f"Here is the function:\n\n```python\n{good}```\n\nIt adds {k}.", "eos"),
            (f"```python\n{bad}```", "eos"),
            ("I am not able to write this function.", "eos"),  # no program
            (f"Sure.\n```python\n{cut_bad}", "length"),  # wrong and cut: not rejected either
            (f"```python\n{good2}", "eos"),  # an unclosed fence that still ended by EOS
        ]
        tests = [f"assert add{i}(1, 2) == {3 + k}", f"assert add{i}(0, 0) == {k}",
                 f"assert add{i}(5, 1) == {6 + k}"]
        rows.append({"version": 1, "id": f"p{i}", "problem": problem,
                     "prompt": problem + "\n\nSolve it.", "response_format": "code_block",
                     "samples": [{"response": t, "finish": f,
                                  "program": extract.program_from_response(t, problem, "code_block")}
                                 for t, f in responses],
                     "tests": tests, "note": "passed through"})
    return rows


def response_texts(records_dir, tok):
    """(chosen, rejected) response texts of every pair record of the run."""
    out = []
    for split in ("train", "validation"):
        src = records.PairDataSource.from_manifest(records_dir / "manifest.json", split)
        for j in range(len(src)):
            r = src.record(j)
            out.append(tuple(tok.decode(ids[segs >= records.Segment.PREFIX].tolist())
                             for ids, segs in ((r.chosen_ids, r.chosen_segments),
                                               (r.rejected_ids, r.rejected_segments))))
    return out


@pytest.mark.slow
def test_real_config_wiring_on_a_tiny_model(tmp_path):
    tok = build_tiny_tokenizer(tmp_path / "tok", chat_template=True)
    hf = tmp_path / "hf"
    make_hf_model(hf, "qwen2", vocab_size=len(AutoTokenizer.from_pretrained(tok)))
    for f in pathlib.Path(tok).iterdir():
        shutil.copy(f, hf / f.name)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Write add{i}(a, b)."})
                               + "\n" for i in range(4)))
    w = tmp_path / "run"

    # A random policy writes no program: sampling works, and the run stops at the pairs
    # stage saying why, instead of failing inside every training run.
    proc = pipeline(w, hf, prompts, "--only=init,sample,execute,pairs")
    assert proc.returncode != 0
    assert "stage pairs: 0 training pairs from 4 prompts, fewer than one batch (4)" in proc.stderr
    samples = [json.loads(l) for l in open(w / "samples.jsonl")]
    assert [s["id"] for s in samples] == [f"p{i}" for i in range(4)]
    assert all(len(s["samples"]) == 10 for s in samples)  # k = 10 [paper]
    assert all(len(s["test_samples"]) == 10 for s in samples)  # model-written tests
    # max_new_tokens = 24: a sample cut there has 24 token ids; one that stopped, fewer.
    assert all(len(x["response_ids"]) == 24 if x["finish"] == "length" else
               len(x["response_ids"]) < 24 for s in samples for x in s["samples"])

    # Hand-written records in their place: the rest of the real path runs.
    with open(w / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in hand_written_records(10))
    for stage in ("execute", "pairs"):
        (w / "stages" / f"{stage}.json").unlink(missing_ok=True)
    # The executor resumes by content: verdicts computed for the old samples are redone.
    proc = pipeline(w, hf, prompts, "--only=execute")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (f"{w / 'executed.jsonl'}: 0 records kept, 4 redone (4: changed codes, tests, "
            "record), 6 new") in (w / "logs" / "execute.log").read_text()
    proc = pipeline(w, hf, prompts, "--config.build.train_pairs=5",
                    "--only=execute,pairs,reference,train,analyze")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # One record flowed through every stage: the executor's output is the sampler's records
    # with the verdicts added; build and analyze read it; no glue file was written.
    sampled = {r["id"]: r for r in map(json.loads, open(w / "samples.jsonl"))}
    executed = {r["id"]: r for r in map(json.loads, open(w / "executed.jsonl"))}
    assert set(executed) == set(sampled)
    for pid, r in executed.items():
        assert {k: r[k] for k in sampled[pid]} == sampled[pid]
        assert len(r["passed"]) == 6 and r["passed"][0] == [True] * 3
    assert sorted(x.name for x in w.glob("*.jsonl")) == [
        "executed.jsonl", "sample_prompts.jsonl", "samples.jsonl"]

    manifest = json.loads((w / "pairs" / "manifest.json").read_text())
    c = manifest["counts"]
    # Counts add up: every problem used or dropped for one reason; every sample counted.
    assert c["lines_in"] == 10 == c["lines_used"] + sum(manifest["drop_reasons"].values())
    assert c["samples"] == {"samples_in": 60, "samples_empty_program": 10,
                            "samples_truncated": 20, "truncated_not_chosen": 10,
                            "truncated_not_rejected": 10}
    sel = c["selection"]
    for split in ("train", "validation"):
        assert sel[split]["candidates"] == sel[split]["kept"] + sel[split]["cut"]
        assert c["records_out"][split] == sel[split]["kept"]
    assert sel["train"]["limit"] == 5 and c["records_out"]["train"] == min(
        5, sel["train"]["candidates"]) >= 4
    assert sel["validation"]["limit"] == 1000
    # Truncated samples never appear as chosen, nor (truncated=drop) as rejected.
    tok_run = AutoTokenizer.from_pretrained(w / "init" / "hf_extras")
    pairs = response_texts(w / "pairs", tok_run)
    assert len(pairs) == sum(c["records_out"].values())
    for chosen, rejected in pairs:
        assert "result" not in chosen and "diff" not in rejected
        assert "total = a + b" in chosen or "s = a + b" in chosen
        assert "total = a - b" in rejected
    # On-policy sides (build.response="response"): each is a raw response the policy wrote,
    # prose and fences included, ending in the EOS because it stopped there; not the
    # extracted program with an appended EOS.
    raw = {x["response"] for r in hand_written_records(10) for x in r["samples"]}
    eos = tok_run.eos_token
    for side in (s for pair in pairs for s in pair):
        assert side.endswith(eos) and side[:-len(eos)] in raw, side
    assert any(chosen.startswith("Here is the function:") for chosen, _ in pairs)

    for method in ("focused_dpo", "dpo"):
        metrics = [json.loads(l) for l in open(w / "train" / f"{method}-s0" / "metrics.jsonl")]
        assert [m["step"] for m in metrics if m["split"] == "train"][-1] == 3
    cont = json.loads((w / "analysis" / "continuation.json").read_text())
    # every used problem is judged by the tests its top-ranked code passes (all 3 here)
    assert cont["problems"] == 10
    assert cont["chosen"]["programs"] == cont["rejected"]["programs"] == 10
