"""Flags shared by the launch programs that use JAX (the mesh and multi-host set-up)."""

from __future__ import annotations

import os

from absl import flags

from fdpo import runtime

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


def init_jax(mesh_shape=None):
    """JAX set-up from the flags (multi-host when --distributed); returns the mesh:
    `mesh_shape` when given (a run config's), else --mesh_shape."""
    try:
        return runtime.init(mesh_shape if mesh_shape is not None else MESH_SHAPE.value,
                            distributed=DISTRIBUTED.value,
                            coordinator_address=COORDINATOR.value,
                            num_processes=NUM_PROCESSES.value, process_id=PROCESS_ID.value)
    except ValueError as e:
        raise flags.ValidationError(f"--mesh_shape: {e}") from e


def quiet_tokenizers():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
