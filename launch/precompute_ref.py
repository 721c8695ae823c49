r"""Fills `ref_logps` of pair records with a reference model's per-segment log-prob sums.

    python -m launch.precompute_ref --checkpoint CKPT --data DIR --out DIR2 \
        [--batch_size 16] [--compute_dtype float32] [--shard_index I --num_shards N]

Reads every shard listed in DIR/manifest.json, scores chosen and rejected with the train
step's own log-prob function (`fdpo.train.make_score_fn`: float32 log-softmax, chunked),
and writes the same records, with `ref_logps[side, (prefix, mid, suffix)]` set, to shards
of the same names in DIR2, plus a manifest that records which reference made them. Train
on DIR2 with `--config.loss.reference=precomputed`: the step then runs no reference
forward. Use the compute dtype the frozen reference would have had (float32 by default).

Several hosts: give each a `--shard_index` of `--num_shards`; each scores the shard files
`i, i+n, ...` on its own devices (no jax.distributed needed) and writes the same manifest.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

from absl import app, flags, logging

from launch import common

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "fdpo checkpoint of the reference.")
HF_DIR = flags.DEFINE_string("hf_dir", None, "Or: a Hugging Face model directory.")
DATA = flags.DEFINE_string("data", None, "Dataset directory (manifest.json).", required=True)
OUT = flags.DEFINE_string("out", None, "Output dataset directory.", required=True)
BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Pairs per compiled call.")
COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                                  "Compute dtype of the reference forward.")
CHUNK = flags.DEFINE_integer("logprob_chunk", 256, "Positions per log-softmax chunk.")
SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This invocation's index.")
NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Invocations sharing the work.")


def precompute(checkpoint_dir, hf_dir, data_dir, out_dir, mesh, *, batch_size=16,
               compute_dtype="float32", chunk=256, shard_index=0, num_shards=1) -> dict:
    import jax
    import numpy as np
    from flax import nnx
    from tqdm import tqdm

    from fdpo import records as rec
    from fdpo import train
    from fdpo.models import checkpoint

    data_dir, out_dir = pathlib.Path(data_dir), pathlib.Path(out_dir)
    if data_dir.resolve() == out_dir.resolve():
        raise ValueError("--out must differ from --data (shards are rewritten)")
    manifest = rec.read_manifest(data_dir / "manifest.json")
    cfg, _, state, _ = checkpoint.load_checkpoint_or_hf(
        mesh, checkpoint=checkpoint_dir, hf_dir=hf_dir, compute_dtype=compute_dtype)
    params = nnx.to_pure_dict(state)
    score = train.make_score_fn(cfg, mesh, chunk=chunk)
    out_dir.mkdir(parents=True, exist_ok=True)
    multiple = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
    batch = -(-batch_size // multiple) * multiple

    shards = [(split, s["path"]) for split, info in manifest["splits"].items()
              for s in info["shards"]]
    mine = shards[shard_index::num_shards]
    total = sum(len(rec.PairDataSource(data_dir / p)) for _, p in mine)
    with tqdm(total=total, desc="reference", unit="pair") as bar:
        for split, path in mine:
            source = rec.PairDataSource(data_dir / path, max_len=manifest["max_len"])
            tmp = out_dir / (path + ".tmp")
            with rec.RecordWriter(tmp) as writer:
                for start in range(0, len(source), batch):
                    records = [source.record(i)
                               for i in range(start, min(start + batch, len(source)))]
                    n = len(records)
                    rows = records + [records[0]] * (batch - n)  # pad to the compiled shape
                    ids = np.stack([r.chosen_ids for r in rows] + [r.rejected_ids for r in rows])
                    seg = np.stack([r.chosen_segments for r in rows] +
                                   [r.rejected_segments for r in rows])
                    sums = np.asarray(jax.device_get(score(params, ids, seg)), np.float32)
                    for i, r in enumerate(records):
                        ref = np.stack([sums[i], sums[batch + i]]).astype(np.float32)
                        writer.write(dataclasses.replace(r, ref_logps=ref))
                    bar.update(n)
            os.replace(tmp, out_dir / path)
            logging.info("%s: %d records -> %s", path, len(source), out_dir / path)
    out_manifest = dict(manifest)
    out_manifest["reference"] = {
        "checkpoint": str(checkpoint_dir or hf_dir), "compute_dtype": compute_dtype,
        "logprob_chunk": chunk, "source_dataset": str(data_dir.absolute()),
        "layout": "ref_logps[side, segment]: (chosen, rejected) x (prefix, mid, suffix)"}
    rec.write_manifest(out_dir / "manifest.json", out_manifest)
    return out_manifest


def main(argv):
    del argv
    import jax

    from fdpo import sharding

    if (CHECKPOINT.value is None) == (HF_DIR.value is None):
        raise app.UsageError("give exactly one of --checkpoint and --hf_dir")
    shape = [int(s) for s in common.MESH_SHAPE.value]
    mesh = sharding.make_mesh(shape, jax.local_devices())
    precompute(CHECKPOINT.value, HF_DIR.value, DATA.value, OUT.value, mesh,
               batch_size=BATCH_SIZE.value, compute_dtype=COMPUTE_DTYPE.value,
               chunk=CHUNK.value, shard_index=SHARD_INDEX.value, num_shards=NUM_SHARDS.value)
    print(f"reference log-probs: {DATA.value} -> {OUT.value}")


if __name__ == "__main__":
    app.run(main)
