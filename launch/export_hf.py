"""Exports an fdpo checkpoint to a Hugging Face directory transformers can load.

    python -m launch.export_hf --checkpoint CKPT --out HF2 [--max_shard_size_mb 5120]

Writes safetensors (sharded with an index above the size threshold, as transformers does)
in the checkpoint's original dtype, config.json (the original one when the checkpoint kept
it), generation_config.json and the tokenizer files (`fdpo.models.checkpoint.export_hf`).
Many hosts: the same command on every host with `--distributed`; every process takes part
in gathering each tensor, process 0 alone writes OUT.
"""

from __future__ import annotations

from absl import flags, logging

from fdpo.models import checkpoint
from launch import common

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "fdpo checkpoint directory.",
                                 required=True)
OUT = flags.DEFINE_string("out", None, "Output Hugging Face directory.", required=True)
MAX_SHARD_SIZE_MB = flags.DEFINE_integer("max_shard_size_mb", 5 * 1024,
                                         "Shard the safetensors above this size.")


def main(argv):
    if len(argv) > 1:
        raise common.UsageError(f"unexpected arguments: {argv[1:]}")
    common.check(MAX_SHARD_SIZE_MB.value > 0,
                 f"--max_shard_size_mb={MAX_SHARD_SIZE_MB.value}: must be positive")
    common.check_dir("--checkpoint", CHECKPOINT.value)
    common.check_output("--out", OUT.value, directory=True, make_parents=True)
    try:
        checkpoint.check_export_out(OUT.value)
    except ValueError as e:
        raise common.UsageError(f"--out={e}") from None
    common.check_mesh_shape()
    mesh = common.init_jax()
    out = checkpoint.export_hf(CHECKPOINT.value, OUT.value, mesh,
                               MAX_SHARD_SIZE_MB.value * 1024 * 1024)
    logging.info("wrote %s", out)
    print(f"exported {CHECKPOINT.value} -> {out}")


if __name__ == "__main__":
    common.run(main)
