"""Process set-up shared by every program that uses JAX: multi-host initialisation and the
device mesh. `jax.distributed.initialize` must run before the first computation (importing
jax is fine)."""
from __future__ import annotations

import logging
from typing import Sequence

import jax

from fdpo import sharding

log = logging.getLogger("fdpo.runtime")


def init(mesh_shape: Sequence[int | str], *, distributed: bool = False,
         coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None) -> jax.sharding.Mesh:
    """Initialises JAX (multi-host when `distributed`: every process of the job calls this
    with the same arguments) and returns the mesh (data, fsdp, tensor); one -1 in
    `mesh_shape` takes the remaining devices."""
    if distributed:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    try:
        shape = [int(s) for s in mesh_shape]
    except ValueError as e:
        raise ValueError(f"mesh shape {list(mesh_shape)}: {e}") from e
    mesh = sharding.make_mesh(shape)
    log.info("mesh %s over %d %s devices (process %d of %d)", dict(mesh.shape),
             jax.device_count(), jax.devices()[0].platform, jax.process_index(),
             jax.process_count())
    return mesh
