"""The builder's study arms and controls (issues 16 and 19), record by record on hand-made
executed problem files with known verdicts: emit="rft" (every correct sample once, none
incorrect), focus="random" / "oracle" (where the MID class, hence the weight, lands) and
shuffle_labels (sides exchanged for about half the pairs)."""
import json
import math
import os
import re

import numpy as np
import pytest

from data_tools import build, tokenized
from fdpo import extract, records
from fdpo.records import Segment
from tests.helpers.tokenizer import tiny_tokenizer_dirs, tok, tok_dir  # noqa: F401, F811

SUM = "def f(xs):\n    return sum(xs)\n"
SUM_LOOP = "def f(xs):\n    t = 0\n    for x in xs:\n        t += x\n    return t\n"
MAX = "def f(xs):\n    return max(xs)\n"
OTHER = "class Stack:\n    def __init__(self):\n        self.items = []\n"
# Focused-DPO's table (METHOD.md section 3), written here: side -> segment -> weight.
FOCUSED = {"chosen": {Segment.PREFIX: 1, Segment.MID: 2, Segment.SUFFIX: 1},
           "rejected": {Segment.PREFIX: 1, Segment.MID: 1, Segment.SUFFIX: 0}}


def _problem(pid, codes, passed, finish=None, responses=None, **extra):
    """A problem record after launch.execute; each response is its program unless given."""
    responses = responses or codes
    finish = finish or ["eos"] * len(codes)
    return {"version": 1, "id": pid, "prompt": f"Problem {pid}.", "response_format": "code_block",
            "samples": [{"response": r, "program": c, "finish": f}
                        for r, c, f in zip(responses, codes, finish)],
            "tests": [f"t{j}" for j in range(len(passed[0]))], "passed": passed, **extra}


def _build(tmp_path, lines, tok_dir, name="out", **cfg):
    inp = tmp_path / f"{name}.jsonl"
    inp.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    out = tmp_path / name
    cfg = {"max_len": 160, "val_fraction": 0.0, **cfg}
    manifest, _ = build.build(str(inp), tok_dir, str(out), build.BuildConfig(**cfg))
    recs = {}
    for split in build.SPLITS:
        src = records.PairDataSource.from_manifest(str(out / "manifest.json"), split)
        recs[split] = [src.record(i) for i in range(len(src))]
    with open(out / "drops-00000-of-00001.jsonl") as f:
        drops = [json.loads(x) for x in f]
    return manifest, recs, drops


def _response(ids, segs):
    return np.asarray(ids)[np.asarray(segs) >= Segment.PREFIX]


# ----------------------------------------------------------------------------------- rft

def test_rft_holds_every_correct_sample_once_and_none_incorrect(tmp_path, tok_dir, tok):
    # Known verdicts: tests 0-2 are passed by the top code, so "correct" = passes all three.
    lines = [
        # samples 0, 2 (the same program twice), 4 correct; 1, 3 incorrect; 5 correct but cut
        # by the token limit (never chosen, so not an RFT record either).
        _problem("p1", [SUM, MAX, SUM, OTHER, SUM_LOOP, SUM_LOOP],
                 [[1, 1, 1], [1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 1, 1], [1, 1, 1]],
                 finish=["eos", "eos", "eos", "eos", "eos", "length"]),
        _problem("all-correct", [SUM, SUM_LOOP], [[1, 1], [1, 1]]),  # no pair, two samples
        _problem("none-correct", [SUM, MAX], [[0, 0], [0, 0]]),
        {"prompt": "Sum.", "chosen": SUM, "rejected": MAX},  # a ready pair: no verdicts
        # A fenced instruct response: the code span is MID, prose and fences LEAD / TRAIL.
        _problem("fenced", [SUM, MAX], [[1], [0]],
                 responses=[f"Here you go:\n```python\n{SUM}```\nDone.", MAX]),
    ]
    m, recs, drops = _build(tmp_path, lines, tok_dir, emit="rft", val_fraction=0.5)
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    want = {  # (problem, sample index) -> response text of every correct, untruncated sample
        ("p1", 0): SUM, ("p1", 2): SUM, ("p1", 4): SUM_LOOP,
        ("all-correct", 0): SUM, ("all-correct", 1): SUM_LOOP,
        ("fenced", 0): f"Here you go:\n```python\n{SUM}```\nDone."}
    lines_of = {"p1": 1, "all-correct": 2, "fenced": 5}
    got = {}
    for split, rs in recs.items():
        for r in rs:
            assert build.split_of(r.problem_name, 0.5) == split  # split by problem
            line, index = divmod(int(r.pair_id), build.MAX_PAIRS_PER_PROBLEM)
            assert line == lines_of[r.problem_name]
            key = (r.problem_name, index)
            assert key not in got  # each sample once
            got[key] = r
    assert set(got) == set(want)
    assert m["counts"]["records_out"]["train"] + m["counts"]["records_out"]["validation"] == 6
    for key, r in got.items():
        resp = _response(r.chosen_ids, r.chosen_segments)
        want_ids = tok(want[key], add_special_tokens=False)["input_ids"] + [eos]
        assert resp.tolist() == want_ids, key
        # The rejected side is the prompt alone; the prompts agree.
        assert not (r.rejected_segments >= Segment.PREFIX).any()
        p = r.chosen_segments == Segment.PROMPT
        np.testing.assert_array_equal(p, r.rejected_segments == Segment.PROMPT)
        np.testing.assert_array_equal(r.chosen_ids[p], r.rejected_ids[p])
        # MID = the code span: the program's tokens (the fenced block's, for "fenced").
        mid = tok.decode(r.chosen_ids[r.chosen_segments == Segment.MID].tolist())
        if key[0] == "fenced":
            a, b = extract.program_span(want[key])  # the extractor's block, its tokens
            assert want[key][a:b] in mid and mid.strip() == SUM.strip()
            assert (r.chosen_segments == Segment.LEAD).any()
        else:
            assert mid == want[key] + tok.eos_token  # all code: EOS is its end
    assert m["counts"]["rft"] == {"correct_samples": 6, "records": 6, "samples_too_long": 0,
                                  "duplicate_samples": 1}
    assert m["drop_reasons"] == {"no_correct_code": 1, "ready_pair_without_verdicts": 1}
    assert sorted((d["line"], d["reason"]) for d in drops) == [
        (3, "no_correct_code"), (4, "ready_pair_without_verdicts")]
    c = m["counts"]
    assert c["lines_in"] == 5 == c["lines_used"] + c["lines_dropped"]


def test_rft_too_long_samples_are_counted_and_a_problem_without_room_dropped(tmp_path, tok_dir):
    long = "def f(xs):\n" + "    x = 1\n" * 40 + "    return sum(xs)\n"
    lines = [_problem("short-and-long", [SUM, long, MAX], [[1], [1], [0]]),
             _problem("only-long", [long, MAX], [[1], [0]])]
    m, recs, drops = _build(tmp_path, lines, tok_dir, emit="rft", max_len=64)
    assert [r.problem_name for r in recs["train"]] == ["short-and-long"]
    assert m["counts"]["rft"] == {"correct_samples": 3, "records": 1, "samples_too_long": 2,
                                  "duplicate_samples": 0}
    (d,) = drops
    assert (d["line"], d["reason"], d["max_len"]) == (2, "too_long", 64)


@pytest.mark.parametrize("field, value", [("focus", "random"), ("shuffle_labels", True),
                                          ("train_pairs", 10), ("pairs_per_problem", 2)])
def test_rft_refuses_pair_options(field, value):
    with pytest.raises(ValueError, match=f"config.{field}=.*emit='rft'"):
        build.BuildConfig(emit="rft", **{field: value}).validate()


@pytest.mark.parametrize("field, value, match", [
    ("emit", "sft", "config.emit='sft': choose one of"),
    ("focus", "middle", "config.focus='middle': choose one of"),
    ("focus_seed", -1, "config.focus_seed=-1 must be an integer >= 0")])
def test_bad_control_values_are_named(field, value, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        build.BuildConfig(**{field: value}).validate()


def test_tokenized_builds_refuse_the_controls(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}) + "\n")
    with pytest.raises(ValueError, match="config.focus='random': --tokenized"):
        tokenized.build_tokenized(str(inp), str(tmp_path / "out"),
                                  build.BuildConfig(focus="random"), vocab_size=10)


@pytest.mark.slow
def test_sft_preset_trains_on_an_rft_directory(tmp_path, tok_dir, tok, program):
    """launch.train's sft preset reads an rft build as it is (rejected sides empty)."""
    lines = [_problem(f"q{i}", [SUM, MAX, SUM_LOOP], [[1, 1], [0, 1], [1, 1]]) for i in range(8)]
    _build(tmp_path, lines, tok_dir, name="rft", emit="rft", max_len=64, val_fraction=0.25)
    ckpt = tmp_path / "init"
    env = {"JAX_PLATFORMS": "cpu"}
    program("launch.init_model", f"--out={ckpt}", f"--tokenizer={tok_dir}",
            "--config.fields.hidden_size=32", "--config.fields.intermediate_size=64",
            "--config.fields.num_layers=1", "--config.fields.num_heads=2",
            "--config.fields.num_kv_heads=1", env=env)
    run = tmp_path / "run"
    program("launch.train", f"--workdir={run}",
            f"--config=configs/focused_dpo.py:model={ckpt},data={tmp_path / 'rft'},preset=sft,"
            "runlocal", "--config.train.num_steps=4", "--config.train.batch_size=8",
            "--config.optimizer.lr=1e-2", "--config.log.eval_every_steps=4",
            "--config.checkpoint.every_steps=4", env=env, timeout=600)
    lines = [json.loads(x) for x in open(run / "metrics.jsonl")]
    train = [x for x in lines if x["split"] == "train"]
    assert [x["step"] for x in train] == [1, 2, 3, 4]
    vocab = len(tok)
    # NLL alone (no reference run); a fresh model is near uniform over the vocabulary, and
    # four steps on these few programs lower it.
    assert all(math.isfinite(x["loss"]) and x["loss"] == pytest.approx(x["nll"]) for x in train)
    assert train[0]["loss"] == pytest.approx(math.log(vocab), rel=0.2)
    assert train[-1]["loss"] < train[0]["loss"]
    assert any(x["split"] != "train" and math.isfinite(x["loss"]) for x in lines)  # validation
    assert (run / "final" / "fdpo_model.json").exists()


# -------------------------------------------------------------------------- focus controls

def _pair_lines(n, seed=0):
    """Problems with one correct and some incorrect programs that differ in one statement in
    the middle of a long common prefix and suffix, so random spans have room."""
    rng = np.random.default_rng(seed)
    ops = ["sum(xs)", "max(xs)", "min(xs)", "len(xs)", "xs[0]"]
    lines = []
    for i in range(n):
        k = int(rng.integers(2, 5))
        body = [ops[(i + j) % 5] for j in range(k)]
        codes = [f"def f{i}(xs):\n    y = {i}\n    z = {body[j]}\n    w = y + 1\n    return z\n"
                 for j in range(k)]
        passed = [[1, 1]] + [[1, 0]] * (k - 1)
        lines.append(_problem(f"s{i}", codes, passed, oracle_focus=r"z = [^\n]*"))
    return lines


def _by_pair(recs):
    return {int(r.pair_id): r for rs in recs.values() for r in rs}


def _weights(segs, side):
    """Per-token weight of Focused-DPO's table (0 outside prefix / mid / suffix)."""
    return np.array([FOCUSED[side].get(Segment(int(s)), 0) for s in segs], float)


def test_random_focus_moves_the_mid_to_an_equal_span_elsewhere(tmp_path, tok_dir, tok):
    lines = _pair_lines(30)
    m0, base, _ = _build(tmp_path, lines, tok_dir, name="error_point")
    m1, rand, _ = _build(tmp_path, lines, tok_dir, name="random", focus="random", focus_seed=3)
    base, rand = _by_pair(base), _by_pair(rand)
    assert set(base) == set(rand) and len(base) == 30
    assert m1["counts"]["focus"] == {"pairs": 30, "no_random_span": 0}
    moved = 0
    for pid, b in base.items():
        r = rand[pid]
        for side in ("chosen", "rejected"):
            ids, bs, rs = (getattr(b, f"{side}_ids"), getattr(b, f"{side}_segments"),
                           getattr(r, f"{side}_segments"))
            np.testing.assert_array_equal(ids, getattr(r, f"{side}_ids"))  # same tokens
            np.testing.assert_array_equal(np.sort(bs), np.sort(rs))  # a permutation of labels
            true_mid = np.nonzero(bs == Segment.MID)[0]
            new_mid = np.nonzero(rs == Segment.MID)[0]
            assert len(new_mid) == len(true_mid)  # the mid's length
            if not len(true_mid):  # an insertion on the other side: nothing to move
                continue
            moved += 1
            # A contiguous span, disjoint from the error point, wholly inside the error-point
            # record's common prefix or wholly inside its suffix.
            assert (np.diff(new_mid) == 1).all() and not set(new_mid) & set(true_mid)
            (cls,) = set(bs[new_mid].tolist())
            assert cls in (Segment.PREFIX, Segment.SUFFIX)
            assert (rs[true_mid] == cls).all()  # the true mid takes the decoy's class
            # Decoded: the focused text is a piece of the common code, not the divergent one.
            common = tok.decode(ids[bs == cls].tolist())
            assert tok.decode(ids[new_mid].tolist()) in common
            # Focused-DPO's table now weights the decoy and not the error point, with the
            # side's total weight unchanged.
            wb, wr = _weights(bs, side), _weights(rs, side)
            assert wb.sum() == wr.sum()
            np.testing.assert_array_equal(wr[new_mid], FOCUSED[side][Segment.MID])
            np.testing.assert_array_equal(wr[true_mid], FOCUSED[side][cls])
    assert moved >= 30  # every chosen mid at least
    # Reproducible for a seed; another seed moves some span elsewhere.
    _, again, _ = _build(tmp_path, lines, tok_dir, name="again", focus="random", focus_seed=3)
    _, other, _ = _build(tmp_path, lines, tok_dir, name="other", focus="random", focus_seed=4)
    again, other = _by_pair(again), _by_pair(other)
    assert all((again[p].chosen_segments == rand[p].chosen_segments).all() for p in rand)
    assert any((other[p].chosen_segments != rand[p].chosen_segments).any() for p in rand)


def test_random_focus_drops_a_pair_with_no_room(tmp_path, tok_dir):
    # The chosen mid is the whole program but its last line: longer than prefix + suffix.
    long = "def f(xs):\n    a = sorted(xs, reverse=True)\n    b = a[0] + a[1] + a[2]\n    return b\n"
    lines = [_problem("no-room", [long, "return b\n"], [[1], [0]])] + _pair_lines(2)
    m, recs, drops = _build(tmp_path, lines, tok_dir, focus="random")
    assert m["drop_reasons"] == {"no_random_span": 1}
    assert [(d["line"], d["reason"]) for d in drops] == [(1, "no_random_span")]
    assert m["counts"]["candidate_pairs_filtered"]["no_random_span"] == 1
    assert m["counts"]["focus"] == {"pairs": 2, "no_random_span": 1}


def test_oracle_focus_marks_the_regex_match_on_each_side(tmp_path, tok_dir, tok):
    fence = "Sure:\n```python\n{}```\nBye."
    lines = _pair_lines(6) + [
        _problem("no-oracle", [SUM, MAX], [[1], [0]]),
        _problem("no-match", [SUM, MAX], [[1], [0]], oracle_focus=r"sum\(xs\)"),
        _problem("bad-regex", [SUM, MAX], [[1], [0]], oracle_focus="("),
        # Instruct responses: the match is searched in the code span; prose stays LEAD/TRAIL.
        _problem("fenced", [SUM, MAX], [[1], [0]], oracle_focus=r"def f\(xs\)",
                 responses=[fence.format(SUM), fence.format(MAX)]),
    ]
    m, recs, drops = _build(tmp_path, lines, tok_dir, focus="oracle")
    got = _by_pair(recs)
    assert len(got) == 7
    for r in got.values():
        rx = re.compile(r"def f\(xs\)" if r.problem_name == "fenced" else r"z = [^\n]*")
        for side in ("chosen", "rejected"):
            ids, segs = getattr(r, f"{side}_ids"), getattr(r, f"{side}_segments")
            text = tok.decode(_response(ids, segs).tolist(), skip_special_tokens=True)
            match = rx.search(text)
            # The MID is the fewest tokens covering the match: its text holds the match, and
            # the prefix before it ends at or before the match.
            pre = tok.decode(ids[segs == Segment.PREFIX].tolist())
            mid = tok.decode(ids[segs == Segment.MID].tolist())
            lead = tok.decode(ids[segs == Segment.LEAD].tolist())
            assert match.group() in mid
            assert len(lead + pre) <= match.start() and len(lead + pre + mid) >= match.end()
            # Ordered layout: lead, prefix, mid, suffix, trail.
            resp = segs[segs >= Segment.PREFIX].astype(int)
            order = [{5: 0, 2: 1, 3: 2, 4: 3, 6: 4}[v] for v in resp]
            assert order == sorted(order)
            if r.problem_name == "fenced":
                assert lead == "Sure:\n```python\n" and (segs == Segment.TRAIL).any()
    assert m["drop_reasons"] == {"no_oracle_focus": 1, "oracle_focus_no_match": 1,
                                 "oracle_focus_invalid": 1}
    by_line = {d["line"]: d for d in drops}
    assert by_line[7]["reason"] == "no_oracle_focus"
    assert by_line[8]["reason"] == "oracle_focus_no_match" and "rejected" in by_line[8]["detail"]
    assert by_line[9]["reason"] == "oracle_focus_invalid" and "line 9" in by_line[9]["detail"]
    assert m["counts"]["focus"] == {"pairs": 7, "oracle_focus_no_match": 1,
                                    "oracle_focus_invalid": 1}
    assert extract.program_span(fence.format(SUM)) is not None  # the case is really fenced


def test_shuffle_labels_swaps_about_half_and_only_exchanges_sides(tmp_path, tok_dir):
    lines = _pair_lines(80, seed=1)
    _, base, _ = _build(tmp_path, lines, tok_dir, name="base", val_fraction=0.25)
    m, shuf, _ = _build(tmp_path, lines, tok_dir, name="shuf", val_fraction=0.25,
                        shuffle_labels=True, focus_seed=7)
    base, shuf = _by_pair(base), _by_pair(shuf)
    assert set(base) == set(shuf) and len(base) == 80
    swapped = set()
    for pid, b in base.items():
        s = shuf[pid]
        same = all((getattr(s, k) == getattr(b, k)).all() for k in (
            "chosen_ids", "rejected_ids", "chosen_segments", "rejected_segments"))
        exchanged = all((getattr(s, f"{x}_{k}") == getattr(b, f"{y}_{k}")).all()
                        for x, y in (("chosen", "rejected"), ("rejected", "chosen"))
                        for k in ("ids", "segments"))
        assert same != exchanged, pid
        assert (s.problem_id, s.problem_name) == (b.problem_id, b.problem_name)
        if exchanged:
            swapped.add(pid)
    # The rule (docs/data.md): swap when the pair's draw from (focus_seed, pair_id, 2) is < 1/2.
    want = {p for p in base if np.random.default_rng([7, p, 2]).random() < 0.5}
    assert swapped == want
    # About half: binomial(80, 1/2) is 40 +- 4.5; this seed's count is 32 (1.8 sd low).
    assert len(swapped) == 32 and abs(len(swapped) - 40) <= 3 * math.sqrt(80) / 2
    swaps = m["counts"]["label_swaps"]
    assert swaps["train"] + swaps["validation"] == len(swapped)
    assert swaps["validation"] == sum(
        1 for p in swapped if build.split_of(base[p].problem_name, 0.25) == "validation")


@pytest.mark.slow
def test_launch_build_takes_the_fields_and_names_a_bad_value(tmp_path, tok_dir, program):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in _pair_lines(4)))
    proc = program("launch.build", f"--input={inp}", f"--tokenizer={tok_dir}",
                   f"--out={tmp_path / 'bad'}", "--config.focus=middle", check=False)
    assert proc.returncode != 0 and "config.focus='middle': choose one of" in proc.stderr
    assert not (tmp_path / "bad").exists()
    program("launch.build", f"--input={inp}", f"--tokenizer={tok_dir}", f"--out={tmp_path / 'ok'}",
            "--config.max_len=160", "--config.focus=oracle", "--config.shuffle_labels=true",
            "--config.focus_seed=5", "--noprogress")
    m = records.read_manifest(str(tmp_path / "ok" / "manifest.json"))
    assert (m["config"]["focus"], m["config"]["shuffle_labels"], m["config"]["focus_seed"]) == (
        "oracle", True, 5)
    assert m["counts"]["focus"]["pairs"] == 4 and "label_swaps" in m["counts"]
