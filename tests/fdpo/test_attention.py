"""`ModelConfig.attention`: jax.nn.dot_product_attention against the einsum path, under the
same masks (causal, padding segments, shared-prompt branches), forward and gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import focused_dpo
from fdpo import logprobs, records, sharding, train
from fdpo import loss as loss_lib
from fdpo.models import convert
from fdpo.models.config import ConfigError, ModelConfig
from fdpo.testing import random_params, random_pairs, stack
from tests.helpers.numerics import assert_close_at_scale

ONE_DEVICE = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
MODELS = {
    # Qwen2: q/k/v bias, grouped-query attention (2 query heads per kv head), tied.
    "qwen2_gqa": ModelConfig(architecture="qwen2", vocab_size=128, hidden_size=64,
                             intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=16, rms_norm_eps=1e-6, rope_theta=1e6, qkv_bias=True,
                             tie_embeddings=True),
    # Llama: linear rope scaling, attention bias incl. o_proj, one kv head for 4 queries.
    "llama_mqa": ModelConfig(architecture="llama", vocab_size=128, hidden_size=64,
                             intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=1,
                             head_dim=16, rms_norm_eps=1e-5, rope_theta=1e5, rope_type="linear",
                             rope_factor=4.0, qkv_bias=True, o_bias=True),
}


def structured_batch(vocab: int, length: int = 24):
    """Rows with every mask the model sees: a full row; right padding in its own segment
    (shared-prompt rows); left padding (the sampler's prompts); a prompt trunk with two
    branches whose positions both continue from the trunk, then padding."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, vocab, (4, length)).astype(np.int32)
    seg = np.ones((4, length), np.int32)
    pos = np.tile(np.arange(length, dtype=np.int32), (4, 1))
    branch = np.zeros((4, length), np.int32)
    seg[1, 17:] = 0
    seg[2, :6] = 0
    pos[2] = np.maximum(np.arange(length) - 6, 0)
    trunk, a, b = 7, 6, 5  # then 6 pads
    branch[3, trunk:trunk + a], branch[3, trunk + a:trunk + a + b] = 1, 2
    pos[3, trunk + a:trunk + a + b] = np.arange(trunk, trunk + b)
    seg[3, trunk + a + b:] = 0
    return tuple(jnp.asarray(x) for x in (ids, pos, seg, branch))


def graph(cfg):
    return nnx.graphdef(nnx.eval_shape(lambda: convert.Decoder(cfg, nnx.Rngs(0))))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dot_product_matches_einsum_forward_and_gradients(name):
    base = MODELS[name]
    params = random_params(base, seed=1)
    ids, pos, seg, branch = structured_batch(base.vocab_size)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=ids.shape), jnp.float32)

    def run(cfg):
        g = graph(cfg)

        def loss(p):
            logits = nnx.merge(g, p)(ids, pos, seg, branch)
            return jnp.sum(weights * logprobs.token_logprobs(logits, ids) * (seg > 0)), logits

        (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return float(value), np.asarray(logits), jax.device_get(grads)

    v0, logits0, g0 = run(base)
    # Whole rows, and query blocks of 5 (24 = 4 x 5 + 4: a padded last block).
    for variant in (dict(attention="dot_product"), dict(attention="dot_product",
                                                        attention_block=5)):
        v1, logits1, g1 = run(base.replace(**variant))
        assert_close_at_scale(logits1, logits0, 1e-5, what=f"{variant} logits")
        assert v1 == pytest.approx(v0, rel=1e-5), variant
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
            assert np.abs(b).max() > 0, jax.tree_util.keystr(path)  # every parameter reached
            assert_close_at_scale(a, b, 1e-5, axis=None,
                                  what=f"{variant} {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("block", [0, 4])
def test_dot_product_honours_branches_and_padding(block):
    """Independent of the einsum path: each branch of a shared row gives the logits of its
    own sequence run alone, and a left-padded row those of its unpadded tokens."""
    cfg = MODELS["qwen2_gqa"].replace(attention="dot_product", attention_block=block)
    model = nnx.merge(graph(cfg), random_params(cfg, seed=3))
    ids, pos, seg, branch = structured_batch(cfg.vocab_size)
    out = np.asarray(model(ids, pos, seg, branch))

    def alone(seq):
        return np.asarray(model(jnp.asarray(seq)[None]))[0]

    row = np.asarray(ids[3])
    assert_close_at_scale(out[3, :13], alone(row[:13]), 1e-5, what="trunk + branch 1")
    second = alone(np.concatenate([row[:7], row[13:18]]))
    assert_close_at_scale(out[3, 13:18], second[7:], 1e-5, what="branch 2")
    assert_close_at_scale(out[2, 6:], alone(np.asarray(ids[2, 6:])), 1e-5, what="left pad")


def test_train_step_with_dot_product_attention_equals_einsum():
    """The default run's path: shared-prompt rows, frozen reference, one AdamW step."""
    cfg = MODELS["qwen2_gqa"]
    examples = stack(random_pairs(4, 40, cfg.vocab_size, seed=4))
    examples.pop("ref_logps", None)
    need = int(records.shared_row_lengths(examples["chosen_segments"],
                                          examples["rejected_segments"]).max())
    params, ref = random_params(cfg, seed=5), random_params(cfg, seed=6)
    results = []
    for attention in ("einsum", "dot_product"):
        tx = optax.sgd(0.5)
        trainer = train.Trainer(cfg.replace(attention=attention),
                                loss_lib.preset("focused_dpo", beta=0.5, nll_weight=0.1), tx,
                                ONE_DEVICE, chunk=8, shared_length=need)
        state, metrics = trainer.train_step(trainer.init_state(train.copy_params(params)),
                                            trainer.make_batch(examples), ref)
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]),
                        jax.device_get(state["params"])))
    (l0, n0, p0), (l1, n1, p1) = results
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert n1 == pytest.approx(n0, rel=1e-5)
    assert n0 > 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p1), jax.tree.leaves(p0)):
        assert_close_at_scale(a, b, 1e-5, axis=None, what=jax.tree_util.keystr(path))


def test_attention_is_a_run_config_choice():
    config = focused_dpo.get_config("model=CKPT,data=DATA")
    assert config.model.attention == "einsum"
    config.model.attention = "dot_product"
    cfg = MODELS["qwen2_gqa"].replace(**config.model.to_dict())
    assert cfg.attention == "dot_product"
    with pytest.raises(ConfigError, match="attention='flash'"):
        MODELS["qwen2_gqa"].replace(attention="flash")
    with pytest.raises(ConfigError, match="blocks are for attention='dot_product'"):
        MODELS["qwen2_gqa"].replace(attention_block=512)
