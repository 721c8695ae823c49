"""Sequence scoring: per-segment sums of per-token log-probs, one jitted function for every
use. The train step runs `sequence_segment_logps` on chosen and rejected; `make_score_fn`
compiles that same function over a mesh (reference log-probs, `precompute_reference`);
`Scorer` pads arbitrary sequences for it (`launch.score`).

Per-token log-probs are a float32 log-softmax, chunked over the sequence
(`fdpo.logprobs`): token t's log-prob `log p(x_t | x_<t)` counts in the segment of token t,
and token 0 has none.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from fdpo import logprobs
from fdpo import records as rec
from fdpo import sharding as shd
from fdpo.models import convert
from fdpo.models.config import ModelConfig

Array = jax.Array
log = logging.getLogger("fdpo.scoring")
MAX_SEGMENT_LABELS = 16  # Scorer: segment labels 0..15 are summed separately


def sequence_segment_logps(graphdef, params, ids: Array, labels: Array, chunk: int = 256,
                           values: Sequence[int] = rec.RESPONSE_SEGMENTS, *,
                           capacity: int = 0, recompute: bool = True) -> Array:
    """ids, labels [N, L] -> [N, len(values)]: the log-prob sums of the tokens labelled
    values[k] (default the response segments: prefix, mid, suffix, lead, trail).

    Log-softmax in float32, chunked over the sequence (no [N, L, vocab] logits tensor).
    `capacity` > 0: only the first `capacity` labelled positions t >= 1 of each row reach
    the unembedding (the caller guarantees no row has more). Call under
    `sharding.use_mesh` to constrain activations.
    """
    model = nnx.merge(graphdef, params)
    ids = shd.constrain(ids, ("batch", "length"))
    hidden = model(ids, return_hidden=True)
    if not capacity:
        lp = logprobs.token_logprobs_from_hidden(hidden, model.unembedding(), ids, chunk,
                                                 recompute)
        return logprobs.segment_sums(lp, labels, values)
    labelled = jnp.isin(labels, jnp.asarray([int(v) for v in values], labels.dtype))
    index, valid = logprobs.scored_positions(labelled.at[:, 0].set(False), capacity)
    take = lambda x: jnp.take_along_axis(x, index, axis=1)  # noqa: E731
    # The hidden state before each position scores it (fillers: any in-range one).
    before = jnp.take_along_axis(hidden, jnp.maximum(index - 1, 0)[..., None], axis=1)
    lp = logprobs.target_logprobs(before, model.unembedding(), take(ids), chunk, recompute)
    return logprobs.segment_sums(lp, jnp.where(valid, take(labels), -1), values)


def make_score_fn(model_cfg: ModelConfig, mesh: Mesh, rules=shd.DEFAULT_RULES,
                  chunk: int = 256, values: Sequence[int] = rec.RESPONSE_SEGMENTS):
    """jit(params, ids [N, L], labels [N, L]) -> [N, len(values)] `sequence_segment_logps`:
    the train step's own log-prob function (N must divide over the data-parallel devices;
    params are the pure-dict tree, placed by `rules`)."""
    rules = tuple(tuple(r) for r in rules)
    values = tuple(int(v) for v in values)
    graphdef, abstract = nnx.split(convert.abstract_model(model_cfg))
    param_shardings = nnx.to_pure_dict(shd.state_shardings(abstract, mesh, rules))
    rows = NamedSharding(mesh, P(dict(rules).get("batch"), None))

    def score(params, ids, labels):
        with shd.use_mesh(mesh, rules):
            return sequence_segment_logps(graphdef, params, ids, labels, chunk, values)

    return jax.jit(score, in_shardings=(param_shardings, rows, rows), out_shardings=rows)


@dataclasses.dataclass
class ScoreResult:
    logp_sum: np.ndarray  # [B] float32 sums over scored tokens (1 <= t < length)
    num_tokens: np.ndarray  # [B] tokens scored (length - 1)
    segment_sums: np.ndarray  # [B, MAX_SEGMENT_LABELS]
    segment_counts: np.ndarray  # [B, MAX_SEGMENT_LABELS]


class Scorer:
    """Scores sequences of any lengths: pads them into one batch (rows a multiple of the
    data-parallel devices), labels padding and token 0 as scored by no segment, and runs
    `make_score_fn` (one compilation per (rows, length) shape)."""

    def __init__(self, cfg: ModelConfig, graphdef, state, mesh: Mesh,
                 rules=shd.DEFAULT_RULES, chunk: int = 256):
        del graphdef  # the model's graph comes from cfg, as in the train step
        self.params = nnx.to_pure_dict(state)
        # Labels 0..15, and one more column for scored tokens without a label.
        self._score = make_score_fn(cfg, mesh, rules, chunk,
                                    values=range(MAX_SEGMENT_LABELS + 1))
        self.batch_multiple = shd.data_parallel_size(mesh, rules)
        self._rows = shd.data_sharding(mesh, rules)

    def score(self, sequences: Sequence[Sequence[int]],
              labels: Sequence[Sequence[int]] | None = None,
              pad_to: int | None = None) -> ScoreResult:
        n = len(sequences)
        lengths = np.array([len(s) for s in sequences], np.int32)
        length = int(pad_to or lengths.max())
        rows = -(-n // self.batch_multiple) * self.batch_multiple
        ids = np.zeros((rows, length), np.int32)
        lab = np.full((rows, length), -1, np.int32)  # -1: not scored (padding, token 0)
        for i, s in enumerate(sequences):
            ids[i, :len(s)] = s
            # A scored token without a label in 0..15 (none given, or -1) counts in the
            # extra column: in the total, in no segment.
            row = np.asarray(labels[i][1:] if labels is not None else [], np.int32)
            lab[i, 1:len(s)] = np.where((row >= 0) & (row < MAX_SEGMENT_LABELS), row,
                                        MAX_SEGMENT_LABELS) if row.size else MAX_SEGMENT_LABELS
        # Several processes: each holds the whole batch, places its own devices' rows, and
        # reads every row's sums back.
        sums = shd.to_host(self._score(self.params, shd.global_array(ids, self._rows),
                                       shd.global_array(lab, self._rows)))[:n]
        counts = (lab[:n, :, None] == np.arange(MAX_SEGMENT_LABELS)).sum(1)
        return ScoreResult(sums.sum(-1), np.maximum(lengths - 1, 0),
                           sums[:, :MAX_SEGMENT_LABELS], counts.astype(np.int64))


class NonFiniteReference(ValueError):
    """Reference log-probs that are NaN or infinite (a broken reference model, or ids past
    its embedding table): never written into a dataset."""


def _reference_shard(score_pairs, path, out_path, max_len: int, batch: int, bar) -> None:
    """One shard of pair records -> `out_path` with ref_logps set (None: computed, not
    written); NonFiniteReference naming the first record whose sums are not finite."""
    source = rec.PairDataSource(path, max_len=max_len)
    with (rec.RecordWriter(out_path) if out_path is not None else _Discard()) as writer:
        for start in range(0, len(source), batch):
            records = [source.record(i) for i in range(start, min(start + batch, len(source)))]
            n = len(records)
            rows = records + [records[0]] * (batch - n)  # pad to the compiled shape
            pairs = {k: np.stack([getattr(r, k) for r in rows]) for k in
                     ("chosen_ids", "rejected_ids", "chosen_segments", "rejected_segments")}
            sums = np.asarray(score_pairs(pairs), np.float32)[:n]
            finite = np.isfinite(sums).reshape(n, -1).all(axis=1)
            if not finite.all():
                i = int(np.argmin(finite))
                r = records[i]
                raise NonFiniteReference(
                    f"{path}: record {start + i} (pair_id {r.pair_id}, problem "
                    f"{r.problem_name or r.problem_id!r}): reference log-prob sums "
                    f"{sums[i].tolist()} are not finite ({int((~finite).sum())} of this "
                    f"batch's {n} records)")
            for r, ref in zip(records, sums):
                writer.write(dataclasses.replace(r, ref_logps=ref))
            bar.update(n)


class _Discard:
    """The shard writer of a process other than 0: records are computed, not written."""

    def __enter__(self) -> _Discard:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def write(self, record) -> None:
        del record


def precompute_reference(score_pairs, data_dir, out_dir, *, batch_multiple: int = 1,
                         provenance: dict | None = None, batch_size: int = 16) -> dict:
    """Copies the pair dataset `data_dir` to `out_dir` with `ref_logps[side, segment]` set
    by `score_pairs` (numpy pair arrays `chosen_ids`, ... [b, L] -> [b, 2, 3] sums;
    `fdpo.reference.pair_scorer`), in batches of `batch_size` pairs rounded up to
    `batch_multiple` (the last one padded), and writes the manifest, whose `reference`
    entry is `provenance` (the reference's identity, path, compute dtype and chunk) plus
    the layout. Returns that manifest. Raises NonFiniteReference, naming the record, when
    a sum is NaN or infinite; then the shards this call wrote are removed (and `out_dir`
    when this call made it and it is empty).

    Several processes (jax.distributed): every process runs every batch with the others
    (`score_pairs` over the global mesh) and gets every sum back; process 0 alone writes
    `out_dir`."""
    data_dir, out_dir = pathlib.Path(data_dir), pathlib.Path(out_dir)
    if data_dir.resolve() == out_dir.resolve():
        raise ValueError("the output directory must differ from the data directory (shards "
                         "are rewritten)")
    manifest = rec.read_manifest(data_dir / "manifest.json")
    batch = -(-batch_size // batch_multiple) * batch_multiple

    shards = [(split, s["path"]) for split, info in manifest["splits"].items()
              for s in info["shards"]]
    total = sum(len(rec.PairDataSource(data_dir / p)) for _, p in shards)
    writer = shd.is_writer()
    created = not out_dir.exists()
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    written = []  # shard files this call wrote: removed again when it fails
    try:
        with tqdm(total=total, desc="reference", unit="pair") as bar:
            for _, path in shards:
                tmp = out_dir / (path + ".tmp") if writer else None
                if writer:
                    written.append(tmp)
                _reference_shard(score_pairs, data_dir / path, tmp, manifest["max_len"],
                                 batch, bar)
                if writer:
                    os.replace(tmp, out_dir / path)
                    written[-1] = out_dir / path
                    log.info("%s: -> %s", path, out_dir / path)
    except BaseException:
        # No half-made dataset under the output (it has no manifest yet): what this call
        # wrote goes, and the directory too when this call made it and nothing else is there.
        for p in written:
            p.unlink(missing_ok=True)
        if writer and created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    out_manifest = dict(manifest)
    out_manifest["reference"] = {
        **(provenance or {}), "source_dataset": str(data_dir.absolute()),
        "layout": "ref_logps[side, segment]: (chosen, rejected) x (prefix, mid, suffix, lead, "
                  "trail)"}
    if writer:
        rec.write_manifest(out_dir / "manifest.json", out_manifest)
    return out_manifest
