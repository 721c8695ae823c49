"""The Focused-DPO loss family against an independent PyTorch reference, and its algebra.

The reference side never calls fdpo: per-token log-probs come from transformers' own
forward (`tests.hf_models.torch_token_logprobs`), are summed per segment here with numpy,
and the formulas of METHOD.md section 3 are written out below.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fdpo import logprobs, scoring, sharding
from fdpo import loss as loss_lib
from fdpo import train
from fdpo.models import convert
from fdpo.records import Segment, shared_row_lengths
from fdpo.testing import random_pairs, stack
from fdpo.testing import torch_token_logprobs
from tests.helpers.models import models  # noqa: F401  (fixture)

pytestmark = pytest.mark.torch

torch.set_num_threads(2)

ONE_DEVICE = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
LENGTH = 32
# float32 forward against float32 torch: per-token log-probs agree to ~1e-6; sums of
# ~20 tokens and a log-sigmoid keep the loss within 2e-5 (a wrong weight or beta moves it
# by > 1e-2 on these pairs).
LOSS_ATOL, LOSS_RTOL = 2e-5, 1e-4


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.fixture(scope="module")
def pairs():
    return stack(random_pairs(8, LENGTH, vocab=211, seed=0))


@pytest.fixture(scope="module")
def prose_pairs():
    """With LEAD/TRAIL tokens (prose around the code) differing between the two sides, as
    instruct responses have."""
    return stack(random_pairs(8, LENGTH, vocab=211, seed=3, prose=(1, 3)))


@pytest.fixture(scope="module")
def torch_sums(models, pairs):
    return _torch_sums(models, pairs)


def _torch_sums(models, pairs):
    """[B, 2, 5] per-segment sums and [B, 2] response totals / token counts, from torch."""
    out = {}
    for name in ("policy", "reference"):
        seg_sums = np.zeros((len(pairs["chosen_ids"]), 2, 5))
        for s, side in enumerate(("chosen", "rejected")):
            lp = torch_token_logprobs(models[name][0], pairs[f"{side}_ids"])
            seg = pairs[f"{side}_segments"]
            for k, label in enumerate((Segment.PREFIX, Segment.MID, Segment.SUFFIX,
                                       Segment.LEAD, Segment.TRAIL)):
                seg_sums[:, s, k] = np.where(seg == label, lp, 0.0).sum(-1)
            out[f"{name}_{side}_total"] = np.where(seg >= Segment.PREFIX, lp, 0.0).sum(-1)
        out[name] = seg_sums
    out["chosen_tokens"] = (pairs["chosen_segments"] >= Segment.PREFIX).sum()
    out["lengths"] = response_lengths(pairs)
    return out


def swap_roles(d):
    """The same dict with the policy and reference models (and their sums) exchanged. With
    seed 0 as the policy every chosen log-ratio of the fixture pairs is positive, so DPOP's
    penalty is inactive; swapped, it is active on every pair: DPOP is tested both ways."""
    def swapped(k):
        for a, b in (("policy", "reference"), ("reference", "policy")):
            if k == a or k.startswith(a + "_"):
                return b + k[len(a):]
        return k
    return {swapped(k): v for k, v in d.items()}


def response_lengths(pairs):
    """[B, 2] response tokens of (chosen, rejected), counted here from the segment ids."""
    return np.stack([(pairs[f"{side}_segments"] >= Segment.PREFIX).sum(-1)
                     for side in ("chosen", "rejected")], -1)


def formula_loss(pol, ref, lengths, n_chosen, weights, beta, kind="sigmoid", eps=0.0,
                 nll_weight=0.0, dpop_lambda=0.0, dpop_weighted=False, length_normalize=False):
    """METHOD.md section 3 and the baselines' papers, written out in torch on per-segment
    sums pol, ref [B, 2, 5] (float64 tensors), so torch autograd can differentiate it.

    DPOP (Pal et al. 2024, eq. 3): -log sigmoid(beta (h - lambda max(0, -(log pi(y_c) -
    log pi_ref(y_c))))). Length-normalised IPO (TRL): h from each side's log-ratio divided
    by its response token count. Returns (mean loss, beta h of the unnormalised sums [B]).
    """
    W = torch.as_tensor(np.asarray(weights, np.float64))
    if W.shape[1] == 3:  # the documented default: lead weighted as prefix, trail as suffix
        W = torch.cat([W, W[:, [0]], W[:, [2]]], dim=1)
    d = pol - ref  # [B, 2, 5]
    side_c, side_r = (W[0] * d[:, 0]).sum(-1), (W[1] * d[:, 1]).sum(-1)
    h_sum = side_c - side_r
    h = h_sum
    if length_normalize:
        # An empty response (pair 2 of the fixture's rejected side) has log-ratio 0.
        n = torch.as_tensor(lengths, dtype=torch.float64).clamp(min=1)
        h = side_c / n[:, 0] - side_r / n[:, 1]
    if dpop_lambda:
        chosen = side_c if dpop_weighted else d[:, 0].sum(-1)
        h = h - dpop_lambda * torch.clamp(-chosen, min=0.0)
    if kind == "sigmoid":
        per_pair = (-(1 - eps) * torch.nn.functional.logsigmoid(beta * h)
                    - eps * torch.nn.functional.logsigmoid(-beta * h))
    elif kind == "ipo":
        per_pair = (h - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        per_pair = torch.clamp(1 - beta * h, min=0.0)
    else:
        per_pair = torch.zeros_like(h)
    nll = -pol[:, 0].sum() / n_chosen
    return per_pair.mean() + nll_weight * nll, beta * h_sum


def expected_loss(t, **formula):
    """`formula_loss` on the torch sums: (loss, beta h [B]) as numpy."""
    f64 = lambda x: torch.as_tensor(np.asarray(x, np.float64))
    loss, margins = formula_loss(f64(t["policy"]), f64(t["reference"]), t["lengths"],
                                 float(t["chosen_tokens"]), **formula)
    return float(loss), margins.numpy()


CASES = {
    "focused_dpo": (loss_lib.preset("focused_dpo", beta=0.5),
                    dict(weights=((1, 2, 1), (1, 1, 0)), beta=0.5)),
    "focused_dpo_w5": (loss_lib.preset("focused_dpo", w_focused=5.0, beta=0.3),
                       dict(weights=((1, 5, 1), (1, 1, 0)), beta=0.3)),
    "dpo": (loss_lib.preset("dpo", beta=0.5), dict(weights=((1, 1, 1), (1, 1, 1)), beta=0.5)),
    "mid_only": (loss_lib.preset("mid_only", beta=0.5),
                 dict(weights=((0, 1, 0), (0, 1, 0)), beta=0.5)),
    "target_dpo_like": (loss_lib.preset("target_dpo_like", beta=0.5),
                        dict(weights=((1, 1, 1), (0, 1, 0)), beta=0.5)),
    "sft": (loss_lib.preset("sft"), dict(weights=((0,) * 3,) * 2, beta=0.0, kind="none",
                                         nll_weight=1.0)),
    "focused_dpo_rpo": (loss_lib.preset("focused_dpo", beta=0.5, nll_weight=0.2),
                        dict(weights=((1, 2, 1), (1, 1, 0)), beta=0.5, nll_weight=0.2)),
    "dpo_label_smoothing": (loss_lib.preset("dpo", beta=0.5, label_smoothing=0.1),
                            dict(weights=((1, 1, 1), (1, 1, 1)), beta=0.5, eps=0.1)),
    "focused_ipo": (loss_lib.preset("focused_dpo", beta=0.5, loss_type="ipo"),
                    dict(weights=((1, 2, 1), (1, 1, 0)), beta=0.5, kind="ipo")),
    "focused_hinge": (loss_lib.preset("focused_dpo", beta=0.5, loss_type="hinge"),
                      dict(weights=((1, 2, 1), (1, 1, 0)), beta=0.5, kind="hinge")),
    "own_prose_weights": (loss_lib.LossConfig(beta=0.5, weights=((1, 2, 1, 0, 0.5),
                                                                 (1, 1, 0, 0.25, 0))),
                          dict(weights=((1, 2, 1, 0, 0.5), (1, 1, 0, 0.25, 0)), beta=0.5)),
    # The baselines of issue 16: DPOP at the paper's lambda (50) and at a small one on the
    # focused table with the weighted penalty; DPO + NLL (RPO); IPO per response token.
    "dpop": (loss_lib.preset("dpop", beta=0.5),
             dict(weights=((1, 1, 1), (1, 1, 1)), beta=0.5, dpop_lambda=50.0)),
    "focused_dpop_weighted": (
        loss_lib.preset("focused_dpo", beta=0.5, dpop_lambda=2.0, dpop_weighted=True),
        dict(weights=((1, 2, 1), (1, 1, 0)), beta=0.5, dpop_lambda=2.0, dpop_weighted=True)),
    "dpo_nll": (loss_lib.preset("dpo_nll", beta=0.5),
                dict(weights=((1, 1, 1), (1, 1, 1)), beta=0.5, nll_weight=1.0)),
    "dpo_nll_0.3": (loss_lib.preset("dpo_nll", beta=0.5, nll_weight=0.3),
                    dict(weights=((1, 1, 1), (1, 1, 1)), beta=0.5, nll_weight=0.3)),
    "ipo_length_norm": (loss_lib.preset("ipo_length_norm", beta=0.5),
                        dict(weights=((1, 1, 1), (1, 1, 1)), beta=0.5, kind="ipo",
                             length_normalize=True)),
}


_TRAINERS = {}  # one compiled eval step per (loss, reference mode) in this module


def fdpo_eval(models, pairs, loss_cfg, micro_batches=2, reference="frozen", data=None,
              shared_length=0):
    key = (loss_cfg, reference, shared_length)
    if key not in _TRAINERS:
        tx, _ = train.make_optimizer(train.OptimizerConfig(), 10)
        _TRAINERS[key] = train.Trainer(models["cfg"], loss_cfg, tx, ONE_DEVICE,
                                       reference=reference, chunk=8,
                                       shared_length=shared_length)
    trainer = _TRAINERS[key]
    batch = trainer.make_batch(data if data is not None else pairs, micro_batches)
    sums = jax.device_get(trainer.eval_step(models["policy"][1], batch,
                                            models["reference"][1]
                                            if reference == "frozen" else None))
    return train.eval_metrics(sums, loss_cfg)


@pytest.fixture(scope="module")
def fdpo_sums(models, pairs):
    return _fdpo_sums(models, pairs)


def _fdpo_sums(models, pairs):
    """Per-segment sums [B, 2, 5] of policy and reference from fdpo's forward (the train
    step's own log-prob function)."""
    score = scoring.make_score_fn(models["cfg"], ONE_DEVICE, chunk=8)
    b = len(pairs["chosen_ids"])
    ids = np.concatenate([pairs["chosen_ids"], pairs["rejected_ids"]])
    seg = np.concatenate([pairs["chosen_segments"], pairs["rejected_segments"]])
    out = {}
    for name in ("policy", "reference"):
        sums = np.asarray(score(models[name][1], ids, seg))
        out[name] = np.stack([sums[:b], sums[b:]], 1)
    return out


def test_segment_sums_match_torch(fdpo_sums, torch_sums):
    for name in ("policy", "reference"):
        np.testing.assert_allclose(fdpo_sums[name], torch_sums[name], atol=1e-4, rtol=1e-5)


DPOP_CASES = ("dpop", "focused_dpop_weighted")


@pytest.mark.parametrize("name,swapped", [(n, False) for n in sorted(CASES)] +
                         [(n, True) for n in DPOP_CASES])
def test_loss_matches_torch_reference(name, swapped, fdpo_sums, pairs, torch_sums):
    """fdpo's loss functions on fdpo's sums against the written-out formula on torch's."""
    if swapped:
        fdpo_sums, torch_sums = swap_roles(fdpo_sums), swap_roles(torch_sums)
    loss_cfg, formula = CASES[name]
    want, margins = expected_loss(torch_sums, **formula)
    pol = jnp.asarray(fdpo_sums["policy"], jnp.float32)
    ref = jnp.asarray(fdpo_sums["reference"], jnp.float32)
    terms = loss_lib.pair_terms(pol, ref if loss_cfg.needs_reference else None, loss_cfg,
                                jnp.asarray(response_lengths(pairs)))
    b = pol.shape[0]
    n_chosen = float((pairs["chosen_segments"] >= Segment.PREFIX).sum())
    got = loss_lib.total_loss(terms, jnp.ones(b), float(b), n_chosen, loss_cfg)
    assert float(got) == pytest.approx(want, abs=LOSS_ATOL, rel=LOSS_RTOL)
    np.testing.assert_allclose(terms["rewards_margin"], margins, atol=LOSS_ATOL, rtol=LOSS_RTOL)
    if name != "sft":  # the pairs must make the test discriminating
        assert abs(margins).mean() > 1e-2


@pytest.mark.parametrize("name", ["focused_dpo", "dpo", "own_prose_weights", "sft"])
def test_prose_segments_match_torch_reference(name, models, prose_pairs):
    """LEAD/TRAIL tokens are summed into their own columns, weighted by the table (three
    columns: lead as prefix, trail as suffix), through the trainer's step code."""
    t = _torch_sums(models, prose_pairs)
    got_sums = _fdpo_sums(models, prose_pairs)
    for name_ in ("policy", "reference"):
        np.testing.assert_allclose(got_sums[name_], t[name_], atol=1e-4, rtol=1e-5)
    assert np.all(np.abs(t["policy"][:, :, 3:]) > 0)  # every side has lead and trail tokens
    loss_cfg, formula = CASES[name]
    want, margins = expected_loss(t, **formula)
    got = fdpo_eval(models, prose_pairs, loss_cfg)
    assert got["loss"] == pytest.approx(want, abs=LOSS_ATOL, rel=LOSS_RTOL)
    assert got["rewards/margins"] == pytest.approx(margins.mean(), abs=LOSS_ATOL, rel=LOSS_RTOL)


@pytest.mark.parametrize("name,shared,swapped", [
    ("focused_dpo_rpo", False, False), ("sft", False, False), ("dpop", False, True),
    ("dpop", True, True), ("focused_dpop_weighted", False, True), ("dpo_nll", False, False),
    ("ipo_length_norm", False, False), ("ipo_length_norm", True, False)])
def test_trainer_loss_matches_torch_reference(name, shared, swapped, models, pairs,
                                              torch_sums):
    """The same through the trainer's jitted step code (micro-batches, masks, metrics), with
    separate chosen/rejected rows or shared-prompt rows (whose response lengths, for
    length-normalised IPO, come from the packed row's branches)."""
    if swapped:
        models, torch_sums = swap_roles(models), swap_roles(torch_sums)
    loss_cfg, formula = CASES[name]
    want, margins = expected_loss(torch_sums, **formula)
    need = int(shared_row_lengths(pairs["chosen_segments"], pairs["rejected_segments"]).max())
    got = fdpo_eval(models, pairs, loss_cfg, shared_length=need if shared else 0)
    assert got["loss"] == pytest.approx(want, abs=LOSS_ATOL, rel=LOSS_RTOL)
    assert got["rewards/margins"] == pytest.approx(margins.mean(), abs=LOSS_ATOL, rel=LOSS_RTOL)
    assert got["rewards/accuracies"] == pytest.approx((margins > 0).mean())
    d = torch_sums["policy"][:, 0] - torch_sums["reference"][:, 0]  # chosen [B, 5]
    if formula.get("dpop_weighted"):  # the focused table's chosen row, lead/trail extended
        d = d * np.array([1, 2, 1, 1, 1])
    assert got["dpop/penalty"] == pytest.approx(np.maximum(0.0, -d.sum(-1)).mean(),
                                                abs=LOSS_ATOL, rel=LOSS_RTOL)


@pytest.mark.parametrize("swapped", [False, True])
def test_dpop_penalty_is_discriminating(swapped, fdpo_sums, torch_sums):
    """The `dpop/penalty` term is max(0, log pi_ref(y_c) - log pi(y_c)) of the whole chosen
    response, in nats: 0 on every fixture pair one way round (DPOP = DPO there), > 0 on every
    pair the other (DPOP's loss strictly above DPO's)."""
    if swapped:
        fdpo_sums, torch_sums = swap_roles(fdpo_sums), swap_roles(torch_sums)
    dc = torch_sums["policy_chosen_total"] - torch_sums["reference_chosen_total"]
    assert np.all(dc > 0.5) if not swapped else np.all(dc < -0.5)
    pol = jnp.asarray(fdpo_sums["policy"], jnp.float32)
    ref = jnp.asarray(fdpo_sums["reference"], jnp.float32)
    terms = loss_lib.pair_terms(pol, ref, CASES["dpop"][0])
    np.testing.assert_allclose(terms["dpop_penalty"], np.maximum(0.0, -dc), atol=LOSS_ATOL,
                               rtol=LOSS_RTOL)
    dpo = np.asarray(loss_lib.pair_terms(pol, ref, loss_lib.preset("dpo", beta=0.5))["dpo_loss"])
    got = np.asarray(terms["dpo_loss"])
    if swapped:
        assert np.all(got > dpo + 1.0)
    else:
        np.testing.assert_array_equal(got, dpo)


# Gradients: d loss / d (final hidden state of the policy), fdpo's chunked log-softmax and
# jax.grad against transformers' full-vocabulary logits and torch autograd. Both sides see
# the reference sums of their own framework (they agree to ~1e-6).
GRAD_CASES = ["dpop", "focused_dpop_weighted", "dpo_nll", "ipo_length_norm", "focused_dpo"]


def torch_hidden_grad(models, pairs, t, formula):
    """[2B, L, D] rows alternate chosen, rejected: the layout fdpo's step uses."""
    model = models["policy"][0]
    b, length = pairs["chosen_ids"].shape
    ids = torch.as_tensor(np.stack([pairs["chosen_ids"], pairs["rejected_ids"]], 1)
                          .reshape(2 * b, length), dtype=torch.long)
    seg = torch.as_tensor(np.stack([pairs["chosen_segments"], pairs["rejected_segments"]], 1)
                          .reshape(2 * b, length).astype(np.int64))
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
    hidden = hidden.detach().double().requires_grad_(True)
    logits = hidden @ model.lm_head.weight.detach().double().T  # [2B, L, V]: no chunking
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    lp = torch.gather(logp, -1, ids[:, 1:, None])[..., 0]  # [2B, L - 1]
    nxt = seg[:, 1:]
    labels = (Segment.PREFIX, Segment.MID, Segment.SUFFIX, Segment.LEAD, Segment.TRAIL)
    sums = torch.stack([torch.where(nxt == int(k), lp, 0.0).sum(-1) for k in labels], -1)
    ref = torch.as_tensor(t["reference"], dtype=torch.float64)
    loss, _ = formula_loss(sums.reshape(b, 2, 5), ref, t["lengths"], float(t["chosen_tokens"]),
                           **formula)
    loss.backward()
    return float(loss.detach()), hidden.grad.numpy()


@pytest.mark.parametrize("name,swapped", [(n, n in DPOP_CASES) for n in GRAD_CASES])
def test_gradients_match_torch_autograd(name, swapped, models, pairs, torch_sums, fdpo_sums):
    if swapped:  # DPOP's penalty active on every pair
        models, torch_sums, fdpo_sums = (swap_roles(x) for x in (models, torch_sums, fdpo_sums))
    loss_cfg, formula = CASES[name]
    want_loss, want = torch_hidden_grad(models, pairs, torch_sums, formula)
    cfg = models["cfg"]
    model = nnx.merge(nnx.graphdef(convert.abstract_model(cfg)), models["policy"][1])
    b, length = pairs["chosen_ids"].shape
    ids = jnp.asarray(np.stack([pairs["chosen_ids"], pairs["rejected_ids"]], 1).reshape(
        2 * b, length))
    seg = jnp.asarray(np.stack([pairs["chosen_segments"], pairs["rejected_segments"]], 1)
                      .reshape(2 * b, length))
    hidden = model(ids, return_hidden=True)
    ref = jnp.asarray(fdpo_sums["reference"], jnp.float32)
    lengths = jnp.asarray(response_lengths(pairs))
    n_chosen = float(torch_sums["chosen_tokens"])

    def loss_of_hidden(h):
        lp = logprobs.token_logprobs_from_hidden(h, model.unembedding(), ids, chunk=8)
        pol = loss_lib.response_segment_sums(lp, seg).reshape(b, 2, 5)
        terms = loss_lib.pair_terms(pol, ref, loss_cfg, lengths)
        return loss_lib.total_loss(terms, jnp.ones(b), float(b), n_chosen, loss_cfg)

    got_loss, got = jax.value_and_grad(loss_of_hidden)(hidden)
    assert float(got_loss) == pytest.approx(want_loss, abs=LOSS_ATOL, rel=LOSS_RTOL)
    scale = np.abs(want).max()
    assert scale > 0
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-3 * scale)


def test_step_dpo_like_is_a_deprecated_alias_of_mid_only(caplog):
    with caplog.at_level("WARNING", logger="fdpo.loss"):
        old = loss_lib.preset("step_dpo_like", beta=0.5)
    assert old == loss_lib.preset("mid_only", beta=0.5)
    assert "deprecated" in caplog.text and "mid_only" in caplog.text
    assert "step_dpo_like" not in loss_lib.PRESETS


def test_all_weights_one_is_standard_dpo(fdpo_sums, torch_sums):
    """dpo preset = -log sigmoid(beta * (dc - dr)) on whole-response log-prob sums."""
    beta = 0.5
    dc = torch_sums["policy_chosen_total"] - torch_sums["reference_chosen_total"]
    dr = torch_sums["policy_rejected_total"] - torch_sums["reference_rejected_total"]
    want = -log_sigmoid(beta * (dc - dr))
    terms = loss_lib.pair_terms(jnp.asarray(fdpo_sums["policy"], jnp.float32),
                                jnp.asarray(fdpo_sums["reference"], jnp.float32),
                                loss_lib.preset("dpo", beta=beta))
    np.testing.assert_allclose(terms["dpo_loss"], want, atol=LOSS_ATOL, rtol=LOSS_RTOL)
    # And as pure functions on arbitrary sums, to float32 rounding.
    rng = np.random.default_rng(1)
    pol, ref = (jnp.asarray(rng.normal(size=(16, 2, 5)) * 10, jnp.float32) for _ in range(2))
    terms = loss_lib.pair_terms(pol, ref, loss_lib.preset("dpo", beta=beta))
    tot = lambda x: np.asarray(x, np.float64).sum(-1)
    std = -log_sigmoid(beta * ((tot(pol[:, 0]) - tot(ref[:, 0])) -
                               (tot(pol[:, 1]) - tot(ref[:, 1]))))
    np.testing.assert_allclose(terms["dpo_loss"], std, rtol=1e-5, atol=1e-6)


def test_focused_dpo_prefix_terms_cancel(fdpo_sums, torch_sums):
    """Shared prefixes give equal prefix sums on both sides, so the loss is the short form
    -log sigmoid(beta (w dmid_c + dsuffix_c - dmid_r)), and the gradient with respect to
    the two prefix sums is equal and opposite."""
    beta, w = 0.5, 2.0
    d = torch_sums["policy"] - torch_sums["reference"]
    np.testing.assert_allclose(torch_sums["policy"][:, 0, 0], torch_sums["policy"][:, 1, 0],
                               atol=1e-5)  # same tokens, same context
    short = -log_sigmoid(beta * (w * d[:, 0, 1] + d[:, 0, 2] - d[:, 1, 1]))
    cfg = loss_lib.preset("focused_dpo", beta=beta)
    pol = jnp.asarray(fdpo_sums["policy"], jnp.float32)
    ref = jnp.asarray(fdpo_sums["reference"], jnp.float32)
    terms = loss_lib.pair_terms(pol, ref, cfg)
    np.testing.assert_allclose(terms["dpo_loss"], short, atol=LOSS_ATOL, rtol=LOSS_RTOL)
    np.testing.assert_allclose(terms["segment_margins"][:, 0], 0.0, atol=1e-5)

    grad = jax.grad(lambda p: loss_lib.pair_terms(p, ref, cfg)["dpo_loss"].sum())(pol)
    assert np.all(np.asarray(grad[:, 0, 0] + grad[:, 1, 0]) == 0.0)
    assert np.all(np.asarray(grad[:, 1, 2]) == 0.0)  # rejected suffix weight 0
    assert np.all(np.abs(np.asarray(grad[:, 0, 1])) > 0)


@pytest.mark.parametrize("preset", ["focused_dpo", "sft"])
def test_no_gradient_from_prompt_and_padding(models, pairs, preset):
    """d loss / d (hidden state predicting token t) is exactly 0 when token t is prompt or
    padding (and for the last position, which predicts nothing)."""
    cfg = models["cfg"]
    loss_cfg = loss_lib.preset(preset, beta=0.5, nll_weight=0.1 if preset != "sft" else 1.0)
    params = models["policy"][1]
    model = nnx.merge(nnx.graphdef(convert.abstract_model(cfg)), params)
    b, length = pairs["chosen_ids"].shape
    ids = jnp.asarray(np.stack([pairs["chosen_ids"], pairs["rejected_ids"]], 1).reshape(
        2 * b, length))
    seg = np.stack([pairs["chosen_segments"], pairs["rejected_segments"]], 1).reshape(
        2 * b, length)
    hidden = model(ids, return_hidden=True)
    ref = jnp.asarray(np.random.default_rng(0).normal(size=(b, 2, 5)), jnp.float32)

    def loss_of_hidden(h):
        lp = logprobs.token_logprobs_from_hidden(h, model.unembedding(), ids, chunk=8)
        pol = loss_lib.response_segment_sums(lp, jnp.asarray(seg)).reshape(b, 2, 5)
        terms = loss_lib.pair_terms(pol, ref, loss_cfg)
        n_chosen = float((pairs["chosen_segments"] >= Segment.PREFIX).sum())
        return loss_lib.total_loss(terms, jnp.ones(b), float(b), n_chosen, loss_cfg)

    g = np.asarray(jax.grad(loss_of_hidden)(hidden))  # [2b, L, D]
    grad_norm = np.abs(g).max(-1)
    next_seg = np.concatenate([seg[:, 1:], np.zeros((2 * b, 1), seg.dtype)], axis=1)
    silent = (next_seg == Segment.PROMPT) | (next_seg == Segment.PAD)
    assert silent.sum() > 50 and (~silent).sum() > 50
    assert np.all(grad_norm[silent] == 0.0)
    # Response tokens train iff their weight is non-zero (or, chosen only, through the NLL):
    # e.g. focused_dpo's rejected suffix (weight 0) gets exactly no gradient either.
    W = np.asarray(loss_cfg.weights)
    side = np.arange(2 * b)[:, None] % 2  # rows alternate chosen, rejected
    weight = np.where(silent, 0.0, W[side, np.clip(next_seg - Segment.PREFIX, 0, 4)])
    if loss_cfg.loss_type == "none":
        weight = weight * 0
    trained = (weight != 0) | ((side == 0) & ~silent & (loss_cfg.nll_weight > 0))
    assert np.all(grad_norm[~trained] == 0.0)
    assert np.all(grad_norm[trained] > 0)


def test_chunked_segment_sums_match_naive_with_weighted_gradients():
    """Chunk boundaries that do not divide the length, a non-uniform cotangent."""
    rng = np.random.default_rng(2)
    hidden = jnp.asarray(rng.normal(size=(3, 29, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(97, 16)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 97, size=(3, 29)))
    seg = jnp.asarray(rng.integers(0, 7, size=(3, 29)), jnp.int8)
    coef = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)

    def naive(h, w):
        lp = logprobs.token_logprobs(jnp.einsum("btd,vd->btv", h, w), ids)
        return (loss_lib.response_segment_sums(lp, seg) * coef).sum()

    def chunked(h, w):
        lp = logprobs.token_logprobs_from_hidden(h, w, ids, chunk=5)
        return (loss_lib.response_segment_sums(lp, seg) * coef).sum()

    v1, g1 = jax.value_and_grad(naive, argnums=(0, 1))(hidden, w)
    v2, g2 = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, w)
    assert float(v2) == pytest.approx(float(v1), rel=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


def test_precomputed_reference_gives_the_same_loss(models, pairs, fdpo_sums):
    """ref_logps scored once (`scoring.make_score_fn`, as launch.precompute_ref does) give the
    loss of the frozen reference evaluated in the step."""
    loss_cfg = CASES["focused_dpo_rpo"][0]
    data = dict(pairs, ref_logps=fdpo_sums["reference"].astype(np.float32))
    frozen = fdpo_eval(models, pairs, loss_cfg)
    pre = fdpo_eval(models, pairs, loss_cfg, reference="precomputed", data=data)
    for key in ("loss", "rewards/margins", "rewards/chosen", "rewards/margins_mid"):
        assert pre[key] == pytest.approx(frozen[key], abs=1e-6, rel=1e-6), key
    with pytest.raises(ValueError, match="precompute_ref"):
        fdpo_eval(models, pairs, loss_cfg, reference="precomputed")


def test_config_errors_are_named():
    with pytest.raises(ValueError, match="loss_type"):
        loss_lib.LossConfig(loss_type="kto")
    with pytest.raises(KeyError, match="unknown loss preset"):
        loss_lib.preset("focused")
    with pytest.raises(ValueError, match="2 x 5"):
        loss_lib.LossConfig(weights=((1, 1), (1, 1)))
    with pytest.raises(ValueError, match="reference"):
        loss_lib.pair_terms(jnp.zeros((1, 2, 5)), None, loss_lib.preset("dpo"))
    with pytest.raises(ValueError, match="dpop_lambda.*sigmoid"):
        loss_lib.preset("dpop", loss_type="ipo")
    with pytest.raises(ValueError, match="dpop_lambda"):
        loss_lib.LossConfig(dpop_lambda=-1.0)
    with pytest.raises(ValueError, match="length_normalize.*ipo"):
        loss_lib.LossConfig(length_normalize=True)
    with pytest.raises(ValueError, match="lengths"):
        loss_lib.pair_terms(jnp.zeros((1, 2, 5)), jnp.zeros((1, 2, 5)),
                            loss_lib.preset("ipo_length_norm"))
