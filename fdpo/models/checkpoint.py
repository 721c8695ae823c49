"""fdpo model checkpoints: orbax parameters plus the facts needed to use them.

Layout of a model checkpoint directory:

    CKPT/
      params/           orbax PyTree checkpoint of the parameter tree (pure dict)
      fdpo_model.json   the ModelConfig, the original HF config.json, the parameter layout
      hf_extras/        tokenizer and generation-config files copied from the HF directory

Parameters are always restored into an abstract target carrying the current mesh's
shardings, never the shardings stored in the checkpoint, so a checkpoint written on one
topology loads on any other.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from fdpo import sharding as shd
from fdpo.models import convert
from fdpo.models.config import ModelConfig

FORMAT_VERSION = 1
METADATA_FILE = "fdpo_model.json"
PARAMS_DIR = "params"
EXTRAS_DIR = "hf_extras"
# Files a model directory carries besides weights and config.json.
HF_EXTRA_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)


def copy_hf_extras(src: pathlib.Path, dst: pathlib.Path) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in HF_EXTRA_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def save_model(path: str | pathlib.Path, cfg: ModelConfig, state: nnx.State, *,
               hf_config: dict[str, Any] | None = None,
               extras_from: str | pathlib.Path | None = None,
               metadata: dict[str, Any] | None = None) -> pathlib.Path:
    path = pathlib.Path(path).absolute()
    if (path / PARAMS_DIR).exists():
        raise FileExistsError(f"{path}: a checkpoint already exists there")
    path.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / PARAMS_DIR, nnx.to_pure_dict(state))
    checkpointer.wait_until_finished()
    extras = copy_hf_extras(pathlib.Path(extras_from), path / EXTRAS_DIR) if extras_from else []
    meta = {
        "format_version": FORMAT_VERSION,
        "model_config": cfg.to_json(),
        "hf_config": hf_config,
        # The parameter layout does not depend on scan_layers (layers are always stacked);
        # the flag is recorded so a run can be reproduced exactly.
        "layout": {"stacked_layers": True, "scan_layers": cfg.scan_layers},
        "hf_extras": extras,
        **(metadata or {}),
    }
    if jax.process_index() == 0:
        (path / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_metadata(path: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(path)
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path}: not an fdpo model checkpoint (no {METADATA_FILE})")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: format_version {meta.get('format_version')}, "
                         f"this fdpo reads {FORMAT_VERSION}")
    return meta


def load_model(path: str | pathlib.Path, mesh: Mesh, rules=shd.DEFAULT_RULES,
               **config_overrides):
    """Restores (cfg, graphdef, state) with parameters placed on `mesh` by `rules`.

    `config_overrides` change how the model runs (compute_dtype, remat_policy,
    scan_layers); param_dtype may change too, and the stored values are cast.
    """
    path = pathlib.Path(path).absolute()
    meta = read_metadata(path)
    cfg = ModelConfig.from_json(meta["model_config"]).replace(**config_overrides)
    graphdef, abstract = nnx.split(convert.abstract_model(cfg))
    shardings = nnx.to_pure_dict(shd.state_shardings(abstract, mesh, rules))
    target = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        nnx.to_pure_dict(abstract), shardings)
    stored = ocp.StandardCheckpointer().metadata(path / PARAMS_DIR)
    stored_tree = getattr(stored, "item_metadata", stored)
    stored_shapes = jax.tree.map(lambda m: tuple(m.shape), dict(stored_tree))
    want_shapes = jax.tree.map(lambda t: tuple(t.shape), target)
    if stored_shapes != want_shapes:
        raise ValueError(f"{path}: stored parameter shapes do not match its model config")
    params = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, target)
    state = nnx.State(abstract)
    nnx.replace_by_pure_dict(state, params)
    return cfg, graphdef, state


def load_checkpoint_or_hf(mesh: Mesh, *, checkpoint: str | None = None,
                          hf_dir: str | None = None, rules=shd.DEFAULT_RULES,
                          **config_overrides):
    """(cfg, graphdef, state, dir holding tokenizer files) from exactly one source."""
    if (checkpoint is None) == (hf_dir is None):
        raise ValueError("give exactly one of checkpoint= and hf_dir=")
    if checkpoint is not None:
        cfg, graphdef, state = load_model(checkpoint, mesh, rules, **config_overrides)
        return cfg, graphdef, state, pathlib.Path(checkpoint) / EXTRAS_DIR
    cfg = ModelConfig.from_hf_dir(hf_dir, **config_overrides)
    graphdef, state = convert.load_hf_params(hf_dir, cfg, mesh, rules)
    return cfg, graphdef, state, pathlib.Path(hf_dir)
