"""The KV-cache sampler against transformers, and its sampling statistics."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from flax import nnx

from fdpo import sampling, sharding
from fdpo.models import convert
from fdpo.models.config import ModelConfig
from fdpo.models.transformer import KVCache
from fdpo.testing import make_hf_model

pytestmark = pytest.mark.torch

torch.set_num_threads(2)

ONE_DEVICE = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
PROMPT_LENGTHS = (1, 6, 17, 33)  # one batch; left-padded to 64 (the default bucket)
NEW_TOKENS = 24
# Significance level of the distribution tests. The seeds are fixed, so each test is
# deterministic; the level says how unlikely the observed counts are under the claim.
ALPHA = 1e-3

ARCHS = {
    "qwen2_tied_gqa": ("qwen2", dict(tie_word_embeddings=True, num_key_value_heads=2)),
    "llama_linear_rope": ("llama", dict(num_key_value_heads=4,
                                        rope_scaling={"rope_type": "linear", "factor": 4.0})),
}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def model(request, tmp_path_factory):
    arch, kw = ARCHS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    torch_model = make_hf_model(out, arch, **kw)
    cfg = ModelConfig.from_hf_dir(out)
    graphdef, state = convert.load_hf_params(out, cfg, ONE_DEVICE)
    return cfg, graphdef, state, torch_model, out


def prompts_for(cfg, lengths=PROMPT_LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]


def hf_generate(torch_model, prompt, max_new_tokens, eos=None):
    """transformers' greedy generate on one prompt alone (no padding at all)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = torch_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=max_new_tokens, eos_token_id=eos,
                                   pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_cached_forward_matches_full_forward(model):
    """Left-padded cached prefill + one-token steps give the full forward's logits, for the
    scanned and the unrolled layers."""
    cfg, graphdef, state, _, _ = model
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 14))
    full = np.asarray(nnx.merge(graphdef, state)(jnp.asarray(ids)))
    pad, prompt = (0, 3), 9  # row 1 is left-padded by 3
    for scan in (True, False):
        graph = nnx.graphdef(convert.abstract_model(cfg.replace(scan_layers=scan)))
        m = jax.jit(lambda ids, pos, seg, cache, graph=graph: nnx.merge(graph, state)(
            ids, pos, seg, cache=cache))
        tok = np.zeros((2, prompt), np.int32)
        seg, pos = np.zeros_like(tok), np.zeros_like(tok)
        for r in range(2):
            k = prompt - pad[r]
            tok[r, pad[r]:], seg[r, pad[r]:], pos[r, pad[r]:] = ids[r, :k], 1, np.arange(k)
        logits, cache = m(jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(seg),
                          KVCache.init(cfg, 2, 20))
        for r in range(2):
            np.testing.assert_allclose(np.asarray(logits)[r, pad[r]:],
                                       full[r, :prompt - pad[r]], atol=1e-4)
        for step in range(4):
            n = [prompt - pad[r] + step for r in range(2)]
            logits, cache = m(jnp.asarray([[ids[r, n[r]]] for r in range(2)]),
                              jnp.asarray([[n[r]] for r in range(2)]), jnp.ones((2, 1), jnp.int32),
                              cache)
            assert int(cache.index) == prompt + step + 1
            for r in range(2):
                # float32; the two paths sum in different orders: ~5e-6 observed.
                np.testing.assert_allclose(np.asarray(logits)[r, 0], full[r, n[r]], atol=1e-4)


def test_greedy_equals_transformers_generate(model):
    """Token for token, prompts of several lengths in one batch, against transformers
    generating each prompt alone (the stronger reference: no padding on its side)."""
    cfg, graphdef, state, torch_model, _ = model
    prompts = prompts_for(cfg)
    sampler = sampling.Sampler(cfg, graphdef, state, ONE_DEVICE)
    params = sampling.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, eos_ids=())
    out = sampler.generate(prompts, params)
    for prompt, completion in zip(prompts, out):
        assert completion.finish_reason == "length"
        assert completion.tokens == hf_generate(torch_model, prompt, NEW_TOKENS)


def test_greedy_across_cache_windows_equals_transformers(model):
    """Decoding grows its cache window in phases (one compiled loop each); a batch that
    crosses a window boundary mid-generation still matches transformers token for token."""
    cfg, graphdef, state, torch_model, _ = model
    prompts = prompts_for(cfg)
    sampler = sampling.Sampler(cfg, graphdef, state, ONE_DEVICE, length_bucket=8)
    new = 40  # prompts padded to 40; slots 80; windows 64 (steps 0-24), then 80
    assert [sampler.cache_window(40, s, 80) for s in (0, 23, 25, 39)] == [64, 64, 80, 80]
    out = sampler.generate(prompts, sampling.SamplingParams(max_new_tokens=new, temperature=0,
                                                            eos_ids=()))
    for prompt, completion in zip(prompts, out):
        assert completion.tokens == hf_generate(torch_model, prompt, new)


def test_cache_window_reads_only_the_first_slots(model):
    """A windowed cached step equals the unwindowed one when the filled slots lie inside
    the window, differs when the window cuts them off, and a window past the cache is an
    error."""
    cfg, graphdef, state, _, _ = model
    m = nnx.merge(graphdef, state)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 10)))
    ones = jnp.ones((2, 10), jnp.int32)
    _, cache = m(ids, jnp.cumsum(ones, 1) - 1, ones, cache=KVCache.init(cfg, 2, 32))
    step = lambda window: np.asarray(m(ids[:, :1], jnp.full((2, 1), 10), ones[:, :1],
                                       cache=cache, cache_window=window)[0])
    full = step(None)
    # float32 products over fewer (masked) slots sum in another order: ~1e-5 observed.
    np.testing.assert_allclose(step(10), full, atol=1e-4)
    np.testing.assert_allclose(step(16), full, atol=1e-4)
    assert np.abs(step(5) - full).max() > 1e-2
    with pytest.raises(ValueError, match="cache_window=33; the cache has 32 slots"):
        step(33)


def test_eos_stops_rows_like_transformers(model):
    cfg, graphdef, state, torch_model, _ = model
    prompts = prompts_for(cfg)
    free = hf_generate(torch_model, prompts[2], NEW_TOKENS)
    # An EOS id that prompt 2's greedy continuation first emits at step >= 3.
    step = next(i for i in range(3, NEW_TOKENS) if free[i] not in free[:i])
    eos = free[step]
    sampler = sampling.Sampler(cfg, graphdef, state, ONE_DEVICE)
    out = sampler.generate(prompts, sampling.SamplingParams(
        max_new_tokens=NEW_TOKENS, temperature=0, eos_ids=(eos,)))
    assert out[2].tokens == free[:step] and out[2].finish_reason == "eos"
    for prompt, completion in zip(prompts, out):
        ref = hf_generate(torch_model, prompt, NEW_TOKENS, eos=eos)
        if ref[-1] == eos:  # transformers keeps the EOS; the sampler reports it instead
            assert (completion.tokens, completion.finish_reason) == (ref[:-1], "eos")
        else:
            assert (completion.tokens, completion.finish_reason) == (ref, "length")


def test_mesh_2x2x2_greedy_matches_one_device(tmp_path):
    assert jax.device_count() == 8, "conftest must set 8 fake CPU devices before JAX starts"
    torch_model = make_hf_model(tmp_path, "qwen2", num_key_value_heads=2, vocab_size=256,
                                intermediate_size=128)
    cfg = ModelConfig.from_hf_dir(tmp_path)
    prompts = prompts_for(cfg, (3, 9, 20))  # 3 rows over a batch split of 4: one dummy row
    params = sampling.SamplingParams(max_new_tokens=16, temperature=0, eos_ids=())
    g1, s1 = convert.load_hf_params(tmp_path, cfg, ONE_DEVICE)
    expected = sampling.Sampler(cfg, g1, s1, ONE_DEVICE).generate(prompts, params)
    mesh = sharding.make_mesh((2, 2, 2))
    g8, s8 = convert.load_hf_params(tmp_path, cfg, mesh)
    sampler = sampling.Sampler(cfg, g8, s8, mesh)
    assert sampler.batch_multiple == 4
    got = sampler.generate(prompts, params)
    # Token for token, except that a sharded forward sums in another order: where two
    # logits tie to float32 rounding (relative 1e-4 of the row's scale, measured against
    # float64 logits), either token is a correct greedy choice and the rows may part.
    torch_model = torch_model.double()
    for prompt, a, b in zip(prompts, got, expected):
        t = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), None)
        if t is None:
            assert a.tokens == b.tokens
            continue
        with torch.no_grad():
            logits = torch_model(torch.tensor([prompt + b.tokens[:t]])).logits[0, -1].numpy()
        gap = abs(logits[a.tokens[t]] - logits[b.tokens[t]])
        assert gap <= 1e-4 * np.abs(logits).max(), (
            f"greedy rows part at step {t} where the logits differ by {gap:.3g}: not a tie")


# ----------------------------------------------------------------------------------------
# Sampling statistics
# ----------------------------------------------------------------------------------------


def chi_square_p(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> float:
    """Pearson's chi-square p-value of counts against probs; bins expecting fewer than
    `min_expected` draws are pooled into one (the test's usual validity condition)."""
    expected = probs * counts.sum()
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return scipy.stats.chisquare(obs, exp).pvalue


def softmax64(logits, temperature):
    z = np.asarray(logits, np.float64) / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


def test_first_token_distribution_is_softmax_over_temperature(model):
    """4,096 rows of one prompt, one new token each, at T = 1.5: the counts fit
    softmax(transformers' logits / 1.5) and do not fit softmax(logits / 1.0)."""
    cfg, graphdef, state, torch_model, _ = model
    prompt = prompts_for(cfg, (7,), seed=3)[0]
    n = 4096
    sampler = sampling.Sampler(cfg, graphdef, state, ONE_DEVICE, length_bucket=8)
    out = sampler.generate([prompt] * n, sampling.SamplingParams(
        max_new_tokens=1, temperature=1.5, eos_ids=()), seed=1)
    counts = np.bincount([c.tokens[0] for c in out], minlength=cfg.vocab_size)
    with torch.no_grad():
        logits = torch_model(torch.tensor([prompt])).logits[0, -1].double().numpy()
    assert chi_square_p(counts, softmax64(logits, 1.5)) > ALPHA
    # The test has power: the wrong temperature is rejected by far.
    assert chi_square_p(counts, softmax64(logits, 1.0)) < 1e-6


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (8, 0.7)])
def test_sample_logits_filters_exactly(top_k, top_p):
    """On fixed logits: no excluded token is ever drawn, and the kept ones follow the
    renormalised softmax (transformers' order: temperature, top-k, top-p)."""
    rng = np.random.default_rng(4)
    vocab, n, temperature = 40, 20000, 1.3
    logits = rng.normal(size=vocab) * 2.0
    probs = softmax64(logits, temperature)
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros(vocab, bool)
    keep[order[:top_k or vocab]] = True
    if top_p < 1:
        kept = probs * keep
        kept /= kept.sum()
        before = np.cumsum(kept[order]) - kept[order]
        keep[order[before >= top_p]] = False
    keys = jax.random.split(jax.random.PRNGKey(5), n)
    draws = np.asarray(sampling.sample_logits(
        jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, vocab)), keys,
        temperature=temperature, top_k=top_k, top_p=top_p))
    assert keep[draws].all(), f"excluded tokens drawn: {sorted(set(draws[~keep[draws]]))}"
    target = np.where(keep, probs, 0.0)
    counts = np.bincount(draws, minlength=vocab)
    assert chi_square_p(counts[keep], target[keep] / target.sum()) > ALPHA


def test_greedy_is_argmax_and_temperature_one_is_plain_softmax():
    rng = np.random.default_rng(6)
    logits = jnp.asarray(rng.normal(size=(3, 11)), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    np.testing.assert_array_equal(
        sampling.sample_logits(logits, keys, temperature=0.0, top_k=3, top_p=0.5),
        np.argmax(np.asarray(logits), -1))
    ties = jnp.asarray([[0.0, 2.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0], [-1.0, -jnp.inf, 5.0, 5.0]])
    np.testing.assert_array_equal(sampling.first_argmax(ties), [1, 0, 2])
    expected = jax.vmap(jax.random.categorical)(keys, logits)
    np.testing.assert_array_equal(sampling.sample_logits(logits, keys, temperature=1.0),
                                  expected)


def test_top_k_top_p_in_generation_never_emit_excluded_tokens(model):
    """64 rows x 24 tokens at T = 1.5; every drawn token is checked against the filter
    recomputed from a separate full (uncached) forward of the sampled sequence."""
    cfg, graphdef, state, _, _ = model
    prompt = prompts_for(cfg, (5,), seed=7)[0]
    forward = jax.jit(lambda ids: nnx.merge(graphdef, state)(ids))
    sampler = sampling.Sampler(cfg, graphdef, state, ONE_DEVICE, length_bucket=8)
    temperature = 1.5
    for top_k, top_p in ((4, 1.0), (0, 0.5)):
        out = sampler.generate([prompt] * 64, sampling.SamplingParams(
            max_new_tokens=NEW_TOKENS, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_ids=()), seed=2)
        seqs = np.array([prompt + c.tokens for c in out])
        logits = np.asarray(forward(jnp.asarray(seqs)), np.float64)[:, len(prompt) - 1:-1]
        drawn = seqs[:, len(prompt):]
        z = logits / temperature
        picked = np.take_along_axis(z, drawn[..., None], -1)[..., 0]
        # rank of the drawn token among the step's logits (0 = most likely)
        rank = (z > picked[..., None]).sum(-1)
        if top_k:
            assert rank.max() < top_k
        else:
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            mass_before = np.where(z > picked[..., None], p, 0).sum(-1)
            # The cached and the full forward differ by ~1e-6 in logits; the slack keeps a
            # token sitting exactly on the boundary from failing on rounding alone.
            assert mass_before.max() < top_p + 1e-5
        assert len(set(drawn.ravel())) > 1  # really sampling


def test_seeds_reproduce_rows_in_any_batch(model):
    cfg, graphdef, state, _, _ = model
    prompts = prompts_for(cfg, (4, 9, 12, 50), seed=8)
    sampler = sampling.Sampler(cfg, graphdef, state, ONE_DEVICE)
    params = sampling.SamplingParams(max_new_tokens=12, temperature=1.0, eos_ids=())
    a = sampler.generate(prompts[:3], params, seed=9, row_seeds=[10, 11, 12])
    again = sampler.generate(prompts[:3], params, seed=9, row_seeds=[10, 11, 12])
    assert [c.tokens for c in a] == [c.tokens for c in again]
    # Row seed 12 elsewhere in another batch (another padded length: 64 vs 128 for 50+).
    b = sampler.generate([prompts[3], prompts[2]], params, seed=9, row_seeds=[13, 12])
    assert b[1].tokens == a[2].tokens
    other = sampler.generate(prompts[:3], params, seed=10, row_seeds=[10, 11, 12])
    assert [c.tokens for c in other] != [c.tokens for c in a]
    assert len({tuple(c.tokens) for c in sampler.generate(
        [prompts[0]] * 4, params, seed=9)}) > 1  # different row seeds, different samples


def test_stop_strings_cut_on_the_host(model):
    cfg, graphdef, state, _, _ = model
    decode = lambda ids: "".join(f"<{t}>" for t in ids)
    prompts = prompts_for(cfg, (3, 10), seed=11)
    sampler = sampling.Sampler(cfg, graphdef, state, ONE_DEVICE, decode=decode,
                               stop_check_steps=4)
    greedy = sampling.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, eos_ids=())
    free = sampler.generate(prompts, greedy)
    # A stop string completed by prompt 0's token at step 9, in a later check chunk.
    stop = decode(free[0].tokens[8:10])
    first = next(k for k in range(1, NEW_TOKENS + 1) if stop in decode(free[0].tokens[:k]))
    out = sampler.generate(prompts, dataclasses.replace(greedy, stop=(stop,)))
    assert out[0].finish_reason == "stop"
    assert out[0].tokens == free[0].tokens[:first]
    assert out[0].text == decode(free[0].tokens[:first])[:decode(
        free[0].tokens[:first]).index(stop)]
    assert stop not in out[0].text
    if stop not in free[1].text:
        assert out[1].tokens == free[1].tokens and out[1].finish_reason == "length"


def test_bad_requests_are_refused(model):
    cfg, graphdef, state, _, _ = model
    sampler = sampling.Sampler(cfg, graphdef, state, ONE_DEVICE)
    with pytest.raises(ValueError, match="empty"):
        sampler.generate([[1, 2], []], sampling.SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="decode="):
        sampler.generate([[1]], sampling.SamplingParams(max_new_tokens=2, stop=("x",)))
    with pytest.raises(ValueError, match="top_p"):
        sampling.SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sampler.generate([[1]], sampling.SamplingParams(max_new_tokens=cfg.max_position_embeddings))
