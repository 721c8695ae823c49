"""Pair batches for training and evaluation, read with grain from ArrayRecord shards.

Training: one global, deterministic order (`shuffle(seed)`, reshuffled every epoch by
grain's `repeat`) cut into per-process batches of `global_batch / process_count` pairs;
process `i` reads every `process_count`-th of them, so global batch `k` is the
concatenation, in process order, of batch `k * P + i` of each process `i`. Each process
reads only its own records. The iterator state (`{"next_index": k}`) goes into every
checkpoint; restoring it continues with exactly the next batch.

Evaluation: the split in order, once, in global batches padded with masked pairs.
"""

from __future__ import annotations

import functools
from typing import Iterator, NamedTuple

import grain
import numpy as np

from fdpo.records import (PairDataSource, Segment, pack_shared_prompt, shared_row_lengths,
                          trunk_lengths)


def train_dataset(source: PairDataSource, *, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  shuffle: bool = True, shared_length: int = 0,
                  trunk: bool = True) -> grain.MapDataset:
    """This process's infinite sequence of [global_batch / process_count] batches.

    `shared_length` > 0: each batch also holds its pairs packed as shared rows of that many
    tokens (`fdpo.records.pack_shared_prompt`, `trunk` as there), packed by the loader's
    read-ahead threads instead of the train step's host code (`Trainer.make_batch` uses
    them as they are)."""
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} does not split over {process_count} "
                         f"processes")
    if len(source) < global_batch:
        raise ValueError(f"{len(source)} training pairs are fewer than one batch of "
                         f"{global_batch}")
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(None)  # each epoch reshuffled with (seed, epoch)
    ds = ds.batch(global_batch // process_count, drop_remainder=True)
    ds = ds[process_index::process_count]
    if shared_length:
        ds = ds.map(functools.partial(_with_shared_rows, length=shared_length, trunk=trunk))
    return ds


def _with_shared_rows(batch: dict, length: int, trunk: bool) -> dict:
    return batch | pack_shared_prompt(batch, length, trunk)


def train_iterator(ds: grain.MapDataset, *, num_threads: int = 2,
                   prefetch: int = 4) -> grain.DatasetIterator:
    """A checkpointable iterator (`get_state()` / `set_state()`), reading ahead."""
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))


def eval_batches(source: PairDataSource, *, global_batch: int, process_index: int = 0,
                 process_count: int = 1, max_batches: int | None = None
                 ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """(this process's examples, pair mask) for each global batch of the split, in order.

    The last batch is filled up with copies of pair 0 whose mask is 0.
    """
    n = len(source)
    local = global_batch // process_count
    num_batches = -(-n // global_batch)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    for k in range(num_batches):
        idx = k * global_batch + process_index * local + np.arange(local)
        mask = (idx < n).astype(np.float32)
        records = source.__getitems__([int(i) if i < n else 0 for i in idx])
        yield {key: np.stack([r[key] for r in records]) for key in records[0]}, mask


def longest_shared_row(*sources: PairDataSource, chunk: int = 4096,
                       trunk: bool = True) -> int:
    """The most tokens any pair of `sources` needs as a shared row (`fdpo.train`: prompt +
    common prefix once, or the prompt only when `trunk` is False), in one pass over the
    records."""
    return row_extents(*sources, chunk=chunk, trunk=trunk).length


# The record arrays that size a batch's rows.
BATCH_KEYS = ("chosen_ids", "rejected_ids", "chosen_segments", "rejected_segments")


class RowExtents(NamedTuple):
    """The most of each count over a dataset's rows (`batch_extents`)."""
    length: int  # tokens of a shared row
    scored: int  # positions whose log-probs the loss reads
    trunk: int  # of those, in the trunk (shared rows), scored once for both sides
    branches: int  # of those, in the two branches


def row_extents(*sources: PairDataSource, chunk: int = 4096, shared: bool = True,
                trunk: bool = True) -> RowExtents:
    """`batch_extents` over every record of `sources`, in one pass."""
    most = RowExtents(0, 0, 0, 0)
    for source in sources:
        for start in range(0, len(source), chunk):
            records = source.__getitems__(range(start, min(start + chunk, len(source))))
            part = batch_extents({k: np.stack([r[k] for r in records]) for k in BATCH_KEYS},
                                 shared=shared, trunk=trunk)
            most = RowExtents(*map(max, most, part))
    return most


def batch_extents(arrays: dict[str, np.ndarray], shared: bool = True,
                  trunk: bool = True) -> RowExtents:
    """The longest shared row and the most scored positions of any row of pairs [b, L]
    (ids and segments of both sides), in all, in the trunk and in the branches.

    Scored positions are those whose log-probs the loss reads (label >= PREFIX; in separate
    rows not token 0, which has no context): a row's count with shared rows (`trunk` as in
    `longest_shared_row`), else the larger side's (and no trunk). `Trainer(
    response_capacity=..., trunk_capacity=...)` sends only that many positions per row to
    the LM head, so these counts size them for the data (`train.response_capacity=-1`)."""
    cs, rs = arrays["chosen_segments"], arrays["rejected_segments"]
    shared_tokens = trunk_lengths(**arrays) if trunk else (cs == Segment.PROMPT).sum(-1)
    lengths = shared_row_lengths(cs, rs, shared_tokens)
    if shared:
        # Every prompt token sits in the trunk (both sides share the prompt), so a row
        # scores all of its tokens but those, and its trunk all of the trunk's but those.
        prompt = (cs == Segment.PROMPT).sum(-1)
        scored, in_trunk = lengths - prompt, shared_tokens - prompt
        return RowExtents(int(lengths.max()), int(scored.max()), int(in_trunk.max()),
                          int((scored - in_trunk).max()))
    scored = np.maximum((cs[:, 1:] >= Segment.PREFIX).sum(-1),
                        (rs[:, 1:] >= Segment.PREFIX).sum(-1))
    return RowExtents(int(lengths.max()), int(scored.max()), 0, int(scored.max()))


def steps_per_epoch(num_pairs: int, global_batch: int) -> int:
    return num_pairs // global_batch
