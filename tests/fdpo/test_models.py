"""The Qwen2 / Llama ports against transformers' PyTorch models, and HF import / export."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from fdpo import logprobs, sharding
from fdpo.models import checkpoint, convert
from fdpo.models.config import ConfigError, ModelConfig, preset
from fdpo.testing import make_hf_model, torch_token_logprobs
from tests.helpers.numerics import assert_as_accurate_as, assert_close_at_scale

pytestmark = pytest.mark.torch

torch.set_num_threads(2)

# float32 everywhere; the ports and transformers sum in different orders, so per-token
# log-probs agree to ~1e-6 abs. 1e-4 leaves room while a wrong rope/bias is off by >1e-2.
LOGP_ATOL = 1e-4
SEQUENCE_SUMS_RTOL = 1e-4

CASES = {
    # name: (arch, kwargs) -- chosen to cover the list
    "qwen2_untied_gqa": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=False)),
    "qwen2_tied_mqa": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=1,
                                     tie_word_embeddings=True, vocab_size=199)),
    "llama_linear_rope": ("llama", dict(num_attention_heads=4, num_key_value_heads=4,
                                        rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama_bias_legacy_config": ("llama", dict(num_attention_heads=8, num_key_value_heads=2,
                                               hidden_size=64, attention_bias=True,
                                               legacy_config=True,
                                               rope_scaling={"rope_type": "linear",
                                                             "factor": 2.0})),
}

ONE_DEVICE = sharding.make_mesh((1, 1, 1), jax.devices()[:1])


def fdpo_token_logprobs(cfg, graphdef, state, ids) -> np.ndarray:
    model = nnx.merge(graphdef, state)
    logits = model(jnp.asarray(ids))
    return np.asarray(logprobs.token_logprobs(logits, jnp.asarray(ids)), np.float64)


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_case(request, tmp_path_factory):
    arch, kw = CASES[request.param]
    out = tmp_path_factory.mktemp(request.param)
    model = make_hf_model(out, arch, **kw)
    return request.param, out, model


def test_parity_long_sequences(hf_case):
    """Per-token log-probs over 1,100 positions: a wrong rope theta shows past ~1k."""
    name, hf_dir, torch_model = hf_case
    cfg = ModelConfig.from_hf_dir(hf_dir)
    if "legacy" in name:
        raw = json.loads((hf_dir / "config.json").read_text())
        assert "rope_parameters" not in raw and raw["rope_scaling"]["type"] == "linear"
        assert cfg.rope_type == "linear" and cfg.rope_factor == 2.0
    graphdef, state = convert.load_hf_params(hf_dir, cfg, ONE_DEVICE)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(2, 1100))
    ours = fdpo_token_logprobs(cfg, graphdef, state, ids)
    ref = torch_token_logprobs(torch_model, ids)
    np.testing.assert_allclose(ours, ref, atol=LOGP_ATOL, rtol=0)
    np.testing.assert_allclose(ours.sum(-1), ref.sum(-1), rtol=SEQUENCE_SUMS_RTOL)


def test_rope_theta_matters_past_1k(tmp_path):
    """The parity test can fail: the same weights with a wrong theta disagree."""
    torch_model = make_hf_model(tmp_path, "qwen2")
    cfg = ModelConfig.from_hf_dir(tmp_path)
    graphdef, state = convert.load_hf_params(tmp_path, cfg, ONE_DEVICE)
    wrong = cfg.replace(rope_theta=1e4)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(1, 1100))
    ref = torch_token_logprobs(torch_model, ids)
    bad = fdpo_token_logprobs(wrong, nnx.graphdef(nnx.eval_shape(
        lambda: convert.Decoder(wrong, nnx.Rngs(0)))), state, ids)
    assert np.abs(bad - ref).max() > 100 * LOGP_ATOL


def test_import_export_bitwise_and_transformers_loads(hf_case, tmp_path):
    name, hf_dir, torch_model = hf_case
    ckpt = tmp_path / "ckpt"
    cfg = ModelConfig.from_hf_dir(hf_dir)
    graphdef, state = convert.load_hf_params(hf_dir, cfg, ONE_DEVICE)
    checkpoint.save_model(ckpt, cfg, state,
                          hf_config=json.loads((hf_dir / "config.json").read_text()),
                          extras_from=hf_dir)
    out = tmp_path / "hf2"
    checkpoint.export_hf(ckpt, out, ONE_DEVICE, max_shard_bytes=40_000)  # force several shards

    original = _read_all(hf_dir)
    exported = _read_all(out)
    assert set(exported) == set(original)
    if cfg.tie_embeddings:
        assert "lm_head.weight" not in exported
    for key, (dtype, data) in original.items():
        assert exported[key][0] == dtype, key
        assert exported[key][1] == data, f"{key} differs after import -> export"
    assert (out / "model.safetensors.index.json").is_file()

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(2, 50))
    np.testing.assert_array_equal(torch_token_logprobs(reloaded, ids),
                                  torch_token_logprobs(torch_model, ids))


def _read_all(hf_dir: pathlib.Path) -> dict[str, tuple[str, bytes]]:
    reader = convert.SafetensorsReader(hf_dir)
    return {k: (reader.shape_dtype(k)[1], reader.read(k).tobytes()) for k in reader.keys()}


def test_sharded_safetensors_and_bfloat16_roundtrip(tmp_path):
    make_hf_model(tmp_path / "hf", "qwen2", dtype="bfloat16", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    cfg = ModelConfig.from_hf_dir(tmp_path / "hf")
    assert cfg.checkpoint_dtype == cfg.param_dtype == "bfloat16"
    graphdef, state = convert.load_hf_params(tmp_path / "hf", cfg, ONE_DEVICE)
    checkpoint.save_model(tmp_path / "ck", cfg, state, extras_from=tmp_path / "hf")
    checkpoint.export_hf(tmp_path / "ck", tmp_path / "out", ONE_DEVICE, max_shard_bytes=1 << 30)
    assert (tmp_path / "out" / "model.safetensors").is_file()  # below threshold: one file
    a, b = _read_all(tmp_path / "hf"), _read_all(tmp_path / "out")
    assert a == b


def test_scan_unrolled_remat_agree(tmp_path):
    make_hf_model(tmp_path, "llama", num_hidden_layers=3)
    cfg = ModelConfig.from_hf_dir(tmp_path)
    graphdef, state = convert.load_hf_params(tmp_path, cfg, ONE_DEVICE)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, 40))
    results = []
    for variant in (dict(), dict(scan_layers=False), dict(remat_policy="full"),
                    dict(scan_layers=False, remat_policy="dots")):
        vcfg = cfg.replace(**variant)
        vgraph = nnx.graphdef(nnx.eval_shape(lambda: convert.Decoder(vcfg, nnx.Rngs(0))))
        loss = lambda st: logprobs.token_logprobs(nnx.merge(vgraph, st)(jnp.asarray(ids)),
                                                  jnp.asarray(ids)).sum()
        value, grads = jax.value_and_grad(loss)(state)
        results.append((float(value), jax.tree.leaves(grads)))
    for value, grads in results[1:]:
        assert value == pytest.approx(results[0][0], rel=1e-6)
        for g, g0 in zip(grads, results[0][1]):
            # float32, different fusion and summation order: agree to 1e-5 of the scale.
            assert np.abs(g - g0).max() <= 1e-5 * np.abs(g0).max()


def test_bfloat16_compute_is_close(tmp_path):
    torch_model = make_hf_model(tmp_path, "qwen2")
    cfg = ModelConfig.from_hf_dir(tmp_path, compute_dtype="bfloat16")
    graphdef, state = convert.load_hf_params(tmp_path, cfg, ONE_DEVICE)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, size=(2, 64))
    ours = fdpo_token_logprobs(cfg, graphdef, state, ids)
    ref = torch_token_logprobs(torch_model, ids)
    # bf16 has 8 bits of mantissa: sequence sums stay within a few percent.
    np.testing.assert_allclose(ours.sum(-1), ref.sum(-1), rtol=3e-2)


def test_mesh_2x2x2_matches_one_device(tmp_path):
    assert jax.device_count() == 8, "conftest must set 8 fake CPU devices before JAX starts"
    torch_model = make_hf_model(tmp_path, "qwen2", num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=256, intermediate_size=128)
    cfg = ModelConfig.from_hf_dir(tmp_path)
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, size=(4, 48))
    g1, s1 = convert.load_hf_params(tmp_path, cfg, ONE_DEVICE)
    expected = np.asarray(nnx.merge(g1, s1)(jnp.asarray(ids)))

    mesh = sharding.make_mesh((2, 2, 2))
    g8, s8 = convert.load_hf_params(tmp_path, cfg, mesh)
    q = s8["layers"]["attn"]["q_kernel"]
    assert q.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor",
                                                                     None)
    assert len(q.get_value().sharding.device_set) == 8

    @jax.jit
    def forward(state, ids):
        with sharding.use_mesh(mesh):
            return nnx.merge(g8, state)(ids)

    batch = jax.device_put(jnp.asarray(ids), sharding.data_sharding(mesh))
    got = forward(s8, batch)
    assert len(got.sharding.device_set) == 8
    # Sharded matmuls reduce in another order, so the two float32 results differ by their
    # rounding, which depends on the machine. Against float64 logits (transformers in
    # double precision), the sharded forward must be as accurate as the one-device one.
    with torch.no_grad():
        exact = torch_model.double()(torch.as_tensor(ids)).logits.numpy()
    assert_close_at_scale(expected, exact, rtol=1e-4, what="one device vs float64")
    assert_as_accurate_as(np.asarray(got), expected, exact, what="2x2x2 mesh")


def test_packed_segments_and_shared_prefix_branches(tmp_path):
    """The attention structure ids: packing and a trunk with two branches."""
    make_hf_model(tmp_path, "qwen2")
    cfg = ModelConfig.from_hf_dir(tmp_path)
    graphdef, state = convert.load_hf_params(tmp_path, cfg, ONE_DEVICE)
    model = nnx.merge(graphdef, state)
    rng = np.random.default_rng(6)
    trunk, a, b = (rng.integers(0, cfg.vocab_size, n) for n in (7, 5, 4))

    def alone(seq):
        return np.asarray(model(jnp.asarray(seq)[None]))[0]

    # Packed: two sequences in one row, separated by segment ids, positions restart.
    s1, s2 = np.concatenate([trunk, a]), np.concatenate([trunk, b])
    packed = np.concatenate([s1, s2])[None]
    seg = np.array([[1] * len(s1) + [2] * len(s2)])
    pos = np.array([list(range(len(s1))) + list(range(len(s2)))])
    out = np.asarray(model(jnp.asarray(packed), jnp.asarray(pos), jnp.asarray(seg)))[0]
    np.testing.assert_allclose(out[:len(s1)], alone(s1), atol=1e-5)
    np.testing.assert_allclose(out[len(s1):], alone(s2), atol=1e-5)

    # Shared trunk once, then branch 1 and branch 2; branch 2's positions continue the trunk.
    row = np.concatenate([trunk, a, b])[None]
    branch = np.array([[0] * len(trunk) + [1] * len(a) + [2] * len(b)])
    pos = np.array([list(range(len(trunk) + len(a))) +
                    list(range(len(trunk), len(trunk) + len(b)))])
    out = np.asarray(model(jnp.asarray(row), jnp.asarray(pos), None, jnp.asarray(branch)))[0]
    np.testing.assert_allclose(out[:len(trunk) + len(a)], alone(s1), atol=1e-5)
    np.testing.assert_allclose(out[len(trunk) + len(a):], alone(s2)[len(trunk):], atol=1e-5)


def test_chunked_logprobs_match_naive():
    rng = np.random.default_rng(7)
    hidden = jnp.asarray(rng.normal(size=(2, 37, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(101, 16)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 101, size=(2, 37)))

    def naive(h, w):
        return logprobs.token_logprobs(jnp.einsum("btd,vd->btv", h, w), ids).sum()

    def chunked(h, w):
        return logprobs.token_logprobs_from_hidden(h, w, ids, chunk=8).sum()

    v1, g1 = jax.value_and_grad(naive, argnums=(0, 1))(hidden, w)
    v2, g2 = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, w)
    assert float(v1) == pytest.approx(float(v2), rel=1e-6)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Configs and bad input
# ----------------------------------------------------------------------------------------


def test_presets_have_published_sizes():
    assert preset("qwen2.5-coder-7b").num_params == pytest.approx(7.62e9, rel=0.01)
    assert preset("qwen2.5-coder-0.5b").num_params == pytest.approx(0.494e9, rel=0.01)
    assert preset("qwen2.5-coder-1.5b").num_params == pytest.approx(1.54e9, rel=0.01)
    ds = preset("deepseek-coder-6.7b")
    assert ds.num_params == pytest.approx(6.74e9, rel=0.01)
    assert (ds.rope_type, ds.rope_factor, ds.rope_theta) == ("linear", 4.0, 1e5)


def test_both_config_layouts_read_the_same(tmp_path):
    make_hf_model(tmp_path / "new", "llama", rope_scaling={"rope_type": "linear", "factor": 4.0})
    make_hf_model(tmp_path / "old", "llama", rope_scaling={"rope_type": "linear", "factor": 4.0},
                  legacy_config=True)
    assert ModelConfig.from_hf_dir(tmp_path / "new") == ModelConfig.from_hf_dir(tmp_path / "old")


def test_unsupported_rope_type_is_named(tmp_path):
    make_hf_model(tmp_path, "llama")
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e5}
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"rope_parameters\.rope_type='yarn'"):
        ModelConfig.from_hf_dir(tmp_path)
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=1e5, rope_scaling={"type": "dynamic", "factor": 2.0})
    path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"rope_scaling\.rope_type='dynamic'"):
        ModelConfig.from_hf_dir(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf_dir(tmp_path)
    make_hf_model(tmp_path / "m", "qwen2", max_shard_size="50KB")
    cfg = ModelConfig.from_hf_dir(tmp_path / "m")
    shard = sorted((tmp_path / "m").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        convert.load_hf_params(tmp_path / "m", cfg, ONE_DEVICE)
    for f in (tmp_path / "m").glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        convert.load_hf_params(tmp_path / "m", cfg, ONE_DEVICE)
    with pytest.raises(FileNotFoundError, match="fdpo_model.json"):
        checkpoint.load_model(tmp_path / "m", ONE_DEVICE)


def test_shape_mismatch_names_the_tensor(tmp_path):
    make_hf_model(tmp_path, "qwen2", intermediate_size=96)
    path = tmp_path / "config.json"
    cfg = json.loads(path.read_text())
    cfg["intermediate_size"] = 128
    path.write_text(json.dumps(cfg))
    with pytest.raises(convert.CheckpointMismatch, match=r"mlp\.gate_proj\.weight.*\(96, 64\)"):
        convert.load_hf_params(tmp_path, ModelConfig.from_hf_dir(tmp_path), ONE_DEVICE)
    cfg["intermediate_size"] = 96
    cfg["num_hidden_layers"] = 3
    path.write_text(json.dumps(cfg))
    with pytest.raises(convert.CheckpointMismatch, match=r"missing \['model\.layers\.2\."):
        convert.load_hf_params(tmp_path, ModelConfig.from_hf_dir(tmp_path), ONE_DEVICE)


def test_checkpoint_with_wrong_config_is_refused(tmp_path):
    make_hf_model(tmp_path / "hf", "qwen2")
    cfg = ModelConfig.from_hf_dir(tmp_path / "hf")
    _, state = convert.load_hf_params(tmp_path / "hf", cfg, ONE_DEVICE)
    checkpoint.save_model(tmp_path / "ck", cfg, state)
    meta_path = tmp_path / "ck" / checkpoint.METADATA_FILE
    meta = json.loads(meta_path.read_text())
    meta["model_config"]["hidden_size"] = 48
    meta["model_config"]["head_dim"] = 12
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shapes do not match"):
        checkpoint.load_model(tmp_path / "ck", ONE_DEVICE)
