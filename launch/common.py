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
COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "With --distributed: host:port of process 0 (default: detected from the cluster).")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "With --distributed: number of processes (default: detected).")
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "With --distributed: this process's index (default: detected).")


def init_distributed():
    """jax.distributed.initialize() when --distributed; a no-op otherwise."""
    import jax

    if DISTRIBUTED.value:
        jax.distributed.initialize(coordinator_address=COORDINATOR.value,
                                   num_processes=NUM_PROCESSES.value,
                                   process_id=PROCESS_ID.value)


def init_jax(mesh_shape=None):
    """Initialises JAX (multi-host when --distributed) and returns the mesh: `mesh_shape`
    when given (a run config's), else --mesh_shape."""
    import jax

    init_distributed()
    from fdpo import sharding

    try:
        shape = [int(s) for s in (mesh_shape if mesh_shape is not None else MESH_SHAPE.value)]
    except ValueError as e:
        raise flags.ValidationError(f"--mesh_shape={MESH_SHAPE.value}: {e}") from e
    mesh = sharding.make_mesh(shape)
    logging.info("mesh %s over %d %s devices (process %d of %d)", dict(mesh.shape),
                 jax.device_count(), jax.devices()[0].platform, jax.process_index(),
                 jax.process_count())
    return mesh


def quiet_tokenizers():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
