"""The build renders prompts in the format the samples were drawn with: the records'
`prompt_format` by default, a different one (or prompt ids that differ) is an error naming
file:line. The continuation experiment takes the records' format the same way."""
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from data_tools import analyze, build
from fdpo import problem, records
from fdpo.records import Segment
from tests.helpers.tokenizer import tiny_tokenizer_dirs  # noqa: F401  (fixture)

MESSAGE = "Sum a list of numbers."
MAGICODER = ("You are an exceptionally intelligent coding assistant that consistently delivers "
             "accurate and reliable responses to user instructions.\n\n@@ Instruction\n"
             f"{MESSAGE}\n\n@@ Response\n")
GOOD, BAD = "def f(xs):\n    return sum(xs)\n", "def f(xs):\n    return max(xs)\n"


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dirs):  # noqa: F811
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dirs["chat"])


def _record(pid, tok, prompt_format=None, prompt_ids=None):
    rec = {"version": problem.VERSION, "id": pid, "prompt": MESSAGE,
           "samples": [{"response": r, "program": r, "finish": "eos"} for r in (GOOD, BAD)],
           "tests": ["assert f([1, 2]) == 3"], "passed": [[1], [0]]}
    if prompt_format is not None:
        rec["prompt_format"] = prompt_format
    if prompt_ids is not None:
        rec["prompt_ids"] = prompt_ids
    return rec


def _build(tmp_path, tok, lines, **cfg):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    manifest, _ = build.build(str(inp), "", str(tmp_path / "out"),
                              build.BuildConfig(max_len=256, val_fraction=0.0, **cfg), tokenizer=tok)
    src = records.PairDataSource.from_manifest(str(tmp_path / "out" / "manifest.json"), "train")
    return manifest, [src.record(i) for i in range(len(src))], inp


def _prompt_of(rec):
    return np.asarray(rec.chosen_ids)[np.asarray(rec.chosen_segments) == Segment.PROMPT].tolist()


def test_records_format_is_used_by_default(tmp_path, tok):
    want = tok(MAGICODER)["input_ids"]  # the layout with the tokenizer's special tokens
    manifest, recs, _ = _build(tmp_path, tok, [_record("a", tok, "magicoder", want),
                                               _record("b", tok, "magicoder")])
    assert [_prompt_of(r) for r in recs] == [want, want]
    assert manifest["tokenizer"]["prompt_format"] == "magicoder"
    assert manifest["config"]["prompt_format"] == ""


def test_records_without_a_format_get_the_tokenizers_default(tmp_path, tok):
    manifest, (rec,), _ = _build(tmp_path, tok, [_record("a", tok)])
    chat = tok.apply_chat_template([{"role": "user", "content": MESSAGE}], tokenize=False,
                                   add_generation_prompt=True)
    assert _prompt_of(rec) == tok(chat, add_special_tokens=False)["input_ids"]
    assert manifest["tokenizer"]["prompt_format"] == "chat_template"


def test_another_format_than_the_records_is_refused(tmp_path, tok):
    with pytest.raises(build.FormatError, match=r"in\.jsonl:1: sampled with prompt_format="
                                                r"'magicoder'.*'plain'"):
        _build(tmp_path, tok, [_record("a", tok, "magicoder")], prompt_format="plain")
    assert not (tmp_path / "out").exists()


def test_records_of_two_formats_are_refused(tmp_path, tok):
    with pytest.raises(build.FormatError, match=r"in\.jsonl:2: sampled with prompt_format="
                                                r"'deepseek_instruct'"):
        _build(tmp_path, tok, [_record("a", tok, "magicoder"),
                               _record("b", tok, "deepseek_instruct")])


def test_prompt_ids_that_render_otherwise_are_refused(tmp_path, tok):
    ids = tok(MAGICODER)["input_ids"]
    with pytest.raises(build.FormatError, match=r"in\.jsonl:1: the prompt renders here "
                                                r"\(prompt_format 'magicoder'\) to \d+ tokens "
                                                r"that differ at token 3"):
        _build(tmp_path, tok, [_record("a", tok, "magicoder", ids[:3] + [0] + ids[4:])])


def test_unknown_config_format_is_refused():
    with pytest.raises(ValueError, match="config.prompt_format='alpaca'"):
        build.BuildConfig(prompt_format="alpaca").validate()


def test_continuation_takes_the_records_format():
    job = lambda fmt, line: {"id": str(line), "prompt_format": fmt, "where": f"s.jsonl:{line}"}  # noqa: E731
    assert analyze.continuation_prompt_format([job("magicoder", 1), job(None, 2)]) == "magicoder"
    assert analyze.continuation_prompt_format([job(None, 1)], "plain") == "plain"
    assert analyze.continuation_prompt_format([job(None, 1)]) == ""
    with pytest.raises(analyze.ContinuationInputError, match=r"s\.jsonl:1: sampled with "
                                                              r"prompt_format='magicoder'"):
        analyze.continuation_prompt_format([job("magicoder", 1)], "plain")
    with pytest.raises(analyze.ContinuationInputError, match=r"s\.jsonl:3: .*'plain', but "
                                                              r"s\.jsonl:1 with 'magicoder'"):
        analyze.continuation_prompt_format([job("magicoder", 1), job("plain", 3)])
