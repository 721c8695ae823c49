"""Hugging Face safetensors <-> fdpo parameters, from one declarative table.

Each row of `TABLE` names an HF key, the fdpo parameter path, and whether the HF matrix
is transposed on the way in. Everything else (the head split of projection kernels, the
stacking of layers) follows from the fdpo parameter's shape, so import and export are the
same table read in opposite directions and cannot drift apart.

Import reads one tensor at a time from single or sharded safetensors and places it onto
its target sharding; layers are written into a donated stacked buffer, so host memory in
flight stays near one tensor. Export reverses each row and writes shards the way
transformers does (an index file above a size threshold), keeping the original key set:
no `lm_head.weight` when embeddings are tied.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.flax import save_file

from fdpo import sharding as shd
from fdpo.models.config import ModelConfig
from fdpo.models.transformer import Decoder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some checkpoints carry that are recomputed from the config, not parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Row:
    hf_key: str  # "{i}" stands for the layer index
    path: tuple[str, ...]  # fdpo parameter path
    transpose: bool  # HF stores [out, in]; fdpo kernels are [in, ...]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf_key


def _layer(hf, path, transpose):
    return Row(f"model.layers.{{i}}.{hf}", ("layers",) + path, transpose)


TABLE: tuple[Row, ...] = (
    Row("model.embed_tokens.weight", ("embed",), False),
    Row("model.norm.weight", ("final_norm", "scale"), False),
    Row("lm_head.weight", ("lm_head",), False),  # absent when embeddings are tied
    _layer("input_layernorm.weight", ("attn_norm", "scale"), False),
    _layer("post_attention_layernorm.weight", ("mlp_norm", "scale"), False),
    _layer("self_attn.q_proj.weight", ("attn", "q_kernel"), True),
    _layer("self_attn.k_proj.weight", ("attn", "k_kernel"), True),
    _layer("self_attn.v_proj.weight", ("attn", "v_kernel"), True),
    _layer("self_attn.o_proj.weight", ("attn", "o_kernel"), True),
    _layer("self_attn.q_proj.bias", ("attn", "q_bias"), False),  # Qwen2; Llama w/ bias
    _layer("self_attn.k_proj.bias", ("attn", "k_bias"), False),
    _layer("self_attn.v_proj.bias", ("attn", "v_bias"), False),
    _layer("self_attn.o_proj.bias", ("attn", "o_bias"), False),  # Llama w/ bias only
    _layer("mlp.gate_proj.weight", ("mlp", "gate_kernel"), True),
    _layer("mlp.up_proj.weight", ("mlp", "up_kernel"), True),
    _layer("mlp.down_proj.weight", ("mlp", "down_kernel"), True),
)


class CheckpointMismatch(ValueError):
    """The safetensors do not match the config.json next to them."""


def to_fdpo(row: Row, hf_tensor: np.ndarray, fdpo_shape: tuple[int, ...]) -> np.ndarray:
    x = hf_tensor.T if row.transpose else hf_tensor
    return x.reshape(fdpo_shape)


def to_hf(row: Row, fdpo_tensor: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
    if row.transpose:  # fdpo [in, ...out] -> [in, out] -> HF [out, in]
        return np.ascontiguousarray(fdpo_tensor.reshape(hf_shape[::-1]).T)
    return fdpo_tensor.reshape(hf_shape)


def _hf_shape(row: Row, fdpo_layer_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape of a row, derived from the fdpo shape of one layer."""
    name = row.path[-1]
    if name.endswith("_bias"):  # [heads, head_dim] <- [heads*head_dim]
        return (math.prod(fdpo_layer_shape),)
    if not row.transpose:
        return tuple(fdpo_layer_shape)
    if name == "o_kernel":  # [heads, head_dim, embed] <- [embed, heads*head_dim]
        return (fdpo_layer_shape[-1], math.prod(fdpo_layer_shape[:-1]))
    return (math.prod(fdpo_layer_shape[1:]), fdpo_layer_shape[0])  # [in, ...out] <- [out, in]


def rows_for(cfg: ModelConfig, params: dict) -> list[Row]:
    """The table rows that exist for this model (bias and lm_head rows depend on config)."""
    rows = []
    for row in TABLE:
        node = params
        try:
            for part in row.path:
                node = node[part]
        except KeyError:
            continue
        rows.append(row)
    return rows


def _get(tree, path):
    for part in path:
        tree = tree[part]
    return tree


def abstract_model(cfg: ModelConfig):
    return nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0)))


# ----------------------------------------------------------------------------------------
# Reading safetensors, single or sharded.
# ----------------------------------------------------------------------------------------


class SafetensorsReader:
    """Lazy access to the tensors of an HF directory, one at a time, on the host."""

    def __init__(self, hf_dir: str | pathlib.Path):
        self.dir = pathlib.Path(hf_dir)
        index = self.dir / INDEX_FILE
        single = self.dir / SINGLE_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointMismatch(f"{index}: no 'weight_map' object")
            self.files = {k: self.dir / v for k, v in weight_map.items()}
            for f in sorted(set(self.files.values())):
                if not f.is_file():
                    raise FileNotFoundError(f"{f}: listed in {index} but missing")
        elif single.is_file():
            with safe_open(single, framework="flax") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"{self.dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found (only safetensors "
                f"checkpoints are supported)")
        self._cpu = jax.local_devices(backend="cpu")[0]

    def keys(self) -> set[str]:
        return set(self.files)

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], str]:
        with safe_open(self.files[key], framework="flax") as f:
            sl = f.get_slice(key)
            return tuple(sl.get_shape()), sl.get_dtype()

    def read(self, key: str) -> np.ndarray:
        if key not in self.files:
            raise CheckpointMismatch(f"{self.dir}: tensor {key!r} is missing")
        # safetensors' numpy backend has no bfloat16; its flax backend does. Pin it to the
        # host so an accelerator's memory is not used as a staging area.
        with jax.default_device(self._cpu), safe_open(self.files[key], framework="flax") as f:
            return np.asarray(f.get_tensor(key))


# ----------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------


def _make_array(host: np.ndarray, sharding) -> jax.Array:
    # Each host slices the shards it owns from its own copy: works on multi-host meshes.
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def load_hf_params(hf_dir: str | pathlib.Path, cfg: ModelConfig, mesh: Mesh,
                   rules=shd.DEFAULT_RULES, progress: Callable | None = None):
    """Reads an HF checkpoint into sharded fdpo params.

    Returns (graphdef, state): `nnx.merge(graphdef, state)` is the model. Raises
    CheckpointMismatch naming the tensor when shapes, keys or counts disagree with `cfg`.
    """
    reader = SafetensorsReader(hf_dir)
    graphdef, abstract = nnx.split(abstract_model(cfg))
    shardings = shd.state_shardings(abstract, mesh, rules)
    pure_abstract = nnx.to_pure_dict(abstract)
    pure_shardings = nnx.to_pure_dict(shardings)
    rows = rows_for(cfg, pure_abstract)
    dtype = jnp.dtype(cfg.param_dtype)

    expected = set()
    for row in rows:
        if row.per_layer:
            expected.update(row.hf_key.format(i=i) for i in range(cfg.num_layers))
        else:
            expected.add(row.hf_key)
    present = {k for k in reader.keys() if not k.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints still ship a copy
    missing, extra = sorted(expected - present), sorted(present - expected)
    if missing or extra:
        raise CheckpointMismatch(
            f"{hf_dir}: tensors do not match config.json "
            f"({cfg.architecture}, {cfg.num_layers} layers, qkv_bias={cfg.qkv_bias}, "
            f"tie_word_embeddings={cfg.tie_embeddings}); missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{'...' if len(extra) > 5 else ''}")

    def host_tensor(row, key, fdpo_shape):
        want = _hf_shape(row, fdpo_shape)
        got, _ = reader.shape_dtype(key)
        if tuple(got) != tuple(want):
            raise CheckpointMismatch(
                f"{hf_dir}: tensor {key!r} has shape {tuple(got)}, but config.json implies "
                f"{tuple(want)}")
        return to_fdpo(row, reader.read(key), fdpo_shape).astype(dtype, copy=False)

    set_layer = jax.jit(lambda stack, x, i: jax.lax.dynamic_update_index_in_dim(stack, x, i, 0),
                        donate_argnums=0)
    out = {}
    for row in rows:
        leaf = _get(pure_abstract, row.path)
        target = _get(pure_shardings, row.path)
        if not row.per_layer:
            value = _make_array(host_tensor(row, row.hf_key, leaf.shape), target)
            if progress:
                progress(1)
        else:
            layer_shape = leaf.shape[1:]
            layer_sharding = NamedSharding(mesh, P(*target.spec[1:]))
            zeros = jax.jit(lambda: jnp.zeros(leaf.shape, dtype), out_shardings=target)
            value = zeros()
            for i in range(cfg.num_layers):
                x = _make_array(host_tensor(row, row.hf_key.format(i=i), layer_shape),
                                layer_sharding)
                value = set_layer(value, x, i)
                if progress:
                    progress(1)
        node = out
        for part in row.path[:-1]:
            node = node.setdefault(part, {})
        node[row.path[-1]] = value
    state = nnx.State(abstract)  # keeps the Variable types and metadata
    nnx.replace_by_pure_dict(state, out)
    return graphdef, state


def num_hf_tensors(cfg: ModelConfig) -> int:
    _, abstract = nnx.split(abstract_model(cfg))
    rows = rows_for(cfg, nnx.to_pure_dict(abstract))
    return sum(cfg.num_layers if r.per_layer else 1 for r in rows)


# ----------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # transformers' save_pretrained default (5GB)


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def iter_hf_tensors(cfg: ModelConfig, params: dict) -> Iterator[tuple[str, jax.Array]]:
    """(HF key, tensor in HF layout) for every parameter, one at a time.

    `params` is the pure-dict parameter tree (values are jax or numpy arrays). Each tensor
    is gathered to the host only when yielded.
    """
    dtype = jnp.dtype(cfg.checkpoint_dtype)
    for row in rows_for(cfg, params):
        leaf = _get(params, row.path)
        if not row.per_layer:
            host = _to_host(leaf)
            yield row.hf_key, to_hf(row, host, _hf_shape(row, host.shape)).astype(dtype)
            continue
        for i in range(cfg.num_layers):
            host = _to_host(leaf[i])
            hf = to_hf(row, host, _hf_shape(row, host.shape)).astype(dtype)
            yield row.hf_key.format(i=i), hf


def write_safetensors(tensors: Iterator[tuple[str, np.ndarray]], out_dir: str | pathlib.Path,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[pathlib.Path]:
    """Writes tensors as transformers does: one file, or shards plus an index.

    Holds at most one shard's tensors in memory.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    current: dict[str, np.ndarray] = {}  # the shard being filled
    shard_of: dict[str, int] = {}  # key -> shard index
    size = total = 0
    tmp_paths: list[pathlib.Path] = []

    def flush():
        path = out_dir / f"shard-tmp-{len(tmp_paths):05d}.safetensors"
        save_file({k: jnp.asarray(v) for k, v in current.items()}, str(path),
                  metadata={"format": "pt"})
        tmp_paths.append(path)

    for key, tensor in tensors:
        if current and size + tensor.nbytes > max_shard_bytes:
            flush()
            current, size = {}, 0
        current[key] = tensor
        shard_of[key] = len(tmp_paths)
        size += tensor.nbytes
        total += tensor.nbytes
    flush()

    if len(tmp_paths) == 1:
        final = out_dir / SINGLE_FILE
        tmp_paths[0].replace(final)
        return [final]
    n = len(tmp_paths)
    finals = [out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, final in zip(tmp_paths, finals):
        tmp.replace(final)
    index = {"metadata": {"total_size": total},
             "weight_map": {k: finals[v].name for k, v in sorted(shard_of.items())}}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return finals
