"""Batched sampling with a KV cache: a jitted prefill and a jitted decode loop.

The model is the training model (`fdpo.models.transformer.Decoder`) called with a
`KVCache`; there is no second implementation.

Layout. Prompts of different lengths share one batch by left padding to a common length
P (rounded up to `length_bucket`, so few shapes compile): every row writes its next token
into the same cache slot, and the last prompt column holds every row's last prompt token.
Pads carry segment id 0 and real tokens 1, so no real token ever attends to a pad; rope
positions count each row's real tokens from 0, so a row's numbers do not depend on how
much it was padded. The cache holds S = P + max_new_tokens slots.

Decoding. `jax.lax.while_loop` inside jit: sample a token from the current logits, record
it, run the model on it (one cached step), repeat; the loop exits early once every row
has finished (EOS) or after `max_new_tokens`. A step reads only a window of the cache
that holds its filled slots: the smallest power of two above them (capped at S), so the
loop runs in at most log2(S / P) + 1 phases, one compiled program each, and reads on
average ~25% fewer slots than the whole buffer (P=32, 128 new tokens: 119 of 160).
Stop strings need detokenisation, so they are checked on the host: with stop strings the
loop runs `stop_check_steps` steps at a time, the host decodes the unfinished rows, marks
rows whose text holds a stop string finished, and re-enters the loop with its (donated)
carry. In this plain loop rows finished early keep running through the model until the
whole batch is done (their tokens are discarded): a batch costs its longest sample.

Refill (`Sampler(refill=True)`; continuous batching over the same fixed-shape cache). All
prompts of a `generate` call wait in a queue on the device; the B cache rows are slots for
samples. The loop alternates two inner loops: start the next queued sample in each free row
(a prefill of that one prompt, its keys and values copied into the row's first P slots,
the row's other slots masked off), then decode every row until a row is free again and a
prompt waits. Each row keeps its own step, rope position and slot (P + step), so a row
holds exactly what it would in the plain loop, and a batch costs the mean sample length,
not the longest. The cache window is the smallest power of two above the fullest running
row's filled slots; the loop returns to the host when that changes (growing or shrinking),
at a stop-string check, or when the queue is done. Stop strings are checked as in the plain
loop, every `stop_check_steps` decode steps on the host (the text needs detokenising; no
token-level check runs on the device), and a stopped row takes the next prompt.

Sampling. On float32 logits, in the order transformers' `generate` applies them:
temperature, then top-k, then top-p (the smallest set of most likely tokens whose
probability reaches top_p; the most likely token is always kept). Temperature 0 is greedy
(argmax). Every parameter is static: one compilation per setting.

Randomness. Sample i draws its step s with key `fold_in(fold_in(PRNGKey(seed),
row_seeds[i]), s)`, s counting that sample's own tokens. With the same seed and row seed, a
sample is the same in any batch, at any position in it, with or without refill and in any
queue order, up to float rounding of its logits (XLA may sum in another order for another
padded shape or cache window, which can flip a draw that sits on a boundary; same batch,
same shapes: bit-identical; the tests find refill and the plain loop identical).

Sharding. Parameters stay where they are (the training mesh and rules); batch rows are
split over the rules' `batch` axes (rows are padded up to a multiple of that size with
dummy rows that start finished), the cache's kv heads over `act_heads`. With several
processes (jax.distributed) every process passes the same prompts: each places its own
devices' rows (`sharding.global_array`) and reads every row back (`sharding.to_host`), so
all take the same host-side decisions (tests/launch/test_multiprocess_programs.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fdpo import sharding
from fdpo.models.config import ModelConfig
from fdpo.models.transformer import KVCache

Array = jax.Array
# logits_hook(logits [B, V] float32, sample [B] int32, step [B] int32) -> logits: applied
# before each draw; `sample` is the row's index in the `generate` call's prompts, `step` the
# index of the token being drawn (benchmarks plant EOS at chosen steps with it).
LogitsHook = Callable[[Array, Array, Array], Array]

# Row states in DecodeState.finished.
RUNNING, EOS, STOP, LENGTH, DUMMY = 0, 1, 2, 3, 4
FINISH_REASONS = {EOS: "eos", STOP: "stop", LENGTH: "length"}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. All fields are static (part of the compiled program)."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    stop: tuple[str, ...] = ()  # stop strings, checked on the host (needs `decode`)
    eos_ids: tuple[int, ...] | None = None  # None: the model config's eos_token_id

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}; must be >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}; must be >= 0 (0 is off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}; must be in (0, 1]")
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not s for s in self.stop):
            raise ValueError("empty stop string")
        if self.eos_ids is not None:
            object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))


@dataclasses.dataclass
class Completion:
    tokens: list[int]  # new tokens: without the EOS; through the token completing a stop
    finish_reason: str  # "eos", "stop" or "length"
    text: str | None = None  # decoded (when the sampler has `decode`), cut before a stop


# ----------------------------------------------------------------------------------------
# Choosing the next token.
# ----------------------------------------------------------------------------------------


def sample_logits(logits: Array, keys: Array, *, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
    """logits [B, V], keys [B, 2] (one PRNG key per row) -> token ids int32 [B]."""
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return first_argmax(logits)
    logits = logits / temperature

    def draw(keys, logits):  # jax.random.categorical per row, with first_argmax's speed
        noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[1:]))(keys)
        return first_argmax(logits + noise)

    if top_k:
        values, indices = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))  # descending
        if top_p < 1.0:
            probs = jax.nn.softmax(values, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely candidates
            values = jnp.where(before < top_p, values, -jnp.inf)  # keeps the first always
        choice = draw(keys, values)
        return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    if top_p < 1.0:
        logits = jnp.where(jax.nn.softmax(logits, axis=-1) >= nucleus_threshold(logits, top_p),
                           logits, -jnp.inf)
    return draw(keys, logits).astype(jnp.int32)


def first_argmax(logits: Array) -> Array:
    """[B, V] -> int32 [B]: the first index of each row's maximum, as `jnp.argmax` (NaN
    aside). Two plain reductions: XLA:CPU's (value, index) reduce behind jnp.argmax took
    15 us of a ~190 us decode step on the tiny benchmark model, this takes 4 (measured)."""
    top = logits.max(axis=-1, keepdims=True)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits == top, index, logits.shape[-1] - 1), axis=-1)


def nucleus_threshold(logits: Array, top_p: float) -> Array:
    """[B, 1]: the probability of the least likely token in each row's nucleus.

    The nucleus is the fewest most likely tokens whose mass reaches top_p; it is
    {p >= t} for the largest t with mass(p >= t) >= top_p, and that t is one of the p.
    Found by bisection on the bit patterns of the float32 probabilities (monotone for
    non-negative floats): 31 masked sums over the vocabulary instead of sorting it.
    Tokens tied with the last one are all kept (a sort would keep an arbitrary subset).
    """
    probs = jax.nn.softmax(logits, axis=-1)
    as_bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.int32)
    as_float = lambda b: jax.lax.bitcast_convert_type(b, jnp.float32)
    lo = jnp.zeros(probs.shape[:-1] + (1,), jnp.int32)  # mass(p >= lo) >= top_p always
    hi = as_bits(probs.max(axis=-1, keepdims=True)) + 1  # mass(p >= hi) = 0 < top_p

    def bisect(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(jnp.where(probs >= as_float(mid), probs, 0.0), -1, keepdims=True) >= top_p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 31, bisect, (lo, hi))
    return as_float(lo)


# ----------------------------------------------------------------------------------------
# The jitted programs.
# ----------------------------------------------------------------------------------------


class DecodeState(NamedTuple):
    cache: KVCache
    logits: Array  # [B, V] float32: next-token logits
    tokens: Array  # [B, N] int32: sampled tokens (pad after a row finished)
    num_tokens: Array  # [B] int32: tokens kept per row (EOS not counted)
    positions: Array  # [B] int32: rope position of each row's next token
    finished: Array  # [B] int8: RUNNING, EOS, STOP, LENGTH, DUMMY
    keys: Array  # [B, 2] uint32: per-row PRNG keys
    step: Array  # int32 scalar


def _last_logits(model, hidden: Array) -> Array:
    """Final-normed hidden [B, T, D] -> float32 logits of the last position [B, V]."""
    last = hidden[:, -1]
    logits = jnp.einsum("bd,vd->bv", last, model.unembedding().astype(last.dtype))
    return sharding.constrain(logits, ("batch", "act_vocab")).astype(jnp.float32)


def _empty_cache(*, cfg, mesh, rules, batch, max_len):
    with sharding.use_mesh(mesh, rules):
        return KVCache.init(cfg, batch, max_len)


def _prefill(state, cache, ids, positions, segment_ids, lengths, seed, row_seeds, finished, *,
             graphdef, mesh, rules, max_new_tokens, pad_id):
    # The empty cache comes in as an argument (donated): built in here, XLA would
    # constant-fold the attention over its all-zero, all-masked slots at compile time.
    model = nnx.merge(graphdef, state)
    b, p = ids.shape
    with sharding.use_mesh(mesh, rules):
        # The cache is empty: one (masked) slot is all the prompt needs to read from it.
        hidden, cache = model(ids, positions, segment_ids, return_hidden=True, cache=cache,
                              cache_window=1)
        logits = _last_logits(model, hidden)
    base = jax.random.PRNGKey(seed)
    keys = jax.vmap(lambda s: jax.random.fold_in(base, s))(row_seeds)
    return DecodeState(cache=cache, logits=logits,
                       tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
                       num_tokens=jnp.zeros((b,), jnp.int32), positions=lengths,
                       finished=finished, keys=keys, step=jnp.zeros((), jnp.int32))


def _next_token(logits: Array, keys: Array, samples: Array, steps: Array, running: Array, *,
                params: SamplingParams, eos: Array, pad_id: int,
                logits_hook: LogitsHook | None) -> tuple[Array, Array, Array]:
    """One decode step's choice for every row, shared by the plain and the refill loop:
    logits [B, V] of row r's sample `samples[r]` at its own step `steps[r]` (the step
    seeds the row's key, so a sample draws the same tokens in either loop) -> (token [B],
    pad where the row is not kept; is_eos [B]; keep [B]: running and not EOS)."""
    keys = jax.vmap(jax.random.fold_in)(keys, steps)
    if logits_hook is not None:
        logits = logits_hook(logits, samples, steps)
    token = sample_logits(logits, keys, temperature=params.temperature, top_k=params.top_k,
                          top_p=params.top_p)
    is_eos = running & jnp.isin(token, eos)
    keep = running & ~is_eos
    return jnp.where(keep, token, pad_id), is_eos, keep


def _decode(state, carry: DecodeState, limit, first_sample, *, graphdef, mesh, rules,
            params: SamplingParams, eos_ids: tuple[int, ...], pad_id: int, window: int,
            logits_hook: LogitsHook | None) -> DecodeState:
    """Runs steps until `limit` (<= max_new_tokens) or until every row has finished; every
    step must find its filled cache slots within the first `window`. Row r holds sample
    `first_sample + r` of the `generate` call (what `logits_hook` is told)."""
    model = nnx.merge(graphdef, state)
    b, n = carry.tokens.shape
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    samples = first_sample + jnp.arange(b, dtype=jnp.int32)

    def cond(c: DecodeState):
        return (c.step < limit) & jnp.any(c.finished == RUNNING)

    def body(c: DecodeState) -> DecodeState:
        running = c.finished == RUNNING
        token, is_eos, keep = _next_token(c.logits, c.keys, samples,
                                          jnp.broadcast_to(c.step, (b,)), running,
                                          params=params, eos=eos, pad_id=pad_id,
                                          logits_hook=logits_hook)
        tokens = jax.lax.dynamic_update_slice_in_dim(c.tokens, token[:, None], c.step, axis=1)
        num_tokens = c.num_tokens + keep
        finished = jnp.where(is_eos, EOS, c.finished)
        finished = jnp.where((finished == RUNNING) & (c.step + 1 >= n), LENGTH, finished)
        with sharding.use_mesh(mesh, rules):
            hidden, cache = model(token[:, None], c.positions[:, None], return_hidden=True,
                                  cache=c.cache, cache_window=window)
            logits = _last_logits(model, hidden)
        return DecodeState(cache, logits, tokens, num_tokens, c.positions + 1,
                           finished.astype(jnp.int8), c.keys, c.step + 1)

    return jax.lax.while_loop(cond, body, carry)


# Refill (continuous batching): the cache's rows are slots for samples, not samples.


class Queue(NamedTuple):
    """The prompts of one refill `generate` call, left-padded to P; rows past `count` pad
    the queue to a compiled length Q."""
    ids: Array  # [Q, P] int32
    positions: Array  # [Q, P] int32
    segment_ids: Array  # [Q, P] int32
    lengths: Array  # [Q] int32
    seeds: Array  # [Q] uint32
    count: Array  # int32 scalar: real prompts


class RefillState(NamedTuple):
    cache: KVCache  # S + 1 slots per row: slot S is scratch (see _refill_decode)
    logits: Array  # [B, V] float32: next-token logits of each row's sample
    sample: Array  # [B] int32: queue index of the row's sample (Q: none yet)
    steps: Array  # [B] int32: tokens the row's sample has drawn (its own step)
    positions: Array  # [B] int32: rope position of each row's next token
    finished: Array  # [B] int8: RUNNING, or how the row's sample ended (DUMMY: none yet)
    keys: Array  # [B, 2] uint32: the PRNG key of each row's sample
    next: Array  # int32 scalar: the next queue index to start
    tokens: Array  # [Q, N] int32: each sample's tokens (pad after it finished)
    num_tokens: Array  # [Q] int32: tokens kept per sample (EOS not counted)
    finish: Array  # [Q] int8: RUNNING until the sample ends, then EOS, STOP or LENGTH
    step: Array  # int32 scalar: decode steps run (for the host's stop-string checks)


def _refill_init(cache, *, rows: int, vocab: int, queue_len: int, max_new_tokens: int,
                 pad_id: int) -> RefillState:
    """Every row free (DUMMY): the loop's first iterations start the first samples."""
    return RefillState(
        cache=cache, logits=jnp.zeros((rows, vocab), jnp.float32),
        sample=jnp.full((rows,), queue_len, jnp.int32), steps=jnp.zeros((rows,), jnp.int32),
        positions=jnp.zeros((rows,), jnp.int32), finished=jnp.full((rows,), DUMMY, jnp.int8),
        keys=jnp.zeros((rows, 2), jnp.uint32), next=jnp.zeros((), jnp.int32),
        tokens=jnp.full((queue_len, max_new_tokens), pad_id, jnp.int32),
        num_tokens=jnp.zeros((queue_len,), jnp.int32),
        finish=jnp.full((queue_len,), RUNNING, jnp.int8), step=jnp.zeros((), jnp.int32))


def _window_for(fill: Array, slots: int) -> Array:
    """Device twin of `Sampler.cache_window`: the smallest power of two above `fill`
    (int32 > 0), capped at `slots`."""
    return jnp.minimum(jnp.left_shift(1, 32 - jax.lax.clz(fill)), slots)


def _refill_decode(state, carry: RefillState, queue: Queue, seed, limit, *, graphdef, mesh,
                   rules, params: SamplingParams, eos_ids: tuple[int, ...], pad_id: int,
                   window: int, logits_hook: LogitsHook | None) -> RefillState:
    """The refill loop: start the next queued sample in each free row (a prefill of that
    row alone, one row at a time), then run decode steps of every row until a row is free
    and a sample waits; repeat. It exits
    when every sample has finished, after `limit` decode steps, or when the cache window
    the rows need differs from `window` (the host re-enters with the new one).

    Rows hold samples at different steps, so each row writes its next key and value at
    its own slot P + step (the layout of a row in the plain loop: prompt in [0, P),
    tokens after it). The model writes every row at one shared index; that index is the
    scratch slot S, outside every window (never read), and the step then copies the
    scratch column to each row's own slot (a scatter of one column per row and layer).
    A refilled row gets its prompt's keys and values in [0, P) and segment ids 0 on every
    other slot, so nothing of the row's previous sample is seen."""
    model = nnx.merge(graphdef, state)
    cfg = model.cfg
    b = carry.logits.shape[0]
    queue_len, n = carry.tokens.shape
    plen = queue.ids.shape[1]
    slots = carry.cache.segment_ids.shape[1] - 1  # the last is scratch
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    base = jax.random.PRNGKey(seed)
    rows = jnp.arange(b)

    def cond(c: RefillState):
        running = c.finished == RUNNING
        more = jnp.any(running) | (jnp.any(~running) & (c.next < queue.count))
        fill = jnp.max(jnp.where(running, plen + c.steps, plen))
        return more & (c.step < limit) & (_window_for(fill, slots) == window)

    def start(c: RefillState) -> RefillState:
        r = jnp.argmax(c.finished != RUNNING)  # the first free row
        q = c.next
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, q, 1, axis=0)
        segs = take(queue.segment_ids)
        empty = KVCache(jnp.zeros(c.cache.k.shape[:1] + (1,) + c.cache.k.shape[2:4] + (plen,),
                                  c.cache.k.dtype),
                        jnp.zeros(c.cache.v.shape[:1] + (1, c.cache.v.shape[2], plen,
                                                        c.cache.v.shape[4]), c.cache.v.dtype),
                        jnp.zeros((1, plen), jnp.int32), jnp.zeros((), jnp.int32))
        with sharding.use_mesh(mesh, rules):
            hidden, one = model(take(queue.ids), take(queue.positions), segs,
                                return_hidden=True, cache=empty, cache_window=1)
            logits = _last_logits(model, hidden)
        cache = c.cache
        row_segs = jnp.zeros((1, slots + 1), jnp.int32).at[:, :plen].set(segs)
        cache = KVCache(jax.lax.dynamic_update_slice(cache.k, one.k, (0, r, 0, 0, 0)),
                        jax.lax.dynamic_update_slice(cache.v, one.v, (0, r, 0, 0, 0)),
                        jax.lax.dynamic_update_slice(cache.segment_ids, row_segs, (r, 0)),
                        cache.index)
        key = jax.random.fold_in(base, queue.seeds[q])
        return c._replace(
            cache=cache, logits=jax.lax.dynamic_update_slice(c.logits, logits, (r, 0)),
            sample=c.sample.at[r].set(q), steps=c.steps.at[r].set(0),
            positions=c.positions.at[r].set(queue.lengths[q]),
            finished=c.finished.at[r].set(RUNNING), keys=c.keys.at[r].set(key), next=q + 1)

    def decode(c: RefillState) -> RefillState:
        running = c.finished == RUNNING
        token, is_eos, keep = _next_token(c.logits, c.keys, c.sample, c.steps, running,
                                          params=params, eos=eos, pad_id=pad_id,
                                          logits_hook=logits_hook)
        q = jnp.where(running, c.sample, queue_len)  # out of range: dropped
        steps = c.steps + running
        finished = jnp.where(is_eos, EOS, c.finished)
        finished = jnp.where((finished == RUNNING) & (steps >= n), LENGTH, finished)
        finished = finished.astype(jnp.int8)
        with sharding.use_mesh(mesh, rules):
            hidden, cache = model(token[:, None], c.positions[:, None], return_hidden=True,
                                  cache=c.cache._replace(index=jnp.int32(slots)),
                                  cache_window=window)
            logits = _last_logits(model, hidden)
        # A row that has run out of slots (its sample ended at max_new_tokens) writes
        # scratch onto itself.
        slot = jnp.minimum(plen + c.steps, slots)
        k = cache.k.at[:, rows, :, :, slot].set(cache.k[..., slots].swapaxes(0, 1))
        v = cache.v.at[:, rows, :, slot].set(cache.v[:, :, :, slots].swapaxes(0, 1))
        segs = cache.segment_ids.at[rows, slot].set(1)
        return c._replace(
            cache=KVCache(k, v, segs, cache.index), logits=logits, steps=steps,
            positions=c.positions + running, finished=finished,
            tokens=c.tokens.at[q, c.steps].set(token, mode="drop"),
            num_tokens=c.num_tokens.at[q].set(c.steps + keep, mode="drop"),
            finish=c.finish.at[q].set(finished, mode="drop"), step=c.step + 1)

    def can_start(c: RefillState):
        return jnp.any(c.finished != RUNNING) & (c.next < queue.count)

    def body(c: RefillState) -> RefillState:
        # Two loops rather than a lax.cond between a start and a step: XLA:CPU copied the
        # carry (the cache) through the conditional, ~1.5x the plain loop's step (measured).
        c = jax.lax.while_loop(can_start, start, c)
        return jax.lax.while_loop(lambda c: cond(c) & ~can_start(c), decode, c)

    return jax.lax.while_loop(cond, body, carry)


# ----------------------------------------------------------------------------------------
# The host side.
# ----------------------------------------------------------------------------------------


def prompt_room(max_positions: int, max_new_tokens: int, length_bucket: int) -> int:
    """The longest prompt `Sampler.generate` takes (<= 0: none): a batch's prompts are padded
    to a multiple of `length_bucket`, and that plus `max_new_tokens` must fit in the model's
    `max_positions` (the check in `generate`)."""
    return (max_positions - max_new_tokens) // length_bucket * length_bucket


class Sampler:
    """Generates completions for token-id prompts.

    `decode` (token ids -> text, e.g. `lambda ids: tok.decode(ids)`) is needed for stop
    strings and fills `Completion.text`. `refill`: run the refill loop (continuous
    batching, see the module docstring) instead of one batch after another.
    `logits_hook`: see LogitsHook. One compilation per (rows, prompt bucket,
    SamplingParams, and for refill the queue length); rows are padded up to a multiple of
    the mesh's batch split.
    """

    def __init__(self, cfg: ModelConfig, graphdef, state, mesh: Mesh,
                 rules=sharding.DEFAULT_RULES, *, decode: Callable[[list[int]], str] | None = None,
                 length_bucket: int = 64, stop_check_steps: int = 32, pad_id: int | None = None,
                 refill: bool = False, logits_hook: LogitsHook | None = None):
        self.cfg, self.graphdef, self.state, self.mesh = cfg, graphdef, state, mesh
        self.rules = tuple(rules)
        self.decode = decode
        self.length_bucket = length_bucket
        self.stop_check_steps = stop_check_steps
        self.pad_id = int(pad_id if pad_id is not None else (cfg.pad_token_id or 0))
        self.refill = refill
        self.logits_hook = logits_hook
        batch_axes = sharding.data_sharding(mesh, self.rules).spec[0] or ()
        batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
        self._row_spec = P(batch_axes or None)
        self.batch_multiple = int(np.prod([mesh.shape[a] for a in batch_axes]))
        self._prefill = functools.lru_cache(maxsize=None)(self._make_prefill)
        self._decode = functools.lru_cache(maxsize=None)(self._make_decode)
        self._empty_cache = functools.lru_cache(maxsize=None)(self._make_empty_cache)
        self._refill_init = functools.lru_cache(maxsize=None)(self._make_refill_init)
        self._refill_decode = functools.lru_cache(maxsize=None)(self._make_refill_decode)

    def _make_prefill(self, max_new_tokens: int):
        fn = functools.partial(_prefill, graphdef=self.graphdef, mesh=self.mesh,
                               rules=self.rules, max_new_tokens=max_new_tokens,
                               pad_id=self.pad_id)
        return jax.jit(fn, donate_argnums=1)

    def _make_empty_cache(self, batch: int, max_len: int):
        return jax.jit(functools.partial(_empty_cache, cfg=self.cfg, mesh=self.mesh,
                                         rules=self.rules, batch=batch, max_len=max_len))

    def _make_decode(self, params: SamplingParams, eos_ids: tuple[int, ...], window: int):
        fn = functools.partial(_decode, graphdef=self.graphdef, mesh=self.mesh,
                               rules=self.rules, params=params, eos_ids=eos_ids,
                               pad_id=self.pad_id, window=window, logits_hook=self.logits_hook)
        return jax.jit(fn, donate_argnums=1)

    def _make_refill_init(self, rows: int, queue_len: int, max_new_tokens: int):
        return jax.jit(functools.partial(
            _refill_init, rows=rows, vocab=self.cfg.vocab_size, queue_len=queue_len,
            max_new_tokens=max_new_tokens, pad_id=self.pad_id), donate_argnums=0)

    def _make_refill_decode(self, params: SamplingParams, eos_ids: tuple[int, ...],
                            window: int):
        fn = functools.partial(_refill_decode, graphdef=self.graphdef, mesh=self.mesh,
                               rules=self.rules, params=params, eos_ids=eos_ids,
                               pad_id=self.pad_id, window=window, logits_hook=self.logits_hook)
        return jax.jit(fn, donate_argnums=1)

    def prompt_room(self, max_new_tokens: int) -> int:
        """The longest prompt `generate` takes with `max_new_tokens` (<= 0: none)."""
        return prompt_room(self.cfg.max_position_embeddings, max_new_tokens, self.length_bucket)

    @staticmethod
    def cache_window(prompt_len: int, step: int, slots: int) -> int:
        """The cache window for decode step `step`: it reads slots < prompt_len + step; the
        smallest power of two above that, capped at the cache's length."""
        return min(1 << (prompt_len + step).bit_length(), slots)

    def eos_ids(self, params: SamplingParams) -> tuple[int, ...]:
        if params.eos_ids is not None:
            return params.eos_ids
        eos = self.cfg.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)

    @staticmethod
    def _host(*arrays) -> list[np.ndarray]:
        """The arrays' whole values on this process (gathered from the others' devices
        with several processes: every process reads the same values, so all take the same
        decisions)."""
        return [sharding.to_host(a) for a in arrays]

    def _put(self, x: np.ndarray):
        spec = P(*self._row_spec, *([None] * (x.ndim - 1)))
        # Every process holds the whole host array: each places its own devices' rows.
        return sharding.global_array(x, NamedSharding(self.mesh, spec))

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 seed: int = 0, row_seeds: Sequence[int] | None = None,
                 pad_rows_to: int = 0, batch_rows: int = 0) -> list[Completion]:
        """One completion per prompt. `row_seeds` (uint32 each; default 0, 1, ...) pick each
        sample's random stream; see the module docstring. `batch_rows` (0: all prompts at
        once) is the number of cache rows; `pad_rows_to` pads the rows with dummy rows up
        to that many (one compiled shape for a last, smaller batch). Without refill the
        prompts run `batch_rows` at a time; with refill they queue for the rows."""
        n = len(prompts)
        if n == 0:
            return []
        if params.stop and self.decode is None:
            raise ValueError("stop strings need a Sampler with decode=")
        if row_seeds is None:
            row_seeds = range(n)
        if len(row_seeds) != n:
            raise ValueError(f"{len(row_seeds)} row seeds for {n} prompts")
        lengths = np.array([len(p) for p in prompts], np.int32)
        if lengths.min() < 1:
            raise ValueError(f"prompt {int(np.argmin(lengths))} is empty")
        bucket = self.length_bucket
        plen = -(-int(lengths.max()) // bucket) * bucket
        if plen + params.max_new_tokens > self.cfg.max_position_embeddings:
            raise ValueError(f"prompt bucket {plen} + max_new_tokens {params.max_new_tokens} "
                             f"exceeds max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")
        per_call = min(n, batch_rows) if batch_rows > 0 else n
        rows = -(-max(per_call, pad_rows_to) // self.batch_multiple) * self.batch_multiple
        seeds = np.asarray(row_seeds, np.uint64).astype(np.uint32)
        if self.refill:
            tokens, counts, finished, stop_at = self._generate_refill(
                prompts, params, seed, seeds, plen, rows)
        else:
            tokens, counts, finished, stop_at = [], [], [], {}
            for first in range(0, n, per_call):
                part = self._generate_batch(prompts[first:first + per_call], params, seed,
                                            seeds[first:first + per_call], plen, rows, first)
                tokens += part[0]
                counts += part[1]
                finished += part[2]
                stop_at.update({first + r: cut for r, cut in part[3].items()})
        return [self._completion(tokens[i][:counts[i]], int(finished[i]), stop_at.get(i),
                                 params) for i in range(n)]

    @staticmethod
    def _padded_prompts(prompts, plen: int, rows: int, pad_id: int):
        """Left-padded ids, positions and segment ids [rows, plen] and lengths [rows] (rows
        past the prompts: one real token)."""
        ids = np.full((rows, plen), pad_id, np.int32)
        segment_ids = np.zeros((rows, plen), np.int32)
        positions = np.zeros((rows, plen), np.int32)
        lengths = np.ones((rows,), np.int32)
        for i, prompt in enumerate(prompts):
            k = len(prompt)
            ids[i, plen - k:] = prompt
            segment_ids[i, plen - k:] = 1
            positions[i, plen - k:] = np.arange(k)
            lengths[i] = k
        segment_ids[len(prompts):, -1] = 1
        return ids, positions, segment_ids, lengths

    def _generate_batch(self, prompts, params: SamplingParams, seed: int, row_seeds, plen: int,
                        rows: int, first: int):
        """The prompts in one batch of `rows` rows (the plain loop). Returns the rows'
        tokens, kept-token counts and finish states, and {row: tokens kept} for rows a stop
        string ended during the loop."""
        n = len(prompts)
        ids, positions, segment_ids, row_lengths = self._padded_prompts(
            prompts, plen, rows, self.pad_id)
        seeds = np.zeros((rows,), np.uint32)
        seeds[:n] = row_seeds
        finished = np.full((rows,), RUNNING, np.int8)
        finished[n:] = DUMMY

        cache = self._empty_cache(rows, plen + params.max_new_tokens)()
        carry = self._prefill(params.max_new_tokens)(
            self.state, cache, self._put(ids), self._put(positions), self._put(segment_ids),
            self._put(row_lengths), jnp.uint32(seed), self._put(seeds), self._put(finished))
        eos = self.eos_ids(params)
        total = params.max_new_tokens
        slots = plen + total
        chunk = self.stop_check_steps if params.stop else total
        stop_at: dict[int, int] = {}  # row -> tokens kept, for rows stopped by a string
        step, next_check = 0, chunk
        while True:
            # A phase ends at a stop-string check, at the end, or where the window is full.
            window = self.cache_window(plen, step, slots)
            limit = min(next_check, total, window - plen + 1)
            carry = self._decode(params, eos, window)(self.state, carry, jnp.int32(limit),
                                                      jnp.int32(first))
            step = int(carry.step)
            finished = sharding.to_host(carry.finished).copy()  # a writable copy
            if step >= total or not (finished == RUNNING).any():
                break
            if params.stop and step >= next_check:
                next_check = step + chunk
                tokens, counts = self._host(carry.tokens, carry.num_tokens)
                newly = self._check_stops(tokens, counts, np.flatnonzero(finished[:n] == RUNNING),
                                          params.stop)
                for r, cut in newly.items():
                    stop_at[r], finished[r] = cut, STOP
                if newly:
                    carry = carry._replace(finished=self._put(finished))
                    if not (finished == RUNNING).any():
                        break
        tokens, counts, finished = self._host(carry.tokens, carry.num_tokens, carry.finished)
        return (list(tokens[:n]), list(counts[:n]), list(finished[:n]),
                stop_at)

    def _generate_refill(self, prompts, params: SamplingParams, seed: int, row_seeds,
                         plen: int, rows: int):
        """Every prompt queued for `rows` cache rows (the refill loop). Returns as
        `_generate_batch`, by prompt."""
        n = len(prompts)
        queue_len = -(-n // rows) * rows  # few compiled queue lengths
        ids, positions, segment_ids, lengths = self._padded_prompts(
            prompts, plen, queue_len, self.pad_id)
        seeds = np.zeros((queue_len,), np.uint32)
        seeds[:n] = row_seeds
        queue = Queue(*(jnp.asarray(a) for a in (ids, positions, segment_ids, lengths, seeds)),
                      jnp.int32(n))
        total = params.max_new_tokens
        slots = plen + total
        cache = self._empty_cache(rows, slots + 1)()  # + the scratch slot
        carry = self._refill_init(rows, queue_len, total)(cache)
        eos = self.eos_ids(params)
        chunk = self.stop_check_steps if params.stop else None
        stop_at: dict[int, int] = {}  # sample -> tokens kept, for samples a stop string ended
        window, next_check = self.cache_window(plen, 0, slots), chunk
        while True:
            limit = next_check if chunk else np.iinfo(np.int32).max
            carry = self._refill_decode(params, eos, window)(
                self.state, carry, queue, jnp.uint32(seed), jnp.int32(limit))
            finished, steps = self._host(carry.finished, carry.steps)
            finished = finished.copy()
            running = finished == RUNNING
            if not running.any() and int(carry.next) >= n:
                break
            if chunk and int(carry.step) >= next_check:
                next_check = int(carry.step) + chunk
                sample, tokens, counts = self._host(carry.sample, carry.tokens,
                                                    carry.num_tokens)
                newly = self._check_stops(tokens, counts, sample[running], params.stop)
                if newly:
                    finish = self._host(carry.finish)[0].copy()
                    for q, cut in newly.items():
                        stop_at[q], finish[q] = cut, STOP
                    finished[np.isin(sample, list(newly))] = STOP
                    carry = carry._replace(finished=self._put(finished),
                                           finish=jnp.asarray(finish))
                    running = finished == RUNNING
            fill = int((plen + steps[running]).max()) if running.any() else plen
            window = self.cache_window(fill, 0, slots)
        tokens, counts, finish = self._host(carry.tokens, carry.num_tokens, carry.finish)
        assert (finish[:n] != RUNNING).all(), "refill loop ended with samples running"
        return list(tokens[:n]), list(counts[:n]), list(finish[:n]), stop_at

    def _check_stops(self, tokens: np.ndarray, counts: np.ndarray, which,
                     stop: tuple[str, ...]) -> dict[int, int]:
        """{i: tokens kept} for the rows `which` of tokens whose text holds a stop string."""
        found = {}
        for i in which:
            cut = self._stop_cut(tokens[i, :counts[i]].tolist(), stop)
            if cut is not None:
                found[int(i)] = cut
        return found

    def _completion(self, tokens, finished: int, stop_at: int | None,
                    params: SamplingParams) -> Completion:
        toks = [int(t) for t in tokens]
        reason = FINISH_REASONS.get(finished, "length")
        if params.stop and stop_at is None:  # a stop in the last chunk
            stop_at = self._stop_cut(toks, params.stop)
        if stop_at is not None:
            toks, reason = toks[:stop_at], "stop"
        text = None
        if self.decode is not None:
            text = self.decode(toks)
            if reason == "stop":
                text = text[:min(i for i in (text.find(s) for s in params.stop) if i >= 0)]
        return Completion(toks, reason, text)

    def _stop_cut(self, tokens: list[int], stop: tuple[str, ...]) -> int | None:
        """The fewest leading tokens whose text holds a stop string, or None."""
        def hit(k):
            text = self.decode(tokens[:k])
            return any(s in text for s in stop)

        if not tokens or not hit(len(tokens)):
            return None
        lo, hi = 1, len(tokens)  # hit(hi) holds; find the smallest such k
        while lo < hi:
            mid = (lo + hi) // 2
            if hit(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo


def eos_ids(model_cfg: ModelConfig, tokenizer=None, tok_dir=None) -> tuple[int, ...]:
    """Union of the model config's, the tokenizer's and generation_config.json's EOS ids
    (chat models end turns with a token, e.g. <|im_end|>, that config.json may not name)."""
    found = []
    for value in (model_cfg.eos_token_id, getattr(tokenizer, "eos_token_id", None)):
        found += value if isinstance(value, (list, tuple)) else [value]
    gen = pathlib.Path(tok_dir) / "generation_config.json" if tok_dir else None
    if gen is not None and gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        found += value if isinstance(value, (list, tuple)) else [value]
    return tuple(dict.fromkeys(int(e) for e in found if e is not None))
