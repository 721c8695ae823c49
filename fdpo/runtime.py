"""Process set-up shared by every program that uses JAX: the CPU pins that make its bits
reproducible across machines, multi-host initialisation and the device mesh. Both must run
before the first computation (importing jax is fine).

On CPU a run's floating-point bits depend on the instruction set XLA compiles for and on the
size of its intra-op thread pool (docs/pipeline.md#determinism has the measurements). Two
environment variables pin them for every program that calls :func:`init`, and so for every
stage the pipeline and the study start (the stages inherit the environment):

    FDPO_CPU_ISA=AVX2      XLA_FLAGS gains --xla_cpu_max_isa=AVX2 (an error if this CPU
                           lacks it: it could not reproduce those bits)
    FDPO_CPU_THREADS=2     the process is bound to 2 of its allowed CPUs, which sizes the
                           thread pool (an error if fewer are allowed)
"""
from __future__ import annotations

import logging
import os
import re
from typing import Sequence

import jax

from fdpo import sharding

log = logging.getLogger("fdpo.runtime")

ISA_ENV, THREADS_ENV = "FDPO_CPU_ISA", "FDPO_CPU_THREADS"
# The values of --xla_cpu_max_isa (XLA only warns on others and ignores them) and the
# /proc/cpuinfo flags a CPU needs to run code built for them (AVX2 implies FMA in XLA).
ISA_FLAGS = {"SSE4_2": ("sse4_2",), "AVX": ("avx",), "AVX2": ("avx2", "fma"),
             "AVX512": ("avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512cd"),
             "AVX512_VNNI": ("avx512_vnni",), "AVX512_BF16": ("avx512_bf16",),
             "AMX": ("amx_tile", "amx_bf16", "amx_int8")}
_ISA_ORDER = tuple(ISA_FLAGS)


class PinError(Exception):
    """A pin that is malformed, that this machine cannot honour, or that comes too late."""


def _cpu_flags() -> set[str] | None:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:  # not Linux: the check is skipped
        return None
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else None


def pin_cpu(env: dict | None = None) -> dict:
    """Applies FDPO_CPU_ISA and FDPO_CPU_THREADS (module docstring) to this process and
    returns what was pinned ({"isa": ..., "threads": ...}, None where unset). Must run before
    JAX starts its backend: the thread pool is sized and XLA_FLAGS read then, so a later pin
    would silently change nothing; that case is an error."""
    env = os.environ if env is None else env
    isa = env.get(ISA_ENV, "").strip().upper() or None
    threads = env.get(THREADS_ENV, "").strip() or None
    if isa is None and threads is None:
        return {"isa": None, "threads": None}
    from jax._src import xla_bridge  # the one place that knows whether a backend exists

    if xla_bridge.backends_are_initialized():
        raise PinError(f"{ISA_ENV}/{THREADS_ENV} must be applied before JAX starts its "
                           "backend (something computed before runtime.init)")
    if isa is not None:
        if isa not in ISA_FLAGS:
            raise PinError(f"{ISA_ENV}={isa}: not one of {', '.join(ISA_FLAGS)}")
        have = _cpu_flags()
        if have is not None:
            # XLA orders the ISAs linearly; a cap includes every one below it.
            needed = [f for name in _ISA_ORDER[:_ISA_ORDER.index(isa) + 1]
                      for f in ISA_FLAGS[name]]
            missing = [f for f in needed if f not in have]
            if missing:
                raise PinError(f"{ISA_ENV}={isa}: this CPU lacks {', '.join(missing)}, so "
                                 f"it cannot reproduce {isa} bits; pin a lower ISA on every "
                                 "machine")
        # XLA reads the process environment, whatever `env` the pins came from.
        flags = re.sub(r"--xla_cpu_max_isa=\S*", "", os.environ.get("XLA_FLAGS", "")).split()
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_cpu_max_isa={isa}"])
    if threads is not None:
        try:
            n = int(threads)
            if n < 1:
                raise ValueError
        except ValueError:
            raise PinError(f"{THREADS_ENV}={threads}: must be a whole number >= 1") from None
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < n:
            raise PinError(f"{THREADS_ENV}={n}: only {len(allowed)} CPUs are allowed here "
                             f"(a different pool size gives different bits)")
        os.sched_setaffinity(0, allowed[:n])
        threads = n
    log.info("CPU pinned: %s=%s, %s=%s", ISA_ENV, isa, THREADS_ENV, threads)
    return {"isa": isa, "threads": threads}


def init(mesh_shape: Sequence[int | str], *, distributed: bool = False,
         coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None) -> jax.sharding.Mesh:
    """Initialises JAX (multi-host when `distributed`: every process of the job calls this
    with the same arguments) and returns the mesh (data, fsdp, tensor); one -1 in
    `mesh_shape` takes the remaining devices. Applies the CPU pins first (:func:`pin_cpu`)."""
    pin_cpu()
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
