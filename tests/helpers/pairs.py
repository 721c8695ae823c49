"""Synthetic preference pairs in the record layout, for the loss and training tests.

Each pair is ``[prompt | prefix | mid | suffix | pad]`` on both sides: prompt, prefix and
suffix tokens are shared, the mids differ (the rejected mid may be empty), padding uses
token 0 and segment 0.
"""
from __future__ import annotations

import numpy as np

from fdpo.records import PairRecord, Segment


def random_pairs(n: int, length: int, vocab: int, seed: int = 0,
                 lengths: tuple[tuple[int, int], ...] = ((2, 6), (0, 5), (1, 5), (0, 5), (0, 5))
                 ) -> list[PairRecord]:
    """`lengths`: inclusive (lo, hi) token counts of prompt, prefix, chosen mid, rejected
    mid, suffix."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        p, pre, mc, mr, suf = (int(rng.integers(lo, hi + 1)) for lo, hi in lengths)
        prompt, prefix, suffix = (rng.integers(1, vocab, k) for k in (p, pre, suf))
        sides = {}
        for side, m in (("chosen", mc), ("rejected", mr)):
            ids = np.concatenate([prompt, prefix, rng.integers(1, vocab, m), suffix])
            seg = [Segment.PROMPT] * p + [Segment.PREFIX] * pre + [Segment.MID] * m + \
                [Segment.SUFFIX] * suf
            if len(ids) > length:
                raise ValueError(f"pair of {len(ids)} tokens does not fit length {length}")
            sides[side] = (np.pad(ids, (0, length - len(ids))).astype(np.int32),
                           np.pad(np.asarray(seg, np.int8), (0, length - len(ids))))
        records.append(PairRecord(sides["chosen"][0], sides["rejected"][0], sides["chosen"][1],
                                  sides["rejected"][1], pair_id=i, problem_id=i,
                                  problem_name=f"p{i}"))
    return records


def random_params(cfg, seed: int = 0, scale: float = 0.1) -> dict:
    """A random pure-dict parameter tree for `cfg`, drawn with numpy (eager `Decoder`
    initialisation dispatches one small compiled op per parameter: seconds per model)."""
    import jax
    from flax import nnx

    from fdpo.models import convert

    abstract = nnx.to_pure_dict(nnx.split(convert.abstract_model(cfg))[1])
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = scale * rng.standard_normal(leaf.shape)
        if str(getattr(path[-1], "key", "")) == "scale":  # RMSNorm scales around 1
            x = 1.0 + x
        return jax.numpy.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def stack(records: list[PairRecord]) -> dict[str, np.ndarray]:
    """Records -> the dict of [n, ...] arrays grain's batching produces."""
    dicts = [r.to_dict() for r in records]
    return {k: np.stack([d[k] for d in dicts]) for k in dicts[0]}


def write_dataset(out_dir, splits: dict[str, list[PairRecord]], shards: int = 2) -> str:
    """Writes each split as `shards` ArrayRecord files plus `manifest.json` (the layout
    `data_tools.build` writes); returns the manifest path."""
    import os

    from fdpo import records as rec

    os.makedirs(out_dir, exist_ok=True)
    max_len = next(iter(splits.values()))[0].max_len
    manifest_splits = {}
    for name, items in splits.items():
        entries = []
        for s in range(shards):
            part = items[s::shards]
            path = f"{name}-{s:05d}-of-{shards:05d}.array_record"
            rec.write_array_record(os.path.join(out_dir, path), part)
            entries.append({"path": path, "records": len(part)})
        manifest_splits[name] = {"records": len(items), "shards": entries}
    manifest = rec.make_manifest(max_len=max_len, tokenizer={"name": "synthetic"},
                                 counts={"pairs": sum(len(v) for v in splits.values())},
                                 drop_reasons={}, splits=manifest_splits,
                                 config={"synthetic": True})
    path = os.path.join(out_dir, "manifest.json")
    rec.write_manifest(path, manifest)
    return path
