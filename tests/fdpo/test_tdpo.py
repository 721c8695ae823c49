"""Token-level DPO (TDPO1, TDPO2) against an independent PyTorch implementation.

The reference side never calls fdpo: transformers' own forward gives the full logits of
policy and reference, the per-position KL(p_ref || p_theta) is taken over the whole
vocabulary with no chunking, and the loss of Zeng et al. (arXiv 2404.11999) is written out
below; torch autograd gives its gradient. fdpo's side is the trainer's step code (chunked
log-softmax of both models side by side, micro-batches, shared-prompt rows or not).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import focused_dpo
from fdpo import logprobs, sharding, train, train_loop
from fdpo import loss as loss_lib
from fdpo.models import convert
from fdpo.models.config import ModelConfig
from fdpo.records import Segment, shared_row_lengths
from fdpo.testing import make_hf_model, random_pairs, stack
from tests.helpers.models import models  # noqa: F401  (fixture)

pytestmark = pytest.mark.torch

torch.set_num_threads(2)

ONE_DEVICE = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
LENGTH = 32
# float32 on both sides: per-token log-probs and KLs agree to ~1e-6, so losses of ~20-token
# sums to well within 1e-4 relative; gradients (summed over tokens and pairs) to 1e-3.
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-6
GRAD_RTOL = 1e-3


@pytest.fixture(scope="module")
def pairs():
    return stack(random_pairs(6, LENGTH, vocab=211, seed=0))


def torch_tdpo(policy, reference, pairs, *, kind, beta, alpha=0.5, kl_weights=None):
    """The TDPO loss (mean over pairs) on transformers' full logits, written out:

        KL(y)  = sum_t w[seg_t] sum_v p_ref(v | ctx_t) (log p_ref(v | ctx_t) - log p(v | ctx_t))
        u      = (log p(y_c) - log p_ref(y_c)) - (log p(y_r) - log p_ref(y_r))
        tdpo1  = -log sigmoid(beta (u - (KL(y_r) - KL(y_c))))
        tdpo2  = -log sigmoid(beta (u - alpha (KL(y_r) - stopgrad(KL(y_c)))))

    over response tokens only. Returns (loss tensor with autograd to the policy, KL per side
    [B] as numpy)."""
    w = np.ones((2, 5)) if kl_weights is None else np.asarray(kl_weights, np.float64)
    ratio, kl = [], []
    for s, side in enumerate(("chosen", "rejected")):
        ids = torch.as_tensor(pairs[f"{side}_ids"], dtype=torch.long)
        seg = pairs[f"{side}_segments"][:, 1:]
        logp = torch.log_softmax(policy(ids).logits.float()[:, :-1], -1)
        with torch.no_grad():
            ref_logp = torch.log_softmax(reference(ids).logits.float()[:, :-1], -1)
        kl_tok = (ref_logp.exp() * (ref_logp - logp)).sum(-1)  # [B, L-1]
        target = ids[:, 1:, None]
        lr = torch.gather(logp, -1, target)[..., 0] - torch.gather(ref_logp, -1, target)[..., 0]
        response = torch.as_tensor(seg >= Segment.PREFIX, dtype=torch.float32)
        col = np.clip(seg.astype(int) - int(Segment.PREFIX), 0, 4)
        kl_w = torch.as_tensor(np.where(seg >= Segment.PREFIX, w[s][col], 0.0),
                               dtype=torch.float32)
        ratio.append((lr * response).sum(-1))
        kl.append((kl_tok * kl_w).sum(-1))
    u = ratio[0] - ratio[1]
    if kind == "tdpo1":
        z = beta * (u - (kl[1] - kl[0]))
    else:
        z = beta * (u - alpha * (kl[1] - kl[0].detach()))
    loss = -torch.nn.functional.logsigmoid(z).mean()
    return loss, [k.detach().numpy() for k in kl]


_TRAINERS = {}


def trainer_for(models, loss_cfg, shared_length=0):
    key = (loss_cfg, shared_length)
    if key not in _TRAINERS:
        tx, _ = train.make_optimizer(train.OptimizerConfig(), 10)
        _TRAINERS[key] = train.Trainer(models["cfg"], loss_cfg, tx, ONE_DEVICE, chunk=8,
                                       shared_length=shared_length)
    return _TRAINERS[key]


def shared_length(pairs):
    return int(shared_row_lengths(pairs["chosen_segments"], pairs["rejected_segments"]).max())


def fdpo_eval(models, pairs, loss_cfg, shared=False, ref_params=None):
    trainer = trainer_for(models, loss_cfg, shared_length(pairs) if shared else 0)
    batch = trainer.make_batch(pairs, micro_batches=2)
    ref = models["reference"][1] if ref_params is None else ref_params
    sums = jax.device_get(trainer.eval_step(models["policy"][1], batch, ref))
    return train.eval_metrics(sums, loss_cfg)


def fdpo_grads(models, pairs, loss_cfg, shared=False):
    """The gradient of the step's loss (one micro-batch: the whole batch) with respect to the
    policy's parameters, as HF-layout numpy arrays keyed by HF name."""
    trainer = trainer_for(models, loss_cfg, shared_length(pairs) if shared else 0)
    batch = trainer.make_batch(pairs, micro_batches=1)
    micro = jax.tree.map(lambda x: x[0], batch)
    num_pairs, num_chosen = trainer._normalisers(batch)

    def loss_fn(p):
        return trainer._micro_loss(p, micro, models["reference"][1], num_pairs, num_chosen)[0]

    grads = jax.jit(jax.grad(loss_fn))(models["policy"][1])
    return {k: np.asarray(v, np.float64) for k, v in convert.iter_hf_tensors(models["cfg"],
                                                                              grads)}


CASES = {
    "tdpo1": (loss_lib.preset("tdpo1", beta=0.5), dict(kind="tdpo1", beta=0.5)),
    "tdpo2": (loss_lib.preset("tdpo2", beta=0.5), dict(kind="tdpo2", beta=0.5, alpha=0.5)),
    "tdpo2_alpha2": (loss_lib.preset("tdpo2", beta=0.3, tdpo_alpha=2.0),
                     dict(kind="tdpo2", beta=0.3, alpha=2.0)),
    # Focused TDPO: only the mids' KL (lead/trail follow prefix/suffix: weight 0).
    "tdpo1_mid_kl": (loss_lib.preset("tdpo1", beta=0.5, kl_weights=((0, 1, 0), (0, 1, 0))),
                     dict(kind="tdpo1", beta=0.5,
                          kl_weights=((0, 1, 0, 0, 0), (0, 1, 0, 0, 0)))),
}


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_tdpo_loss_matches_torch(name, shared, models, pairs):
    loss_cfg, formula = CASES[name]
    with torch.no_grad():
        want, (kl_c, kl_r) = torch_tdpo(models["policy"][0], models["reference"][0], pairs,
                                        **formula)
    got = fdpo_eval(models, pairs, loss_cfg, shared=shared)
    assert got["loss"] == pytest.approx(float(want), rel=LOSS_RTOL, abs=LOSS_ATOL)
    if "kl_weights" not in formula:  # the metrics report the unweighted KL
        assert got["kl/chosen"] == pytest.approx(kl_c.mean(), rel=LOSS_RTOL)
        assert got["kl/rejected"] == pytest.approx(kl_r.mean(), rel=LOSS_RTOL)
        parts = sum(got[f"kl/chosen_{s}"] for s in loss_lib.SEGMENT_NAMES)
        assert parts == pytest.approx(got["kl/chosen"], rel=1e-5)
    # Discriminating: the KL term moves the loss well past the tolerance.
    dpo = fdpo_eval(models, pairs, loss_lib.preset("dpo", beta=formula["beta"]))
    assert abs(got["loss"] - dpo["loss"]) > 1e-2
    assert kl_c.min() > 0.1


@pytest.mark.parametrize("name", ["tdpo1", "tdpo2"])
def test_tdpo_gradients_match_torch(name, models, pairs):
    """torch autograd through the written-out loss against jax.grad of the step's loss, for
    every parameter (HF layout)."""
    loss_cfg, formula = CASES[name]
    policy = models["policy"][0]
    policy.zero_grad()
    loss, _ = torch_tdpo(policy, models["reference"][0], pairs, **formula)
    loss.backward()
    want = {k: p.grad.double().numpy() for k, p in policy.named_parameters()}
    got = fdpo_grads(models, pairs, loss_cfg)
    assert set(got) == set(want)
    for k in want:
        scale = np.abs(want[k]).max()
        assert scale > 0, k
        np.testing.assert_allclose(got[k], want[k], rtol=GRAD_RTOL, atol=GRAD_RTOL * scale,
                                   err_msg=k)


def test_tdpo_shared_rows_give_the_separate_rows_gradient(models, pairs):
    loss_cfg = CASES["tdpo2"][0]
    sep = fdpo_grads(models, pairs, loss_cfg)
    shr = fdpo_grads(models, pairs, loss_cfg, shared=True)
    for k in sep:
        np.testing.assert_allclose(shr[k], sep[k], rtol=1e-4,
                                   atol=1e-4 * np.abs(sep[k]).max(), err_msg=k)


def test_tdpo2_with_alpha_zero_is_dpo(models, pairs):
    tdpo = fdpo_eval(models, pairs, loss_lib.preset("tdpo2", beta=0.5, tdpo_alpha=0.0))
    dpo = fdpo_eval(models, pairs, loss_lib.preset("dpo", beta=0.5))
    for key in ("loss", "rewards/margins", "rewards/chosen", "logps/rejected"):
        assert tdpo[key] == pytest.approx(dpo[key], rel=1e-6, abs=1e-7), key
    g_tdpo = fdpo_grads(models, pairs, loss_lib.preset("tdpo2", beta=0.5, tdpo_alpha=0.0))
    g_dpo = fdpo_grads(models, pairs, loss_lib.preset("dpo", beta=0.5))
    for k in g_dpo:
        np.testing.assert_allclose(g_tdpo[k], g_dpo[k], rtol=1e-5,
                                   atol=1e-6 * np.abs(g_dpo[k]).max(), err_msg=k)


def test_kl_is_zero_when_policy_is_reference(models, pairs):
    """Same parameters: every KL is 0, the margin is 0, the loss is log 2."""
    got = fdpo_eval(models, pairs, CASES["tdpo1"][0], ref_params=models["policy"][1])
    assert abs(got["kl/chosen"]) < 1e-6 and abs(got["kl/rejected"]) < 1e-6
    assert got["loss"] == pytest.approx(np.log(2.0), abs=1e-6)


def _naive_kl(hidden, w, ref_hidden, ref_w):
    """Full [B, T, V] softmaxes, written out."""
    logp = jax.nn.log_softmax(jnp.einsum("btd,vd->btv", hidden, w), -1)
    ref_logp = jax.nn.log_softmax(jnp.einsum("btd,vd->btv", ref_hidden, ref_w), -1)
    return jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), -1), logp, ref_logp


def test_chunked_kl_equals_unchunked_with_gradients():
    """Chunk boundaries that do not divide the length, a non-uniform cotangent; KL >= 0."""
    rng = np.random.default_rng(2)
    hidden, ref_hidden = (jnp.asarray(rng.normal(size=(3, 29, 16)), jnp.float32)
                          for _ in range(2))
    w, ref_w = (jnp.asarray(rng.normal(size=(97, 16)), jnp.float32) for _ in range(2))
    ids = jnp.asarray(rng.integers(0, 97, size=(3, 29)))
    coef = jnp.asarray(rng.normal(size=(3, 3, 29)), jnp.float32)

    def naive(h, w):
        kl, logp, ref_logp = _naive_kl(h, w, ref_hidden, ref_w)
        pick = lambda x: jnp.take_along_axis(x, ids[..., None], -1)[..., 0]  # noqa: E731
        return (jnp.stack([pick(logp), pick(ref_logp), kl]) * coef).sum(), kl

    def chunked(h, w):
        outs = logprobs.target_logprobs_and_kl(h, w, ref_hidden, ref_w, ids, chunk=5)
        return (jnp.stack(outs) * coef).sum(), outs[2]

    (v1, kl1), g1 = jax.value_and_grad(naive, argnums=(0, 1), has_aux=True)(hidden, w)
    (v2, kl2), g2 = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, w)
    np.testing.assert_allclose(kl2, kl1, rtol=1e-5, atol=1e-5)
    assert float(v2) == pytest.approx(float(v1), rel=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)
    assert float(kl2.min()) >= 0.0 and float(kl2.mean()) > 0.1
    # The reference is frozen: no gradient reaches it.
    g_ref = jax.grad(lambda r: jnp.sum(jnp.stack(
        logprobs.target_logprobs_and_kl(hidden, w, r, ref_w, ids, 5))))(ref_hidden)
    assert np.all(np.asarray(g_ref) == 0.0)


def test_tdpo_refuses_a_precomputed_reference(models):
    tx, _ = train.make_optimizer(train.OptimizerConfig(), 10)
    with pytest.raises(ValueError, match="frozen"):
        train.Trainer(models["cfg"], CASES["tdpo2"][0], tx, ONE_DEVICE, reference="precomputed")
    c = focused_dpo.get_config("model=/m,data=/d,preset=tdpo2")
    c.loss.reference = "precomputed"
    with pytest.raises(ValueError, match="loss.reference=frozen"):
        train_loop.check_config(c)
    c.loss.reference = "frozen"
    train_loop.check_config(c)
    with pytest.raises(ValueError, match="needs the per-position KL"):
        loss_lib.pair_terms(jnp.zeros((1, 2, 5)), jnp.zeros((1, 2, 5)), CASES["tdpo1"][0])


def test_tdpo_from_the_run_config():
    c = focused_dpo.get_config("model=/m,data=/d,preset=tdpo2")
    cfg = loss_lib.from_config(c.loss)
    assert (cfg.loss_type, cfg.tdpo_alpha, cfg.kl_weights) == ("tdpo2", 0.5, None)
    assert cfg.weights == loss_lib.weight_table("dpo")
    c.loss.tdpo_alpha, c.loss.kl_weights = 0.25, ((0, 1, 0), (0, 1, 1))
    cfg = loss_lib.from_config(c.loss)
    assert cfg.tdpo_alpha == 0.25
    assert cfg.kl_weights == ((0.0, 1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="tdpo_alpha"):
        loss_lib.preset("tdpo2", tdpo_alpha=-1.0)


@pytest.mark.slow
def test_launch_train_runs_tdpo_and_refuses_a_precomputed_reference(tmp_path, program):
    """The user's path: `launch.train` with preset=tdpo2 and the default config otherwise
    (shared-prompt rows, frozen reference) trains and logs the KL metrics;
    `loss.reference=precomputed` is a usage error naming the key, before any step."""
    import json

    from fdpo.models import checkpoint
    from fdpo.testing import write_dataset

    hf = tmp_path / "hf"
    make_hf_model(hf, "qwen2", seed=0)
    cfg = ModelConfig.from_hf_dir(hf)
    _, state = convert.load_hf_params(hf, cfg, ONE_DEVICE)
    checkpoint.save_model(tmp_path / "ckpt", cfg, state,
                          hf_config=json.loads((hf / "config.json").read_text()),
                          extras_from=hf)
    write_dataset(tmp_path / "data", {"train": random_pairs(16, 32, 211, seed=0),
                                      "validation": random_pairs(4, 32, 211, seed=1)})
    config = (f"--config=configs/focused_dpo.py:model={tmp_path / 'ckpt'},"
              f"data={tmp_path / 'data'},preset=tdpo2,runlocal")
    args = ["--config.train.num_steps=4", "--config.log.eval_every_steps=4",
            "--config.checkpoint.every_steps=4", "--config.log.tensorboard=False"]
    refused = program("launch.train", f"--workdir={tmp_path / 'no'}", config, *args,
                      "--config.loss.reference=precomputed", check=False)
    assert refused.returncode != 0
    assert "loss.reference=frozen" in refused.stderr
    assert not (tmp_path / "no" / "metrics.jsonl").exists()
    program("launch.train", f"--workdir={tmp_path / 'run'}", config, *args,
            env={"JAX_PLATFORMS": "cpu"})
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    train_lines = [m for m in lines if m["split"] == "train"]
    assert [m["step"] for m in train_lines] == [1, 2, 3, 4]
    first = train_lines[0]
    # Step 1: policy = reference, so KL 0 and loss ln 2; later steps move away.
    assert first["loss"] == pytest.approx(np.log(2.0), abs=1e-5)
    assert abs(first["kl/chosen"]) < 1e-6
    assert train_lines[-1]["kl/chosen"] > 0 and "kl/rejected_mid" in train_lines[-1]
    assert any(m["split"] == "validation" and "kl/chosen" in m for m in lines)


def test_tdpo_step_on_8_devices_matches_one_device():
    """Vocabulary sharded over `tensor`, batch over data x fsdp: the chunked KL's sums over
    the vocabulary and the step's gradient (2 SGD steps) match one device."""
    import optax

    from fdpo.testing import random_params

    assert jax.device_count() == 8, "conftest must set 8 fake CPU devices before JAX starts"
    cfg = ModelConfig(architecture="qwen2", vocab_size=256, hidden_size=64,
                      intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, rms_norm_eps=1e-6, rope_theta=1e4, qkv_bias=True)
    data = stack(random_pairs(8, 32, 256, seed=0))
    loss_cfg = loss_lib.preset("tdpo2", beta=0.5)
    runs = []
    for mesh in (ONE_DEVICE, sharding.make_mesh((2, 2, 2))):
        trainer = train.Trainer(cfg, loss_cfg, optax.sgd(0.5), mesh, chunk=8,
                                shared_length=shared_length(data))
        params = jax.device_put(random_params(cfg, 0), trainer.param_shardings)
        ref = jax.device_put(random_params(cfg, 1), trainer.param_shardings)
        state, batch = trainer.init_state(params), trainer.make_batch(data, 2)
        metrics = []
        for _ in range(2):
            state, m = trainer.train_step(state, batch, ref)
            metrics.append(jax.device_get(m))
        runs.append((jax.device_get(state["params"]), metrics))
    (p1, m1), (p8, m8) = runs
    for a, b in zip(m1, m8):
        for key in ("loss", "kl/chosen", "kl/rejected_mid"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-5), key
    assert m1[1]["loss"] < m1[0]["loss"]
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-5 * np.abs(x).max())


def test_pipeline_trains_tdpo_methods_with_the_frozen_reference(tmp_path, monkeypatch):
    """Listed in the pipeline's `methods`, tdpo1/tdpo2 reach launch.train as their presets
    with `loss.reference=frozen` (the other methods keep the precomputed sums), and the
    config they run with passes launch.train's check."""
    from tests.conftest import REPO
    from tests.launch.test_pipeline import config, program_config, stage_calls

    cfg = config("toy:fast", tmp_path)
    cfg.methods = ("focused_dpo", "tdpo1", "tdpo2")
    calls = stage_calls(cfg, tmp_path / "run")
    monkeypatch.chdir(REPO)
    trains = {}
    for stage, module, args in calls:
        if stage == "train":
            c = program_config(module, args)
            trains[(c.loss.preset, c.loss.reference)] = c
    assert set(trains) == {("focused_dpo", "precomputed"), ("tdpo1", "frozen"),
                           ("tdpo2", "frozen")}
    for c in trains.values():
        train_loop.check_config(c)
        assert loss_lib.from_config(c.loss).is_tdpo == c.loss.preset.startswith("tdpo")
