"""Writes a randomly initialised fdpo checkpoint (for the miniature and for benchmarks).

    python -m launch.init_model --out CKPT --preset qwen2.5-coder-0.5b
    python -m launch.init_model --out CKPT --tokenizer TOKENIZER_DIR \
        --fields hidden_size=64,num_layers=2,num_heads=4,num_kv_heads=2,intermediate_size=128

Without --preset the base is a tiny Qwen2 shape. With --tokenizer, the vocabulary size,
the bos/eos/pad ids come from the tokenizer and its files are stored with the checkpoint
(so `launch.score`, sampling and export find them). Parameters are drawn as transformers
initialises them (normal, std 0.02; norms 1, biases 0).
"""

from __future__ import annotations

import pathlib

from absl import app, flags

from launch import common

OUT = flags.DEFINE_string("out", None, "Output checkpoint directory.", required=True)
PRESET = flags.DEFINE_string("preset", None, "A shape preset (fdpo.models.config.PRESETS).")
FIELDS = flags.DEFINE_list("fields", [], "ModelConfig overrides, key=value.")
TOKENIZER = flags.DEFINE_string("tokenizer", None, "Hugging Face tokenizer directory.")
SEED = flags.DEFINE_integer("seed", 0, "Initialisation seed.")


def parse_fields(items):
    import dataclasses

    from fdpo.models.config import ModelConfig

    types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise app.UsageError(f"--fields: {item!r} is not key=value with a ModelConfig "
                                 f"field (fields: {sorted(types)})")
        kind = str(types[key])
        if "bool" in kind:
            out[key] = value.lower() in ("1", "true", "yes")
        elif kind.startswith("int"):
            out[key] = int(value)
        elif kind.startswith("float"):
            out[key] = float(value)
        else:
            out[key] = value
    return out


def main(argv):
    del argv
    common.init_jax()
    from fdpo.models import checkpoint

    path = checkpoint.init_random(pathlib.Path(OUT.value), preset=PRESET.value,
                                  fields=parse_fields(FIELDS.value),
                                  tokenizer=TOKENIZER.value, seed=SEED.value)
    print(f"initialised {path}")


if __name__ == "__main__":
    app.run(main)
