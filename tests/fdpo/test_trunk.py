"""Trunk rows (`fdpo.train` shared rows: prompt + common prefix once, both rests branching
off it) against a packing written here and against separate chosen/rejected rows.

The packing is checked semantically from the attention rule written below: every token a
side's loss reads must be scored from a hidden state that sees exactly that side's
separate-row context at the same positions. The step is checked by running the same
pairs both ways (Qwen2 and Llama, policy != reference, padded rows, a masked pair, two
micro-batches): losses, logged metrics (mechanism metrics included) and gradients agree to
1e-5 of their scale for every loss preset.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fdpo import loss as loss_lib
from fdpo import records, sharding, train
from fdpo.models import transformer
from fdpo.models.config import ModelConfig
from fdpo.records import Segment
from fdpo.testing import random_params, random_pairs, stack
from tests.helpers.numerics import assert_close_at_scale

ONE_DEVICE = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
LENGTH = 40
KEYS = ("chosen_ids", "rejected_ids", "chosen_segments", "rejected_segments")
MODELS = {
    "qwen2": ModelConfig(architecture="qwen2", vocab_size=211, hidden_size=64,
                         intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=16, rms_norm_eps=1e-6, rope_theta=1e4, qkv_bias=True),
    "llama": ModelConfig(architecture="llama", vocab_size=211, hidden_size=64,
                         intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=1,
                         head_dim=16, rms_norm_eps=1e-5, rope_theta=1e5, rope_type="linear",
                         rope_factor=4.0),
}
PRESETS = loss_lib.PRESETS + loss_lib.TDPO_TYPES
TRUNK_LABELS = (Segment.PROMPT, Segment.LEAD, Segment.PREFIX)
RTOL = 1e-5


def with_same_lead(rec):
    """An instruct-style pair whose two sides open with the same prose: the rejected side
    becomes the chosen side's prompt + lead + prefix followed by its own mid, suffix, trail,
    so the trunk runs through the lead and the prefix."""
    c_seg, r_seg = np.asarray(rec.chosen_segments), np.asarray(rec.rejected_segments)
    head = int(np.isin(c_seg, TRUNK_LABELS).sum())
    rest = ~np.isin(r_seg, TRUNK_LABELS + (Segment.PAD,))
    ids = np.concatenate([rec.chosen_ids[:head], rec.rejected_ids[rest]])
    seg = np.concatenate([c_seg[:head], r_seg[rest]])
    rec.rejected_ids = np.pad(ids, (0, LENGTH - len(ids))).astype(np.int32)
    rec.rejected_segments = np.pad(seg, (0, LENGTH - len(seg))).astype(np.int8)
    return rec


@pytest.fixture(scope="module")
def pairs():
    """8 pairs: completion pairs with prefixes of 0..8 tokens and rejected mids that may be
    empty (a chosen mid is not: an empty pair of mids would make the sides equal, whose
    reward margin of exactly 0 in separate rows flips the accuracy metric on rounding); two
    instruct pairs with the same lead on both sides (the trunk runs through it) and one
    whose leads differ (the trunk is the prompt)."""
    recs = random_pairs(5, LENGTH, vocab=211, seed=7,
                        lengths=((2, 6), (0, 8), (1, 4), (0, 4), (0, 5)))
    prose = random_pairs(3, LENGTH, vocab=211, seed=8,
                         lengths=((2, 5), (2, 6), (1, 4), (1, 4), (1, 4)), prose=(1, 3))
    recs += [with_same_lead(prose[0]), with_same_lead(prose[1]), prose[2]]
    return stack(recs)


def trunk_here(c_ids, r_ids, c_seg, r_seg) -> int:
    """The trunk by its definition: tokens from the start, equal ids and labels on both
    sides, labelled prompt, lead or prefix."""
    t = 0
    while (t < len(c_ids) and c_ids[t] == r_ids[t] and c_seg[t] == r_seg[t]
           and c_seg[t] in TRUNK_LABELS):
        t += 1
    return t


def mask_here(real, branch):
    """May row position i attend to j: causal in row order, real tokens among real ones,
    and j in the trunk (branch 0) or in i's own branch."""
    S = len(real)
    m = np.zeros((S, S), bool)
    for i in range(S):
        for j in range(i + 1):
            m[i, j] = real[i] == real[j] and (branch[j] == 0 or branch[j] == branch[i])
    return m


def test_trunk_lengths_and_row_lengths(pairs):
    """The trunk of every pair by its definition; lead pairs share past the lead, pairs with
    different leads only the prompt; the row needs chosen + rejected - trunk tokens."""
    want = np.array([trunk_here(*(pairs[k][i] for k in KEYS)) for i in range(8)])
    got = records.trunk_lengths(*(pairs[k] for k in KEYS))
    np.testing.assert_array_equal(got, want)
    prompt = (pairs["chosen_segments"] == Segment.PROMPT).sum(-1)
    lead = (pairs["chosen_segments"] == Segment.LEAD).sum(-1)
    prefix = (pairs["chosen_segments"] == Segment.PREFIX).sum(-1)
    np.testing.assert_array_equal(want[:7], (prompt + lead + prefix)[:7])
    assert lead[5] > 0 and lead[6] > 0 and want[7] == prompt[7] and prefix[7] > 0
    n = (pairs["chosen_segments"] != 0).sum(-1) + (pairs["rejected_segments"] != 0).sum(-1)
    np.testing.assert_array_equal(records.shared_row_lengths(
        pairs["chosen_segments"], pairs["rejected_segments"], got), n - want)


@pytest.mark.parametrize("trunk", [False, True], ids=["prompt", "trunk"])
def test_packing_matches_the_packing_written_here(trunk, pairs):
    """Row content against the layout written out here, then each scored token's context
    through the attention rule: its parent hidden state sees exactly the side's separate-row
    tokens before it, at their positions."""
    S = 2 * LENGTH
    rows = train.pack_shared_prompt(pairs, S, trunk=trunk)
    model_mask = np.asarray(transformer.attention_mask(
        jnp.asarray(rows["labels"] != 0, jnp.int32), jnp.asarray(rows["branch"])))
    for i in range(8):
        c_ids, r_ids, c_seg, r_seg = (pairs[k][i] for k in KEYS)
        t = (trunk_here(c_ids, r_ids, c_seg, r_seg) if trunk
             else int((c_seg == Segment.PROMPT).sum()))
        nc, nr = int((c_seg != 0).sum()), int((r_seg != 0).sum())
        n = nc + nr - t
        ids = np.zeros(S, int)
        ids[:n] = np.concatenate([c_ids[:nc], r_ids[t:nr]])
        labels = np.zeros(S, int)
        labels[:n] = np.concatenate([c_seg[:nc], r_seg[t:nr]])
        branch = np.zeros(S, int)
        branch[t:nc], branch[nc:n] = 1, 2
        positions = np.zeros(S, int)
        positions[:n] = np.concatenate([np.arange(nc), np.arange(t, nr)])
        for name, want in (("ids", ids), ("labels", labels), ("branch", branch),
                           ("positions", positions)):
            np.testing.assert_array_equal(rows[name][i], want, err_msg=f"pair {i} {name}")

        real = rows["labels"][i] != 0
        mask = mask_here(real, rows["branch"][i])
        np.testing.assert_array_equal(model_mask[i], mask)
        for side, (s_ids, s_seg) in ((1, (c_ids, c_seg)), (2, (r_ids, r_seg))):
            mine = records.side_labels(rows["labels"][i], rows["branch"][i], side)
            scored = np.flatnonzero(mine >= Segment.PREFIX)
            # every response token of the side once (token 0 never is one: the prompt)
            assert len(scored) == int((s_seg >= Segment.PREFIX).sum()), (i, side)
            for r in scored:
                pos = rows["positions"][i, r]
                h = rows["parents"][i, r]
                seen = np.flatnonzero(mask[h])
                order = np.argsort(rows["positions"][i, seen])
                np.testing.assert_array_equal(rows["positions"][i, seen][order], np.arange(pos))
                np.testing.assert_array_equal(rows["ids"][i, seen][order], s_ids[:pos])
                assert rows["positions"][i, h] == pos - 1
                assert rows["ids"][i, r] == s_ids[pos] and mine[r] == s_seg[pos]
        # the trunk's prefix is scored once in the row, for both sides
        assert (rows["labels"][i] >= Segment.PREFIX).sum() == (
            (c_seg >= Segment.PREFIX).sum() + (r_seg >= Segment.PREFIX).sum() -
            (c_seg[:t] >= Segment.PREFIX).sum())


def grad_keeper():
    """An optimizer that applies nothing and keeps the step's (accumulated) gradient in its
    state, so a train step returns the gradient itself, not a difference of parameters."""
    return optax.GradientTransformation(
        lambda p: {"grad": jax.tree.map(jnp.zeros_like, p)},
        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), {"grad": g}))


def step_both_ways(arch, preset, pairs, mechanism):
    """(separate, trunk) results of one train step (loss, metrics, gradient) and, with
    `mechanism`, one eval step with the mechanism metrics; policy != reference, 8 pairs
    and 2 masked filler pairs in 2 micro-batches."""
    cfg = MODELS[arch]
    loss_cfg = loss_lib.preset(preset, beta=0.5)
    examples = {k: np.concatenate([pairs[k], pairs[k][:2]]) for k in KEYS}  # 10 pairs
    mask = np.array([1.0] * 8 + [0.0] * 2, np.float32)
    shared = records.trunk_lengths(*(examples[k] for k in KEYS))
    need = int(records.shared_row_lengths(examples["chosen_segments"],
                                          examples["rejected_segments"], shared).max())
    out = []
    for length in (0, need):
        trainer = train.Trainer(cfg, loss_cfg, grad_keeper(), ONE_DEVICE, chunk=8,
                                shared_length=length, mechanism=mechanism)
        params = jax.device_put(random_params(cfg, 0), trainer.param_shardings)
        ref = jax.device_put(random_params(cfg, 1), trainer.param_shardings)
        batch = trainer.make_batch(examples, 2, mask)
        sums = jax.device_get(trainer.eval_step(params, batch, ref)) if mechanism else None
        state, metrics = trainer.train_step(trainer.init_state(params), batch, ref)
        out.append((sums, jax.device_get(metrics), jax.device_get(state["opt_state"]["grad"])))
    return out, loss_cfg


def assert_same_step(results, loss_cfg):
    (s0, m0, g0), (s1, m1, g1) = results
    assert float(m0["pairs"]) == 8
    # Tokens run differ (that is the point); everything the loss or a log line reads agrees.
    assert float(m1["tokens"]) < float(m0["tokens"])
    if s0 is not None:
        e0, e1 = train.eval_metrics(s0, loss_cfg), train.eval_metrics(s1, loss_cfg)
        assert any(k.startswith("mech/") for k in e0)
        for k in e0:
            assert e1[k] == pytest.approx(e0[k], rel=RTOL, abs=RTOL), k
    # Absolute 1e-5 too: a margin of cancelling segment sums of tens of nats (the prefix
    # term) carries float32 rounding of those sums, not of the small result.
    for k in m0:
        if k != "tokens":
            np.testing.assert_allclose(m1[k], m0[k], rtol=RTOL, atol=RTOL, err_msg=k)
    leaves0, leaves1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    assert sum(float(np.abs(g).max()) for g in leaves0) > 1e-3  # a gradient to compare
    for a, b in zip(leaves1, leaves0):
        assert_close_at_scale(a, b, RTOL, axis=None, what="gradient")


# About a minute each on a loaded 2-core machine (four compiles); tests/fdpo/test_train.py
# runs the default layout's step against separate rows in the fast suite.
@pytest.mark.slow
@pytest.mark.parametrize("arch,preset", [("qwen2", "focused_dpo"), ("llama", "tdpo2")])
def test_trunk_rows_give_the_same_step_and_mechanism_metrics(arch, preset, pairs):
    assert_same_step(*step_both_ways(arch, preset, pairs, mechanism=True))


# The presets on one architecture: a preset changes only how the loss weighs the segment
# sums the layout gives, while what the layout changes in the model (positions, the branch
# mask, grouped vs single KV heads, rope types) is covered per architecture above. One
# preset per kind of input the loss reads from the layout: per-segment sums at one weight
# (dpo), the NLL and its token count (sft, dpo_nll), the DPOP penalty (dpop), per-side
# token counts (ipo_length_norm) and token-level KL (tdpo1). focused_dpo (non-uniform
# weights) and tdpo2 run above; mid_only and target_dpo_like are weight tables only, as
# focused_dpo is. Each preset costs two compiles (~12 s on a loaded 2-core machine).
LAYOUT_PRESETS = ("dpo", "sft", "dpo_nll", "dpop", "ipo_length_norm", "tdpo1")


def test_the_layout_presets_cover_every_preset_by_kind():
    assert set(LAYOUT_PRESETS) | {"focused_dpo", "tdpo2", "mid_only", "target_dpo_like"} \
        == set(PRESETS)


@pytest.mark.slow
@pytest.mark.parametrize("preset", LAYOUT_PRESETS)
def test_trunk_rows_give_the_same_step_for_every_preset(preset, pairs):
    assert_same_step(*step_both_ways("qwen2", preset, pairs, mechanism=False))


@pytest.mark.parametrize("arch", ["qwen2", pytest.param("llama", marks=pytest.mark.slow)])
def test_remat_gives_the_same_trunk_step(arch, pairs):
    """`model.remat_policy="full"` (configs/focused_dpo.py's default: each decoder layer
    recomputed in the backward instead of its activations kept, docs/training.md "Memory")
    on trunk rows, whose branch mask and positions enter every layer: loss, metrics and
    gradient equal the step without remat to 1e-5 (policy != reference, two
    micro-batches). `dots` is covered on separate rows (tests/fdpo/test_train.py) and in
    the model's gradient (tests/fdpo/test_models.py)."""
    examples = {k: pairs[k] for k in KEYS}
    need = int(records.shared_row_lengths(
        examples["chosen_segments"], examples["rejected_segments"],
        records.trunk_lengths(*(examples[k] for k in KEYS))).max())
    out = {}
    for policy in ("none", "full"):
        cfg = MODELS[arch].replace(remat_policy=policy)
        trainer = train.Trainer(cfg, loss_lib.preset("focused_dpo", beta=0.5), grad_keeper(),
                                ONE_DEVICE, chunk=8, shared_length=need)
        params = jax.device_put(random_params(cfg, 0), trainer.param_shardings)
        ref = jax.device_put(random_params(cfg, 1), trainer.param_shardings)
        state, metrics = trainer.train_step(trainer.init_state(params),
                                            trainer.make_batch(examples, 2), ref)
        out[policy] = jax.device_get((metrics, state["opt_state"]["grad"]))
    m0, g0 = out.pop("none")
    assert sum(float(np.abs(g).max()) for g in jax.tree.leaves(g0)) > 1e-3
    for policy, (m1, g1) in out.items():
        for k in m0:
            np.testing.assert_allclose(m1[k], m0[k], rtol=RTOL, atol=RTOL,
                                       err_msg=f"{policy}: {k}")
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
            assert_close_at_scale(a, b, RTOL, axis=None, what=f"{policy}: gradient")


def test_loader_packed_batches_equal_host_packed_ones(pairs, tmp_path):
    """`data.train_dataset(shared_length=S)` packs in the loader; the trainer then uses the
    packed rows as they are, and its batch equals the one it packs itself."""
    from fdpo import data
    from fdpo.testing import write_dataset

    recs = random_pairs(8, LENGTH, vocab=211, seed=7,
                        lengths=((2, 6), (0, 8), (1, 4), (0, 4), (0, 5)))
    src = records.PairDataSource.from_manifest(
        write_dataset(tmp_path / "data", {"train": recs}), "train")
    S = data.longest_shared_row(src)
    trainer = train.Trainer(MODELS["qwen2"], loss_lib.preset("dpo"), optax.sgd(0.1),
                            ONE_DEVICE, shared_length=S)
    plain = data.train_dataset(src, global_batch=4, seed=0)[0]
    packed = data.train_dataset(src, global_batch=4, seed=0, shared_length=S)[0]
    assert set(records.SHARED_KEYS) <= set(packed) and "ids" not in plain
    a, b = trainer.make_batch(packed, 2), trainer.make_batch(plain, 2)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    with pytest.raises(ValueError, match="packed rows of"):
        train.Trainer(MODELS["qwen2"], loss_lib.preset("dpo"), optax.sgd(0.1), ONE_DEVICE,
                      shared_length=S + 1).make_batch(packed, 2)


def test_train_loop_packs_in_the_loader_with_the_losses_of_separate_rows(tmp_path,
                                                                        monkeypatch):
    """`fdpo.train_loop` (what launch.train runs) learns the row length before it builds the
    loader, so the loader packs the trunk rows and the step's host code never does; the
    run's logged losses equal those of a run on separate chosen/rejected rows."""
    import json

    from configs import focused_dpo
    from fdpo import data, train_loop
    from fdpo.models import checkpoint
    from fdpo.testing import write_dataset

    ckpt = checkpoint.init_random(tmp_path / "ckpt", fields={"vocab_size": 211})
    recs = random_pairs(16, LENGTH, vocab=211, seed=9,
                        lengths=((2, 6), (0, 8), (1, 4), (0, 4), (0, 5)))
    write_dataset(tmp_path / "data", {"train": recs})

    def losses(shared: bool) -> list[float]:
        c = focused_dpo.get_config(f"model={ckpt},data={tmp_path / 'data'},runlocal")
        c.train.num_steps, c.train.micro_batches = 3, 2
        c.train.shared_prompt = shared
        c.log.mechanism, c.log.tensorboard, c.checkpoint.use_async = False, False, False
        workdir = tmp_path / f"shared={shared}"
        run = train_loop.TrainRun(c, workdir, ONE_DEVICE, handle_sigterm=False)
        if shared:
            assert run.trainer.shared_length == data.longest_shared_row(run.train_src)
        # The default response_capacity=-1: the LM head sees only the data's most scored
        # positions per row; with trunk rows and this loss (Focused-DPO: the trunk's
        # log-probs cancel), the trunk's apart, outside the gradient.
        most = data.row_extents(run.train_src, shared=shared)
        assert run.loss_cfg.trunk_cancels
        capacities = (run.trainer.response_capacity, run.trainer.trunk_capacity)
        assert capacities == ((most.branches, most.trunk) if shared else (most.scored, 0))
        assert min(capacities) > 0 if shared else capacities[0] > 0
        run.train()
        lines = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
        return [m["loss"] for m in sorted(lines, key=lambda m: m["step"])
                if m["split"] == "train"]

    def no_host_packing(*args, **kwargs):
        raise AssertionError("the train step's host code packed rows")

    monkeypatch.setattr(train, "pack_shared_prompt", no_host_packing)
    shared = losses(True)
    separate = losses(False)
    assert len(shared) == 3
    np.testing.assert_allclose(shared, separate, rtol=RTOL)
