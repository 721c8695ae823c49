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
carry. Rows finished early keep running through the model until the whole batch is done
(their tokens are discarded); that is the price of static shapes.

Sampling. On float32 logits, in the order transformers' `generate` applies them:
temperature, then top-k, then top-p (the smallest set of most likely tokens whose
probability reaches top_p; the most likely token is always kept). Temperature 0 is greedy
(argmax). Every parameter is static: one compilation per setting.

Randomness. Row r draws step s with key `fold_in(fold_in(PRNGKey(seed), seeds[r]), s)`.
With the same seed and row seed, a row gives the same sample in any batch, at any
position in it, up to float rounding of its logits (XLA may sum in another order for
another padded shape, which can flip a draw that sits on a boundary; same batch, same
shapes: bit-identical).

Sharding. Parameters stay where they are (the training mesh and rules); batch rows are
split over the rules' `batch` axes (rows are padded up to a multiple of that size with
dummy rows that start finished), the cache's kv heads over `act_heads`.
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


def _decode(state, carry: DecodeState, limit, *, graphdef, mesh, rules, params: SamplingParams,
            eos_ids: tuple[int, ...], pad_id: int, window: int) -> DecodeState:
    """Runs steps until `limit` (<= max_new_tokens) or until every row has finished; every
    step must find its filled cache slots within the first `window`."""
    model = nnx.merge(graphdef, state)
    n = carry.tokens.shape[1]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def cond(c: DecodeState):
        return (c.step < limit) & jnp.any(c.finished == RUNNING)

    def body(c: DecodeState) -> DecodeState:
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(c.keys, c.step)
        token = sample_logits(c.logits, keys, temperature=params.temperature,
                              top_k=params.top_k, top_p=params.top_p)
        running = c.finished == RUNNING
        is_eos = running & jnp.isin(token, eos)
        keep = running & ~is_eos
        token = jnp.where(keep, token, pad_id)
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


# ----------------------------------------------------------------------------------------
# The host side.
# ----------------------------------------------------------------------------------------


def prompt_room(max_positions: int, max_new_tokens: int, length_bucket: int) -> int:
    """The longest prompt `Sampler.generate` takes (<= 0: none): a batch's prompts are padded
    to a multiple of `length_bucket`, and that plus `max_new_tokens` must fit in the model's
    `max_positions` (the check in `generate`)."""
    return (max_positions - max_new_tokens) // length_bucket * length_bucket


class Sampler:
    """Generates completions for batches of token-id prompts.

    `decode` (token ids -> text, e.g. `lambda ids: tok.decode(ids)`) is needed for stop
    strings and fills `Completion.text`. One compilation per (batch, prompt bucket,
    SamplingParams); rows are padded up to a multiple of the mesh's batch split.
    """

    def __init__(self, cfg: ModelConfig, graphdef, state, mesh: Mesh,
                 rules=sharding.DEFAULT_RULES, *, decode: Callable[[list[int]], str] | None = None,
                 length_bucket: int = 64, stop_check_steps: int = 32, pad_id: int | None = None):
        self.cfg, self.graphdef, self.state, self.mesh = cfg, graphdef, state, mesh
        self.rules = tuple(rules)
        self.decode = decode
        self.length_bucket = length_bucket
        self.stop_check_steps = stop_check_steps
        self.pad_id = int(pad_id if pad_id is not None else (cfg.pad_token_id or 0))
        batch_axes = sharding.data_sharding(mesh, self.rules).spec[0] or ()
        batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
        self._row_spec = P(batch_axes or None)
        self.batch_multiple = int(np.prod([mesh.shape[a] for a in batch_axes]))
        self._prefill = functools.lru_cache(maxsize=None)(self._make_prefill)
        self._decode = functools.lru_cache(maxsize=None)(self._make_decode)
        self._empty_cache = functools.lru_cache(maxsize=None)(self._make_empty_cache)

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
                               pad_id=self.pad_id, window=window)
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

    def _put(self, x: np.ndarray):
        spec = P(*self._row_spec, *([None] * (x.ndim - 1)))
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 seed: int = 0, row_seeds: Sequence[int] | None = None,
                 pad_rows_to: int = 0) -> list[Completion]:
        """One completion per prompt. `row_seeds` (uint32 each; default 0, 1, ...) pick each
        row's random stream; see the module docstring. `pad_rows_to` pads the batch with
        dummy rows up to that many rows (one compiled shape for a last, smaller batch)."""
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
        rows = -(-max(n, pad_rows_to) // self.batch_multiple) * self.batch_multiple
        if plen + params.max_new_tokens > self.cfg.max_position_embeddings:
            raise ValueError(f"prompt bucket {plen} + max_new_tokens {params.max_new_tokens} "
                             f"exceeds max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")

        ids = np.full((rows, plen), self.pad_id, np.int32)
        segment_ids = np.zeros((rows, plen), np.int32)
        positions = np.zeros((rows, plen), np.int32)
        row_lengths = np.ones((rows,), np.int32)
        for i, prompt in enumerate(prompts):
            k = len(prompt)
            ids[i, plen - k:] = prompt
            segment_ids[i, plen - k:] = 1
            positions[i, plen - k:] = np.arange(k)
            row_lengths[i] = k
        segment_ids[n:, -1] = 1  # dummy rows: one real token, finished from the start
        seeds = np.zeros((rows,), np.uint32)
        seeds[:n] = np.asarray(row_seeds, np.uint64).astype(np.uint32)
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
            carry = self._decode(params, eos, window)(self.state, carry, jnp.int32(limit))
            step = int(carry.step)
            finished = np.array(carry.finished)  # a writable copy
            if step >= total or not (finished == RUNNING).any():
                break
            if params.stop and step >= next_check:
                next_check = step + chunk
                tokens, counts = np.asarray(carry.tokens), np.asarray(carry.num_tokens)
                newly = False
                for r in np.flatnonzero(finished[:n] == RUNNING):
                    cut = self._stop_cut(tokens[r, :counts[r]].tolist(), params.stop)
                    if cut is not None:
                        stop_at[r], finished[r] = cut, STOP
                        newly = True
                if newly:
                    carry = carry._replace(finished=self._put(finished))
                    if not (finished == RUNNING).any():
                        break

        tokens, counts = np.asarray(carry.tokens), np.asarray(carry.num_tokens)
        finished = np.asarray(carry.finished)
        out = []
        for r in range(n):
            toks = tokens[r, :counts[r]].tolist()
            reason = FINISH_REASONS.get(int(finished[r]), "length")
            if params.stop and r not in stop_at:  # a stop in the last chunk
                cut = self._stop_cut(toks, params.stop)
                if cut is not None:
                    stop_at[r] = cut
            if r in stop_at:
                toks, reason = toks[:stop_at[r]], "stop"
            text = None
            if self.decode is not None:
                text = self.decode(toks)
                if reason == "stop":
                    text = text[:min(i for i in (text.find(s) for s in params.stop) if i >= 0)]
            out.append(Completion(toks, reason, text))
        return out

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
