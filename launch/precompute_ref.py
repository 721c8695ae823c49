r"""Fills `ref_logps` of pair records with the reference's per-segment log-prob sums, computed
as the training run given by `--config` would compute them.

    python -m launch.precompute_ref --out=DATA_REF \
        --config=configs/focused_dpo.py:model=CKPT,data=DATA [--config.reference.checkpoint=REF] \
        [--batch_size=16]

`--config` is the training config, with the same overrides as `launch.train`: the reference
is its `reference.checkpoint` / `reference.hf_dir`, or the initial policy when neither is
set; it runs with the config's `model` settings (compute dtype) and `train.logprob_chunk`,
on the config's mesh (`--config.mesh_shape`, as launch.train). Every shard of `data.dir` is
scored with the train step's own log-prob function (`fdpo.scoring.make_score_fn`) and
written, with `ref_logps[side, (prefix, mid, suffix, lead, trail)]` set, to DATA_REF, whose
manifest records the provenance (reference identity and path, compute dtype, chunk). Train
on DATA_REF with `data=DATA_REF` and
`--config.loss.reference=precomputed`: `launch.train` refuses data whose provenance differs
from its own reference, dtype or chunk. The work is `fdpo.reference.precompute`.

Refused with exit status 2 and one line: data built with a tokenizer larger than the
reference's embedding table (both sizes named, before any weights are read), and reference
log-probs that come out NaN or infinite (the shard and record named; the shards this
invocation wrote are removed, so no dataset with NaN references is left behind).

Several hosts: the same command on every host with `--distributed` (as launch.train; one
process per host): every batch runs over the global mesh of all hosts' devices, every
process gets every sum back, and process 0 alone writes DATA_REF (shards and manifest).
"""

from __future__ import annotations

import pathlib

from absl import flags

from fdpo import reference, scoring
from launch import common

CONFIG = common.define_config("config", None, "The training run's config file (with :arg), "
                              "as given to launch.train.", required=True, lock_config=True)
OUT = flags.DEFINE_string("out", None, "Output dataset directory.", required=True)
BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Pairs per compiled call (rounded up to "
                                  "the data-parallel devices).", lower_bound=1)
COMPUTE_DTYPES = ("float32", "bfloat16")


def main(argv):
    del argv
    c = CONFIG.value
    if not c.data.dir:
        raise common.UsageError("--config: data.dir (config arg data=) is empty")
    common.check_readable_file("--config.data.dir", pathlib.Path(c.data.dir) / "manifest.json")
    common.check_output("--out", OUT.value, directory=True, make_parents=True)
    if pathlib.Path(c.data.dir).resolve() == pathlib.Path(OUT.value).resolve():
        raise common.UsageError("--out must differ from the config's data.dir (shards are "
                                "rewritten)")
    common.check_choice("--config.model.compute_dtype", c.model.compute_dtype, COMPUTE_DTYPES)
    common.check_number("--config.train.logprob_chunk", c.train.logprob_chunk, lo=1,
                        integer=True)
    common.check_mesh_shape(c.mesh_shape)
    try:
        reference.source(c)
        reference.check_vocab(c)
    except (OSError, ValueError) as e:
        raise common.UsageError(f"--config: {e}") from None
    mesh = common.init_jax(c.mesh_shape)  # the training run's mesh, --distributed honoured
    try:
        reference.precompute(c, OUT.value, mesh, batch_size=BATCH_SIZE.value)
    except scoring.NonFiniteReference as e:
        raise common.UsageError(f"{e}; what this run wrote to --out is removed") from None
    print(f"reference log-probs: {c.data.dir} -> {OUT.value}")


if __name__ == "__main__":
    common.run(main)
