"""`launch.build --tokenized`: token-id pairs -> records, checked against layouts written
here, against the text builder on the same token ids, and through one train step."""
import json
import math
import os

import numpy as np
import pytest

from data_tools import build, tokenized
from fdpo import records
from fdpo.records import Segment
from tests.helpers.tokenizer import tiny_tokenizer_dirs  # noqa: F401  (fixture)

V = 100  # the vocabulary bound of the hand-made lines


def _line(**fields):
    return json.dumps(fields)


def _pair(pid, prompt, chosen, rejected, **extra):
    return _line(id=pid, prompt_ids=prompt, chosen_ids=chosen, rejected_ids=rejected, **extra)


GOOD = _pair("good", [1, 2], [10, 11, 12, 13, 14], [10, 11, 20, 13, 14])
# Line number -> (content, expected drop reason or None when the line yields a record).
MIXED = [
    (GOOD, None),
    ('{"prompt_ids": [1], "chosen_ids": [', "malformed_json"),
    ("", "blank_line"),
    ("[1, 2, 3]", "malformed_record"),
    (_line(prompt_ids=[1], chosen_ids=[2]), "malformed_record"),  # no rejected_ids
    (_pair("float", [1], [2, 3.0], [2]), "malformed_record"),
    (_pair("bool", [1], [2, True], [2]), "malformed_record"),
    (_pair("str", [1], ["2"], [3]), "malformed_record"),
    (_pair("empty-prompt", [], [2], [3]), "malformed_record"),
    (_pair("one-bound", [1], [2, 3], [2, 4], prefix_len=1), "malformed_record"),
    (_pair("float-bound", [1], [2, 3], [2, 4], prefix_len=1.0, suffix_len=0), "malformed_record"),
    (_line(prompt="text", chosen="a", rejected="b"), "malformed_record"),  # a text pair
    (_pair("too-big", [1], [2, V], [2, 3]), "token_id_out_of_range"),
    (_pair("negative", [-1], [2, 3], [2, 4]), "token_id_out_of_range"),
    (_pair("neg-prefix", [1], [2, 3], [2, 4], prefix_len=-1, suffix_len=0), "invalid_segments"),
    (_pair("past-end", [1], [2, 3], [2, 3, 4], prefix_len=3, suffix_len=0), "invalid_segments"),
    (_pair("overlap", [1], [2, 3, 4], [2, 5, 4], prefix_len=2, suffix_len=2), "invalid_segments"),
    (_pair("prefix-differs", [1], [2, 3, 4], [2, 5, 4], prefix_len=2, suffix_len=0), "invalid_segments"),
    (_pair("suffix-differs", [1], [2, 3, 4], [2, 5, 6], prefix_len=1, suffix_len=1), "invalid_segments"),
    (_pair("identical", [1], [2, 3], [2, 3]), "identical_programs"),
    (_pair("identical-bounds", [1], [2, 3], [2, 3], prefix_len=1, suffix_len=0), "identical_programs"),
    (_pair("insertion", [1], [2, 3], [2, 9, 3]), "empty_chosen_mid"),
    (_pair("long", [1] * 20, [2, 3], [2, 4]), "too_long"),
    (_pair("given", [1, 2], [10, 11, 12, 13, 14], [10, 11, 20, 13, 14], prefix_len=1, suffix_len=1), None),
    (_line(prompt_ids=[7, 8], chosen_ids=[3], rejected_ids=[]), None),  # no id; empty rejected
    (_pair("huge", [1], [2, 2**70], [2, 3]), "token_id_out_of_range"),  # beyond int64
]
MAX_LEN = 16
FILTERS = ("identical_programs", "empty_chosen_mid", "too_long")  # drops with no detail


def _write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def _records(out_dir, split="train"):
    src = records.PairDataSource.from_manifest(os.path.join(out_dir, "manifest.json"), split)
    return [src.record(i) for i in range(len(src))]


def _layout(prompt, resp, prefix, suffix, L):
    """The record side written out: ids and segments of [prompt | prefix | mid | suffix | pad]."""
    ids = np.zeros(L, np.int32)
    ids[:len(prompt) + len(resp)] = list(prompt) + list(resp)
    seg = ([Segment.PROMPT] * len(prompt) + [Segment.PREFIX] * prefix +
           [Segment.MID] * (len(resp) - prefix - suffix) + [Segment.SUFFIX] * suffix)
    return ids, np.array(seg + [Segment.PAD] * (L - len(seg)), np.int8)


def _longest_common(a, b):
    """Longest common prefix, then the longest common suffix of what is left (a plain loop,
    independent of data_tools.segments)."""
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    s = 0
    while s < min(len(a), len(b)) - p and a[len(a) - 1 - s] == b[len(b) - 1 - s]:
        s += 1
    return p, s


def test_mixed_file_counts_drops_and_layouts(tmp_path):
    inp = _write(tmp_path / "in.jsonl", [c for c, _ in MIXED])
    out = str(tmp_path / "out")
    m, _ = tokenized.build_tokenized(inp, out, build.BuildConfig(max_len=MAX_LEN, val_fraction=0.0),
                                     vocab_size=V)
    c = m["counts"]
    assert c["lines_in"] == len(MIXED) == c["lines_used"] + c["lines_dropped"]
    expected = {}
    for _, reason in MIXED:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert m["drop_reasons"] == expected
    assert c["records_out"] == {"train": 3, "validation": 0}
    assert c["candidate_pairs_filtered"] == {"identical_programs": 2, "empty_chosen_mid": 1,
                                             "too_long": 1}
    assert m["tokenizer"]["pre_tokenized"] and m["tokenizer"]["vocab_size"] == V
    assert records.read_manifest(os.path.join(out, "manifest.json")) == m
    with open(os.path.join(out, "drops-00000-of-00001.jsonl")) as f:
        drops = [json.loads(x) for x in f]
    assert [(d["line"], d["reason"]) for d in drops] == [
        (i + 1, r) for i, (_, r) in enumerate(MIXED) if r]
    # Malformed, out-of-range and invalid-segment lines are named FILE:LINE.
    for d in drops:
        if d["reason"] not in ("blank_line", *FILTERS):
            assert d["detail"].startswith(f"{inp}:{d['line']}: "), d
    by_line = {d["line"]: d["detail"] for d in drops}
    assert "missing field 'rejected_ids'" in by_line[5]
    assert "'prefix_len' without 'suffix_len'" in by_line[10]
    assert f"chosen_ids[1] = {V} is outside [0, vocab_size={V})" in by_line[13]
    assert "prompt_ids[0] = -1" in by_line[14]
    assert f"chosen_ids[1] = {2**70} is outside" in by_line[26]
    assert "out of range" in by_line[15] and "out of range" in by_line[16]
    assert "prefix ends after the suffix starts" in by_line[17]
    assert "prefix is not common" in by_line[18] and "suffix is not common" in by_line[19]

    recs = {r.problem_name: r for r in _records(out)}
    # Computed segments: the longest common prefix and suffix of the response ids.
    want = {"good": ([1, 2], [10, 11, 12, 13, 14], [10, 11, 20, 13, 14], 2, 2),
            # Given boundaries are kept as they are (shorter than the longest common part).
            "given": ([1, 2], [10, 11, 12, 13, 14], [10, 11, 20, 13, 14], 1, 1)}
    (noid,) = [n for n in recs if n.startswith("prompt-ids-sha256:")]
    want[noid] = ([7, 8], [3], [], 0, 0)
    assert set(recs) == set(want)
    for name, (prompt, chosen, rejected, p, s) in want.items():
        rec = recs[name]
        for ids, segs, resp in ((rec.chosen_ids, rec.chosen_segments, chosen),
                                (rec.rejected_ids, rec.rejected_segments, rejected)):
            want_ids, want_segs = _layout(prompt, resp, p, s, MAX_LEN)
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_array_equal(segs, want_segs)
    assert recs["good"].pair_id == 1 * build.MAX_PAIRS_PER_PROBLEM
    assert recs["given"].pair_id == 24 * build.MAX_PAIRS_PER_PROBLEM


def test_computed_segments_are_the_longest_common_prefix_and_suffix(tmp_path):
    rng = np.random.default_rng(0)
    lines, want = [], {}
    for i in range(40):
        # Small alphabets make long common runs and chance matches inside the mids.
        base = rng.integers(0, 4, int(rng.integers(1, 12))).tolist()
        a, b = list(base), list(base)
        k = int(rng.integers(0, len(base) + 1))
        a[k:k] = rng.integers(0, 4, int(rng.integers(1, 4))).tolist()
        b[k:k + int(rng.integers(0, 3))] = rng.integers(0, 4, int(rng.integers(0, 3))).tolist()
        lines.append(_pair(f"r{i}", [5], a, b))
        want[f"r{i}"] = (a, b, *_longest_common(a, b))
    inp = _write(tmp_path / "in.jsonl", lines)
    out = str(tmp_path / "out")
    m, _ = tokenized.build_tokenized(inp, out, build.BuildConfig(max_len=32, val_fraction=0.0),
                                     vocab_size=8)
    recs = _records(out)
    assert len(recs) == m["counts"]["lines_used"] > 20
    for rec in recs:
        a, b, p, s = want[rec.problem_name]
        for ids, segs, resp in ((rec.chosen_ids, rec.chosen_segments, a),
                                (rec.rejected_ids, rec.rejected_segments, b)):
            want_ids, want_segs = _layout([5], resp, p, s, 32)
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_array_equal(segs, want_segs)


@pytest.fixture(scope="module")
def text_build(tmp_path_factory, tiny_tokenizer_dirs):  # noqa: F811
    """Ready text pairs built by the text builder, per granularity: {granularity: out dir}."""
    base = tmp_path_factory.mktemp("text_build")
    body = "def f{i}(xs):\n    y = {i}\n    {op}\n    return y\n"
    ops = ["return sum(xs)", "return max(xs)", "z = min(xs)\n    return z", "return len(xs)"]
    lines = []
    rng = np.random.default_rng(1)
    for i in range(30):
        c, r = rng.choice(len(ops), 2, replace=False)
        lines.append(_line(id=f"t{i}", prompt=f"Problem {i}.", chosen=body.format(i=i, op=ops[c]),
                           rejected=body.format(i=i, op=ops[r])))
    inp = _write(base / "text.jsonl", lines)
    outs = {}
    for granularity in ("token", "line"):
        outs[granularity] = str(base / granularity)
        build.build(inp, tiny_tokenizer_dirs["plain"], outs[granularity],
                    build.BuildConfig(max_len=96, val_fraction=0.3, granularity=granularity))
    return outs


@pytest.mark.parametrize("granularity", ["token", "line"])
def test_same_records_as_the_text_builder_on_the_same_ids(tmp_path, text_build, granularity,
                                                          tiny_tokenizer_dirs):  # noqa: F811
    """The text builder's records, turned back into token-id lines (no boundaries), build
    into byte-identical records: same segments (the builder's rule, line-snapped too), same
    split, pair_id and padding."""
    text_out = text_build[granularity]
    recs = {}
    for split in build.SPLITS:
        recs.update({r.pair_id: r for r in _records(text_out, split)})
    assert len(recs) == 30
    lines = []
    for line_no in range(1, 31):
        rec = recs[line_no * build.MAX_PAIRS_PER_PROBLEM]
        cs, rs = rec.chosen_segments, rec.rejected_segments
        lines.append(_pair(rec.problem_name, rec.chosen_ids[cs == Segment.PROMPT].tolist(),
                           rec.chosen_ids[cs >= Segment.PREFIX].tolist(),
                           rec.rejected_ids[rs >= Segment.PREFIX].tolist()))
    inp = _write(tmp_path / "ids.jsonl", lines)
    out = str(tmp_path / "out")
    m, _ = tokenized.build_tokenized(
        inp, out, build.BuildConfig(max_len=96, val_fraction=0.3, granularity=granularity),
        tokenizer_path=tiny_tokenizer_dirs["plain"])
    assert m["counts"]["lines_used"] == 30
    text_manifest = records.read_manifest(os.path.join(text_out, "manifest.json"))
    assert m["counts"]["records_out"] == text_manifest["counts"]["records_out"]
    for split in build.SPLITS:
        for rec in _records(out, split):
            assert records.encode(rec) == records.encode(recs[rec.pair_id])
    if granularity == "line":  # snapping moved some boundary, so the rule was really used
        tok_out = text_build["token"]
        token_recs = {r.pair_id: r for s in build.SPLITS for r in _records(tok_out, s)}
        assert any(not np.array_equal(token_recs[k].chosen_segments, r.chosen_segments)
                   for k, r in recs.items())


def test_sharded_build_merges_to_the_single_one(tmp_path):
    inp = _write(tmp_path / "in.jsonl", [c for c, _ in MIXED])
    single, _ = tokenized.build_tokenized(inp, str(tmp_path / "one"),
                                          build.BuildConfig(max_len=MAX_LEN), vocab_size=V)
    for i in range(2):
        tokenized.build_tokenized(inp, str(tmp_path / "two"),
                                  build.BuildConfig(max_len=MAX_LEN, shard_index=i, num_shards=2),
                                  vocab_size=V)
    merged = build.merge(str(tmp_path / "two"))
    assert merged["counts"] == single["counts"]
    assert merged["drop_reasons"] == single["drop_reasons"]
    for split in build.SPLITS:
        a = sorted(records.encode(r) for r in _records(str(tmp_path / "one"), split))
        b = sorted(records.encode(r) for r in _records(str(tmp_path / "two"), split))
        assert a == b


def test_rebuild_replaces_the_dataset_whole_and_selects_globally(tmp_path, monkeypatch):
    """The text builder's output contract: --out is replaced atomically (a build that fails
    after writing records leaves the old dataset), and train_pairs cuts the split to its top
    pairs."""
    out = str(tmp_path / "out")
    first, _ = tokenized.build_tokenized(_write(tmp_path / "a.jsonl", [c for c, _ in MIXED]),
                                         out, build.BuildConfig(max_len=MAX_LEN, val_fraction=0),
                                         vocab_size=V)
    assert first["counts"]["records_out"]["train"] == 3
    with monkeypatch.context() as m:
        def fail(*args, **kwargs):
            raise KeyboardInterrupt  # as Ctrl-C after the records were written
        m.setattr(build, "write_shard_outputs", fail)
        with pytest.raises(KeyboardInterrupt):
            tokenized.build_tokenized(_write(tmp_path / "b.jsonl", [GOOD]), out,
                                      build.BuildConfig(max_len=MAX_LEN), vocab_size=V)
    assert len(_records(out)) == 3  # untouched
    second, _ = tokenized.build_tokenized(str(tmp_path / "a.jsonl"), out,
                                          build.BuildConfig(max_len=MAX_LEN, val_fraction=0,
                                                            train_pairs=1), vocab_size=V)
    sel = second["counts"]["selection"]["train"]
    assert (sel["candidates"], sel["kept"], sel["cut"]) == (3, 1, 2)
    assert len(_records(out)) == 1
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.")]  # no temporaries


def test_errors_name_the_flag(tmp_path, tiny_tokenizer_dirs):  # noqa: F811
    inp = _write(tmp_path / "in.jsonl", [GOOD])
    with pytest.raises(ValueError, match="needs --vocab_size"):
        tokenized.build_tokenized(inp, str(tmp_path / "o"))
    with pytest.raises(ValueError, match="granularity='line' needs --tokenizer"):
        tokenized.build_tokenized(inp, str(tmp_path / "o"), build.BuildConfig(granularity="line"),
                                  vocab_size=V)
    with pytest.raises(ValueError, match="--vocab_size=0"):
        tokenized.build_tokenized(inp, str(tmp_path / "o"), vocab_size=0)
    with pytest.raises(FileNotFoundError, match="--input"):
        tokenized.build_tokenized(str(tmp_path / "missing.jsonl"), str(tmp_path / "o"), vocab_size=V)
    # Without --vocab_size the tokenizer's length bounds the ids.
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(tiny_tokenizer_dirs["plain"]))
    inp = _write(tmp_path / "edge.jsonl", [_pair("a", [1], [2, n - 1], [2, 3]),
                                           _pair("b", [1], [2, n], [2, 3])])
    m, _ = tokenized.build_tokenized(inp, str(tmp_path / "t"),
                                     tokenizer_path=tiny_tokenizer_dirs["plain"])
    assert m["counts"]["lines_used"] == 1 and m["drop_reasons"] == {"token_id_out_of_range": 1}
    assert m["tokenizer"]["vocab_size"] == n
    assert m["tokenizer"]["tokenizer"]["name_or_path"] == tiny_tokenizer_dirs["plain"]


@pytest.mark.slow  # three program starts
def test_cli(tmp_path, program):
    inp = _write(tmp_path / "in.jsonl", [c for c, _ in MIXED])
    out = tmp_path / "cli"
    res = program("launch.build", "--tokenized", f"--input={inp}", f"--vocab_size={V}",
                  f"--out={out}", f"--config.max_len={MAX_LEN}", "--noprogress")
    summary = json.loads(res.stdout[:res.stdout.rindex("}") + 1])
    assert summary["counts"]["lines_in"] == len(MIXED)
    assert summary["drop_reasons"]["invalid_segments"] == 5
    assert f"line 2 dropped (malformed_json): {inp}:2:" in res.stderr
    assert f"line 13 dropped (token_id_out_of_range): {inp}:13:" in res.stderr
    res = program("launch.build", f"--input={inp}", "--vocab_size=5", f"--out={out}", check=False)
    assert res.returncode != 0 and "--vocab_size applies only with --tokenized" in res.stderr
    res = program("launch.build", "--tokenized", f"--input={inp}", f"--out={out}", check=False)
    assert res.returncode != 0 and "needs --vocab_size" in res.stderr


def test_one_train_step_on_tokenized_records(tmp_path):
    """Token-id lines (with malformed ones among them) -> records -> grain -> one Focused-DPO
    step of a tiny model whose reference is itself: loss ln 2, zero margin, and every
    record's tokens (prompt counted on both sides) where the lines put them."""
    import jax
    import optax

    from fdpo import data, sharding, train
    from fdpo import loss as loss_lib
    from fdpo.models.config import ModelConfig
    from fdpo.testing import random_params

    cfg = ModelConfig(architecture="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, rms_norm_eps=1e-6,
                      rope_theta=1e4, qkv_bias=True)
    rng = np.random.default_rng(0)
    lines, tokens = [], {}
    for i in range(10):
        prompt = rng.integers(0, 64, int(rng.integers(1, 6))).tolist()
        prefix, suffix = (rng.integers(0, 64, int(rng.integers(0, 5))).tolist() for _ in range(2))
        mid_c = rng.integers(0, 64, int(rng.integers(1, 5))).tolist()
        chosen, rejected = prefix + mid_c + suffix, prefix + [(mid_c[0] + 1) % 64] + suffix
        lines.append(_pair(f"p{i}", prompt, chosen, rejected))
        tokens[(len(lines)) * build.MAX_PAIRS_PER_PROBLEM] = 2 * len(prompt) + len(chosen) + len(rejected)
        if i % 3 == 0:
            lines.append(_pair("bad", prompt, chosen + [64], rejected))  # id = vocab: dropped
            lines.append("{not json")
    inp = _write(tmp_path / "in.jsonl", lines)
    m, _ = tokenized.build_tokenized(inp, str(tmp_path / "data"),
                                     build.BuildConfig(max_len=24, val_fraction=0.0), vocab_size=64)
    assert m["counts"]["lines_used"] == 10
    assert m["drop_reasons"] == {"token_id_out_of_range": 4, "malformed_json": 4}

    src = records.PairDataSource.from_manifest(tmp_path / "data" / "manifest.json", "train")
    batch = next(data.train_iterator(data.train_dataset(src, global_batch=8, seed=0)))
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    trainer = train.Trainer(cfg, loss_lib.preset("focused_dpo", beta=0.1), optax.sgd(0.1), mesh,
                            chunk=8)
    params = jax.device_put(random_params(cfg, 0), trainer.param_shardings)
    ref = train.copy_params(params)
    state = trainer.init_state(params)
    state, metrics = trainer.train_step(state, trainer.make_batch(batch), ref)
    metrics = jax.device_get(metrics)
    assert bool(metrics["finite"]) and float(metrics["grad_norm"]) > 0
    assert abs(float(metrics["loss"]) - math.log(2)) < 1e-6
    # Not accuracy 0: the frozen reference runs in another fused graph than the policy, so
    # margins are rounding noise of either sign.
    assert abs(float(metrics["rewards/margins"])) < 1e-6
    assert float(metrics["tokens"]) == sum(tokens[int(k)] for k in batch["pair_id"])
