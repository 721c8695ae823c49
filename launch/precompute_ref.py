r"""Fills `ref_logps` of pair records with a reference model's per-segment log-prob sums.

    python -m launch.precompute_ref --checkpoint CKPT --data DIR --out DIR2 \
        [--config.batch_size=16 --config.compute_dtype=float32] \
        [--config.shard_index=I --config.num_shards=N]

Reads every shard listed in DIR/manifest.json, scores chosen and rejected with the train
step's own log-prob function (`fdpo.scoring.make_score_fn`: float32 log-softmax, chunked),
and writes the same records, with `ref_logps[side, (prefix, mid, suffix, lead, trail)]` set,
to shards
of the same names in DIR2, plus a manifest that records which reference made them. Train
on DIR2 with `--config.loss.reference=precomputed`: the step then runs no reference
forward. Use the compute dtype the frozen reference would have had (float32 by default).
The work is `fdpo.scoring.precompute_reference`; its settings are configs/precompute_ref.py's.

Several hosts: give each a `--config.shard_index` of `--config.num_shards`; each scores the
shard files `i, i+n, ...` on its own devices (no jax.distributed needed) and writes the same
manifest.
"""

from __future__ import annotations

import pathlib

import jax
from absl import app, flags
from ml_collections import config_flags

import configs
from fdpo import scoring, sharding
from launch import common

CONFIG = config_flags.DEFINE_config_file("config", configs.path("precompute_ref.py"),
                                         "Batching, dtype and shards (configs/precompute_ref.py).",
                                         lock_config=True)
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "fdpo checkpoint of the reference.")
HF_DIR = flags.DEFINE_string("hf_dir", None, "Or: a Hugging Face model directory.")
DATA = flags.DEFINE_string("data", None, "Dataset directory (manifest.json).", required=True)
OUT = flags.DEFINE_string("out", None, "Output dataset directory.", required=True)
COMPUTE_DTYPES = ("float32", "bfloat16")


def main(argv):
    del argv
    if (CHECKPOINT.value is None) == (HF_DIR.value is None):
        raise app.UsageError("give exactly one of --checkpoint and --hf_dir")
    if pathlib.Path(DATA.value).resolve() == pathlib.Path(OUT.value).resolve():
        raise app.UsageError("--out must differ from --data (shards are rewritten)")
    c = CONFIG.value
    if c.compute_dtype not in COMPUTE_DTYPES:
        raise app.UsageError(f"--config.compute_dtype={c.compute_dtype!r}; expected one of "
                             f"{COMPUTE_DTYPES}")
    shape = [int(s) for s in common.MESH_SHAPE.value]
    mesh = sharding.make_mesh(shape, jax.local_devices())
    scoring.precompute_reference(
        CHECKPOINT.value, HF_DIR.value, DATA.value, OUT.value, mesh,
        batch_size=c.batch_size, compute_dtype=c.compute_dtype, chunk=c.logprob_chunk,
        shard_index=c.shard_index, num_shards=c.num_shards)
    print(f"reference log-probs: {DATA.value} -> {OUT.value}")


if __name__ == "__main__":
    app.run(main)
