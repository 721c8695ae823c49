"""The reference model of a training run: one contract for the frozen and precomputed modes.

The reference is `config.reference.checkpoint` or `config.reference.hf_dir` when one is set,
else the run's initial policy (`init_checkpoint` / `init_hf_dir`). Either way it is loaded
with the run's `config.model` settings (compute dtype, parameter dtype), so its log-probs are
those the train step computes for it.

`precompute` writes `ref_logps` with a provenance record in the output manifest (key
`reference`): the reference's identity (`identity`: sha256 over its parameter arrays), its
path, the compute dtype and the log-prob chunk. `for_run` gives the train step its
reference: the parameters in frozen mode; in precomputed mode it checks the data's
provenance against the run's own reference and refuses a mismatch, naming both sides.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from fdpo import data, scoring, train
from fdpo import records as rec
from fdpo import sharding as shd
from fdpo.models import checkpoint, convert

log = logging.getLogger("fdpo.reference")
# The provenance fields a training run must agree with (the path is reported, not compared:
# the same weights may live in several places).
CHECKED = ("identity", "compute_dtype", "logprob_chunk")


class ProvenanceError(ValueError):
    """Precomputed `ref_logps` that were not computed the way this run would compute them."""


def rules_of(config) -> tuple:
    return tuple((name, tuple(a) if isinstance(a, (list, tuple)) else a)
                 for name, a in config.sharding_rules)


def source(config) -> tuple[str | None, str | None, bool]:
    """(checkpoint, hf_dir, is_policy): where the run's reference comes from. Exactly one
    of the two paths is set; `is_policy` when it is the initial policy."""
    ref = config.get("reference") or {}
    ckpt, hf = ref.get("checkpoint") or None, ref.get("hf_dir") or None
    if ckpt and hf:
        raise ValueError("set at most one of reference.checkpoint and reference.hf_dir")
    if ckpt or hf:
        return ckpt, hf, False
    init_ckpt, init_hf = config.init_checkpoint or None, config.init_hf_dir or None
    if bool(init_ckpt) == bool(init_hf):
        raise ValueError("set exactly one of init_checkpoint (config arg model=) and "
                         "init_hf_dir")
    return init_ckpt, init_hf, True


def check_vocab(config) -> None:
    """Raises ValueError, naming both sizes, when `config.data.dir` was built with a
    tokenizer of more tokens than the reference has embedding rows (ids past the table give
    NaN log-probs, not an error). Reads the reference's config only, not its weights."""
    ckpt, hf_dir, _ = source(config)
    model_cfg, _ = checkpoint.read_config(checkpoint=ckpt, hf_dir=hf_dir)
    manifest_path = pathlib.Path(config.data.dir) / "manifest.json"
    data_vocab = (rec.read_manifest(manifest_path).get("tokenizer") or {}).get("vocab_size")
    if data_vocab is not None and data_vocab > model_cfg.vocab_size:
        raise ValueError(f"{manifest_path}: the data was built with a tokenizer of {data_vocab} "
                         f"tokens (tokenizer.vocab_size), more than the reference's "
                         f"{model_cfg.vocab_size} embedding rows (vocab_size of "
                         f"{ckpt or hf_dir})")


def load(config, mesh, ckpt: str | None = None, hf_dir: str | None = None):
    """(ModelConfig, pure-dict params) of a model loaded as `config.model` says the run's
    models run. Default: the run's reference (`source`)."""
    if ckpt is None and hf_dir is None:
        ckpt, hf_dir, _ = source(config)
    cfg, _, state, _ = checkpoint.load_checkpoint_or_hf(
        mesh, checkpoint=ckpt, hf_dir=hf_dir, rules=rules_of(config),
        **config.model.to_dict())
    return cfg, nnx.to_pure_dict(state)


def identity(params) -> str:
    """sha256 over the parameter arrays: for each leaf, in sorted key-path order, its path,
    dtype, shape and bytes. Equal for the same weights wherever they were loaded from
    (checkpoint or HF directory) at the same parameter dtype. Reads one leaf at a time to
    the host (all processes take part when the arrays span several)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    digest = hashlib.sha256()
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            host = np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        else:
            host = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{host.dtype}|{host.shape}|".encode())
        digest.update(np.ascontiguousarray(host).tobytes())
    return digest.hexdigest()


def provenance(config, params, path: str) -> dict[str, Any]:
    """The record `precompute` writes and `for_run` expects, for reference `params` loaded
    from `path` and run with this config."""
    return {"identity": identity(params), "checkpoint": str(path),
            "compute_dtype": config.model.compute_dtype,
            "logprob_chunk": int(config.train.logprob_chunk)}


def _describe(p: dict) -> str:
    return (f"{p.get('checkpoint', '?')} (identity {str(p.get('identity', 'none'))[:16]}, "
            f"compute dtype {p.get('compute_dtype', '?')}, chunk {p.get('logprob_chunk', '?')})")


def check(manifest_path, expected: dict[str, Any]) -> None:
    """Raises ProvenanceError when the manifest's `reference` record differs from `expected`
    in identity, compute dtype or chunk (or is missing), naming both sides."""
    manifest = rec.read_manifest(manifest_path)
    got = manifest.get("reference")
    if not got or "identity" not in got:
        raise ProvenanceError(
            f"{manifest_path}: ref_logps have no provenance record (not written by this "
            f"version of launch.precompute_ref); this run's reference is "
            f"{_describe(expected)}. Rerun launch.precompute_ref with the training config, "
            f"or set --config.reference.check_provenance=False to train on them as they are")
    differ = [k for k in CHECKED if got.get(k) != expected[k]]
    if differ:
        raise ProvenanceError(
            f"{manifest_path}: ref_logps were computed by {_describe(got)}, but this run's "
            f"reference is {_describe(expected)} ({', '.join(differ)} differ). Rerun "
            f"`python -m launch.precompute_ref` with this run's config")


def for_run(config, init_params, model_cfg, mesh, *, needs_reference: bool = True):
    """What the train step takes as its reference argument: the frozen reference's params,
    or None (precomputed mode, after checking the data's provenance; or no reference term).

    `init_params` are the run's initial policy parameters, loaded as the run loads them
    (never modified here; frozen mode returns a copy since the train state is donated).
    """
    if not needs_reference:
        return None
    ckpt, hf_dir, is_policy = source(config)
    if config.loss.reference == "frozen":
        if is_policy:
            return train.copy_params(init_params)
        ref_cfg, params = load(config, mesh, ckpt, hf_dir)
        if ref_cfg != model_cfg:
            raise ValueError(f"reference {ckpt or hf_dir}: its model config {ref_cfg} differs "
                             f"from the policy's {model_cfg}; a frozen reference runs in the "
                             f"policy's step, so they must match (a precomputed reference "
                             f"need not)")
        log.info("frozen reference: %s", ckpt or hf_dir)
        return params
    if not config.reference.check_provenance:
        log.warning("reference.check_provenance=False: ref_logps of %s are not checked",
                    config.data.dir)
        return None
    params = init_params if is_policy else load(config, mesh, ckpt, hf_dir)[1]
    check(pathlib.Path(config.data.dir) / "manifest.json",
          provenance(config, params, ckpt or hf_dir))
    log.info("precomputed reference: %s, provenance checked", ckpt or hf_dir)
    return None


def pair_scorer(model_cfg, params, mesh, rules, chunk: int, shared_length: int = 0):
    """numpy pairs (`chosen_ids`, `rejected_ids`, `chosen_segments`, `rejected_segments`
    [b, L]) -> [b, 2, 3] log-prob sums, by the train step's own pair function in its own
    layout (shared-prompt rows of `shared_length` tokens, or separate rows): in bfloat16 the
    layout changes the rounding, and the sums must be the step's to the last bit."""
    graphdef, abstract = nnx.split(convert.abstract_model(model_cfg))
    param_shardings = nnx.to_pure_dict(shd.state_shardings(abstract, mesh, rules))
    rows = NamedSharding(mesh, P(dict(rules).get("batch")))
    fn = train.shared_pair_segment_logps if shared_length else train.pair_segment_logps

    def score(params, micro):
        with shd.use_mesh(mesh, rules):
            return fn(graphdef, params, micro, chunk)

    jitted = jax.jit(score, in_shardings=(param_shardings, rows), out_shardings=rows)

    def call(pairs):
        micro = {k: np.asarray(pairs[k]) for k in train.BATCH_KEYS[:4]}
        if shared_length:
            micro = train.pack_shared_prompt(micro, shared_length)
        # Several processes: each holds the whole batch and places its own devices' rows.
        micro = {k: shd.global_array(v, rows) for k, v in micro.items()}
        return shd.to_host(jitted(params, micro))

    return call


def shared_length_of(config) -> int:
    """The shared-prompt row length `launch.train` uses for this config and its data (0:
    separate rows)."""
    if not config.train.shared_prompt:
        return 0
    if config.train.shared_length:
        return int(config.train.shared_length)
    manifest = pathlib.Path(config.data.dir) / "manifest.json"
    sources = [rec.PairDataSource.from_manifest(manifest, config.data.train_split)]
    try:
        sources.append(rec.PairDataSource.from_manifest(manifest, config.data.eval_split))
    except KeyError:
        pass
    return data.longest_shared_row(*sources)


def precompute(config, out_dir, mesh, *, batch_size: int = 16) -> dict:
    """Copies `config.data.dir` to `out_dir` with `ref_logps` from the run's reference,
    computed as the run's train step would compute them (its model settings, chunk, sharding
    rules and row layout, on `mesh`: the global mesh with several processes, of which
    process 0 writes), and the provenance record in the manifest. Returns that manifest."""
    ckpt, hf_dir, _ = source(config)
    model_cfg, params = load(config, mesh, ckpt, hf_dir)
    record = provenance(config, params, ckpt or hf_dir)
    log.info("reference %s", _describe(record))
    rules = rules_of(config)
    score = pair_scorer(model_cfg, params, mesh, rules, int(config.train.logprob_chunk),
                        shared_length_of(config))
    return scoring.precompute_reference(
        score, config.data.dir, out_dir, batch_multiple=shd.data_parallel_size(mesh, rules),
        provenance=record, batch_size=batch_size)
