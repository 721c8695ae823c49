"""Per-token log-probabilities, in float32, without materialising [batch, length, vocab].

`lp[b, t] = log p(x[b, t] | x[b, <t])` for t >= 1; `lp[b, 0] = 0` (the first token has no
context). Log-softmax is always taken in float32: in bfloat16 it is wrong often enough
to move DPO rewards.

The chunked path computes logits for at most `chunk` positions at a time (balanced chunks:
`chunk_plan`) from the final hidden states and the unembedding, under `jax.checkpoint`
(`recompute=True`), so the forward and the backward pass both hold at most
[batch, chunk, vocab] logits; the backward computes each chunk's logits again.
`recompute=False` keeps every chunk's softmax for the backward instead: no second
unembedding product, but [batch, length, vocab] float32 held.

`scored_positions` picks the positions a loss reads (response tokens) before the
unembedding, so prompt and padding positions never reach the LM head.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def token_logprobs(logits: Array, input_ids: Array) -> Array:
    """Naive reference: logits [B, T, V] of the model on input_ids [B, T] -> lp [B, T]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (1, 0)))


def token_logprobs_from_hidden(hidden: Array, unembedding: Array, input_ids: Array,
                               chunk: int = 256, recompute: bool = True) -> Array:
    """hidden [B, T, D] (final-normed), unembedding [V, D], input_ids [B, T] -> lp [B, T]."""
    lp = target_logprobs(hidden[:, :-1], unembedding, input_ids[:, 1:], chunk, recompute)
    return jnp.pad(lp, ((0, 0), (1, 0)))


def scored_positions(scored: Array, capacity: int) -> tuple[Array, Array]:
    """scored [B, T] bool -> (index, valid), int32 / bool [B, capacity]: the first `capacity`
    scored positions of each row in order, then (valid False) unscored ones as filler.

    A row with more than `capacity` scored positions loses the rest: callers check the
    count on the host (`fdpo.train.Trainer.make_batch`) before a batch gets here.
    """
    # A stable sort on "not scored" puts the scored positions first, in their order.
    index = jnp.argsort(jnp.logical_not(scored).astype(jnp.int8), axis=1, stable=True)
    index = index[:, :capacity].astype(jnp.int32)
    return index, jnp.take_along_axis(scored, index, axis=1)


def target_logprobs(hidden: Array, unembedding: Array, targets: Array,
                    chunk: int = 256, recompute: bool = True) -> Array:
    """log p(targets[b, t] | hidden[b, t]) [B, T]: each hidden state scores the token at the
    same index (the caller aligns them: shifted by one for a plain sequence, gathered for
    shared-prompt rows whose branches do not follow each other)."""
    w = unembedding.astype(hidden.dtype)

    def one_chunk(hc, tc):
        logits = jnp.einsum("bcd,vd->bcv", hc, w).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return (picked - jax.nn.logsumexp(logits, axis=-1),)

    return _by_chunks(one_chunk, (hidden, targets), chunk, recompute)[0]


def target_logprobs_and_kl(hidden: Array, unembedding: Array, ref_hidden: Array,
                           ref_unembedding: Array, targets: Array,
                           chunk: int = 256, recompute: bool = True
                           ) -> tuple[Array, Array, Array]:
    """Policy and reference scoring the same targets, chunk by chunk -> (lp, ref_lp, kl),
    each [B, T] float32, with

        kl[b, t] = sum_v p_ref(v | h_ref[b, t]) (log p_ref(v | h_ref[b, t]) - log p(v | h[b, t]))

    the per-position KL(p_ref || p_theta) of Token-level DPO (Zeng et al. 2024, eq. for
    D_SeqKL). Both log-softmaxes of a chunk are taken side by side in float32 under
    `jax.checkpoint`, so neither pass holds more than [B, chunk, V] logits of each model.
    The reference side is under `stop_gradient`: it is frozen.
    """
    w = unembedding.astype(hidden.dtype)
    ref_hidden = jax.lax.stop_gradient(ref_hidden)
    rw = jax.lax.stop_gradient(ref_unembedding).astype(ref_hidden.dtype)

    def one_chunk(hc, rc, tc):
        logits = jnp.einsum("bcd,vd->bcv", hc, w).astype(jnp.float32)
        ref_logits = jnp.einsum("bcd,vd->bcv", rc, rw).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        ref_lse = jax.nn.logsumexp(ref_logits, axis=-1)
        # sum_v p_ref (log p_ref - log p) with the two log-normalisers taken out of the sum
        # (sum_v p_ref = 1): no log-softmax tensor of either model is kept, which holds the
        # chunk's value-and-grad at 1.33x DPO's instead of 1.77x (benchmarks/bench_train.py).
        p_ref = jnp.exp(ref_logits - ref_lse[..., None])
        kl = jnp.sum(p_ref * (ref_logits - logits), axis=-1) + lse - ref_lse
        pick = lambda x: jnp.take_along_axis(x, tc[..., None], axis=-1)[..., 0]  # noqa: E731
        return pick(logits) - lse, pick(ref_logits) - ref_lse, kl

    return _by_chunks(one_chunk, (hidden, ref_hidden, targets), chunk, recompute)


def _by_chunks(fn, arrays: Sequence[Array], chunk: int,
               recompute: bool = True) -> tuple[Array, ...]:
    """fn over slices [B, chunk, ...] of the arrays' axis 1 (all [B, T, ...]), each call under
    `jax.checkpoint` (unless not `recompute`) and walked by `lax.map`; fn returns a tuple of
    [B, chunk] arrays, and the result is their [B, T] concatenations (the tail is padded,
    then cut).

    The chunks are balanced: as few as `chunk` allows, of equal size, so the padding is
    less than one position per chunk (534 positions in chunks of at most 256 are 3 x 178,
    not 3 x 256: every padded position costs a full row of the unembedding)."""
    b, n = arrays[0].shape[:2]
    num_chunks, chunk = chunk_plan(n, chunk)
    pad = num_chunks * chunk - n

    def split(x):  # [num_chunks, B, chunk, ...] so lax.map walks the sequence
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape((b, num_chunks, chunk) + x.shape[2:]).swapaxes(0, 1)

    body = lambda args: fn(*args)  # noqa: E731
    outs = jax.lax.map(jax.checkpoint(body) if recompute else body, tuple(map(split, arrays)))
    return tuple(o.swapaxes(0, 1).reshape(b, num_chunks * chunk)[:, :n] for o in outs)


def chunk_plan(n: int, chunk: int) -> tuple[int, int]:
    """(number of chunks, positions per chunk) for `n` positions in chunks of at most
    `chunk`: the fewest chunks, balanced (`_by_chunks`)."""
    num_chunks = max(1, -(-n // max(1, chunk)))
    return num_chunks, max(1, -(-n // num_chunks))


def segment_sums(lp: Array, labels: Array, values: Sequence[int]) -> Array:
    """lp [N, T], labels [N, T] -> [N, len(values)]: column k sums lp over the tokens labelled
    values[k], in float32. Tokens with any other label are multiplied by exactly 0."""
    one_hot = (labels[..., None] == jnp.asarray([int(v) for v in values], labels.dtype))
    return jnp.einsum("nt,nts->ns", lp.astype(jnp.float32), one_hot.astype(jnp.float32))
