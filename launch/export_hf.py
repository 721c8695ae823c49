"""Exports an fdpo checkpoint to a Hugging Face directory transformers can load.

    python -m launch.export_hf --checkpoint CKPT --out HF2 [--max_shard_size_mb 5120]

Writes safetensors (sharded with an index above the size threshold, as transformers does)
in the checkpoint's original dtype, config.json (the original one when the checkpoint kept
it), generation_config.json and the tokenizer files.
"""

from __future__ import annotations

import json
import pathlib

from absl import app, flags, logging

from launch import common

CHECKPOINT = flags.DEFINE_string("checkpoint", None, "fdpo checkpoint directory.",
                                 required=True)
OUT = flags.DEFINE_string("out", None, "Output Hugging Face directory.", required=True)
MAX_SHARD_SIZE_MB = flags.DEFINE_integer("max_shard_size_mb", 5 * 1024,
                                         "Shard the safetensors above this size.")


def export(checkpoint_dir, out_dir, mesh, max_shard_bytes):
    import jax
    from flax import nnx
    from tqdm import tqdm

    from fdpo.models import checkpoint, convert

    ckpt = pathlib.Path(checkpoint_dir)
    meta = checkpoint.read_metadata(ckpt)
    cfg, _, state = checkpoint.load_model(ckpt, mesh)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = nnx.to_pure_dict(state)
    tensors = tqdm(convert.iter_hf_tensors(cfg, params), total=convert.num_hf_tensors(cfg),
                   desc="export", unit="tensor")
    if jax.process_index() == 0:
        convert.write_safetensors(tensors, out, max_shard_bytes)
        hf_config = meta.get("hf_config") or cfg.to_hf_config()
        (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        extras = ckpt / checkpoint.EXTRAS_DIR
        if extras.is_dir():
            checkpoint.copy_hf_extras(extras, out)
        if not (out / "generation_config.json").exists():
            gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id),
                                     ("eos_token_id", cfg.eos_token_id),
                                     ("pad_token_id", cfg.pad_token_id)) if v is not None}
            (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    else:
        for _ in tensors:  # every process takes part in gathering sharded arrays
            pass
    return out


def main(argv):
    del argv
    mesh = common.init_jax()
    out = export(CHECKPOINT.value, OUT.value, mesh, MAX_SHARD_SIZE_MB.value * 1024 * 1024)
    logging.info("wrote %s", out)
    print(f"exported {CHECKPOINT.value} -> {out}")


if __name__ == "__main__":
    app.run(main)
