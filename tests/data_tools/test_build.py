"""The builder end to end on hand-made inputs with known answers."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import build as build_config
from data_tools import build
from fdpo import records
from fdpo.records import Segment
from tests.helpers.tokenizer import tiny_tokenizer_dirs  # noqa: F401  (fixture)

from tests.conftest import REPO

SUM = "def f(xs):\n    return sum(xs)\n"
MAX = "def f(xs):\n    return max(xs)\n"
OTHER = "class Stack:\n    def __init__(self):\n        self.items = []\n"


@pytest.fixture(scope="module")
def tok_dirs(tiny_tokenizer_dirs):  # noqa: F811
    return tiny_tokenizer_dirs


@pytest.fixture(scope="module")
def tokenizers(tok_dirs):
    from transformers import AutoTokenizer

    return {k: AutoTokenizer.from_pretrained(v) for k, v in tok_dirs.items()}


def _problem(pid, codes, passed, prompt="Sum a list of numbers."):
    return json.dumps({"id": pid, "prompt": prompt, "codes": codes,
                       "tests": [f"t{j}" for j in range(len(passed[0]))], "passed": passed})


# Line number -> (content, expected drop reason or None when the line yields a record).
MIXED = [
    (_problem("p1", [SUM, MAX, SUM, OTHER], [[1, 1, 1], [1, 0, 0], [1, 1, 1], [0, 0, 0]]), None),
    (_problem("all-correct", [SUM, SUM], [[1, 1], [1, 1]]), "no_incorrect_code"),
    (_problem("none-correct", [SUM, MAX], [[0, 0], [0, 0]]), "no_correct_code"),
    ('{"id": "broken", "prompt": ', "malformed_json"),
    ("", "blank_line"),
    (json.dumps({"id": "x", "codes": [SUM], "tests": [], "passed": [[]]}), "malformed_record"),  # no prompt
    (json.dumps({"id": "y", "prompt": "p", "codes": [SUM, MAX], "tests": ["a"], "passed": [[True], [True, False]]}),
     "malformed_record"),
    (json.dumps({"id": "z", "prompt": "p", "codes": [SUM], "tests": ["a"], "passed": [["yes"]]}), "malformed_record"),
    (json.dumps({"prompt": "Sum.", "chosen": SUM, "rejected": MAX}), None),
    (json.dumps({"prompt": "Sum.", "chosen": SUM, "rejected": SUM}), "identical_programs"),
    (json.dumps({"prompt": "Sum.", "chosen": "x = 1\n", "rejected": "x = 1\ny = 2\n"}), "empty_chosen_mid"),
    (json.dumps({"prompt": "Sum. " * 100, "chosen": SUM, "rejected": MAX}), "too_long"),
    ("[1, 2, 3]", "malformed_record"),
    (json.dumps({"hello": "world"}), "malformed_record"),
]


def _write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def _read_all(out_dir, split="train"):
    src = records.PairDataSource.from_manifest(os.path.join(out_dir, "manifest.json"), split)
    return [src.record(i) for i in range(len(src))]


def test_mixed_file_counts_and_drop_reasons(tmp_path, tok_dirs):
    inp = _write(tmp_path / "in.jsonl", [c for c, _ in MIXED])
    out = str(tmp_path / "out")
    manifest, _ = build.build(inp, tok_dirs["chat"], out, build.BuildConfig(max_len=128, val_fraction=0.0))
    c = manifest["counts"]
    assert c["lines_in"] == len(MIXED) == c["lines_used"] + c["lines_dropped"]
    expected = {}
    for _, reason in MIXED:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert manifest["drop_reasons"] == expected
    assert c["lines_used"] == 2 and c["records_out"] == {"train": 2, "validation": 0}
    assert c["problems_in"] == 3 and c["ready_pairs_in"] == 4
    # Every dropped line, with its 1-based line number and reason, is in the drops file.
    with open(os.path.join(out, "drops-00000-of-00001.jsonl")) as f:
        drops = [json.loads(x) for x in f]
    assert [(d["line"], d["reason"]) for d in drops] == [
        (i + 1, r) for i, (_, r) in enumerate(MIXED) if r]
    assert all(f"line {d['line']}:" in d["detail"] for d in drops
               if d["reason"] in ("malformed_json", "malformed_record"))
    by_line = {d["line"]: d["detail"] for d in drops}
    assert "missing field 'prompt'" in by_line[6]
    assert "'passed' row 1" in by_line[7]
    # Manifest on disk equals the returned one; the preview marks the segments.
    assert records.read_manifest(os.path.join(out, "manifest.json"))["counts"] == c
    with open(os.path.join(out, "preview-00000-of-00001.html")) as f:
        page = f.read()
    assert 'class="mid-c"' in page and 'class="mid-r"' in page and "line 1" in page


def test_known_pair_and_token_level_segments(tmp_path, tok_dirs, tokenizers):
    tok = tokenizers["chat"]
    inp = _write(tmp_path / "in.jsonl", [MIXED[0][0]])
    out = str(tmp_path / "out")
    build.build(inp, tok_dirs["chat"], out, build.BuildConfig(max_len=128, val_fraction=0.0))
    (rec,) = _read_all(out)
    # Ranking: codes 0 and 2 pass everything (tie -> code 0 on top), code 1 passes 1 test,
    # code 3 none. Candidates: (0, 1) with rank diff 2/3 and a long common part, (0, 3) with
    # rank diff 1 and almost nothing in common -> (0, 1): SUM vs MAX.
    eos = tok.eos_token_id
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": "Sum a list of numbers."}],
                                         tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    want_c = prompt + tok(SUM, add_special_tokens=False)["input_ids"] + [eos]
    want_r = prompt + tok(MAX, add_special_tokens=False)["input_ids"] + [eos]
    assert rec.chosen_ids[:len(want_c)].tolist() == want_c
    assert rec.rejected_ids[:len(want_r)].tolist() == want_r
    assert rec.problem_name == "p1" and rec.pair_id == 1 * build.MAX_PAIRS_PER_PROBLEM
    cs, rs = rec.chosen_segments, rec.rejected_segments
    assert (cs[:len(prompt)] == Segment.PROMPT).all() and (cs[len(want_c):] == Segment.PAD).all()

    def text(ids, segs, s):
        return tok.decode(ids[segs == s].tolist())

    assert "sum" in text(rec.chosen_ids, cs, Segment.MID)
    assert "max" in text(rec.rejected_ids, rs, Segment.MID)
    assert "return" in text(rec.chosen_ids, cs, Segment.PREFIX)
    _assert_prefix_cancels(rec)


def _assert_prefix_cancels(rec):
    """Prompt and prefix are the same token ids at the same positions on both sides, so their
    per-token log-probs (same context, same token) are equal and cancel exactly; the suffixes are
    the same token ids (at shifted positions); the chosen mid is never empty."""
    cs, rs = rec.chosen_segments, rec.rejected_segments
    for s in (Segment.PROMPT, Segment.PREFIX):
        np.testing.assert_array_equal(cs == s, rs == s)
        np.testing.assert_array_equal(rec.chosen_ids[cs == s], rec.rejected_ids[rs == s])
    np.testing.assert_array_equal(rec.chosen_ids[cs == Segment.SUFFIX], rec.rejected_ids[rs == Segment.SUFFIX])
    assert (cs == Segment.MID).sum() > 0
    # Segments are contiguous and ordered: prompt, prefix, mid, suffix, pad.
    for segs in (cs, rs):
        assert (np.diff(segs[segs != Segment.PAD].astype(int)) >= 0).all()
        assert (segs[np.argmax(segs == Segment.PAD):] == Segment.PAD).all() if (segs == Segment.PAD).any() else True


def _assert_line_boundaries(rec, tok):
    """With --granularity=line, the token before the mid and the token before the suffix
    (on both sides) contain a newline, unless that boundary is the response start/end."""
    for ids, segs in ((rec.chosen_ids, rec.chosen_segments), (rec.rejected_ids, rec.rejected_segments)):
        resp = np.nonzero(segs >= Segment.PREFIX)[0]
        first_mid_or_suffix = np.nonzero(segs >= Segment.MID)[0]
        suffix = np.nonzero(segs == Segment.SUFFIX)[0]
        for start in (first_mid_or_suffix[:1], suffix[:1]):
            if len(start) and start[0] > resp[0]:
                assert "\n" in tok.decode([int(ids[start[0] - 1])])


def _synthetic_lines(n, seed=0):
    rng = np.random.default_rng(seed)
    bodies = ["return sum(xs)", "return max(xs)", "return min(xs)", "return len(xs)", "return xs[0]"]
    lines = []
    for i in range(n):
        k = int(rng.integers(2, 6))
        codes = [f"def f{i}(xs):\n    y = {i}\n    {bodies[rng.integers(0, 5)]}\n    return y\n" for _ in range(k)]
        passed = (rng.random((k, 4)) < 0.6).tolist()
        lines.append(json.dumps({"id": f"s{i}", "prompt": f"Problem {i}.", "codes": codes,
                                 "tests": ["t"] * 4, "passed": passed}))
    return lines


@pytest.mark.parametrize("granularity", ["token", "line"])
def test_every_record_cancels_and_reads_through_grain(tmp_path, tok_dirs, tokenizers, granularity):
    import grain

    lines = _synthetic_lines(60)
    inp = _write(tmp_path / "in.jsonl", lines)
    out = str(tmp_path / "out")
    m, _ = build.build(inp, tok_dirs["plain"], out,
                       build.BuildConfig(max_len=96, val_fraction=0.5, granularity=granularity, pairs_per_problem=2))
    c = m["counts"]
    assert c["lines_in"] == 60 == c["lines_used"] + c["lines_dropped"]
    n = sum(c["records_out"].values())
    assert c["records_out"]["train"] > 0 and c["records_out"]["validation"] > 0
    names = {}
    for split in build.SPLITS:
        recs = _read_all(out, split)
        assert len(recs) == c["records_out"][split]
        for rec in recs:
            _assert_prefix_cancels(rec)
            assert names.setdefault(rec.problem_name, split) == split  # a problem is in one split
            assert build.split_of(rec.problem_name, 0.5) == split
            if granularity == "line":
                _assert_line_boundaries(rec, tokenizers["plain"])
    # The trainer's path: grain reads every record once.
    src = records.PairDataSource.from_manifest(os.path.join(out, "manifest.json"), "train")
    ids = [int(x["pair_id"]) for x in grain.MapDataset.source(src)]
    assert len(ids) == len(set(ids)) == c["records_out"]["train"] and n >= len(ids)


def test_sharded_build_equals_single(tmp_path, tok_dirs):
    lines = _synthetic_lines(30, seed=1) + [c for c, _ in MIXED]
    inp = _write(tmp_path / "in.jsonl", lines)
    single, _ = build.build(inp, tok_dirs["chat"], str(tmp_path / "one"), build.BuildConfig(max_len=128))
    out = str(tmp_path / "many")
    for i in range(3):
        build.build(inp, tok_dirs["chat"], out, build.BuildConfig(max_len=128, shard_index=i, num_shards=3))
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    merged = build.merge(out)
    assert merged["counts"] == single["counts"]
    assert merged["drop_reasons"] == single["drop_reasons"]
    for split in build.SPLITS:
        assert len(merged["splits"][split]["shards"]) == 3
        one = sorted(int(r.pair_id) for r in _read_all(str(tmp_path / "one"), split))
        many = sorted(int(r.pair_id) for r in _read_all(out, split))
        assert one == many


def test_rebuild_is_byte_identical(tmp_path, tok_dirs):
    inp = _write(tmp_path / "in.jsonl", _synthetic_lines(20, seed=2))
    for d in ("a", "b"):
        build.build(inp, tok_dirs["plain"], str(tmp_path / d), build.BuildConfig(max_len=96, val_fraction=0.3))
    for split in build.SPLITS:
        name = f"{split}-00000-of-00001.array_record"
        with open(tmp_path / "a" / name, "rb") as fa, open(tmp_path / "b" / name, "rb") as fb:
            assert fa.read() == fb.read()


def test_plain_prompt_without_chat_template(tmp_path, tok_dirs, tokenizers):
    tok = tokenizers["plain"]
    inp = _write(tmp_path / "in.jsonl", [json.dumps({"prompt": "Sum.", "chosen": SUM, "rejected": MAX})])
    m, _ = build.build(inp, tok_dirs["plain"], str(tmp_path / "o"), build.BuildConfig(max_len=64, val_fraction=0.0))
    assert m["tokenizer"]["prompt_format"] == "plain" and m["tokenizer"]["chat_template_sha256"] is None
    (rec,) = _read_all(str(tmp_path / "o"))
    prompt = tok("Sum.", add_special_tokens=True)["input_ids"]
    assert rec.chosen_ids[rec.chosen_segments == Segment.PROMPT].tolist() == prompt
    resp = rec.chosen_ids[(rec.chosen_segments >= Segment.PREFIX)].tolist()
    assert resp == tok(SUM, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_config_errors(tmp_path, tok_dirs):
    inp = _write(tmp_path / "in.jsonl", [MIXED[0][0]])
    with pytest.raises(ValueError, match="config.ranker='nope'"):
        build.build(inp, tok_dirs["plain"], str(tmp_path / "o"), build.BuildConfig(ranker="nope"))
    with pytest.raises(ValueError, match="config.shard_index=3"):
        build.build(inp, tok_dirs["plain"], str(tmp_path / "o"), build.BuildConfig(shard_index=3, num_shards=2))
    with pytest.raises(FileNotFoundError, match="--input"):
        build.build(str(tmp_path / "missing.jsonl"), tok_dirs["plain"], str(tmp_path / "o"))
    with pytest.raises(ValueError, match="--tokenizer="):
        build.build(inp, str(tmp_path / "no-tokenizer"), str(tmp_path / "o"))


def test_bad_utf8_line_is_dropped_with_its_number(tmp_path, tok_dirs):
    with open(tmp_path / "bad.jsonl", "wb") as f:
        f.write(MIXED[0][0].encode() + b"\n\xff\xfe\n" + MIXED[0][0].replace('"p1"', '"p2"').encode() + b"\n")
    m, _ = build.build(str(tmp_path / "bad.jsonl"), tok_dirs["plain"], str(tmp_path / "o"), build.BuildConfig(max_len=128))
    assert m["counts"]["lines_in"] == 3 and m["counts"]["lines_used"] == 2
    assert m["drop_reasons"] == {"malformed_utf8": 1}
    with open(tmp_path / "o" / "drops-00000-of-00001.jsonl") as f:
        (d,) = [json.loads(x) for x in f]
    assert d["line"] == 2 and "line 2: not valid UTF-8" in d["detail"]


def test_cli(tmp_path, tok_dirs):
    inp = _write(tmp_path / "in.jsonl", [c for c, _ in MIXED])
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "launch.build", f"--input={inp}", f"--tokenizer={tok_dirs['chat']}",
           f"--out={out}", "--config.max_len=128", "--noprogress"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout[:res.stdout.rindex("}") + 1])
    assert summary["counts"]["lines_in"] == len(MIXED)
    assert "line 4 dropped (malformed_json)" in res.stderr
    res = subprocess.run(cmd[:-1] + ["--config.ranker=bogus"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "config.ranker='bogus'" in res.stderr


def test_build_config_defaults_agree_with_the_library():
    """configs/build.py spells the defaults out (configs import only ml_collections); they
    must be BuildConfig's."""
    assert build_config.get_config().to_dict() == dataclasses.asdict(build.BuildConfig())
