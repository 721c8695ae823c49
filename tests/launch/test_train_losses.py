"""The baseline losses of issue 16 as a user selects them: a preset name (or a loss field) in
configs/focused_dpo.py, a method name in the pipeline's list, and launch.train running it.
Their values are tested against PyTorch in tests/fdpo/test_loss.py."""
from __future__ import annotations

import json
import math

import jax
import pytest

from configs import focused_dpo
from fdpo import loss as loss_lib
from fdpo import pipeline, sharding
from fdpo.models import checkpoint, convert
from fdpo.models.config import ModelConfig
from fdpo.testing import make_hf_model, random_pairs, write_dataset


def test_presets_from_the_run_config():
    """Each preset through `get_config(preset=...)` and `loss.from_config`, the path of
    launch.train, with the fields the preset sets and the ones a user overrides."""
    got = {name: loss_lib.from_config(focused_dpo.get_config(f"preset={name}").loss)
           for name in ("dpop", "dpo_nll", "ipo_length_norm", "mid_only")}
    ones = ((1.0,) * 5, (1.0,) * 5)
    assert got["dpop"] == loss_lib.LossConfig(weights=ones, dpop_lambda=50.0)
    assert got["dpo_nll"] == loss_lib.LossConfig(weights=ones, nll_weight=1.0)
    assert got["ipo_length_norm"] == loss_lib.LossConfig(weights=ones, loss_type="ipo",
                                                         length_normalize=True)
    assert got["mid_only"].weights == ((0, 1, 0, 0, 0), (0, 1, 0, 0, 0))
    c = focused_dpo.get_config("preset=focused_dpo")
    c.loss.dpop_lambda, c.loss.dpop_weighted = 5.0, True  # focused DPOP, weighted penalty
    cfg = loss_lib.from_config(c.loss)
    assert (cfg.dpop_lambda, cfg.dpop_weighted, cfg.weights[0][1]) == (5.0, True, 2.0)
    c = focused_dpo.get_config("preset=dpo_nll")
    c.loss.nll_weight = 0.25
    assert loss_lib.from_config(c.loss).nll_weight == 0.25
    c = focused_dpo.get_config("preset=dpo")
    c.loss.loss_type, c.loss.length_normalize = "ipo", True
    assert loss_lib.from_config(c.loss) == got["ipo_length_norm"]
    c.loss.loss_type = "sigmoid"
    with pytest.raises(ValueError, match="length_normalize"):
        loss_lib.from_config(c.loss)


def test_every_pipeline_method_is_a_train_preset():
    for method, name in pipeline.METHOD_PRESETS.items():
        assert isinstance(loss_lib.preset(name), loss_lib.LossConfig), method
    assert {"mid_only", "dpop", "dpo_nll", "ipo_length_norm"} <= set(pipeline.METHOD_PRESETS)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Qwen2 imported into an fdpo checkpoint, and a pair dataset."""
    base = tmp_path_factory.mktemp("losses")
    make_hf_model(base / "hf", "qwen2", vocab_size=211)
    cfg = ModelConfig.from_hf_dir(base / "hf")
    one = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    _, state = convert.load_hf_params(base / "hf", cfg, one)
    checkpoint.save_model(base / "ckpt", cfg, state,
                          hf_config=json.loads((base / "hf" / "config.json").read_text()),
                          extras_from=base / "hf")
    write_dataset(base / "data", {"train": random_pairs(16, 32, 211, seed=0),
                                  "validation": random_pairs(4, 32, 211, seed=1)})
    return base


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("preset", ["dpop", "ipo_length_norm", "step_dpo_like"])
def test_launch_train_runs_the_preset(preset, setup, program, tmp_path):
    """The default config (shared-prompt rows, frozen reference) with the preset named on
    the command line: every train line logs the DPO metric names and `dpop/penalty`, and
    the deprecated preset name warns and runs as mid_only."""
    base = setup
    proc = program(
        "launch.train", f"--workdir={tmp_path / 'run'}",
        f"--config=configs/focused_dpo.py:model={base / 'ckpt'},data={base / 'data'},"
        f"preset={preset},runlocal",
        "--config.train.num_steps=3", "--config.log.eval_every_steps=3",
        "--config.checkpoint.every_steps=3", "--config.optimizer.lr=1e-3",
        env={"JAX_COMPILATION_CACHE_DIR": str(base / "jaxcache")}, timeout=600)
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    train = [m for m in lines if m["split"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3]
    for m in train:
        for key in ("loss", "dpo_loss", "nll", "rewards/margins", "rewards/accuracies",
                    "dpop/penalty"):
            assert math.isfinite(m[key]), (key, m)
        assert m["dpop/penalty"] >= 0
    # Step 1: policy = reference, so every log-ratio is 0 (to float32 rounding: the two
    # forwards compile apart) and the loss is the preset's at 0.
    first = {"dpop": math.log(2), "ipo_length_norm": (1 / (2 * 0.1)) ** 2,
             "step_dpo_like": math.log(2)}[preset]
    assert train[0]["loss"] == pytest.approx(first, rel=1e-5)
    assert train[0]["dpop/penalty"] == pytest.approx(0.0, abs=1e-4)  # float32 rounding
    if preset == "step_dpo_like":
        assert "deprecated" in proc.stderr and "mid_only" in proc.stderr
