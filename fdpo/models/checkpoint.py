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
import logging
import pathlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from fdpo import atomic
from fdpo import sharding as shd
from fdpo.models import convert
from fdpo.models.config import ModelConfig, field_overrides, preset as model_preset
from fdpo.models.transformer import Decoder

log = logging.getLogger("fdpo.models.checkpoint")
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
    # Several processes: orbax writes the parameters with every process taking part; the
    # rest is written once, by process 0.
    writer = jax.process_index() == 0
    if writer:
        path.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / PARAMS_DIR, nnx.to_pure_dict(state))
    checkpointer.wait_until_finished()
    extras = []
    if extras_from and writer:
        extras = copy_hf_extras(pathlib.Path(extras_from), path / EXTRAS_DIR)
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
    if writer:
        (path / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def save_model_whole(path: str | pathlib.Path, cfg: ModelConfig, state: nnx.State,
                     **kwargs) -> pathlib.Path:
    """`save_model` into a temporary sibling (fdpo.atomic), renamed to `path` when complete:
    a save that is killed or interrupted leaves no `path` (never params without metadata),
    and the next save removes its temporary. Several processes: every process saves into
    one temporary all of them name alike, and process 0 cleans, renames and removes."""
    path = pathlib.Path(path).absolute()
    if (path / PARAMS_DIR).exists():
        raise FileExistsError(f"{path}: a checkpoint already exists there")
    writer = jax.process_index() == 0
    if writer:
        atomic.clean(path, _SAVING)
    if jax.process_count() > 1:
        # temp_sibling's name holds the pid; the processes must agree on one (and `clean`
        # still finds it after a kill).
        tmp = path.parent / f".{path.name}.{_SAVING}-shared"
        shd.sync("save_model_whole: old temporaries removed")
    else:
        tmp = atomic.temp_sibling(path, _SAVING)
    try:
        save_model(tmp, cfg, state, **kwargs)
        if writer:
            atomic.replace_dir(tmp, path)
        shd.sync("save_model_whole: in place")
    except BaseException:  # also KeyboardInterrupt: leave no temporary behind
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


_SAVING = "saving"


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


def read_config(*, checkpoint: str | None = None, hf_dir: str | None = None,
                **config_overrides) -> tuple[ModelConfig, pathlib.Path]:
    """(ModelConfig, dir holding tokenizer files) of exactly one source, without reading
    its weights: what input checks (vocabulary, positions) need before the load."""
    if (checkpoint is None) == (hf_dir is None):
        raise ValueError("give exactly one of checkpoint= and hf_dir=")
    if checkpoint is not None:
        meta = read_metadata(checkpoint)
        cfg = ModelConfig.from_json(meta["model_config"]).replace(**config_overrides)
        return cfg, pathlib.Path(checkpoint) / EXTRAS_DIR
    return ModelConfig.from_hf_dir(hf_dir, **config_overrides), pathlib.Path(hf_dir)


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


def import_hf(hf_dir, out_dir, mesh: Mesh, *,
              param_dtype: str | None = None) -> pathlib.Path:
    """Writes an fdpo checkpoint from an HF directory (single or sharded safetensors, read
    one tensor at a time onto its sharding), with the original config.json and the
    tokenizer files; `param_dtype` defaults to the checkpoint's own."""
    hf_dir = pathlib.Path(hf_dir)
    cfg = ModelConfig.from_hf_dir(hf_dir, **({"param_dtype": param_dtype} if param_dtype
                                             else {}))
    log.info("%s: %s, %.3fB parameters", hf_dir, cfg.architecture, cfg.num_params / 1e9)
    with tqdm(total=convert.num_hf_tensors(cfg), desc="import", unit="tensor") as bar:
        _, state = convert.load_hf_params(hf_dir, cfg, mesh, progress=bar.update)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    return save_model_whole(out_dir, cfg, state, hf_config=hf_config, extras_from=hf_dir,
                            metadata={"imported_from": str(hf_dir.absolute())})


def export_hf(checkpoint_dir, out_dir, mesh: Mesh,
              max_shard_bytes: int = convert.DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
    """Writes an HF directory: safetensors in the original dtype, config.json (the original
    one when the checkpoint kept it), generation config and tokenizer files."""
    check_export_out(out_dir)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be positive")
    ckpt = pathlib.Path(checkpoint_dir)
    meta = read_metadata(ckpt)
    cfg, _, state = load_model(ckpt, mesh)
    final = pathlib.Path(out_dir)
    params = nnx.to_pure_dict(state)
    tensors = tqdm(convert.iter_hf_tensors(cfg, params), total=convert.num_hf_tensors(cfg),
                   desc="export", unit="tensor")
    if jax.process_index() == 0:
        # Written beside the output and swapped in whole: an old export's shards and index
        # never stay next to the new files (import_hf would prefer the stale index).
        final.parent.mkdir(parents=True, exist_ok=True)
        atomic.clean(final, _EXPORT_TAG)
        out = atomic.temp_sibling(final, _EXPORT_TAG)
        out.mkdir()
        try:
            _write_export(tensors, out, max_shard_bytes, meta, cfg, ckpt)
            atomic.replace_dir(out, final)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
    else:
        for _ in tensors:  # every process takes part in gathering sharded arrays
            pass
    return final


_EXPORT_TAG = "exporting"


def check_export_out(out_dir) -> None:
    """An export replaces its output directory whole: refuse one that holds something
    other than a Hugging Face model directory."""
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").exists():
        raise ValueError(f"{out}: a non-empty directory without config.json (not a Hugging "
                         "Face export); the export replaces it whole, so give a new or empty "
                         "directory")


def _write_export(tensors, out, max_shard_bytes, meta, cfg, ckpt) -> None:
    convert.write_safetensors(tensors, out, max_shard_bytes)
    hf_config = meta.get("hf_config") or cfg.to_hf_config()
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    extras = ckpt / EXTRAS_DIR
    if extras.is_dir():
        copy_hf_extras(extras, out)
    if not (out / "generation_config.json").exists():
        gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id),
                                 ("eos_token_id", cfg.eos_token_id),
                                 ("pad_token_id", cfg.pad_token_id)) if v is not None}
        (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


TINY_QWEN2 = dict(architecture="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                  rope_theta=10000.0, qkv_bias=True, tie_embeddings=True,
                  max_position_embeddings=2048)


def init_random(out, *, preset: str | None = None, fields: dict | None = None,
                tokenizer: str | None = None, seed: int = 0) -> pathlib.Path:
    """A randomly initialised checkpoint (normal std 0.02, as transformers): the base is a
    preset or a tiny Qwen2 shape, the set entries of `fields` override it
    (`config.field_overrides`), and a tokenizer directory sets the vocabulary size and
    special ids and is stored with the checkpoint."""
    fields = field_overrides(fields or {})
    if tokenizer:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(tokenizer)
        if fields.get("vocab_size", len(tok)) < len(tok):
            raise ValueError(f"vocab_size={fields['vocab_size']} is smaller than the "
                             f"tokenizer's vocabulary ({len(tok)} tokens in {tokenizer})")
        fields.setdefault("vocab_size", len(tok))
        fields.setdefault("eos_token_id", tok.eos_token_id)
        fields.setdefault("pad_token_id", tok.pad_token_id)
        fields.setdefault("bos_token_id", tok.bos_token_id)
    base = model_preset(preset) if preset else ModelConfig(**TINY_QWEN2)
    if "head_dim" not in fields and ("hidden_size" in fields or "num_heads" in fields):
        fields["head_dim"] = (fields.get("hidden_size", base.hidden_size) //
                              fields.get("num_heads", base.num_heads))
    cfg = base.replace(**fields)
    mesh = shd.make_mesh((1, -1, 1))
    model = Decoder(cfg, nnx.Rngs(seed))
    _, state = nnx.split(model)
    shardings = shd.state_shardings(state, mesh, shd.DEFAULT_RULES)
    state = jax.device_put(state, shardings)
    return save_model_whole(out, cfg, state, hf_config=cfg.to_hf_config(),
                            extras_from=tokenizer, metadata={"init_seed": seed})
