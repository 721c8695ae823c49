"""Log-probs only where the loss reads them (`train.response_capacity`) and the chunk
recompute choice (`train.logprob_recompute`): the same losses and gradients as scoring
every position with recompute."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fdpo import logprobs, records, sharding, train
from fdpo import loss as loss_lib
from fdpo.models.config import ModelConfig
from fdpo.records import Segment
from fdpo.testing import random_params, random_pairs, stack
from tests.helpers.numerics import assert_close_at_scale

ONE_DEVICE = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
TINY = ModelConfig(architecture="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                   rope_theta=1e4, qkv_bias=True)


def test_scored_positions_are_the_scored_indices_in_order():
    rng = np.random.default_rng(0)
    scored = rng.random((5, 30)) < 0.4
    scored[0] = False  # a row with none
    index, valid = logprobs.scored_positions(jnp.asarray(scored), 16)
    for row, idx, ok in zip(scored, np.asarray(index), np.asarray(valid)):
        expected = np.flatnonzero(row)[:16]
        np.testing.assert_array_equal(idx[:len(expected)], expected)
        np.testing.assert_array_equal(ok, np.arange(16) < len(expected))
        assert len(set(idx.tolist())) == 16  # fillers are other, distinct positions


def test_chunks_are_balanced_to_pad_less_than_one_position_per_chunk():
    assert logprobs.chunk_plan(534, 256) == (3, 178)  # not 3 x 256: 234 padded positions
    assert logprobs.chunk_plan(424, 256) == (2, 212)
    assert logprobs.chunk_plan(256, 256) == (1, 256)
    assert logprobs.chunk_plan(0, 256) == (1, 1)
    for n in range(1, 700, 7):
        for chunk in (1, 5, 64, 256, 1000):
            num, size = logprobs.chunk_plan(n, chunk)
            assert size <= chunk and num == -(-n // chunk)
            assert 0 <= num * size - n < num


def test_balanced_chunks_give_the_unchunked_logprobs():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 53, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(40, 8)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 40, size=(2, 53)), jnp.int32)
    logits = jnp.einsum("btd,vd->btv", hidden, w)
    expected = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    for chunk in (1, 10, 17, 52, 53, 64):
        np.testing.assert_allclose(logprobs.target_logprobs(hidden, w, targets, chunk),
                                   expected, rtol=1e-5, atol=1e-5, err_msg=f"chunk {chunk}")


@pytest.fixture(scope="module")
def pairs():
    examples = stack(random_pairs(4, 48, TINY.vocab_size, seed=3, lengths=(
        (4, 9), (0, 8), (1, 7), (0, 7), (0, 8)), prose=(0, 3)))
    examples.pop("ref_logps", None)
    return examples


def response_capacity(examples, shared_length):
    """The smallest capacity that holds every row's response tokens."""
    if shared_length:
        labels = train.pack_shared_prompt(examples, shared_length)["labels"]
        return int((labels >= Segment.PREFIX).sum(-1).max())
    return int(max((examples[f"{s}_segments"][:, 1:] >= Segment.PREFIX).sum(-1).max()
                   for s in ("chosen", "rejected")))


@pytest.mark.parametrize("layout", ["trunk", "prompt", "separate"])
def test_row_extents_size_the_capacity_to_the_data(tmp_path, layout):
    """`data.row_extents` (train.response_capacity=-1) counts, without packing, exactly the
    positions the packed rows score, and the longest row."""
    from fdpo import data
    from fdpo.testing import write_dataset

    recs = random_pairs(24, 48, TINY.vocab_size, seed=5, lengths=(
        (2, 9), (0, 8), (1, 7), (0, 7), (0, 8)), prose=(0, 3))
    src = records.PairDataSource.from_manifest(write_dataset(tmp_path, {"train": recs}),
                                               "train")
    items = [src[i] for i in range(len(src))]
    examples = {k: np.stack([r[k] for r in items]) for k in items[0]}
    trunk = layout == "trunk"
    most = data.row_extents(src, chunk=7, shared=layout != "separate", trunk=trunk)
    rows = train.pack_shared_prompt(examples, most.length, trunk) if layout != "separate" else {}
    if rows:
        scored, in_trunk = rows["labels"] >= Segment.PREFIX, rows["branch"] == 0
        assert most.length == int((rows["labels"] != Segment.PAD).sum(-1).max())
        assert most.scored == int(scored.sum(-1).max())
        assert most.trunk == int((scored & in_trunk).sum(-1).max())
        assert most.branches == int((scored & ~in_trunk).sum(-1).max())
        assert (most.trunk > 0) == trunk  # some pairs have a common prefix
    else:
        assert most.scored == most.branches == response_capacity(examples, 0)
        assert most.trunk == 0
    assert 0 < most.scored < (most.length if rows else 48) - 1


def one_step(examples, shared_length, preset, **options):
    trainer = train.Trainer(TINY, loss_lib.preset(preset, beta=0.5, nll_weight=0.1),
                            optax.sgd(0.5), ONE_DEVICE, chunk=8, shared_length=shared_length,
                            **options)
    state = trainer.init_state(random_params(TINY, seed=1))
    state, metrics = trainer.train_step(state, trainer.make_batch(examples),
                                        random_params(TINY, seed=2))
    return float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(state["params"])


@pytest.mark.parametrize("layout,preset", [
    ("shared", "focused_dpo"),  # the default run's path
    pytest.param("separate", "dpo", marks=pytest.mark.slow),
    pytest.param("shared", "tdpo2", marks=pytest.mark.slow),
    pytest.param("separate", "tdpo1", marks=pytest.mark.slow)])
def test_response_capacity_and_no_recompute_give_the_same_step(pairs, layout, preset):
    shared_length = 0
    if layout == "shared":
        shared_length = int(records.shared_row_lengths(pairs["chosen_segments"],
                                                       pairs["rejected_segments"]).max())
    capacity = response_capacity(pairs, shared_length)
    length = shared_length or pairs["chosen_ids"].shape[1]
    assert capacity <= length - 4  # at least the prompt (4+ tokens) is left out
    l0, n0, p0 = one_step(pairs, shared_length, preset)
    assert n0 > 0
    for options in (dict(response_capacity=capacity),
                    dict(response_capacity=capacity + 5, logprob_recompute=False)):
        l1, n1, p1 = one_step(pairs, shared_length, preset, **options)
        assert l1 == pytest.approx(l0, rel=1e-5), options
        assert n1 == pytest.approx(n0, rel=1e-5), options
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p1), jax.tree.leaves(p0)):
            assert_close_at_scale(a, b, 1e-5, axis=None,
                                  what=f"{options} {jax.tree_util.keystr(path)}")


def test_a_row_over_the_capacity_is_refused_by_name(pairs):
    capacity = response_capacity(pairs, 0)
    trainer = train.Trainer(TINY, loss_lib.preset("focused_dpo"), optax.sgd(0.1), ONE_DEVICE,
                            response_capacity=capacity - 1)
    with pytest.raises(ValueError, match=r"pair \d of the batch: its (chosen|rejected) has "
                                         rf"{capacity} response tokens, more than "
                                         rf"train.response_capacity={capacity - 1}"):
        trainer.make_batch(pairs)


def trunk_split(examples, preset, **overrides):
    """The trunk-row step with the trunk scored apart, outside the gradient, against every
    position scored in one differentiated pass."""
    S = int(records.shared_row_lengths(examples["chosen_segments"], examples["rejected_segments"],
                                       records.trunk_lengths(**{k: examples[k] for k in (
                                           "chosen_ids", "rejected_ids", "chosen_segments",
                                           "rejected_segments")})).max())
    rows = train.pack_shared_prompt(examples, S)
    scored, in_trunk = rows["labels"] >= Segment.PREFIX, rows["branch"] == 0
    branches, trunk = (int((scored & ~in_trunk).sum(-1).max()),
                       int((scored & in_trunk).sum(-1).max()))
    loss_cfg = loss_lib.preset(preset, beta=0.5, **overrides)
    return S, branches, trunk, loss_cfg


@pytest.mark.parametrize("preset,overrides", [
    ("focused_dpo", {}),  # the default run's loss
    pytest.param("dpo", dict(loss_type="ipo"), marks=pytest.mark.slow)])
def test_the_trunk_scored_outside_the_gradient_gives_the_same_step(preset, overrides):
    examples = stack(random_pairs(4, 48, TINY.vocab_size, seed=11, lengths=(
        (3, 6), (4, 12), (1, 7), (0, 7), (0, 8))))
    examples.pop("ref_logps", None)
    S, branches, trunk, loss_cfg = trunk_split(examples, preset, **overrides)
    assert trunk >= 4 and loss_cfg.trunk_cancels

    def step(**options):
        trainer = train.Trainer(TINY, loss_cfg, optax.sgd(0.5), ONE_DEVICE, chunk=8,
                                shared_length=S, **options)
        state = trainer.init_state(random_params(TINY, seed=1))
        ref = random_params(TINY, seed=2)  # policy != reference: the trunk's ratios are not 0
        batch = trainer.make_batch(examples)
        metrics = trainer.eval_step(state["params"], batch, ref)
        state, step_metrics = trainer.train_step(state, batch, ref)
        return metrics, float(step_metrics["grad_norm"]), jax.device_get(state["params"])

    short = train.Trainer(TINY, loss_cfg, optax.sgd(0.5), ONE_DEVICE, chunk=8, shared_length=S,
                          response_capacity=branches, trunk_capacity=trunk - 1)
    with pytest.raises(ValueError, match=rf"its shared row's trunk has {trunk} response tokens, "
                                         rf"more than trunk_capacity={trunk - 1} \(the train "
                                         "loop sizes it from the data"):
        short.make_batch(examples)
    m0, n0, p0 = step()
    m1, n1, p1 = step(response_capacity=branches, trunk_capacity=trunk)
    assert n0 > 0 and n1 == pytest.approx(n0, rel=1e-5)
    assert {"dpo_loss", "logps_chosen", "rewards_chosen", "rewards_margin"} <= set(m0)
    for k in m0:  # the eval step's sums: loss terms, log-probs (trunk included), rewards
        np.testing.assert_allclose(m1[k], m0[k], rtol=1e-5, atol=1e-5, err_msg=k)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p1), jax.tree.leaves(p0)):
        assert_close_at_scale(a, b, 1e-5, axis=None, what=jax.tree_util.keystr(path))


@pytest.mark.parametrize("preset,overrides", [
    ("dpo", dict(nll_weight=0.5)), ("tdpo2", {}), ("dpo", dict(dpop_lambda=1.0)),
    ("focused_dpo", dict(weights=((2.0, 2.0, 1.0), (1.0, 1.0, 0.0))))])
def test_the_trunk_is_scored_in_the_gradient_when_the_loss_reads_it(preset, overrides):
    examples = stack(random_pairs(2, 48, TINY.vocab_size, seed=11, lengths=(
        (3, 6), (4, 12), (1, 7), (0, 7), (0, 8))))
    S, branches, trunk, loss_cfg = trunk_split(examples, preset, **overrides)
    assert not loss_cfg.trunk_cancels
    with pytest.raises(ValueError, match="trunk_capacity=.* needs .*trunk's log-probs cancel"):
        train.Trainer(TINY, loss_cfg, optax.sgd(0.5), ONE_DEVICE, shared_length=S,
                      response_capacity=branches, trunk_capacity=trunk)
    from fdpo.data import RowExtents
    most = RowExtents(S, branches + trunk, trunk, branches)
    assert train.lm_head_capacities(most, S, True, loss_cfg) == (branches + trunk, 0)
