"""On-policy pairs: the policy's own response tokens, the error point inside the code span,
LEAD/TRAIL for prose and fences, EOS only where the policy ended the sample with it
(finish "eos", as fdpo.sampling reports it)."""
import json

import numpy as np
import pytest

from data_tools import build
from fdpo import extract, problem, records
from fdpo.records import Segment
from tests.helpers.tokenizer import tiny_tokenizer_dirs, tok, tok_dir  # noqa: F401, F811

SUM = "def total(xs):\n    out = 0\n    for x in xs:\n        out += x\n    return out"
BAD = "def total(xs):\n    out = 1\n    for x in xs:\n        out += x\n    return out"
# Realistic instruct responses: different prose on every sample, a fenced block in the middle.
GOOD_1 = f"Here is a solution that adds the numbers one by one.\n\n```python\n{SUM}\n```\n\nIt runs in O(n)."
GOOD_2 = f"Sure! The function below loops over the list.\n```python\n{SUM}\n```\nThat's it."
WRONG = f"We start from the neutral element:\n\n```python\n{BAD}\n```\n\nThis handles empty lists too."


def _problem(pid, samples, passed, response_format="code_block", prompt="Sum a list."):
    """A problem record after launch.execute (fdpo.problem), samples completed as
    launch.sample writes them: the extractor's program, finish "eos" unless given."""
    samples = [{"program": extract.extract_program(x["response"]), "finish": "eos", **x}
               for x in samples]
    return {"version": problem.VERSION, "id": pid, "prompt": prompt,
            "response_format": response_format, "samples": samples,
            "tests": [f"t{j}" for j in range(len(passed[0]))], "passed": passed}


def _build(tmp_path, lines, **cfg):
    tmp_path.mkdir(parents=True, exist_ok=True)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    manifest, _ = build.build(str(inp), "", str(out), build.BuildConfig(max_len=256, val_fraction=0.0, **cfg),
                              tokenizer=_tok_cache["tok"])
    src = records.PairDataSource.from_manifest(str(out / "manifest.json"), "train")
    return manifest, [src.record(i) for i in range(len(src))], out


_tok_cache = {}


@pytest.fixture(autouse=True)
def _tok(tok):
    _tok_cache["tok"] = tok


def _response(rec, side):
    seg = np.asarray(getattr(rec, f"{side}_segments"))
    ids = np.asarray(getattr(rec, f"{side}_ids"))
    keep = seg >= Segment.PREFIX
    return ids[keep], seg[keep]


@pytest.mark.parametrize("finish", ["eos", "length"])
def test_mid_inside_code_span_and_prose_segments(tmp_path, tok, finish):
    samples = [{"response": GOOD_1, "finish": "eos"}, {"response": WRONG, "finish": finish}]
    # reject_only: a truncated sample may be rejected (the default drops it from pairs)
    _, recs, _ = _build(tmp_path, [_problem("p", samples, [[1, 1], [0, 1]])],
                        truncated="reject_only")
    (rec,) = recs
    eos = tok.eos_token_id
    for side, text, fin in (("chosen", GOOD_1, "eos"), ("rejected", WRONG, finish)):
        ids, seg = _response(rec, side)
        # The policy's own tokens: the raw response, prose and fences included ...
        body = tok(text, add_special_tokens=False)["input_ids"]
        want = body + ([eos] if fin == "eos" else [])  # ... EOS only where it ended by EOS
        assert ids.tolist() == want
        # Segments in order LEAD, PREFIX, MID, SUFFIX, TRAIL; the code tokens decode to the
        # fenced code and the prose to what surrounds it.
        order = [Segment.LEAD, Segment.PREFIX, Segment.MID, Segment.SUFFIX, Segment.TRAIL]
        runs = [int(v) for k, v in enumerate(seg) if k == 0 or seg[k - 1] != v]
        assert runs == [int(v) for v in order if v in set(seg.tolist())]
        code = ids[(seg >= Segment.PREFIX) & (seg <= Segment.SUFFIX)]
        lead, trail = ids[seg == Segment.LEAD], ids[seg == Segment.TRAIL]
        fenced = SUM if side == "chosen" else BAD
        assert fenced in tok.decode(code.tolist())
        assert "```" in tok.decode(lead.tolist()) and "```" not in tok.decode(code.tolist())
        assert "```" in tok.decode(trail.tolist())
        assert (eos in trail.tolist()) == (fin == "eos")
    # The mid is the code-level difference: prefix/suffix are the common prefix/suffix of
    # the two code token sequences, computed here independently.
    codes = []
    for side in ("chosen", "rejected"):
        ids, seg = _response(rec, side)
        codes.append(ids[(seg >= Segment.PREFIX) & (seg <= Segment.SUFFIX)].tolist())
    p = next(k for k in range(min(map(len, codes))) if codes[0][k] != codes[1][k])
    s = next(k for k in range(min(map(len, codes)) - p) if codes[0][-1 - k] != codes[1][-1 - k])
    for side, code in zip(("chosen", "rejected"), codes):
        ids, seg = _response(rec, side)
        assert (seg == Segment.PREFIX).sum() == p and (seg == Segment.SUFFIX).sum() == s
        mid = ids[seg == Segment.MID]
        assert mid.tolist() == code[p:len(code) - s]
    assert "0" in tok.decode(_response(rec, "chosen")[0][_response(rec, "chosen")[1] == Segment.MID].tolist())
    assert "1" in tok.decode(_response(rec, "rejected")[0][_response(rec, "rejected")[1] == Segment.MID].tolist())


def test_response_ids_are_used_and_a_stop_string_gets_no_eos(tmp_path, tok):
    ids_good = tok(GOOD_2, add_special_tokens=False)["input_ids"]
    # fdpo.sampling: ids without the EOS that ended the sample; at a stop string, ids through
    # the stop string's tokens while the text ends before it.
    ids_stop = tok(WRONG + "\n# END", add_special_tokens=False)["input_ids"]
    samples = [{"response": GOOD_2, "response_ids": ids_good, "finish": "eos"},
               {"response": WRONG, "response_ids": ids_stop, "finish": "stop"}]
    _, (rec,), _ = _build(tmp_path, [_problem("p", samples, [[1], [0]])])
    assert _response(rec, "chosen")[0].tolist() == ids_good + [tok.eos_token_id]
    assert _response(rec, "rejected")[0].tolist() == tok(WRONG, add_special_tokens=False)["input_ids"]


def test_program_option_is_off_policy_without_eos(tmp_path, tok):
    samples = [{"response": GOOD_1, "program": SUM + "\n"},
               {"response": WRONG, "program": BAD + "\n"}]
    line = _problem("p", samples, [[1], [0]])
    for append in (False, True):
        _, (rec,), _ = _build(tmp_path / str(append), [line], response="program", append_eos=append)
        ids, seg = _response(rec, "chosen")
        want = tok(SUM + "\n", add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if append else [])
        assert ids.tolist() == want
        assert not np.isin(seg, [Segment.LEAD, Segment.TRAIL]).any()


def test_completion_records_are_the_response_and_its_eos(tmp_path, tok):
    """Completion-format records (no fences, what the miniature builds): on-policy sides are
    the response tokens and the EOS, all code, byte for byte what the off-policy program form
    with append_eos gives (its program is the response)."""
    bodies = ["    return sum(xs)\n", "    return max(xs)\n", "    s = 0\n    for x in xs: s += x\n    return s\n"]
    line = _problem("c", [{"response": b, "program": b} for b in bodies], [[1, 1], [1, 0], [1, 1]],
                    response_format="completion", prompt="def f(xs):\n")
    _, (rec,), out_a = _build(tmp_path / "a", [line])
    _, _, out_b = _build(tmp_path / "b", [line], response="program", append_eos=True)
    a = (out_a / "train-00000-of-00001.array_record").read_bytes()
    assert a == (out_b / "train-00000-of-00001.array_record").read_bytes()
    assert not np.isin(rec.chosen_segments, [Segment.LEAD, Segment.TRAIL]).any()
    ids, _ = _response(rec, "rejected")
    assert ids.tolist() == tok(bodies[1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_preview_marks_lead_and_trail(tmp_path):
    samples = [{"response": GOOD_1}, {"response": WRONG}]
    manifest, _, out = _build(tmp_path, [_problem("p", samples, [[1], [0]])])
    page = (out / "preview-00000-of-00001.html").read_text()
    assert '<span class="lead">Here is a solution' in page and '<span class="trail">' in page
    assert manifest["counts"]["code_spans"] == {"fenced": 2}


def test_one_train_step_on_instruct_records_starts_at_ln2(tmp_path, tok):
    """Records with LEAD/TRAIL go through the trainer's step; at policy == reference every
    log-ratio is 0, so the sigmoid loss is ln 2 whatever the weights."""
    import jax
    import optax

    from fdpo import loss as loss_lib, sharding, train
    from fdpo.models.config import ModelConfig
    from fdpo.testing import random_params

    samples = [{"response": GOOD_1}, {"response": WRONG},
               {"response": GOOD_2, "finish": "stop"}]
    lines = [_problem(f"p{i}", samples, [[1], [0], [1]]) for i in range(2)]
    _, recs, _ = _build(tmp_path, lines, pairs_per_problem=2)
    assert len(recs) == 4 and all((r.chosen_segments == Segment.LEAD).any() for r in recs)
    cfg = ModelConfig(architecture="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, rms_norm_eps=1e-6,
                      rope_theta=1e4, qkv_bias=True)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    loss_cfg = loss_lib.preset("focused_dpo", beta=0.1)
    trainer = train.Trainer(cfg, loss_cfg, optax.sgd(0.1), mesh, chunk=64)
    params = jax.device_put(random_params(cfg, 0), trainer.param_shardings)
    batch = trainer.make_batch({k: np.stack([r.to_dict()[k] for r in recs]) for k in train.BATCH_KEYS[:4]})
    state, metrics = trainer.train_step(trainer.init_state(params), batch, params)
    assert float(metrics["loss"]) == pytest.approx(np.log(2.0), abs=1e-6)
    assert float(metrics["finite"]) == 1.0 and float(metrics["grad_norm"]) > 0
