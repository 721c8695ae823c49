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


def _record(pid, codes, passed, prompt="Sum a list of numbers.", finish=None, tests=None, **extra):
    """A problem record after launch.execute (fdpo/problem.py) whose samples are `codes`:
    each response is its program alone (no prose, no fence), so the on-policy side is the
    program's tokens and the EOS (prose and fences: tests/data_tools/test_onpolicy.py)."""
    finish = finish or ["eos"] * len(codes)
    return {"version": 1, "id": pid, "prompt": prompt, "response_format": "code_block",
            "samples": [{"response": c, "program": c,
                         "finish": f} for c, f in zip(codes, finish)],
            "tests": tests if tests is not None else [f"t{j}" for j in range(len(passed[0]))],
            "passed": passed, **extra}


def _problem(pid, codes, passed, prompt="Sum a list of numbers.", **kw):
    return json.dumps(_record(pid, codes, passed, prompt, **kw))


# Line number -> (content, expected drop reason or None when the line yields a record).
MIXED = [
    (_problem("p1", [SUM, MAX, SUM, OTHER], [[1, 1, 1], [1, 0, 0], [1, 1, 1], [0, 0, 0]]), None),
    (_problem("all-correct", [SUM, SUM], [[1, 1], [1, 1]]), "no_incorrect_code"),
    (_problem("none-correct", [SUM, MAX], [[0, 0], [0, 0]]), "no_correct_code"),
    ('{"id": "broken", "prompt": ', "malformed_json"),
    ("", "blank_line"),
    (json.dumps({k: v for k, v in _record("x", [SUM], [[]], tests=[]).items() if k != "prompt"}),
     "malformed_record"),
    (_problem("y", [SUM, MAX], [[True], [True, False]], tests=["a"]), "malformed_record"),
    (_problem("z", [SUM], [["yes"]], tests=["a"]), "malformed_record"),
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
        lines.append(_problem(f"s{i}", codes, passed, f"Problem {i}.", tests=["t"] * 4))
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
        # The shards' records, rewritten in pair_id order: the single build's, in its order.
        assert merged["splits"][split]["shards"] == [
            {"path": f"{split}-selected.array_record",
             "records": single["counts"]["records_out"][split]}]
        one = [records.encode(r) for r in _read_all(str(tmp_path / "one"), split)]
        assert one and [records.encode(r) for r in _read_all(out, split)] == one


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


# ------------------------------------------------------------ problem records, selection

SUM2 = "def f(xs):\n    total = sum(xs)\n    return total\n"


def _responses(rec, tok):
    """(chosen, rejected) response texts of a pair record."""
    return tuple(tok.decode(ids[segs >= Segment.PREFIX].tolist(), skip_special_tokens=True)
                 for ids, segs in ((rec.chosen_ids, rec.chosen_segments),
                                   (rec.rejected_ids, rec.rejected_segments)))


@pytest.mark.parametrize("policy", ["drop", "reject_only"])
def test_truncated_samples_are_never_chosen(tmp_path, tok_dirs, tokenizers, policy):
    # Code 0 passes everything and ranks first, but hit the token limit; so did code 2.
    lines = [
        _problem("p", [SUM, SUM2, MAX, OTHER, "", "   "],
                 [[1, 1, 1], [1, 1, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]],
                 finish=["length", "eos", "length", "eos", "eos", "length"]),
        _problem("cut-correct", [SUM, MAX], [[1, 1], [0, 0]], finish=["length", "eos"]),
        _problem("no-program", ["", ""], [[0], [0]], finish=["length", "eos"]),
    ]
    out = str(tmp_path / "out")
    m, _ = build.build(_write(tmp_path / "in.jsonl", lines), tok_dirs["chat"], out,
                       build.BuildConfig(max_len=128, val_fraction=0.0, pairs_per_problem=4,
                                         truncated=policy))
    pairs = {_responses(r, tokenizers["chat"]) for r in _read_all(out)}
    assert all(chosen == SUM2 for chosen, _ in pairs)  # never SUM, the truncated one
    want = {(SUM2, OTHER)} if policy == "drop" else {(SUM2, OTHER), (SUM2, MAX)}
    assert pairs == want
    assert m["drop_reasons"] == {"only_truncated_correct": 1, "no_program": 1}
    assert m["counts"]["samples"] == {
        "samples_in": 10, "samples_empty_program": 4, "samples_truncated": 3,
        "truncated_not_chosen": 2, "truncated_not_rejected": 1 if policy == "drop" else 0}
    c = m["counts"]
    assert c["lines_in"] == c["lines_used"] + sum(m["drop_reasons"].values()) == 3


def test_old_format_missing_passed_and_duplicate_ids_are_errors(tmp_path, tok_dirs):
    old = json.dumps({"id": "a", "prompt": "p", "codes": [SUM], "tests": ["t"], "passed": [[1]]})
    inp = _write(tmp_path / "old.jsonl", [old])
    with pytest.raises(build.FormatError, match=f"{inp}:1: missing field 'version'"):
        build.build(inp, tok_dirs["plain"], str(tmp_path / "o"))
    unrun = {k: v for k, v in _record("a", [SUM, MAX], [[1], [0]]).items() if k != "passed"}
    inp = _write(tmp_path / "unrun.jsonl", [json.dumps(unrun)])
    with pytest.raises(build.FormatError, match=f"{inp}:1: missing field 'passed'"):
        build.build(inp, tok_dirs["plain"], str(tmp_path / "o"))
    p1 = _problem("p1", [SUM, MAX], [[1], [0]])
    inp = _write(tmp_path / "dup.jsonl", [p1, _problem("p2", [SUM, MAX], [[1], [0]]), p1])
    with pytest.raises(build.FormatError, match=f"{inp}:3: duplicate problem id 'p1', first at {inp}:1"):
        build.build(inp, tok_dirs["plain"], str(tmp_path / "o"))
    # Lines 1 and 2 in different shards: the merge finds them.
    inp = _write(tmp_path / "dup2.jsonl", [p1, p1])
    out = str(tmp_path / "shards")
    for i in range(2):
        build.build(inp, tok_dirs["plain"], out, build.BuildConfig(shard_index=i, num_shards=2))
    with pytest.raises(build.FormatError, match=f"{inp}:1: problem id 'p1' repeats at {inp}:2"):
        build.merge(out)


def test_drop_records_carry_token_counts_and_limits(tmp_path, tok_dirs, tokenizers):
    tok = tokenizers["chat"]
    long_sum, long_max = SUM + "# pad\n" * 40, MAX + "# pad\n" * 40
    lines = [_problem("long", [long_sum, long_max], [[1], [0]]), MIXED[10][0], MIXED[11][0]]
    out = str(tmp_path / "o")
    build.build(_write(tmp_path / "in.jsonl", lines), tok_dirs["chat"], out,
                build.BuildConfig(max_len=128, val_fraction=0.0))
    with open(os.path.join(out, "drops-00000-of-00001.jsonl")) as f:
        drops = {d["line"]: d for d in map(json.loads, f)}
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    prompt = len(tok(tok.apply_chat_template([{"role": "user", "content": "Sum a list of numbers."}],
                                             tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"])
    assert drops[1]["reason"] == "too_long"
    assert drops[1]["max_len"] == 128 and drops[1]["prompt_tokens"] == prompt
    assert drops[1]["room"] == 128 - prompt
    assert drops[1]["shortest_pair_tokens"] == max(n(long_sum), n(long_max)) > 128 - prompt
    assert drops[2]["reason"] == "empty_chosen_mid"
    assert drops[2]["chosen_tokens"] == n("x = 1\n") == drops[2]["prefix_tokens"] + drops[2]["suffix_tokens"]
    assert drops[3]["reason"] == "too_long" and drops[3]["room"] < max(drops[3]["chosen_tokens"],
                                                                       drops[3]["rejected_tokens"])


def test_global_top_n_is_independent_of_the_number_of_shards(tmp_path, tok_dirs):
    inp = _write(tmp_path / "in.jsonl", _synthetic_lines(60, seed=3))
    cfg = dict(max_len=96, val_fraction=0.3, pairs_per_problem=2, train_pairs=7, val_pairs=3)
    single, _ = build.build(inp, tok_dirs["plain"], str(tmp_path / "n1"), build.BuildConfig(**cfg))
    results = {1: single}
    for n in (2, 5):
        out = str(tmp_path / f"n{n}")
        for i in range(n):
            build.build(inp, tok_dirs["plain"], out, build.BuildConfig(**cfg, shard_index=i, num_shards=n))
        results[n] = build.merge(out)
    for n, m in results.items():
        assert m["counts"] == single["counts"] and m["splits"] == single["splits"]
        assert m["counts"]["records_out"] == {"train": 7, "validation": 3}
        for split in build.SPLITS:
            with open(tmp_path / f"n{n}" / f"{split}-selected.array_record", "rb") as f, \
                    open(tmp_path / "n1" / f"{split}-selected.array_record", "rb") as g:
                assert f.read() == g.read()
    # The kept pairs are the highest Diff of the candidates, ties by id then pair_id.
    with open(tmp_path / "n1" / "pairs-00000-of-00001.jsonl") as f:
        cands = [json.loads(x) for x in f]
    for split, n in (("train", 7), ("validation", 3)):
        mine = [c for c in cands if c["split"] == split]
        best = sorted(mine, key=lambda c: (-c["diff"], c["id"], c["pair_id"]))[:n]
        kept = {int(r.pair_id) for r in _read_all(str(tmp_path / "n1"), split)}
        assert kept == {c["pair_id"] for c in best}
        assert min(c["diff"] for c in best) >= max(c["diff"] for c in mine if c["pair_id"] not in kept)
        sel = single["counts"]["selection"][split]
        assert sel["candidates"] == len(mine) == sel["kept"] + sel["cut"] and sel["kept"] == n
