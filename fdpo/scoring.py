"""Batched, jitted sequence scoring: log-prob sums, total and per segment.

Used by `launch.score`, and later to precompute the reference model's per-segment
log-prob sums once instead of running the reference in every train step.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from fdpo import logprobs, sharding
from fdpo.models.config import ModelConfig

MAX_SEGMENT_LABELS = 16  # segment labels 0..15 are summed separately


@dataclasses.dataclass
class ScoreResult:
    logp_sum: np.ndarray  # [B] float64 view of float32 sums over scored tokens
    num_tokens: np.ndarray  # [B] tokens scored (length - 1)
    segment_sums: np.ndarray  # [B, MAX_SEGMENT_LABELS]
    segment_counts: np.ndarray  # [B, MAX_SEGMENT_LABELS]


class Scorer:
    """Scores padded batches with one compiled function per (batch, length) shape."""

    def __init__(self, cfg: ModelConfig, graphdef, state, mesh: Mesh,
                 rules=sharding.DEFAULT_RULES, chunk: int = 256):
        self.cfg, self.graphdef, self.state, self.mesh, self.rules = (cfg, graphdef, state,
                                                                      mesh, rules)
        self.batch_sharding = sharding.data_sharding(mesh, rules, ndim=2)
        batch_axes = self.batch_sharding.spec[0] or ()
        batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
        self.batch_multiple = int(np.prod([mesh.shape[a] for a in batch_axes]))

        def score(state, input_ids, lengths, labels):
            model = nnx.merge(graphdef, state)
            with sharding.use_mesh(mesh, rules):
                hidden = model(input_ids, return_hidden=True)
            lp = logprobs.token_logprobs_from_hidden(hidden, model.unembedding(), input_ids,
                                                     chunk)
            t = jnp.arange(input_ids.shape[1])[None]
            scored = (t >= 1) & (t < lengths[:, None])
            lp = jnp.where(scored, lp, 0.0)
            labels = jnp.where(scored, labels, -1)
            return (lp.sum(-1), logprobs.segment_sums(lp, labels, MAX_SEGMENT_LABELS),
                    logprobs.segment_sums(scored.astype(jnp.float32), labels,
                                          MAX_SEGMENT_LABELS))

        self._score = jax.jit(score)

    def score(self, sequences: Sequence[Sequence[int]],
              labels: Sequence[Sequence[int]] | None = None,
              pad_to: int | None = None) -> ScoreResult:
        n = len(sequences)
        lengths = np.array([len(s) for s in sequences], np.int32)
        length = int(pad_to or lengths.max())
        rows = -(-n // self.batch_multiple) * self.batch_multiple
        ids = np.zeros((rows, length), np.int32)
        lab = np.full((rows, length), -1, np.int32)
        lens = np.zeros((rows,), np.int32)
        lens[:n] = lengths
        for i, s in enumerate(sequences):
            ids[i, :len(s)] = s
            if labels is not None:
                lab[i, :len(s)] = labels[i]
        put = lambda x: jax.device_put(x, self.batch_sharding if x.ndim == 2 else
                                       jax.sharding.NamedSharding(
                                           self.mesh, jax.sharding.PartitionSpec(
                                               self.batch_sharding.spec[0])))
        total, seg, cnt = jax.device_get(
            self._score(self.state, put(ids), put(lens), put(lab)))
        return ScoreResult(np.asarray(total[:n]), np.maximum(lengths - 1, 0),
                           np.asarray(seg[:n]), np.asarray(cnt[:n]).round().astype(np.int64))
