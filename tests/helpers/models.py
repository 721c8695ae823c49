"""Policy and reference for the loss and metric tests, as a module-scoped fixture (import it
into the test module)::

    from tests.helpers.models import models  # noqa: F401
    def test_x(models): torch_policy, params = models["policy"]
"""
import jax
import pytest
from flax import nnx

from fdpo import sharding
from fdpo.models import convert
from fdpo.models.config import ModelConfig
from fdpo.testing import make_hf_model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Two tiny random Qwen2 models with different seeds, policy (0) and reference (1), each
    as (transformers model, fdpo params loaded on one device); "cfg": their ModelConfig."""
    one_device = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    out = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        d = tmp_path_factory.mktemp(name)
        torch_model = make_hf_model(d, "qwen2", seed=seed)
        cfg = ModelConfig.from_hf_dir(d)
        _, state = convert.load_hf_params(d, cfg, one_device)
        out[name] = (torch_model, nnx.to_pure_dict(state))
    out["cfg"] = cfg
    return out
