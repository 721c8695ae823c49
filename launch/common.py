"""Flags and set-up shared by the launch programs."""

from __future__ import annotations

import os

from absl import flags, logging

MESH_SHAPE = flags.DEFINE_list(
    "mesh_shape", ["1", "-1", "1"],
    "Device mesh (data, fsdp, tensor); one -1 takes the remaining devices.")
DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Call jax.distributed.initialize() first (multi-host TPU pods and GPU clusters).")


def init_jax():
    """Initialises JAX (multi-host when --distributed) and returns the mesh from the flags."""
    import jax

    if DISTRIBUTED.value:
        jax.distributed.initialize()
    from fdpo import sharding

    try:
        shape = [int(s) for s in MESH_SHAPE.value]
    except ValueError as e:
        raise flags.ValidationError(f"--mesh_shape={MESH_SHAPE.value}: {e}") from e
    mesh = sharding.make_mesh(shape)
    logging.info("mesh %s over %d %s devices (process %d of %d)", dict(mesh.shape),
                 jax.device_count(), jax.devices()[0].platform, jax.process_index(),
                 jax.process_count())
    return mesh


def quiet_tokenizers():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
