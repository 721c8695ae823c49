"""One reference contract, as a user meets it: launch.precompute_ref with the training
config, then launch.train on its output (configs/focused_dpo.py defaults: bfloat16 compute,
shared-prompt rows), and a separate reference model in frozen and precomputed modes."""
from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from fdpo import records, reference, sharding
from fdpo.models import checkpoint, convert
from fdpo.models.config import ModelConfig
from fdpo.testing import make_hf_model, random_pairs, write_dataset

ONE_DEVICE = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
STEPS = 3
RUN = [f"--config.train.num_steps={STEPS}", "--config.train.batch_size=8",
       "--config.log.every_steps=1", "--config.log.eval_every_steps=1000",
       "--config.log.eval_max_batches=1", "--config.checkpoint.every_steps=1000",
       "--config.log.tensorboard=False", "--config.optimizer.lr=1e-3",
       "--config.optimizer.warmup_steps=0"]

pytestmark = [pytest.mark.slow, pytest.mark.torch]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Two tiny Qwen2 models (the policy, another reference) as fdpo checkpoints, a pair
    dataset, and a compilation cache shared by the module's programs."""
    base = tmp_path_factory.mktemp("reference")
    for name, seed in (("policy", 0), ("other", 1)):
        make_hf_model(base / f"hf_{name}", "qwen2", seed=seed, vocab_size=211)
        cfg = ModelConfig.from_hf_dir(base / f"hf_{name}")
        _, state = convert.load_hf_params(base / f"hf_{name}", cfg, ONE_DEVICE)
        checkpoint.save_model(base / name, cfg, state, hf_config=json.loads(
            (base / f"hf_{name}" / "config.json").read_text()), extras_from=base / f"hf_{name}")
    write_dataset(base / "data", {"train": random_pairs(24, 32, 211, seed=0),
                                  "validation": random_pairs(8, 32, 211, seed=1)})
    env = {"JAX_COMPILATION_CACHE_DIR": str(base / "jaxcache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    return base, env


def config_arg(base, data):
    return f"--config=configs/focused_dpo.py:model={base / 'policy'},data={base / data}"


def precompute(program, base, env, out, *extra):
    program("launch.precompute_ref", config_arg(base, "data"), f"--out={base / out}",
            "--batch_size=8", *extra, env=env)
    return records.read_manifest(base / out / "manifest.json")["reference"]


def train(program, base, env, workdir, data, *extra, check=True):
    return program("launch.train", f"--workdir={base / workdir}", config_arg(base, data),
                   *RUN, *extra, env=env, check=check)


def train_lines(base, workdir):
    lines = [json.loads(x) for x in open(base / workdir / "metrics.jsonl")]
    return [m for m in lines if m["split"] == "train"]


def test_policy_as_its_own_precomputed_reference_starts_at_ln2_and_refuses_mismatch(
        setup, program):
    base, env = setup
    prov = precompute(program, base, env, "data_ref")
    from configs import focused_dpo
    default = focused_dpo.get_config()  # the run's defaults are what the record holds
    assert prov["compute_dtype"] == default.model.compute_dtype == "bfloat16"
    assert prov["logprob_chunk"] == default.train.logprob_chunk
    assert prov["checkpoint"] == str(base / "policy") and len(prov["identity"]) == 64

    train(program, base, env, "own", "data_ref", "--config.loss.reference=precomputed")
    first = train_lines(base, "own")[0]
    assert first["step"] == 1
    # Policy == reference at step 1: every log-ratio is 0, so loss = -log sigmoid(0).
    assert abs(first["loss"] - math.log(2)) < 1e-6
    assert first["rewards/accuracies"] == 0.0 and first["rewards/margins"] == 0.0

    # Reference sums in float32 for a bfloat16 run: refused, naming both dtypes.
    precompute(program, base, env, "data_f32", "--config.model.compute_dtype=float32")
    proc = train(program, base, env, "f32", "data_f32", "--config.loss.reference=precomputed",
                 check=False)
    assert proc.returncode != 0
    assert "compute dtype float32" in proc.stderr and "compute dtype bfloat16" in proc.stderr
    assert "compute_dtype differ" in proc.stderr
    # Sums of another model, trained as if the policy were the reference: refused, naming
    # both models.
    other = precompute(program, base, env, "data_other",
                       f"--config.reference.checkpoint={base / 'other'}")
    assert other["identity"] != prov["identity"]
    proc = train(program, base, env, "other_refused", "data_other",
                 "--config.loss.reference=precomputed", check=False)
    assert proc.returncode != 0 and "identity differ" in proc.stderr
    assert str(base / "other") in proc.stderr and str(base / "policy") in proc.stderr
    assert other["identity"][:16] in proc.stderr and prov["identity"][:16] in proc.stderr
    assert not (base / "f32" / "final").exists() and not (base / "other_refused" / "final").exists()


def test_separate_reference_frozen_and_precomputed_give_the_same_losses(setup, program):
    base, env = setup
    ref = f"--config.reference.checkpoint={base / 'other'}"
    if not (base / "data_other").exists():
        precompute(program, base, env, "data_other", ref)
    train(program, base, env, "frozen_other", "data", ref)
    train(program, base, env, "pre_other", "data_other", ref,
          "--config.loss.reference=precomputed")
    frozen, pre = train_lines(base, "frozen_other"), train_lines(base, "pre_other")
    assert [m["step"] for m in frozen] == [m["step"] for m in pre] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([m["loss"] for m in pre], [m["loss"] for m in frozen],
                               rtol=0, atol=1e-5)
    # A reference other than the policy: the step-1 loss is not ln 2.
    assert abs(frozen[0]["loss"] - math.log(2)) > 1e-3


def test_identity_is_the_parameters_not_where_they_were_loaded_from(setup):
    """The same weights read from the fdpo checkpoint and from the HF directory hash alike;
    one changed element changes the hash."""
    base, _ = setup
    _, _, a, _ = checkpoint.load_checkpoint_or_hf(ONE_DEVICE, checkpoint=str(base / "policy"))
    _, _, b, _ = checkpoint.load_checkpoint_or_hf(ONE_DEVICE, hf_dir=str(base / "hf_policy"))
    from flax import nnx

    pa, pb = nnx.to_pure_dict(a), nnx.to_pure_dict(b)
    assert reference.identity(pa) == reference.identity(pb)
    leaves, treedef = jax.tree.flatten(pb)
    changed = np.array(leaves[0])
    changed.flat[0] += 1.0
    pc = jax.tree.unflatten(treedef, [changed] + leaves[1:])
    assert reference.identity(pc) != reference.identity(pa)
