"""`configs/real.py` through the pipeline on a tiny random Hugging Face model.

No real weights exist here, so this checks the real configuration's wiring, not results:
instruct-style sampling with a chat template and model-written tests, a clear stop when
the policy yields too few pairs, and (with hand-written samples standing in for a capable
policy) execution, ranking, pairs, the reference, shared-prompt training and the analysis
with continuations judged by the ranked tests. Evaluation on HumanEval+/MBPP+ is left out
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


def hand_written_samples(n):
    """What a capable instruct policy would have written: fenced programs, some wrong."""
    rows = []
    for i in range(n):
        k = i % 3 + 1
        problem = f"Write a Python function add{i}(a, b) that returns a + b + {k}."
        good = f"def add{i}(a, b):\n    total = a + b\n    return total + {k}\n"
        bad = f"def add{i}(a, b):\n    total = a - b\n    return total + {k}\n"
        codes = [good, bad, good, bad]
        tests = [f"assert add{i}(1, 2) == {3 + k}", f"assert add{i}(0, 0) == {k}",
                 f"assert add{i}(5, 1) == {6 + k}"]
        rows.append({"id": f"p{i}", "prompt": problem + "\n\nSolve it.", "codes": codes,
                     "tests": tests,
                     "raw": {"problem": problem,
                             "code_responses": [f"```python\n{c}```" for c in codes]}})
    return rows


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
    assert all(len(s["raw"]["code_responses"]) == 10 for s in samples)  # k = 10 [paper]
    assert all(len(s["raw"]["test_responses"]) == 10 for s in samples)  # model-written tests

    # Hand-written samples in their place: the rest of the real path runs.
    with open(w / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in hand_written_samples(10))
    for stage in ("execute", "pairs"):
        (w / "stages" / f"{stage}.json").unlink(missing_ok=True)
    # The executor resumes by id; verdicts computed for the old samples are refused.
    proc = pipeline(w, hf, prompts, "--only=execute")
    assert proc.returncode != 0
    assert "the result for id 'p0' has 0 codes x None tests" in proc.stderr + proc.stdout
    (w / "verdicts.jsonl").unlink()
    proc = pipeline(w, hf, prompts, "--only=execute,pairs,reference,train,analyze")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((w / "pairs" / "manifest.json").read_text())
    assert manifest["counts"]["records_out"]["train"] >= 4
    for method in ("focused_dpo", "dpo"):
        metrics = [json.loads(l) for l in open(w / "train" / f"{method}-s0" / "metrics.jsonl")]
        assert [m["step"] for m in metrics if m["split"] == "train"][-1] == 3
    cont = json.loads((w / "analysis" / "continuation.json").read_text())
    # every used problem is judged by the tests its top-ranked code passes (all 3 here)
    assert cont["problems"] == 10
    assert cont["chosen"]["programs"] == cont["rejected"]["programs"] == 10
