r"""Fills `ref_logps` of pair records with a reference model's per-segment log-prob sums.

    python -m launch.precompute_ref --checkpoint CKPT --data DIR --out DIR2 \
        [--batch_size 16] [--compute_dtype float32] [--shard_index I --num_shards N]

Reads every shard listed in DIR/manifest.json, scores chosen and rejected with the train
step's own log-prob function (`fdpo.scoring.make_score_fn`: float32 log-softmax, chunked),
and writes the same records, with `ref_logps[side, (prefix, mid, suffix)]` set, to shards
of the same names in DIR2, plus a manifest that records which reference made them. Train
on DIR2 with `--config.loss.reference=precomputed`: the step then runs no reference
forward. Use the compute dtype the frozen reference would have had (float32 by default).
The work is `fdpo.scoring.precompute_reference`.

Several hosts: give each a `--shard_index` of `--num_shards`; each scores the shard files
`i, i+n, ...` on its own devices (no jax.distributed needed) and writes the same manifest.
"""

from __future__ import annotations

import pathlib

import jax
from absl import app, flags

from fdpo import scoring, sharding
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


def main(argv):
    del argv
    if (CHECKPOINT.value is None) == (HF_DIR.value is None):
        raise app.UsageError("give exactly one of --checkpoint and --hf_dir")
    if pathlib.Path(DATA.value).resolve() == pathlib.Path(OUT.value).resolve():
        raise app.UsageError("--out must differ from --data (shards are rewritten)")
    shape = [int(s) for s in common.MESH_SHAPE.value]
    mesh = sharding.make_mesh(shape, jax.local_devices())
    scoring.precompute_reference(
        CHECKPOINT.value, HF_DIR.value, DATA.value, OUT.value, mesh,
        batch_size=BATCH_SIZE.value, compute_dtype=COMPUTE_DTYPE.value, chunk=CHUNK.value,
        shard_index=SHARD_INDEX.value, num_shards=NUM_SHARDS.value)
    print(f"reference log-probs: {DATA.value} -> {OUT.value}")


if __name__ == "__main__":
    app.run(main)
