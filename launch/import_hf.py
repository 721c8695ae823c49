"""Imports a Hugging Face checkpoint (Qwen2 / Llama safetensors) into an fdpo checkpoint.

    python -m launch.import_hf --hf_dir HF --out CKPT [--param_dtype bfloat16]

Reads tensors one at a time (single or sharded safetensors), places each on its target
sharding, and writes an orbax checkpoint with the model config, the original config.json
and the tokenizer files (`fdpo.models.checkpoint.import_hf`). Many hosts: the same command
on every host with `--distributed`; orbax writes the parameters with every process taking
part, process 0 the rest, and renames the whole checkpoint into place.
"""

from __future__ import annotations

import os
import pathlib

from absl import flags, logging

from fdpo.models import checkpoint
from launch import common

HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory.", required=True)
OUT = flags.DEFINE_string("out", None, "Output fdpo checkpoint directory.", required=True)
PARAM_DTYPE = flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16", "float16"],
                                "Parameter dtype; default: the checkpoint's own dtype.")


def main(argv):
    if len(argv) > 1:
        raise common.UsageError(f"unexpected arguments: {argv[1:]}")
    common.check(os.path.isfile(pathlib.Path(HF_DIR.value) / "config.json"),
                 f"--hf_dir={HF_DIR.value}: no config.json (not a Hugging Face model "
                 "directory)")
    common.check_output("--out", OUT.value, directory=True, make_parents=True)
    common.check_mesh_shape()
    mesh = common.init_jax()
    out = checkpoint.import_hf(HF_DIR.value, OUT.value, mesh, param_dtype=PARAM_DTYPE.value)
    logging.info("wrote %s", out)
    print(f"imported {HF_DIR.value} -> {out}")


if __name__ == "__main__":
    common.run(main)
