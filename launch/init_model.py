r"""Writes a randomly initialised fdpo checkpoint (for the miniature and for benchmarks).

    python -m launch.init_model --out=CKPT --config.preset=qwen2.5-coder-0.5b
    python -m launch.init_model --out=CKPT --tokenizer=TOKENIZER_DIR \
        --config.fields.hidden_size=64 --config.fields.num_layers=2 \
        --config.fields.num_heads=4 --config.fields.num_kv_heads=2 \
        --config.fields.intermediate_size=128

The settings are configs/init_model.py: a preset (none: a tiny Qwen2 shape), ModelConfig
fields that override it, the seed. With --tokenizer, the vocabulary size and the
bos/eos/pad ids come from the tokenizer and its files are stored with the checkpoint (so
`launch.score`, sampling and export find them). Parameters are drawn as transformers
initialises them (normal, std 0.02; norms 1, biases 0): `fdpo.models.checkpoint.init_random`.
"""

from __future__ import annotations

from absl import app, flags

import configs
from fdpo.models import checkpoint
from launch import common

CONFIG = common.define_config("config", configs.path("init_model.py"),
                              "Model settings (configs/init_model.py).",
                              lock_config=True)
OUT = flags.DEFINE_string("out", None, "Output checkpoint directory.", required=True)
TOKENIZER = flags.DEFINE_string("tokenizer", None, "Hugging Face tokenizer directory.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    c = CONFIG.value
    common.check_output("--out", OUT.value, directory=True, make_parents=True)
    if TOKENIZER.value is not None:
        common.check_dir("--tokenizer", TOKENIZER.value)
    common.check_mesh_shape()
    common.init_jax()
    try:
        path = checkpoint.init_random(OUT.value, preset=c.preset, fields=c.fields.to_dict(),
                                      tokenizer=TOKENIZER.value, seed=c.seed)
    except ValueError as e:  # a vocab_size below the tokenizer's, an unknown preset
        raise common.UsageError(f"--config.fields.{e}" if str(e).startswith("vocab_size")
                                else str(e)) from None
    print(f"initialised {path}")


if __name__ == "__main__":
    common.run(main)
