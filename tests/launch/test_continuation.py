"""The continuation experiment (`launch.analyze --continuation`) on a case whose answer is
known exactly, and the tests that judge continuations in a real run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from configs import real
from data_tools import analyze as A
from fdpo import pipeline
from fdpo.testing import build_tiny_tokenizer, make_hf_model

from tests.conftest import REPO

pytestmark = [pytest.mark.torch, pytest.mark.sandbox]

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory):
    """A tiny HF model whose greedy continuation is EOS at once, whatever the input.

    The final norm's weight is zero, so every logit is exactly 0 and greedy decoding takes
    the first maximum, token 0; token 0 is made an EOS id in config.json (and so in
    generation_config.json), which `fdpo.sampling.eos_ids` reads. A continuation therefore adds
    nothing: the program is prompt + prefix + mid, and its verdict is known in advance.
    """
    d = tmp_path_factory.mktemp("eos_model")
    build_tiny_tokenizer(d, chat_template=False)
    tok = AutoTokenizer.from_pretrained(str(d))
    assert tok.convert_ids_to_tokens(0) == "<|endoftext|>"
    model = make_hf_model(d, "qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          eos_token_id=0, pad_token_id=0, bos_token_id=None)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(d)
    assert json.loads((d / "config.json").read_text())["eos_token_id"] == 0
    return d


def _analyze(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "launch.analyze", *map(str, args)], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=timeout)


ADD = {"id": "add", "prompt": "# f adds one\n",
       "codes": ["def f(x):\n    return x + 1\n",   # correct
                 "def f(x):\n    return x + 2\n",   # incorrect
                 "def f(x):\n    return x + 1\n"],  # correct
       "tests": ["assert f(1) == 2"], "passed": [[True], [False], [True]]}
# prefix "def g(s):\n    return s.", mids "upper()" / "lower() + 'x'", suffix "\n": both
# prefix + mid texts are whole programs.
UPPER = {"id": "upper", "prompt": "# g upper-cases\n",
         "codes": ["def g(s):\n    return s.lower() + 'x'\n",  # incorrect
                   "def g(s):\n    return s.upper()\n"],       # correct
         "tests": ["assert g('a') == 'A'", "assert g('') == ''"],
         "passed": [[False, False], [True, True]]}
ALL_CORRECT = {"id": "all-correct", "prompt": "# h\n",
               "codes": ["def h():\n    return 1\n", "def h():\n    return 1 \n"],
               "tests": ["assert h() == 1"], "passed": [[True], [True]]}


def _write(path, records, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(extra_lines))
    return path


def test_continuation_known_answer(tmp_path, eos_model):
    samples = _write(tmp_path / "s.jsonl", [ADD, ALL_CORRECT, UPPER],
                     # Dropped by the Phi stage (counted there); the continuation skips it too.
                     ["{not json\n"])
    out = tmp_path / "out"
    r = _analyze("--samples", samples, "--out", out, "--config.continuation=True",
                 "--hf_dir", eos_model, "--config.num_continuations=2",
                 "--config.max_new_tokens=4", "--config.timeout=5")
    assert r.returncode == 0, r.stderr[-3000:]
    phi = json.loads((out / "phi.json").read_text())
    assert phi["problems_used"] == 2 and phi["problems_skipped"] == {"no_incorrect_code": 1}
    assert phi["lines_dropped"] == {"malformed": 1}
    cont = json.loads((out / "continuation.json").read_text())
    # 2 used problems x 2 continuations per side; the all-correct problem is not counted.
    assert cont["problems"] == 2 and cont["problems_skipped"] == {}
    assert cont["chosen"] == {"pass@1": 100.0, "programs": 4, "passed": 4}
    assert cont["rejected"] == {"pass@1": 0.0, "programs": 4, "passed": 0}
    assert [p["id"] for p in cont["per_problem"]] == ["add", "upper"]
    md = (out / "continuation.md").read_text()
    assert "| prompt + prefix + chosen mid | 100.00 | 4 | 4 |" in md
    assert "| prompt + prefix + rejected mid | 0.00 | 0 | 4 |" in md
    assert "2 problems x 2 continuations per side" in md


def test_continuation_problem_without_tests_is_counted_not_passed(tmp_path, eos_model):
    # An empty test list would pass every program (all([]) is True): left out and counted.
    samples = _write(tmp_path / "s.jsonl", [ADD, dict(UPPER, tests=[])])
    out = tmp_path / "out"
    r = _analyze("--samples", samples, "--out", out, "--config.continuation=True",
                 "--hf_dir", eos_model, "--config.max_new_tokens=4")
    assert r.returncode == 0, r.stderr[-3000:]
    cont = json.loads((out / "continuation.json").read_text())
    assert cont["problems"] == 1 and cont["problems_skipped"] == {"no_tests": 1}
    assert cont["chosen"]["programs"] == cont["rejected"]["programs"] == 1
    assert cont["chosen"]["pass@1"] == 100.0 and cont["rejected"]["pass@1"] == 0.0
    assert 'problems left out: {"no_tests": 1}' in (out / "continuation.md").read_text()


@pytest.mark.parametrize("drop,where", [("prompt", 2), ("tests", 2)])
def test_continuation_line_without_prompt_or_tests_names_file_and_line(tmp_path, drop, where):
    # Checked before any model is loaded, so a checkpoint path that does not exist is fine.
    bad = {k: v for k, v in UPPER.items() if k != drop}
    samples = _write(tmp_path / "s.jsonl", [ADD, bad])
    r = _analyze("--samples", samples, "--out", tmp_path / "out", "--config.continuation=True",
                 "--checkpoint", tmp_path / "nowhere", timeout=120)
    assert r.returncode != 0
    assert f"{samples}:{where}: --config.continuation needs 'prompt' (str) and 'tests'" in r.stderr


def test_continuation_unused_line_needs_no_prompt(tmp_path):
    # The all-correct problem is not used, so its missing prompt is no error; a repeated id
    # is one, already when the table's input is read, naming both lines (file:line).
    no_prompt = {k: v for k, v in ALL_CORRECT.items() if k != "prompt"}
    samples = _write(tmp_path / "s.jsonl", [no_prompt, ADD, ADD])
    r = _analyze("--samples", samples, "--out", tmp_path / "out", "--config.continuation=True",
                 "--checkpoint", tmp_path / "nowhere", timeout=120)
    assert r.returncode != 0
    assert f"error: {samples}:3: id 'add' repeats {samples}:2" in r.stderr
    assert "needs 'prompt'" not in r.stderr


def test_continuation_without_a_model_is_a_usage_error(tmp_path):
    samples = _write(tmp_path / "s.jsonl", [ADD])
    for extra in ([], ["--checkpoint", "a", "--hf_dir", "b"]):
        r = _analyze("--samples", samples, "--out", tmp_path / "out",
                     "--config.continuation=True", *extra, timeout=120)
        assert r.returncode != 0
        assert "--config.continuation needs exactly one of --checkpoint and --hf_dir" in r.stderr
        assert not (tmp_path / "out").exists()  # refused before any work


# ------------------------------------------------------------------ real runs: judging tests

@pytest.mark.parametrize("passed,ranker,expected", [
    # Test t1 is wrong (only the bad code passes it): the top code passes t0 alone.
    ([[1, 0], [1, 0], [0, 1]], "mutual", ["t0"]),
    # One code passes 3 tests alone; three codes agree on 2 others. Pass counts trust the
    # loner (3 > 2); CodeT trusts the agreeing group (2 * sqrt(3) = 3.46 > 3 * sqrt(1)).
    ([[1, 1, 1, 0, 0]] + [[0, 0, 0, 1, 1]] * 3, "pass_count", ["t0", "t1", "t2"]),
    ([[1, 1, 1, 0, 0]] + [[0, 0, 0, 1, 1]] * 3, "codet", ["t3", "t4"]),
    ([[1, 1, 1, 0, 0]] + [[0, 0, 0, 1, 1]] * 3, "mutual", ["t3", "t4"]),
    ([[0, 0], [0, 0]], "mutual", []),  # the top code passes nothing: no evidence
    ([], "mutual", []),  # no codes
])
def test_judging_tests_hand_made(passed, ranker, expected):
    tests = [f"t{j}" for j in range(len(passed[0]) if passed else 2)]
    assert A.judging_tests(tests, passed, ranker) == expected


def test_judging_tests_are_what_the_ranked_verdict_trusts():
    # The ranked verdict's chosen code passes every judging test, its rejected one does not.
    rng = np.random.default_rng(0)
    for _ in range(50):
        passed = rng.random((6, 5)) < 0.5
        tests = [f"t{j}" for j in range(5)]
        judged = A.judging_tests(tests, passed)
        correct, _ = A.verdicts(passed, A.Options(verdict="ranked"))
        cols = [int(t[1:]) for t in judged]
        assert correct.tolist() == [bool(cols) and bool(row[cols].all()) for row in passed]


def test_judging_tests_shape_mismatch():
    with pytest.raises(ValueError, match="for 3 tests"):
        A.judging_tests(["a", "b", "c"], [[1, 0]])


# A real (instruct-style) run's executed problem record, as launch.sample and launch.execute
# leave it. Code responses are fenced; "I cannot." extracts to no program, so it is no code
# (its row fails everything). Test 2 is wrong: only the x + 2 code passes it.
_RESPONSES = ["```python\ndef f(x):\n    return x + 1\n```", "I cannot.",
              "```python\ndef f(x):\n    return x + 2\n```",
              "```python\ndef f(x):\n    return x + 1\n```"]
REAL_RECORD = {
    "version": 1, "id": "p", "problem": "f adds one", "prompt": "Write f, which adds one.\n",
    "response_format": "code_block",
    "samples": [{"response": r, "finish": "eos",
                 "program": r.split("```python\n")[1].split("```")[0] if "```" in r else ""}
                for r in _RESPONSES],
    "tests": ["assert f(1) == 2", "assert f(0) == 1", "assert f(1) == 3"],
    "passed": [[True, True, False], [False, False, False], [False, False, True],
               [True, True, False]]}


def test_real_run_analyze_stage_judges_by_ranked_tests(tmp_path, eos_model):
    w = tmp_path / "run"
    w.mkdir()
    _write(w / "executed.jsonl", [REAL_RECORD])
    p = pipeline.Pipeline(real.get_config("hf_dir=/nowhere,prompts=/nowhere.jsonl"), w)
    calls = []
    p.run = lambda stage, module, *args: calls.append([stage, module, *map(str, args)])
    p.analyze()
    (call,) = calls
    stage, module, *args = call
    assert (stage, module) == ("analyze", "launch.analyze")
    config = dict(a.removeprefix("--config.").split("=", 1) for a in args
                  if a.startswith("--config."))
    paths = [a for a in args if not a.startswith("--config.")]
    flags = dict(zip(paths[::2], paths[1::2]))
    # The executed records themselves, no glue file: no --verdicts, no input written here.
    assert flags["--samples"] == str(w / "executed.jsonl") and "--verdicts" not in flags
    assert sorted(x.name for x in w.iterdir() if x.is_file()) == ["executed.jsonl"]
    assert config["continuation"] == "True" and config["verdict"] == "ranked"
    assert config["ranker"] == "mutual" and config["response_format"] == "code_block"
    assert flags["--checkpoint"] == str(w / "init") and config["timeout"] == "10.0"
    # What the analysis reads: the responses with a program, the message the policy saw,
    # and, for continuations, the tests the ranking trusts.
    result = A.phi_tables(A.read_inputs(str(w / "executed.jsonl"), None).problems,
                          A.Options(verdict="ranked"))
    (job,), _ = A.continuation_jobs(str(w / "executed.jsonl"), result, "char")
    assert job["prompt"] == REAL_RECORD["prompt"]
    assert job["tests"] == ["assert f(1) == 2", "assert f(0) == 1"]
    assert A.record_view(REAL_RECORD)["codes"] == [t for t in _RESPONSES if t != "I cannot."]

    # The stage's own command, with the EOS-only model for the policy: prefix + chosen mid is
    # "```python\ndef f(x):\n    return x + 1", whose extracted program passes both trusted
    # tests; the rejected side's x + 2 fails them (though it passes the wrong test 2).
    i = args.index("--checkpoint")
    args[i:i + 2] = ["--hf_dir", str(eos_model)]
    r = _analyze(*args, "--config.max_new_tokens=4")
    assert r.returncode == 0, r.stderr[-3000:]
    cont = json.loads((w / "analysis" / "continuation.json").read_text())
    assert cont["problems"] == 1
    assert cont["chosen"]["pass@1"] == 100.0 and cont["rejected"]["pass@1"] == 0.0
