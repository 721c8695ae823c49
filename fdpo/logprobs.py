"""Per-token log-probabilities, in float32, without materialising [batch, length, vocab].

`lp[b, t] = log p(x[b, t] | x[b, <t])` for t >= 1; `lp[b, 0] = 0` (the first token has no
context). Log-softmax is always taken in float32: in bfloat16 it is wrong often enough
to move DPO rewards.

The chunked path computes logits for `chunk` positions at a time from the final hidden
states and the unembedding, under `jax.checkpoint`, so the forward and the backward pass
both hold at most [batch, chunk, vocab] logits.
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
                               chunk: int = 256) -> Array:
    """hidden [B, T, D] (final-normed), unembedding [V, D], input_ids [B, T] -> lp [B, T]."""
    lp = target_logprobs(hidden[:, :-1], unembedding, input_ids[:, 1:], chunk)
    return jnp.pad(lp, ((0, 0), (1, 0)))


def target_logprobs(hidden: Array, unembedding: Array, targets: Array,
                    chunk: int = 256) -> Array:
    """log p(targets[b, t] | hidden[b, t]) [B, T]: each hidden state scores the token at the
    same index (the caller aligns them: shifted by one for a plain sequence, gathered for
    shared-prompt rows whose branches do not follow each other)."""
    b, n, d = hidden.shape
    chunk = max(1, min(chunk, n))
    pad = (-n) % chunk
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    num_chunks = (n + pad) // chunk
    # [num_chunks, B, chunk, ...] so lax.map walks the sequence.
    h = h.reshape(b, num_chunks, chunk, d).swapaxes(0, 1)
    targets = targets.reshape(b, num_chunks, chunk).swapaxes(0, 1)
    w = unembedding.astype(hidden.dtype)

    @jax.checkpoint
    def one_chunk(args):
        hc, tc = args
        logits = jnp.einsum("bcd,vd->bcv", hc, w).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    lp = jax.lax.map(one_chunk, (h, targets))  # [num_chunks, B, chunk]
    return lp.swapaxes(0, 1).reshape(b, num_chunks * chunk)[:, :n]


def segment_sums(lp: Array, labels: Array, values: Sequence[int]) -> Array:
    """lp [N, T], labels [N, T] -> [N, len(values)]: column k sums lp over the tokens labelled
    values[k], in float32. Tokens with any other label are multiplied by exactly 0."""
    one_hot = (labels[..., None] == jnp.asarray([int(v) for v in values], labels.dtype))
    return jnp.einsum("nt,nts->ns", lp.astype(jnp.float32), one_hot.astype(jnp.float32))
