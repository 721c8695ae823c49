"""Imports a Hugging Face checkpoint (Qwen2 / Llama safetensors) into an fdpo checkpoint.

    python -m launch.import_hf --hf_dir HF --out CKPT [--param_dtype bfloat16]

Reads tensors one at a time (single or sharded safetensors), places each on its target
sharding, and writes an orbax checkpoint with the model config, the original config.json
and the tokenizer files.
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags, logging

from launch import common

HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory.", required=True)
OUT = flags.DEFINE_string("out", None, "Output fdpo checkpoint directory.", required=True)
PARAM_DTYPE = flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16", "float16"],
                                "Parameter dtype; default: the checkpoint's own dtype.")


def main(argv):
    del argv
    from tqdm import tqdm

    from fdpo.models import checkpoint, convert
    from fdpo.models.config import ModelConfig

    mesh = common.init_jax()
    hf_dir = pathlib.Path(HF_DIR.value)
    overrides = {"param_dtype": PARAM_DTYPE.value} if PARAM_DTYPE.value else {}
    cfg = ModelConfig.from_hf_dir(hf_dir, **overrides)
    logging.info("%s: %s, %.3fB parameters", hf_dir, cfg.architecture, cfg.num_params / 1e9)
    with tqdm(total=convert.num_hf_tensors(cfg), desc="import", unit="tensor") as bar:
        _, state = convert.load_hf_params(hf_dir, cfg, mesh, progress=bar.update)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    out = checkpoint.save_model(OUT.value, cfg, state, hf_config=hf_config, extras_from=hf_dir,
                                metadata={"imported_from": str(hf_dir.absolute())})
    logging.info("wrote %s", out)
    print(f"imported {hf_dir} -> {out}")


if __name__ == "__main__":
    app.run(main)
