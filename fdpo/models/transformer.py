"""The decoder of Qwen2 (Qwen2.5-Coder) and Llama (DeepSeek-Coder), in Flax NNX.

Read it next to transformers' `modeling_qwen2.py` and `modeling_llama.py`: the blocks are
the same; the two architectures differ only in the config flags `qkv_bias`, `o_bias`,
`tie_embeddings` and the rope settings (see `config.py`).

Layout choices:
- The layers' parameters are stacked on a leading `layers` axis (one `Block` holds all of
  them). `scan_layers=True` runs them with `jax.lax.scan` (one compiled block, fast
  compiles); `False` unrolls a Python loop over the same arrays. The checkpoint layout is
  the same either way.
- Projection kernels keep the head axis apart (`q: [embed, heads, head_dim]`), so heads can
  be sharded without reshapes. The unembedding is `[vocab, embed]`, like the embedding.
- Rotary embeddings use HF's half-split layout (`rotate_half`), so converted q/k weights
  need no permutation.

Attention structure is explicit, for packed batches and shared-prefix pairs: token i
attends to token j iff `segment_ids` match, j <= i, and `branch_ids[j]` is 0 (the shared
trunk) or equals `branch_ids[i]`. Positions are passed in, so the second branch can
continue from the trunk. `ModelConfig.attention` picks how that masked attention is computed
without a cache: explicit einsums ("einsum"), or `jax.nn.dot_product_attention` with XLA's
("dot_product") or cuDNN's ("cudnn") implementation, under the same mask.

KV cache (sampling): `Decoder.__call__(..., cache=KVCache)` lets the given tokens attend to
the cached slots before `cache.index` and causally to each other, then writes their keys
and values at `cache.index` and returns `(logits, new_cache)`. Inside the layer scan the
cache is only read; the one write after the scan updates the buffer in place. Each row
may hold a left-padded prompt: a slot is visible to a query iff their segment ids match
(pads carry segment 0, real tokens 1). `cache_window` (static) limits the slots read to
the first `cache_window`: a decode step then costs what the filled part of the cache
costs, not the whole buffer (the sampler grows the window as the cache fills). Without a
cache the forward is the training path, unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fdpo import sharding
from fdpo.models.config import ModelConfig

Array = jax.Array


def _dtype(name: str):
    return jnp.dtype(name)


def _param(rngs: nnx.Rngs, shape, axes, dtype, init="normal"):
    if init == "normal":  # transformers' initializer_range default
        value = 0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


# ----------------------------------------------------------------------------------------
# Building blocks. Parameters of a Block have a leading `layers` axis; inside the forward
# each module sees one layer's slice.
# ----------------------------------------------------------------------------------------


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    # As HF: normalise in float32, cast back to the input dtype, then scale.
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * x32.astype(x.dtype)


def rope_tables(positions: Array, head_dim: int, theta: float, factor: float):
    """cos, sin of shape [batch, length, head_dim] for HF's half-split rotary layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    inv_freq = inv_freq / factor  # linear scaling; factor is 1.0 for "default"
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x: [batch, length, heads, head_dim]; cos, sin: [batch, length, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def attention_mask(segment_ids: Array, branch_ids: Array) -> Array:
    """[batch, length, length] bool: may query i attend to key j."""
    length = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    key_branch = branch_ids[:, None, :]
    same_branch = (key_branch == 0) | (key_branch == branch_ids[:, :, None])
    return causal[None] & same_segment & same_branch


class KVCache(NamedTuple):
    """Keys and values of every layer for `max_len` slots per row.

    k: [layers, batch, kv_heads, head_dim, max_len], v: [layers, batch, kv_heads, max_len,
    head_dim] (stacked like the layers' params). Keys are stored transposed so that both
    attention products are plain matrix products per (row, head): on XLA:CPU the scores
    product ran 2.2x faster than against [max_len, head_dim] keys (measured, decode step);
    segment_ids: int32 [batch, max_len], 0 for slots not (yet) holding a real token;
    index: int32 scalar, the next slot to write (the same for every row).
    """
    k: Array
    v: Array
    segment_ids: Array
    index: Array

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int) -> KVCache:
        dtype = _dtype(cfg.compute_dtype)
        lead = (cfg.num_layers, batch, cfg.num_kv_heads)
        k = sharding.constrain(jnp.zeros(lead + (cfg.head_dim, max_len), dtype), K_CACHE_AXES)
        v = sharding.constrain(jnp.zeros(lead + (max_len, cfg.head_dim), dtype), V_CACHE_AXES)
        return cls(k, v, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


K_CACHE_AXES = ("layers", "batch", "act_heads", None, "length")
V_CACHE_AXES = ("layers", "batch", "act_heads", "length", None)


def cache_attention_mask(segment_ids: Array, cache_segment_ids: Array, index: Array) -> Array:
    """[batch, length, max_len] bool: may a new token attend to cache slot j (j < index)."""
    filled = jnp.arange(cache_segment_ids.shape[1]) < index
    return filled[None, None] & (segment_ids[:, :, None] == cache_segment_ids[:, None, :])


class RMSNorm(nnx.Module):

    def __init__(self, cfg: ModelConfig, stack: tuple[int, ...], rngs: nnx.Rngs):
        axes = ("layers",) * len(stack) + ("norm",)
        self.scale = _param(rngs, stack + (cfg.hidden_size,), axes, _dtype(cfg.param_dtype),
                            init="ones")
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.scale[...], self.eps)


class Attention(nnx.Module):

    def __init__(self, cfg: ModelConfig, stack: tuple[int, ...], rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        pd = _dtype(cfg.param_dtype)
        lay = ("layers",) * len(stack)
        self.q_kernel = _param(rngs, stack + (d, h, hd), lay + ("embed", "heads", "head_dim"), pd)
        self.k_kernel = _param(rngs, stack + (d, kv, hd), lay + ("embed", "kv_heads", "head_dim"),
                               pd)
        self.v_kernel = _param(rngs, stack + (d, kv, hd), lay + ("embed", "kv_heads", "head_dim"),
                               pd)
        self.o_kernel = _param(rngs, stack + (h, hd, d), lay + ("heads", "head_dim", "embed"), pd)
        if cfg.qkv_bias:  # Qwen2 always; Llama with attention_bias
            self.q_bias = _param(rngs, stack + (h, hd), lay + ("heads", "head_dim"), pd, "zeros")
            self.k_bias = _param(rngs, stack + (kv, hd), lay + ("kv_heads", "head_dim"), pd,
                                 "zeros")
            self.v_bias = _param(rngs, stack + (kv, hd), lay + ("kv_heads", "head_dim"), pd,
                                 "zeros")
        if cfg.o_bias:  # never in Qwen2
            self.o_bias = _param(rngs, stack + (d,), lay + ("embed",), pd, "zeros")

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array,
                 kv_cache: tuple[Array, Array] | None = None, cache_mask: Array | None = None):
        """Self-attention over x (`mask`: [batch, length, length]) -> [batch, length, embed].

        With `kv_cache` = this layer's cached (k, v) in KVCache's layout without the layer
        axis, the queries also attend to the cached slots `cache_mask` [batch, length,
        max_len] allows, in one softmax; returns (output, (k, v) of x's tokens in the same
        layout) for the caller to store.
        """
        cfg = self.cfg
        cd = x.dtype

        def project(kernel, bias_name):
            y = jnp.einsum("btd,dhk->bthk", x, kernel[...].astype(cd))
            if hasattr(self, bias_name):
                y = y + getattr(self, bias_name)[...].astype(cd)
            return y

        q = apply_rope(project(self.q_kernel, "q_bias"), cos, sin)
        k = apply_rope(project(self.k_kernel, "k_bias"), cos, sin)
        v = project(self.v_kernel, "v_bias")

        b, t, _, hd = q.shape
        if kv_cache is None and cfg.attention != "einsum":
            with jax.named_scope("dot_product_attention"):
                out = _library_attention(q, k, v, mask, cfg.attention, cfg.attention_block)
        else:
            # Grouped-query attention: query heads are [kv_heads, group].
            group = cfg.num_heads // cfg.num_kv_heads
            q = q.reshape(b, t, cfg.num_kv_heads, group, hd)
            scale = jnp.sqrt(jnp.float32(hd))
            if kv_cache is not None:
                out = _cached_attention(q, k, v, mask, kv_cache, cache_mask, scale)
            else:
                with jax.named_scope("einsum_attention"):
                    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / scale
                    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
                    probs = jax.nn.softmax(scores, axis=-1).astype(cd)
                    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
        out = out.reshape(b, t, cfg.num_heads, hd)
        out = jnp.einsum("bthk,hkd->btd", out, self.o_kernel[...].astype(cd))
        if cfg.o_bias:
            out = out + self.o_bias[...].astype(cd)
        return out if kv_cache is None else (out, (k.transpose(0, 2, 3, 1), v.swapaxes(1, 2)))


def _library_attention(q: Array, k: Array, v: Array, mask: Array, impl: str,
                       block: int = 0) -> Array:
    """`jax.nn.dot_product_attention` of q [b, t, heads, d] over k, v [b, t, kv_heads, d]
    under `mask` [b, t, t] -> [b, t, heads, d]; impl "dot_product" (XLA) or "cudnn".

    Query head h uses kv head h // (heads // kv_heads), as in the einsum path (the
    library's GQA grouping). The mask already holds the causal part; `is_causal` repeats it
    so that cuDNN can skip the blocks above the diagonal (it folds the boolean mask into an
    additive [b, 1, t, t] bias, one per row, not per head). Scores are float32 either way.

    `block` > 0 (XLA): queries in blocks of `block`, each under `jax.checkpoint` and walked
    by `lax.map`: XLA's implementation materialises every score, so this bounds them to
    [b, heads, block, t] in the forward and the backward (which recomputes a block's
    scores), for one more score product per block.
    """
    implementation = "xla" if impl == "dot_product" else impl
    b, t, h, d = q.shape
    if not block or block >= t:
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=True,
                                            implementation=implementation)
    pad = (-t) % block
    n = (t + pad) // block
    # Padded query rows see no key: their output is a finite average, cut below.
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, block, h, d)
    mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0))).reshape(b, n, block, t)

    def one(args):  # a block's causal part is in its mask (is_causal aligns T and S at 0)
        qb, mb = args
        return jax.nn.dot_product_attention(qb, k, v, mask=mb[:, None],
                                            implementation=implementation)

    out = jax.lax.map(jax.checkpoint(one), (q.swapaxes(0, 1), mask.swapaxes(0, 1)))
    return out.swapaxes(0, 1).reshape(b, n * block, h, d)[:, :t]


def _cached_attention(q: Array, k: Array, v: Array, mask: Array, kv_cache: tuple[Array, Array],
                      cache_mask: Array, scale: Array) -> Array:
    """Attention of new tokens q [b, t, kv, g, d] over the cached slots and over their own
    keys k, v [b, t, kv, d], in one softmax; -> [b, t, kv, g, d].

    Each (row, kv head) is one matrix product over rows (t, g) of queries: on XLA:CPU the
    per-batch-element products are ~2-3x faster in this layout than with t and g apart
    (measured on the decode step, where the cache products dominate).
    """
    b, t, kvh, g, d = q.shape
    cd = q.dtype
    k_cache, v_cache = (c.astype(cd) for c in kv_cache)  # [b, kv, d, slots], [b, kv, slots, d]
    rows = q.transpose(0, 2, 1, 3, 4).reshape(b, kvh, t * g, d)
    lowest = jnp.finfo(jnp.float32).min

    def masked(scores, allowed):  # [b, kv, t*g, n], allowed [b, t, n] -> [b, kv, t, g, n]
        scores = scores.reshape(b, kvh, t, g, -1).astype(jnp.float32) / scale
        return jnp.where(allowed[:, None, :, None], scores, lowest)

    cached = masked(jnp.einsum("bkqd,bkds->bkqs", rows, k_cache), cache_mask)
    own = masked(jnp.einsum("bkqd,bskd->bkqs", rows, k), mask)
    # One softmax over both parts without concatenating them (and slicing the result).
    top = jnp.maximum(cached.max(-1, keepdims=True), own.max(-1, keepdims=True))
    cached, own = jnp.exp(cached - top), jnp.exp(own - top)
    total = cached.sum(-1, keepdims=True) + own.sum(-1, keepdims=True)
    as_rows = lambda p: (p / total).astype(cd).reshape(b, kvh, t * g, -1)
    out = (jnp.einsum("bkqs,bksd->bkqd", as_rows(cached), v_cache) +
           jnp.einsum("bkqs,bskd->bkqd", as_rows(own), v))
    return out.reshape(b, kvh, t, g, d).transpose(0, 2, 1, 3, 4)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, stack: tuple[int, ...], rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        pd = _dtype(cfg.param_dtype)
        lay = ("layers",) * len(stack)
        self.gate_kernel = _param(rngs, stack + (d, f), lay + ("embed", "mlp"), pd)
        self.up_kernel = _param(rngs, stack + (d, f), lay + ("embed", "mlp"), pd)
        self.down_kernel = _param(rngs, stack + (f, d), lay + ("mlp", "embed"), pd)

    def __call__(self, x: Array) -> Array:
        cd = x.dtype
        gate = jnp.einsum("btd,df->btf", x, self.gate_kernel[...].astype(cd))
        up = jnp.einsum("btd,df->btf", x, self.up_kernel[...].astype(cd))
        hidden = sharding.constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return jnp.einsum("btf,fd->btd", hidden, self.down_kernel[...].astype(cd))


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, stack: tuple[int, ...], rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg, stack, rngs)
        self.attn = Attention(cfg, stack, rngs)
        self.mlp_norm = RMSNorm(cfg, stack, rngs)
        self.mlp = MLP(cfg, stack, rngs)

    def __call__(self, x: Array, cos: Array, sin: Array, mask: Array,
                 kv_cache: tuple[Array, Array] | None = None, cache_mask: Array | None = None):
        """Returns x, or (x, new (k, v) of x's tokens) with a `kv_cache` (see Attention)."""
        if kv_cache is None:
            x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        else:
            attn, new_kv = self.attn(self.attn_norm(x), cos, sin, mask, kv_cache, cache_mask)
            x = x + attn
        x = x + self.mlp(self.mlp_norm(x))
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        return x if kv_cache is None else (x, new_kv)


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Decoder(nnx.Module):
    """Token ids -> logits (or final hidden states)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = _dtype(cfg.param_dtype)
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
        self.layers = Block(cfg, (cfg.num_layers,), rngs)
        self.final_norm = RMSNorm(cfg, (), rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                  pd)

    def unembedding(self) -> Array:
        """[vocab, embed]: the lm_head, or the embedding when they are tied."""
        return (self.embed if self.cfg.tie_embeddings else self.lm_head)[...]

    def __call__(self, input_ids: Array, positions: Array | None = None,
                 segment_ids: Array | None = None, branch_ids: Array | None = None, *,
                 return_hidden: bool = False, cache: KVCache | None = None,
                 cache_window: int | None = None):
        """input_ids, positions, segment_ids, branch_ids: int [batch, length].

        Defaults: positions 0..length-1, one segment, no branches. Returns logits
        [batch, length, vocab] in the compute dtype, or the final-normed hidden states
        [batch, length, embed] with `return_hidden=True` (for chunked log-probs).

        With `cache` (sampling): the tokens occupy slots cache.index.. of every row, positions
        must be given (per row, they need not equal the slot), branch_ids must be None, and
        the result is `(logits or hidden, new_cache)` with the index advanced by length.
        `cache_window`: read only slots < cache_window; the caller guarantees
        cache.index <= cache_window (slots past the window are not seen, even if filled).
        """
        cfg = self.cfg
        cd = _dtype(cfg.compute_dtype)
        b, t = input_ids.shape
        if positions is None:
            if cache is not None:
                raise ValueError("a cached forward needs explicit positions")
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if cache is not None and branch_ids is not None:
            raise ValueError("branch_ids are not supported with a KV cache")
        if branch_ids is None:
            branch_ids = jnp.zeros((b, t), jnp.int32)
        mask = attention_mask(segment_ids, branch_ids)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_factor)

        # Gather from a table whose model dimension is whole on every device (FSDP gathers
        # parameters before use anyway); XLA otherwise falls back to full replication.
        table = sharding.constrain(self.embed[...], ("vocab", None))
        x = jnp.take(table, input_ids, axis=0).astype(cd)
        x = sharding.constrain(x, ("batch", "length", "act_embed"))

        graphdef, layer_state = nnx.split(self.layers)

        if cache is None:
            def one_layer(h, state):
                return nnx.merge(graphdef, state)(h, cos, sin, mask)

            if cfg.remat_policy != "none":
                one_layer = jax.checkpoint(one_layer, policy=_REMAT_POLICIES[cfg.remat_policy],
                                           prevent_cse=not cfg.scan_layers)
            if cfg.scan_layers:
                x, _ = jax.lax.scan(lambda h, s: (one_layer(h, s), None), x, layer_state)
            else:
                for i in range(cfg.num_layers):
                    x = one_layer(x, jax.tree.map(lambda a, i=i: a[i], layer_state))
        else:
            # The cache is only read in here (layer i's slice); the new tokens' keys and
            # values come out stacked and are written once, after the scan.
            max_len = cache.segment_ids.shape[1]
            window = max_len if cache_window is None else cache_window
            if not 0 < window <= max_len:
                raise ValueError(f"cache_window={cache_window}; the cache has {max_len} slots")
            cache_mask = cache_attention_mask(segment_ids, cache.segment_ids[:, :window],
                                              cache.index)

            def one_cached_layer(h, layer):
                state, k_cache, v_cache = layer
                return nnx.merge(graphdef, state)(
                    h, cos, sin, mask, (k_cache[..., :window], v_cache[:, :, :window]),
                    cache_mask)

            if cfg.scan_layers:
                x, (k_new, v_new) = jax.lax.scan(one_cached_layer, x,
                                                 (layer_state, cache.k, cache.v))
            else:
                new = []
                for i in range(cfg.num_layers):
                    x, kv = one_cached_layer(x, jax.tree.map(lambda a, i=i: a[i],
                                                             (layer_state, cache.k, cache.v)))
                    new.append(kv)
                k_new, v_new = (jnp.stack(a) for a in zip(*new))
            def write(buf, new, slot_axis, axes):
                start = [0] * buf.ndim
                start[slot_axis] = cache.index
                return sharding.constrain(
                    jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), start), axes)

            cache = KVCache(write(cache.k, k_new, 4, K_CACHE_AXES),
                            write(cache.v, v_new, 3, V_CACHE_AXES),
                            jax.lax.dynamic_update_slice_in_dim(
                                cache.segment_ids, segment_ids.astype(jnp.int32), cache.index,
                                axis=1),
                            cache.index + t)

        x = self.final_norm(x)
        if not return_hidden:
            x = jnp.einsum("btd,vd->btv", x, self.unembedding().astype(cd))
            x = sharding.constrain(x, ("batch", "length", "act_vocab"))
        return x if cache is None else (x, cache)
