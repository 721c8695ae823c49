"""`python -m launch.sample` run as a user runs it: output format, resuming, bad input."""

from __future__ import annotations

import json
import os

import pytest

from transformers import AutoTokenizer

from fdpo import problem
from fdpo.extract import extract_assertions, extract_program
from fdpo.testing import make_hf_model
from fdpo.testing import build_tiny_tokenizer

from tests.conftest import run_program

pytestmark = pytest.mark.torch
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
PROMPTS = [{"id": "p0", "prompt": "Write a function add(a, b)."},
           {"id": 7, "prompt": "Write is_even(n).", "extra": "ignored"},
           {"id": "p2", "prompt": "Return the maximum of a list."}]
SMALL = ["--config.num_codes=2", "--config.num_tests=2", "--config.max_new_tokens=12",
         "--config.temperature=1.0", "--config.batch_size=8", "--config.length_bucket=32"]


def run(*args, check=True):
    return run_program("launch.sample", *args, env=ENV, timeout=600, check=check)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    build_tiny_tokenizer(out, chat_template=True)  # vocab 400, ChatML, eos <|im_end|>
    make_hf_model(out, "qwen2", vocab_size=400, tie_word_embeddings=True)
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_samples_are_problem_records_and_resume(hf_dir, tmp_path):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "samples.jsonl"
    write_jsonl(inp, PROMPTS)
    proc = run("--hf_dir", str(hf_dir), "--input", str(inp), "--output", str(out), *SMALL)
    assert "prompt format chat_template" in proc.stderr
    lines = out.read_text().splitlines()
    records = [json.loads(l) for l in lines]
    assert [r["id"] for r in records] == ["p0", "7", "p2"]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    for rec, src in zip(records, PROMPTS):
        # The problem record (fdpo/problem.py): checked as the next stages check it.
        problem.check(rec, "samples", problem.SAMPLED)
        assert isinstance(rec["id"], str) and rec["version"] == problem.VERSION
        assert rec["problem"] == src["prompt"]
        assert rec.get("extra") == src.get("extra")  # other input fields pass through
        assert rec["prompt"].startswith(src["prompt"]) and "```python" in rec["prompt"]
        assert len(rec["samples"]) == len(rec["test_samples"]) == 2
        finishes = [s["finish"] for s in rec["samples"] + rec["test_samples"]]
        assert set(finishes) <= {"eos", "length", "stop"}
        for s in rec["samples"]:
            # The token ids are the response the policy wrote (no EOS: `finish` says why
            # it stopped); a length-finished one has exactly max_new_tokens of them.
            assert tok.decode(s["response_ids"]) == s["response"]
            assert s["finish"] != "length" or len(s["response_ids"]) == 12
            assert s["program"] == extract_program(s["response"])
        assert rec["tests"] == list(dict.fromkeys(
            a for r in rec["test_samples"] for a in extract_assertions(r["response"])))
    # T = 1 on a random model: the two samples of a prompt differ.
    assert any(len({s["response"] for s in r["samples"]}) > 1 for r in records)

    # Resume after a crash: the last line lost, the second one cut mid-write.
    out.write_text(lines[0] + "\n" + lines[1][:len(lines[1]) // 2])
    run("--hf_dir", str(hf_dir), "--input", str(inp), "--output", str(out), *SMALL)
    resumed = [json.loads(l) for l in out.read_text().splitlines()]
    # Each sample's stream is fixed by (seed, id, kind, index): the same records again.
    assert resumed == records

    proc = run("--hf_dir", str(hf_dir), "--input", str(inp), "--output", str(out), *SMALL)
    assert "nothing to do" in proc.stdout
    assert out.read_text().splitlines() == lines


def test_resume_refuses_a_corrupt_line_before_the_last(hf_dir, tmp_path):
    """A bad line with records after it is no interrupted write: the run stops, naming it,
    and the output is left as it was (records after a corrupt line were deleted before)."""
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "samples.jsonl"
    write_jsonl(inp, PROMPTS)
    corrupt = '{"id": "p0", "codes": []}\n{"id": "7", "co\n{"id": "p2", "codes": []}\n'
    out.write_text(corrupt)
    proc = run("--hf_dir", str(hf_dir), "--input", str(inp), "--output", str(out), *SMALL,
               check=False)
    assert proc.returncode != 0
    assert f"error: {out}:2: malformed line in the existing output" in proc.stderr
    assert out.read_text() == corrupt


def test_greedy_variant_is_deterministic(hf_dir, tmp_path):
    inp = tmp_path / "prompts.jsonl"
    write_jsonl(inp, PROMPTS[:2])
    outs = []
    for name, seed in (("a", 0), ("b", 5)):
        run("--hf_dir", str(hf_dir), "--input", str(inp), "--output", str(tmp_path / name),
            "--config=configs/sample.py:greedy", "--config.max_new_tokens=10",
            f"--config.seed={seed}",
            # Code-only: the test template is never rendered, so it need not even format.
            "--config.test_prompt={no_such_field}")
        outs.append([json.loads(l) for l in (tmp_path / name).read_text().splitlines()])
    assert outs[0] == outs[1]  # greedy ignores the seed
    for rec in outs[0]:
        assert len(rec["samples"]) == 1 and rec["tests"] == [] and "test_samples" not in rec


def test_malformed_lines_are_reported_with_line_numbers(hf_dir, tmp_path):
    inp = tmp_path / "bad.jsonl"
    inp.write_text('{"id": "a", "prompt": "ok"}\n{not json\n\n{"id": "b"}\n'
                   '{"id": "a", "prompt": "again"}\n[1, 2]\n{"id": true, "prompt": "x"}\n')
    proc = run("--hf_dir", str(hf_dir), "--input", str(inp), "--output",
               str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode != 0
    for expected in (f"{inp}:2: not valid JSON", f"{inp}:4: 'prompt' must be",
                     f"{inp}:5: id 'a' repeats line 1", f"{inp}:6: expected a JSON object",
                     f"{inp}:7: 'id' must be"):
        assert expected in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "o.jsonl").exists() or not (tmp_path / "o.jsonl").read_text()


@pytest.mark.slow
def test_prompt_format_is_recorded_and_a_change_redoes_the_file(hf_dir, tmp_path):
    inp, out = tmp_path / "prompts.jsonl", tmp_path / "samples.jsonl"
    write_jsonl(inp, PROMPTS[:1])
    one = ["--config.mode=code", "--config.num_codes=1", "--config.max_new_tokens=4",
           "--config.batch_size=8", "--config.length_bucket=32"]
    run("--hf_dir", str(hf_dir), "--input", str(inp), "--output", str(out), *one,
        "--config.prompt_format=magicoder")
    (rec,) = [json.loads(l) for l in out.read_text().splitlines()]
    assert rec["prompt_format"] == "magicoder"
    # Magicoder's layout (its README), tokenised with the tokenizer's special tokens.
    text = ("You are an exceptionally intelligent coding assistant that consistently delivers "
            f"accurate and reliable responses to user instructions.\n\n@@ Instruction\n"
            f"{rec['prompt']}\n\n@@ Response\n")
    assert rec["prompt_ids"] == AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"]
    # Resuming the file in another format redoes its record (the format is part of the
    # sample fingerprint): one file never mixes two prompt formats.
    write_jsonl(inp, PROMPTS[:2])
    proc = run("--hf_dir", str(hf_dir), "--input", str(inp), "--output", str(out), *one,
               "--config.prompt_format=plain")
    assert f"{out}: 0 records kept, 1 redone" in proc.stdout and ", 1 new" in proc.stdout
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == sorted(str(p["id"]) for p in PROMPTS[:2])
    assert {r["prompt_format"] for r in recs} == {"plain"}
    proc = run("--hf_dir", str(hf_dir), "--input", str(inp), "--output", str(out), *one,
               "--config.prompt_format=alpaca", check=False)
    assert proc.returncode != 0 and "--config.prompt_format='alpaca'" in proc.stderr
