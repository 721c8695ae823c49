"""Mechanism metrics (fdpo/mechanism.py) against independent computations.

The reference side never calls fdpo's scoring: transformers' own forward gives the full
logits of two different tiny models (policy != reference), from which the per-segment
log-prob changes, the logits at the first divergent token and the per-position KL are
taken over the whole vocabulary, in float64 NumPy. The gradient share is checked against
`jax.grad` of a loss written here on the model's full logits, with the non-mid (or mid)
tokens' log-probs under `stop_gradient`.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fdpo import sharding, train
from fdpo import loss as loss_lib
from fdpo.models import checkpoint, convert
from fdpo.models.config import ModelConfig
from fdpo.records import Segment, shared_row_lengths
from fdpo.testing import make_hf_model, random_pairs, stack, write_dataset
from tests.helpers.models import models  # noqa: F401  (fixture)

pytestmark = pytest.mark.torch

torch.set_num_threads(2)

ONE_DEVICE = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
LENGTH = 32
SEGS = loss_lib.SEGMENT_NAMES
# float32 on both sides: per-token log-probs agree to ~1e-6, so sums over <= 20 tokens and
# their means to 1e-4 relative (plus 1e-5 absolute for changes that are near 0).
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def pairs():
    """7 pairs (one padded out of a batch of 8); mids may be empty on either side, and the
    prose (lead/trail) segments are present."""
    recs = random_pairs(7, LENGTH, vocab=211, seed=3,
                        lengths=((2, 5), (0, 4), (0, 3), (0, 3), (1, 4)), prose=(0, 2))
    # Pairs whose first divergent tokens differ at a shared context: lead equal on both
    # sides (a completion-style pair), so the context before the divergence is common.
    for r in recs:
        c_lead = r.chosen_segments == Segment.LEAD
        r_lead = r.rejected_segments == Segment.LEAD
        if c_lead.sum() != r_lead.sum():
            continue
        r.rejected_ids[r_lead] = r.chosen_ids[c_lead]
    # One pair with an empty chosen mid, one with an empty rejected mid.
    assert any((r.chosen_segments == Segment.MID).sum() == 0 for r in recs)
    assert any((r.rejected_segments == Segment.MID).sum() == 0 for r in recs)
    return stack(recs)


def padded(pairs, n=8):
    """The pairs padded to n with copies of pair 0, and the mask that drops the copies."""
    k = pairs["chosen_ids"].shape[0]
    out = {key: np.concatenate([v, np.repeat(v[:1], n - k, 0)]) for key, v in pairs.items()}
    return out, np.r_[np.ones(k), np.zeros(n - k)].astype(np.float32)


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.double().numpy()


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def numpy_mechanism(policy, reference, pairs):
    """The metrics written out from full logits: dict of per-pair arrays."""
    out = {}
    logits = {}
    for side in ("chosen", "rejected"):
        ids, seg = pairs[f"{side}_ids"], pairs[f"{side}_segments"]
        zp, zr = torch_logits(policy, ids), torch_logits(reference, ids)
        lp, lr = log_softmax(zp[:, :-1]), log_softmax(zr[:, :-1])
        tok = ids[:, 1:, None]
        dl = (np.take_along_axis(lp, tok, -1) - np.take_along_axis(lr, tok, -1))[..., 0]
        kl = (np.exp(lr) * (lr - lp)).sum(-1)
        for i, name in enumerate(SEGS):
            m = seg[:, 1:] == int(Segment.PREFIX) + i
            out[f"dlogp/{side}_{name}"] = (dl * m).sum(-1)
            out[f"tokens/{side}_{name}"] = m.sum(-1)
            out[f"kl/{side}_{name}"] = (kl * m).sum(-1)
        logits[side] = (zp, zr)
    n = pairs["chosen_ids"].shape[0]
    for k in ("policy", "reference"):
        out[f"first_{k}"] = np.zeros(n)
    out["found"] = np.zeros(n)
    for b in range(n):
        idx = {}
        for side in ("chosen", "rejected"):
            seg = pairs[f"{side}_segments"][b]
            after = [t for t in range(LENGTH) if seg[t] in (Segment.MID, Segment.SUFFIX,
                                                              Segment.TRAIL)]
            idx[side] = after[0] if after else None
        if idx["chosen"] is None or idx["rejected"] is None:
            continue
        out["found"][b] = 1
        tc = pairs["chosen_ids"][b, idx["chosen"]]
        tr = pairs["rejected_ids"][b, idx["rejected"]]
        for j, k in enumerate(("policy", "reference")):
            z = logits["chosen"][j][b, idx["chosen"] - 1]  # the chosen side's context
            out[f"first_{k}"][b] = z[tc] - z[tr]
    return out


@pytest.fixture(scope="module")
def trainer_for(models):
    """`trainer_for(preset, shared_length=0, reference="frozen")`: one Trainer per setting
    for the whole module, so the tests of one setting share its compiled steps."""
    made = {}

    def get(preset, shared_length=0, reference="frozen"):
        key = (preset, shared_length, reference)
        if key not in made:
            tx, _ = train.make_optimizer(train.OptimizerConfig(), 10)
            made[key] = train.Trainer(models["cfg"], loss_lib.preset(preset), tx, ONE_DEVICE,
                                      chunk=8, shared_length=shared_length,
                                      reference=reference, mechanism=True)
        return made[key]

    return get


def shared_length(pairs):
    return int(shared_row_lengths(pairs["chosen_segments"], pairs["rejected_segments"]).max())


def fdpo_eval(trainer, params, ref_params, pairs, micro_batches=2):
    batch_pairs, mask = padded(pairs)
    batch = trainer.make_batch(batch_pairs, micro_batches, mask)
    sums = jax.device_get(trainer.eval_step(params, batch, ref_params))
    return train.eval_metrics(sums, trainer.loss_cfg)


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
@pytest.mark.parametrize("preset", ["focused_dpo", "sft", "tdpo1"])
def test_mechanism_metrics_match_full_logits(preset, shared, models, pairs, trainer_for):
    want = numpy_mechanism(models["policy"][0], models["reference"][0], pairs)
    trainer = trainer_for(preset, shared_length(pairs) if shared else 0)
    got = fdpo_eval(trainer, models["policy"][1], models["reference"][1], pairs)
    assert got["pairs"] == 7
    for s, side in enumerate(("chosen", "rejected")):
        whole = sum(want[f"dlogp/{side}_{seg}"] for seg in SEGS)
        assert got[f"mech/dlogp/{side}"] == pytest.approx(whole.mean(), rel=RTOL, abs=ATOL)
        assert got[f"mech/kl/{side}"] == pytest.approx(
            sum(want[f"kl/{side}_{seg}"] for seg in SEGS).mean(), rel=RTOL, abs=ATOL)
        for seg in SEGS:
            d, n = want[f"dlogp/{side}_{seg}"], want[f"tokens/{side}_{seg}"]
            assert got[f"mech/dlogp/{side}_{seg}"] == pytest.approx(d.mean(), rel=RTOL,
                                                                    abs=ATOL), (side, seg)
            assert got[f"mech/dlogp_per_token/{side}_{seg}"] == pytest.approx(
                d.sum() / max(n.sum(), 1), rel=RTOL, abs=ATOL), (side, seg)
            assert got[f"mech/kl/{side}_{seg}"] == pytest.approx(
                want[f"kl/{side}_{seg}"].mean(), rel=RTOL, abs=ATOL), (side, seg)
    found = want["found"]
    assert got["mech/first_margin/pairs"] == found.sum() == 7
    for k in ("policy", "reference"):
        assert got[f"mech/first_margin/{k}"] == pytest.approx(
            want[f"first_{k}"].sum() / found.sum(), rel=RTOL, abs=ATOL)
    assert got["mech/first_margin/change"] == pytest.approx(
        (want["first_policy"] - want["first_reference"]).sum() / found.sum(), rel=RTOL,
        abs=ATOL)
    # Discriminating: policy != reference moves every family well past the tolerances.
    assert abs(got["mech/dlogp/chosen_mid"]) > 0.1
    assert got["mech/kl/chosen"] > 0.1
    assert abs(got["mech/first_margin/change"]) > 0.1


def test_first_margin_skips_pairs_without_a_token_after_the_prefix(models, pairs, trainer_for):
    """A pair whose chosen response ends with the common prefix (no EOS) has no first
    divergent token: it is counted out of the margin, and the others keep their values."""
    cut = {k: v.copy() for k, v in pairs.items()}
    seg = cut["chosen_segments"][0]
    after = np.isin(seg, [Segment.MID, Segment.SUFFIX, Segment.TRAIL])
    seg[after], cut["chosen_ids"][0][after] = Segment.PAD, 0
    want = numpy_mechanism(models["policy"][0], models["reference"][0], cut)
    assert want["found"].tolist() == [0] + [1] * 6
    got = fdpo_eval(trainer_for("dpo"), models["policy"][1],
                    models["reference"][1], cut)
    assert got["mech/first_margin/pairs"] == 6
    assert got["mech/first_margin/policy"] == pytest.approx(
        want["first_policy"][1:].mean(), rel=RTOL, abs=ATOL)


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
def test_policy_equal_to_reference_gives_zero_change_and_kl(shared, models, pairs,
                                                            trainer_for):
    """Step 0: the policy is its own reference."""
    trainer = trainer_for("focused_dpo", shared_length(pairs) if shared else 0)
    p = models["policy"][1]
    got = fdpo_eval(trainer, p, train.copy_params(p), pairs)
    changes = [k for k in got if k.startswith(("mech/dlogp", "mech/kl"))]
    assert len(changes) == 2 * 2 * (len(SEGS) + 1) + 2 * (len(SEGS) + 1)
    for k in changes:
        assert got[k] == pytest.approx(0.0, abs=1e-6), k
    assert got["mech/first_margin/change"] == pytest.approx(0.0, abs=1e-6)
    assert got["mech/first_margin/policy"] == got["mech/first_margin/reference"] != 0


def test_precomputed_reference_uses_the_data_sums_and_skips_kl(models, pairs, trainer_for):
    """With precomputed sums the changes are policy - ref_logps; the KL and the reference's
    first-token margin need the reference model, so they are absent."""
    want = numpy_mechanism(models["policy"][0], models["reference"][0], pairs)
    trainer = trainer_for("dpo")
    frozen = fdpo_eval(trainer, models["policy"][1], models["reference"][1], pairs)
    with_ref = dict(pairs)  # the reference's sums, as launch.precompute_ref writes them
    score = jax.jit(lambda p, m: train.pair_segment_logps(trainer.graphdef, p, m, 8))
    with_ref["ref_logps"] = np.asarray(jax.device_get(score(
        models["reference"][1], {k: jnp.asarray(pairs[k]) for k in train.BATCH_KEYS[:4]})),
        np.float32)
    pre = fdpo_eval(trainer_for("dpo", reference="precomputed"),
                    models["policy"][1], None, with_ref)
    for side in ("chosen", "rejected"):
        for seg in SEGS:
            k = f"mech/dlogp/{side}_{seg}"
            assert pre[k] == pytest.approx(want[f"dlogp/{side}_{seg}"].mean(), rel=RTOL,
                                           abs=ATOL), k
    assert pre["mech/first_margin/policy"] == pytest.approx(frozen["mech/first_margin/policy"],
                                                            rel=RTOL)
    assert not [k for k in pre if k.startswith("mech/kl")]
    assert "mech/first_margin/reference" not in pre


# ----------------------------------------------------------------------------------------
# The gradient share
# ----------------------------------------------------------------------------------------


def direct_focused_dpo_grads(graphdef, params, ref_params, pairs, mask, stops):
    """jax.grad of focused_dpo's loss (beta 0.1, W = ((1,2,1,1,1),(1,1,0,1,0))) written on
    the full logits of `Decoder` (no chunking), once per entry of `stops`, with the
    log-probs of the tokens whose segment is in that entry under stop_gradient. (The
    entries go in as masks over segment ids, so one compiled gradient serves them all.)"""
    w = np.array([[1, 2, 1, 1, 1], [1, 1, 0, 1, 0]], np.float32)
    beta = 0.1

    def side_sums(p, side, stop):
        ids = jnp.asarray(pairs[f"{side}_ids"])
        seg = jnp.asarray(pairs[f"{side}_segments"])[:, 1:]
        logits = nnx.merge(graphdef, p)(ids).astype(jnp.float32)[:, :-1]
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1)[..., 0]
        if stop is not None:
            lp = jnp.where(stop[seg], jax.lax.stop_gradient(lp), lp)
        return jnp.stack([(lp * (seg == int(Segment.PREFIX) + i)).sum(-1)
                          for i in range(5)], -1)  # [B, 5]

    def loss(p, stop):
        h = 0.0
        for s, side in enumerate(("chosen", "rejected")):
            d = side_sums(p, side, stop) - side_sums(ref_params, side, None)
            h = h + (1 - 2 * s) * (d * w[s]).sum(-1)
        return -(mask * jax.nn.log_sigmoid(beta * h)).sum() / mask.sum()

    grad = jax.jit(jax.grad(loss))
    n_segments = max(int(s) for s in Segment) + 1
    return [grad(params, jnp.asarray(np.isin(np.arange(n_segments), stop))) for stop in stops]


@pytest.fixture(scope="module")
def direct_grads(models, pairs, trainer_for):
    """The mid part (every other token's log-prob stopped) and the other part (the mid's
    stopped) of focused_dpo's gradient on the padded pairs, from
    `direct_focused_dpo_grads`: the same for any micro-batch count."""
    batch_pairs, mask = padded(pairs)
    others = [int(Segment.PROMPT), int(Segment.PREFIX), int(Segment.SUFFIX),
              int(Segment.LEAD), int(Segment.TRAIL)]
    g_mid, g_other = direct_focused_dpo_grads(
        trainer_for("focused_dpo").graphdef, models["policy"][1], models["reference"][1],
        batch_pairs, mask, [others, [int(Segment.MID)]])
    return g_mid, g_other


def global_norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                             for x in jax.tree.leaves(tree))))


@pytest.mark.slow
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_grad_share_matches_jax_grad_of_masked_losses(micro_batches, models, pairs,
                                                      trainer_for, direct_grads):
    trainer = trainer_for("focused_dpo")
    batch_pairs, mask = padded(pairs)
    batch = trainer.make_batch(batch_pairs, micro_batches, mask)
    params, ref = models["policy"][1], models["reference"][1]
    got = jax.device_get(trainer.grad_share_step(params, batch, ref))
    g_mid, g_other = direct_grads
    n_mid, n_other = global_norm(g_mid), global_norm(g_other)
    assert float(got["mech/grad/norm_mid"]) == pytest.approx(n_mid, rel=1e-4)
    assert float(got["mech/grad/norm_other"]) == pytest.approx(n_other, rel=1e-4)
    share = float(got["mech/grad/share_mid"])
    assert 0 < share < 1
    assert share == pytest.approx(n_mid / (n_mid + n_other), rel=1e-4)
    # The two parts add up to the train step's gradient (its norm before clipping).
    state = trainer.init_state(train.copy_params(params))
    _, metrics = trainer.train_step(state, trainer.make_batch(batch_pairs, micro_batches, mask),
                                    ref)
    assert float(got["mech/grad/norm"]) == pytest.approx(float(metrics["grad_norm"]), rel=1e-4)
    full = jax.tree.map(jnp.add, g_mid, g_other)
    assert float(got["mech/grad/norm"]) == pytest.approx(global_norm(full), rel=1e-4)


# ----------------------------------------------------------------------------------------
# launch.train: the default config writes the metrics
# ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["focused_dpo", "sft"])
def test_launch_train_writes_mechanism_lines(preset, program, tmp_path):
    """A runlocal run of a tiny model: every validation line has the mechanism metrics, the
    steps named by grad_share_every also the gradient share; at step 0 of a frozen
    reference (the initial policy) the changes would be 0, after training they are not."""
    make_hf_model(tmp_path / "hf", "qwen2", vocab_size=211)
    cfg = ModelConfig.from_hf_dir(tmp_path / "hf")
    _, state = convert.load_hf_params(tmp_path / "hf", cfg, ONE_DEVICE)
    checkpoint.save_model(tmp_path / "ckpt", cfg, state,
                          hf_config=json.loads((tmp_path / "hf" / "config.json").read_text()),
                          extras_from=tmp_path / "hf")
    write_dataset(tmp_path / "data", {"train": random_pairs(16, 32, 211, seed=0),
                                      "validation": random_pairs(6, 32, 211, seed=1)})
    program("launch.train", f"--workdir={tmp_path / 'run'}",
            f"--config=configs/focused_dpo.py:model={tmp_path / 'ckpt'},"
            f"data={tmp_path / 'data'},preset={preset},runlocal",
            "--config.train.num_steps=4", "--config.log.eval_every_steps=2",
            "--config.log.grad_share_every=4", "--config.optimizer.lr=1e-3")
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    val = [m for m in lines if m["split"] == "validation"]
    assert [m["step"] for m in val] == [2, 4]
    for m in val:
        for k in ("mech/dlogp/chosen_mid", "mech/dlogp/rejected_mid", "mech/dlogp/chosen",
                  "mech/dlogp/chosen_suffix", "mech/dlogp/rejected_suffix",
                  "mech/dlogp/chosen_prefix", "mech/first_margin/change", "mech/kl/chosen"):
            assert np.isfinite(m[k]), k
        assert m["mech/kl/chosen"] > 0 and m["mech/dlogp/chosen"] != 0
        assert m["mech/first_margin/pairs"] == 6
    assert "mech/grad/share_mid" not in val[0]
    assert 0 < val[1]["mech/grad/share_mid"] < 1
    assert not [m for m in lines if m["split"] == "train" and any(k.startswith("mech/")
                                                                  for k in m)]


def test_report_draws_mechanism_curves_per_arm(tmp_path):
    """launch.report's library: each run's mech/* validation values, in line order, one
    figure per family, and a table of the last values."""
    from fdpo import report

    cfg = {"name": "x", "toy": {"enabled": False}, "evaluate": {"benchmarks": []}}
    (tmp_path / "pipeline_config.json").write_text(json.dumps(cfg))
    for run, sign in (("focused_dpo-s0", 1.0), ("dpo-s0", -1.0)):
        rows = [{"split": "train", "step": 1, "loss": 0.7},
                {"split": "validation", "step": 2, "loss": 0.6,
                 "mech/dlogp/chosen_mid": 0.5 * sign, "mech/first_margin/change": 0.1},
                {"split": "validation", "step": 4, "loss": 0.5,
                 "mech/dlogp/chosen_mid": 1.5 * sign, "mech/first_margin/change": 0.3,
                 "mech/grad/share_mid": 0.25}]
        path = tmp_path / "train" / run / "metrics.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = report.write(tmp_path)
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert written["mechanism"]["dpo-s0"]["mech/dlogp/chosen_mid"] == [[2, -0.5], [4, -1.5]]
    assert written["mechanism"]["focused_dpo-s0"]["mech/grad/share_mid"] == [[4, 0.25]]
    names = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"mech_dlogp.png", "mech_first_margin.png", "mech_grad.png"} <= names
    assert "mech_kl.png" not in names  # no run logged a KL
    text = md.read_text()
    assert "| dpo-s0 | 4 | -1.5 | - | - | - | - | 0.3 | - | 0.25 |" in text
    assert "![mech_dlogp.png](mech_dlogp.png)" in text


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tdpo1", "sft"])
def test_grad_share_parts_add_up_to_the_step_gradient(preset, models, pairs, trainer_for):
    """For a loss with a KL term (its per-segment KL sums are split like the log-prob sums)
    and for one without a reference: g_mid + g_other is the train step's gradient."""
    trainer = trainer_for(preset, shared_length(pairs))
    batch_pairs, mask = padded(pairs)
    params, ref = models["policy"][1], models["reference"][1]
    got = jax.device_get(trainer.grad_share_step(params, trainer.make_batch(
        batch_pairs, 2, mask), ref))
    state = trainer.init_state(train.copy_params(params))
    _, metrics = trainer.train_step(state, trainer.make_batch(batch_pairs, 2, mask), ref)
    assert float(got["mech/grad/norm"]) == pytest.approx(float(metrics["grad_norm"]), rel=1e-4)
    assert 0 < float(got["mech/grad/share_mid"]) < 1
