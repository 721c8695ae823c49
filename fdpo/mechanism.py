"""Mechanism metrics: what a preference loss does to the policy, measured on validation
pairs during training, unweighted (the same quantities for every loss preset), so that
arms can be compared on why they differ and not only on pass@1 (docs/training.md,
"Mechanism metrics").

Per pair, with S [2, 5] the per-segment log-prob sums of (chosen, rejected) x (prefix, mid,
suffix, lead, trail), for the policy and the reference:

    dlogp[side, seg]  = S_pi[side, seg] - S_ref[side, seg]        (displacement when < 0)
    first margin      = z(y_c at d) - z(y_r at d)                 (policy and reference)
    kl[side, seg]     = sum over seg's tokens of KL(p_ref(. | ctx_t) || p_pi(. | ctx_t))

where d is the first response position after the common prefix (the first divergent token:
each side's first MID token, or its first token after an empty mid) and z the logits at
that position, both tokens scored from the *chosen* side's context (the common context
when the two sides share prompt, lead and prefix; for instruct pairs whose leads differ it
is the chosen side's). The logit difference equals the log-prob difference of the two
tokens there (the normaliser cancels). A pair with no token after the prefix on one side
(a response that ends with the prefix: impossible with an EOS) is left out of the margin
means and counted out in `mech/first_margin/pairs`.

The gradient share: with the loss L a function of the policy's per-segment sums S_pi (and,
for TDPO, of the KL sums K), the chain rule splits its gradient into a part through the
mid tokens and a part through every other response token,

    g = sum_seg dL/dS_seg grad S_seg = g_mid + g_other,

each computed by `jax.grad` of L with the other part's sums under `stop_gradient` (a
segment's sum depends on the parameters only through its own tokens' log-probs, so
stopping a column stops exactly those tokens). The share is
||g_mid|| / (||g_mid|| + ||g_other||), in [0, 1] even when the two parts cancel (their
cosine is logged beside it); ||g_mid|| / ||g|| would exceed 1 then.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fdpo import logprobs
from fdpo import loss as loss_lib
from fdpo import sharding as shd
from fdpo.records import Segment, side_labels

Array = jax.Array
SIDES = ("chosen", "rejected")
# The labels a response token can carry after its common prefix: the first of them on each
# side is that side's first divergent token.
AFTER_PREFIX = (int(Segment.MID), int(Segment.SUFFIX), int(Segment.TRAIL))
MID = loss_lib.SEGMENT_NAMES.index("mid")
# Families of `mech/...` names (the report draws one figure per family).
FAMILIES = ("dlogp", "dlogp_per_token", "first_margin", "kl", "grad")


def pair_pass(graphdef, params, ref_params, micro: dict[str, Array], chunk: int,
              shared: bool) -> dict[str, Array]:
    """The policy (and the frozen reference, unless ref_params is None) on a micro-batch of
    pairs, in either layout (`fdpo.train`: separate rows or shared rows), in one
    chunked pass -> dict of

        policy, reference, kl   [b, 2, 5]  per side x segment sums (reference, kl: frozen
                                           reference only)
        tokens                  [b, 2, 5]  token counts
        first_policy, first_reference  [b, 2]  logits of (chosen, rejected) first divergent
                                           token at the chosen side's context
        first_found             [b]        1 where both sides have a token after the prefix
    """
    model = nnx.merge(graphdef, params)
    ref = None if ref_params is None else nnx.merge(graphdef,
                                                    jax.lax.stop_gradient(ref_params))
    pad = int(Segment.PAD)
    if shared:
        ids = shd.constrain(micro["ids"], ("batch", "length"))
        labels, branch = micro["labels"], micro["branch"]
        b = ids.shape[0]
        real = (labels != pad).astype(jnp.int32)

        def states_of(m):  # [b, S, D]: the hidden state that scores each token
            hidden = m(ids, micro["positions"], real, branch, return_hidden=True)
            return jnp.take_along_axis(hidden, micro["parents"][..., None], axis=1)

        targets = ids
        # The trunk's tokens (prompt, common prefix) count for both sides.
        sides = jnp.stack([side_labels(labels, branch, k) for k in (1, 2)], 1)
        to_sides = lambda x: jnp.broadcast_to(x[:, None], sides.shape)  # noqa: E731
        chosen_rows = rejected_rows = lambda x: x  # noqa: E731
    else:
        b, length = micro["chosen_ids"].shape
        ids = jnp.stack([micro["chosen_ids"], micro["rejected_ids"]], 1).reshape(2 * b, length)
        ids = shd.constrain(ids, ("batch", "length"))

        def states_of(m):  # position t scores token t + 1
            return m(ids, return_hidden=True)[:, :-1]

        targets = ids[:, 1:]
        sides = jnp.stack([micro["chosen_segments"], micro["rejected_segments"]], 1)[..., 1:]
        to_sides = lambda x: x.reshape((b, 2) + x.shape[1:])  # noqa: E731
        chosen_rows = lambda x: to_sides(x)[:, 0]  # noqa: E731
        rejected_rows = lambda x: to_sides(x)[:, 1]  # noqa: E731

    hidden = states_of(model)
    out: dict[str, Array] = {}
    if ref is None:
        lp = logprobs.target_logprobs(hidden, model.unembedding(), targets, chunk)
        per_token = {"policy": lp}
    else:
        ref_hidden = states_of(ref)
        lp, ref_lp, kl = logprobs.target_logprobs_and_kl(
            hidden, model.unembedding(), ref_hidden, ref.unembedding(), targets, chunk)
        per_token = {"policy": lp, "reference": ref_lp, "kl": kl}
    flat_sides = sides.reshape(2 * b, -1)
    for name, x in per_token.items():
        out[name] = loss_lib.response_segment_sums(
            to_sides(x).reshape(2 * b, -1), flat_sides).reshape(b, 2, -1)
    out["tokens"] = loss_lib.response_segment_sums(
        jnp.ones(flat_sides.shape, jnp.float32), flat_sides).reshape(b, 2, -1)

    after = jnp.isin(sides, jnp.asarray(AFTER_PREFIX, sides.dtype))  # [b, 2, T]
    out["first_found"] = after.any(-1).all(-1).astype(jnp.float32)
    first = jnp.argmax(after, axis=-1)  # [b, 2]; 0 where not found (masked by first_found)
    pick = lambda x, i: jnp.take_along_axis(x, i[:, None], axis=1)[:, 0]  # noqa: E731
    tokens = jnp.stack([pick(chosen_rows(targets), first[:, 0]),
                        pick(rejected_rows(targets), first[:, 1])], -1)  # [b, 2]

    def first_logits(m, states):
        state = jnp.take_along_axis(chosen_rows(states), first[:, 0, None, None], axis=1)[:, 0]
        rows = jnp.take(m.unembedding(), tokens, axis=0)  # [b, 2, D]
        return jnp.einsum("bd,bkd->bk", state.astype(jnp.float32), rows.astype(jnp.float32))

    out["first_policy"] = first_logits(model, hidden)
    if ref is not None:
        out["first_reference"] = first_logits(ref, ref_hidden)
    return out


def pair_terms(out: dict[str, Array], reference: Array | None) -> dict[str, Array]:
    """Per-pair mechanism terms ([b] or [b, 2, 5]) of a `pair_pass` output; `reference`
    [b, 2, 5]: the reference's sums (the frozen model's, or precomputed `ref_logps`), None
    when there is none. Summed over pairs by `fdpo.loss.masked_sums`, named `mech_*`."""
    found = out["first_found"]
    terms = {"mech_tokens": out["tokens"], "mech_first_found": found}
    margin = lambda z: found * (z[:, 0] - z[:, 1])  # noqa: E731
    terms["mech_first_policy"] = margin(out["first_policy"])
    if reference is not None:
        terms["mech_dlogp"] = (out["policy"].astype(jnp.float32) -
                               reference.astype(jnp.float32))
    if "first_reference" in out:
        terms["mech_first_reference"] = margin(out["first_reference"])
    if "kl" in out:
        terms["mech_kl"] = out["kl"]
    return terms


def means(sums: dict, num_pairs) -> dict[str, Array]:
    """`mech/...` means from the `mech_*` sums (added over eval batches): per pair, and the
    log-prob change per token as total change / total tokens of the segment."""
    n = jnp.maximum(num_pairs, 1.0)
    out = {}
    if "mech_dlogp" in sums:
        d, tokens = sums["mech_dlogp"], sums["mech_tokens"]
        for s, side in enumerate(SIDES):
            out[f"mech/dlogp/{side}"] = d[s].sum() / n
            out[f"mech/dlogp_per_token/{side}"] = d[s].sum() / jnp.maximum(tokens[s].sum(), 1.0)
            for i, seg in enumerate(loss_lib.SEGMENT_NAMES):
                out[f"mech/dlogp/{side}_{seg}"] = d[s, i] / n
                out[f"mech/dlogp_per_token/{side}_{seg}"] = d[s, i] / jnp.maximum(tokens[s, i],
                                                                                  1.0)
    found = sums["mech_first_found"]
    m = jnp.maximum(found, 1.0)
    out["mech/first_margin/pairs"] = found
    out["mech/first_margin/policy"] = sums["mech_first_policy"] / m
    if "mech_first_reference" in sums:
        out["mech/first_margin/reference"] = sums["mech_first_reference"] / m
        out["mech/first_margin/change"] = (sums["mech_first_policy"] -
                                           sums["mech_first_reference"]) / m
    if "mech_kl" in sums:
        for s, side in enumerate(SIDES):
            out[f"mech/kl/{side}"] = sums["mech_kl"][s].sum() / n
            for i, seg in enumerate(loss_lib.SEGMENT_NAMES):
                out[f"mech/kl/{side}_{seg}"] = sums["mech_kl"][s, i] / n
    return out


def through_segments(x: Array | None, keep: Array) -> Array | None:
    """x [..., 5] per-segment sums with the gradient kept only through the segments where
    keep [5] is true (the others under `stop_gradient`)."""
    if x is None:
        return None
    return jnp.where(keep, x, jax.lax.stop_gradient(x))


def grad_share(g_mid, g_other) -> dict[str, Array]:
    """The logged gradient-share scalars from the two parts of the gradient (pytrees)."""
    n_mid, n_other = (jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(g)))
                      for g in (g_mid, g_other))
    dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g_mid), jax.tree.leaves(g_other)))
    total = jnp.sqrt(jnp.maximum(n_mid ** 2 + n_other ** 2 + 2 * dot, 0.0))
    tiny = jnp.finfo(jnp.float32).tiny
    return {"mech/grad/share_mid": n_mid / jnp.maximum(n_mid + n_other, tiny),
            "mech/grad/norm_mid": n_mid, "mech/grad/norm_other": n_other,
            "mech/grad/norm": total,
            "mech/grad/cos_mid_other": dot / jnp.maximum(n_mid * n_other, tiny)}
