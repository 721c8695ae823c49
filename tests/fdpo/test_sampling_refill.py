"""The refill loop (continuous batching) against the plain loop and transformers: the same
samples per prompt, whatever the rows, the queue order and the lengths."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fdpo import sampling, sharding
from fdpo.models import convert
from fdpo.models.config import ModelConfig
from fdpo.testing import make_hf_model

pytestmark = pytest.mark.torch

torch.set_num_threads(1)

ONE_DEVICE = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
VOCAB = 48  # small, so a few EOS ids end samples after widely varying numbers of tokens
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2")
    torch_model = make_hf_model(out, "qwen2", vocab_size=VOCAB, num_key_value_heads=2)
    cfg = ModelConfig.from_hf_dir(out)
    graphdef, state = convert.load_hf_params(out, cfg, ONE_DEVICE)
    return cfg, graphdef, state, torch_model


def prompts_for(n, seed=0, longest=30):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, k).tolist() for k in rng.integers(1, longest + 1, n)]


def samplers(model, **kw):
    cfg, graphdef, state, _ = model
    return [sampling.Sampler(cfg, graphdef, state, ONE_DEVICE, length_bucket=8, refill=r, **kw)
            for r in (False, True)]


def hf_generate(torch_model, prompt, max_new_tokens, eos):
    """transformers' greedy generate on one prompt alone."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = torch_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=max_new_tokens, eos_token_id=list(eos),
                                   pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("temperature,top_p", [(1.5, 1.0), (1.0, 0.9)])
def test_refill_samples_equal_the_plain_loop(model, temperature, top_p):
    """23 prompts on 4 rows (the plain loop: 6 batches; refill: one queue), sampled with
    fixed per-sample seeds and two EOS ids: every prompt gets the same tokens and finish
    reason from both loops, and the lengths really spread (early EOS to the limit)."""
    plain, refill = samplers(model)
    prompts = prompts_for(23)
    params = sampling.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=temperature,
                                     top_p=top_p, eos_ids=(3, 11))
    seeds = [1000 + 7 * i for i in range(len(prompts))]
    a = plain.generate(prompts, params, seed=5, row_seeds=seeds, batch_rows=4)
    b = refill.generate(prompts, params, seed=5, row_seeds=seeds, batch_rows=4)
    assert [(c.tokens, c.finish_reason) for c in b] == [(c.tokens, c.finish_reason) for c in a]
    lengths = [len(c.tokens) for c in a]
    assert min(lengths) <= 5 and max(lengths) == NEW_TOKENS, lengths
    assert {c.finish_reason for c in a} == {"eos", "length"}
    # A sample depends on its seed, not on its place in the queue: reversed order, other rows.
    back = refill.generate(prompts[::-1], params, seed=5, row_seeds=seeds[::-1], batch_rows=8)
    assert [c.tokens for c in back[::-1]] == [c.tokens for c in a]


def test_refill_greedy_equals_transformers(model):
    """Greedy with EOS ids, 13 prompts on 4 rows: token for token what transformers
    generates for each prompt alone (the EOS reported as the finish, not kept)."""
    _, refill = samplers(model)
    prompts = prompts_for(13, seed=1)
    eos = (5, 17)
    out = refill.generate(prompts, sampling.SamplingParams(
        max_new_tokens=NEW_TOKENS, temperature=0, eos_ids=eos), batch_rows=4)
    reasons = set()
    for prompt, completion in zip(prompts, out):
        ref = hf_generate(model[3], prompt, NEW_TOKENS, eos)
        if ref and ref[-1] in eos:
            ref, reason = ref[:-1], "eos"
        else:
            reason = "length"
        assert (completion.tokens, completion.finish_reason) == (ref, reason)
        reasons.add(reason)
    assert reasons == {"eos", "length"}  # both kinds of end occur


def test_refill_stop_strings_as_the_plain_loop(model):
    """Stop strings (checked on the host every 4 steps): with refill a row a stop string
    ended takes the next prompt, and every completion equals the plain loop's."""
    decode = lambda ids: "".join(f"<{t}>" for t in ids)
    plain, refill = samplers(model, decode=decode, stop_check_steps=4)
    prompts = prompts_for(11, seed=2)
    greedy = sampling.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, eos_ids=(5,))
    free = plain.generate(prompts, greedy)
    # Stop strings that some of the free-running completions contain, at different steps.
    stops = tuple(dict.fromkeys(decode(c.tokens[k:k + 2]) for c, k in zip(free[:3], (2, 9, 21))
                                if len(c.tokens) >= k + 2))
    assert stops
    params = dataclasses.replace(greedy, stop=stops)
    a = plain.generate(prompts, params, batch_rows=4)
    b = refill.generate(prompts, params, batch_rows=4)
    assert [(c.tokens, c.finish_reason, c.text) for c in b] == \
        [(c.tokens, c.finish_reason, c.text) for c in a]
    stopped = [i for i, c in enumerate(b) if c.finish_reason == "stop"]
    assert stopped
    for i in stopped:  # cut right after the token completing the first stop string
        text = decode(b[i].tokens)
        assert any(text.endswith(s) or s in text for s in stops)
        assert not any(s in decode(b[i].tokens[:-1]) for s in stops)
        assert b[i].tokens == free[i].tokens[:len(b[i].tokens)]


def test_logits_hook_plants_the_lengths_in_both_loops(model):
    """The benchmark's way of fixing response lengths: the hook forbids EOS before a
    sample's drawn length and forces it there."""
    cfg = model[0]
    lengths = np.array([3, 40, 1, 17, 8, 40, 26, 2, 11])
    eos = VOCAB - 1
    target = jnp.asarray(lengths)

    def hook(logits, sample, step):
        end = (step >= target[jnp.minimum(sample, len(lengths) - 1)])[:, None]
        is_eos = jnp.arange(cfg.vocab_size) == eos
        return jnp.where(is_eos, jnp.where(end, 0.0, -jnp.inf), jnp.where(end, -jnp.inf, logits))

    params = sampling.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.5, eos_ids=(eos,))
    outs = [s.generate(prompts_for(len(lengths), seed=3), params, batch_rows=4)
            for s in samplers(model, logits_hook=hook)]
    for out in outs:
        assert [len(c.tokens) for c in out] == lengths.tolist()
        assert [c.finish_reason for c in out] == [
            "length" if k == NEW_TOKENS else "eos" for k in lengths]
    assert [c.tokens for c in outs[0]] == [c.tokens for c in outs[1]]


@pytest.mark.slow
def test_refill_on_a_2x2x2_mesh_equals_one_device(model, tmp_path):
    """Rows split over 4 devices (data x fsdp), heads over 2: the refill loop's per-row
    starts and slot writes give the one-device samples."""
    assert jax.device_count() == 8
    cfg, graphdef, state, _ = model
    prompts = prompts_for(10, seed=4)
    params = sampling.SamplingParams(max_new_tokens=24, temperature=1.5, eos_ids=(3, 11))
    one = sampling.Sampler(cfg, graphdef, state, ONE_DEVICE, length_bucket=8, refill=True)
    expected = one.generate(prompts, params, seed=2, batch_rows=4)
    make_hf_model(tmp_path, "qwen2", vocab_size=VOCAB, num_key_value_heads=2)
    mesh = sharding.make_mesh((2, 2, 2))
    g8, s8 = convert.load_hf_params(tmp_path, cfg, mesh)
    got = sampling.Sampler(cfg, g8, s8, mesh, length_bucket=8, refill=True).generate(
        prompts, params, seed=2, batch_rows=4)
    # A sharded forward sums in another order; on this model no draw sat on a boundary.
    assert [(c.tokens, c.finish_reason) for c in got] == \
        [(c.tokens, c.finish_reason) for c in expected]
