"""Logical axis names, the rules that map them onto a device mesh, and the one helper that
constrains activations.

Every parameter carries a tuple of logical axis names in its `logical_axes` metadata
(`('embed', 'heads', 'head_dim')`, ...). A run config holds one rules table, a sequence of
`(logical_name, mesh_axis or tuple of mesh axes or None)`, mapping them onto the mesh
`('data', 'fsdp', 'tensor')`. A GPU run and a TPU-pod run differ only in that table and the
mesh shape.

A dimension that does not divide evenly over its mesh axes (a vocabulary of 32,001 over 2
tensor shards, or 2 KV heads over 4) is replicated instead, since XLA requires even
shards for device_put; `explain_shardings` reports where that happened.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import json
import math
import time
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Parameters are sharded over fsdp on the model dimension and over tensor on heads/mlp/vocab;
# activations split the batch over data and fsdp. This is the usual FSDP + tensor
# parallel layout (flax lm1b, t5x standard rules).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("act_mlp", "tensor"),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
)

Rules = Sequence[tuple[str, Any]]


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one -1 entry takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if shape.count(-1) > 1:
        raise ValueError(f"mesh shape {shape}: at most one -1")
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        if len(devices) % rest:
            raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // rest
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices; "
                         f"{len(devices)} are available")
    device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules) -> P:
    """PartitionSpec for an array of `shape` whose dims carry `logical_axes`."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape, strict=True):
        target = table.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        # A mesh axis may appear only once in a spec; size-1 axes are dropped for clarity.
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if not axes or dim % math.prod(mesh.shape[a] for a in axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """NamedShardings for every variable of an (abstract or concrete) nnx state."""

    def one(v: nnx.Variable):
        axes = v.get_metadata().get("logical_axes")
        value = v.get_value() if hasattr(v, "get_value") else v.value
        if axes is None:
            axes = (None,) * len(value.shape)
        return v.replace(NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules)))

    return jax.tree.map(one, state, is_leaf=_is_variable)


def explain_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> list[str]:
    """One line per parameter whose rule asked for sharding that had to be dropped."""
    table = dict(rules)
    notes = []
    for path, v in jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_variable):
        axes = v.get_metadata().get("logical_axes") or ()
        value = v.get_value() if hasattr(v, "get_value") else v.value
        spec = logical_to_spec(axes, value.shape, mesh, rules)
        for name, dim, got in zip(axes, value.shape, spec):
            if table.get(name) is not None and got is None:
                notes.append(f"{jax.tree_util.keystr(path)}: dim {name}={dim} replicated "
                             f"(not divisible over {table[name]})")
    return notes


# ----------------------------------------------------------------------------------------
# Activation constraints. The model calls `constrain(x, ('batch', 'length', 'act_embed'))`
# at block boundaries; it is a no-op unless a mesh is active through `use_mesh`.
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Active:
    mesh: Mesh
    rules: Rules


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("fdpo_mesh",
                                                                         default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    token = _ACTIVE.set(_Active(mesh, tuple(rules)))
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    active = _ACTIVE.get()
    if active is None:
        return x
    spec = logical_to_spec(logical_axes, x.shape, active.mesh, active.rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(active.mesh, spec))


def data_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
    """Sharding for [batch, length, ...] host batches: batch over the data axes."""
    axes = ("batch",) + (None,) * (ndim - 1)
    spec = []
    for name in axes:
        target = dict(rules).get(name) if name else None
        spec.append(target)
    return NamedSharding(mesh, P(*spec))


def data_parallel_size(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> int:
    """The number of devices the batch axis is spread over: a global batch's rows must be a
    multiple of it."""
    axes = dict(rules).get("batch") or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


# ----------------------------------------------------------------------------------------
# Several processes (jax.distributed: one per host). Every process runs the same program on
# the same inputs: it makes the same calls on global arrays, reads the results back whole
# (`to_host`), takes the same decisions, and process 0 alone writes shared outputs
# (`is_writer`).
# ----------------------------------------------------------------------------------------


def to_host(x) -> np.ndarray:
    """A jax.Array's whole value as numpy, on every process: an array that spans other
    processes' devices is gathered (a collective: every process must call this for the
    same array), others are copied as they are."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def global_array(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array that every process holds whole, placed on `sharding`: each process
    puts only the shards of its own devices (works when the sharding spans processes)."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def is_writer() -> bool:
    """Whether this process writes the outputs every process computed alike (process 0)."""
    return jax.process_index() == 0


_SYNCS = itertools.count()  # barrier ids are used once: every call gets its own
# Where a failing process leaves its error (`announce_failure`) for the others' waits.
FAILED_DIR = "fdpo.failed"


class ProcessFailed(RuntimeError):
    """Another process of the job failed while this one waited for it."""


def _client():
    from jax._src import distributed  # the client jax.distributed.initialize made

    return distributed.global_state.client


def announce_failure(message: str) -> None:
    """Tells the job's other processes that this one is failing (`message`): those waiting
    in `sync` or `gather` stop at once with ProcessFailed naming it, instead of waiting out
    their timeout or jax.distributed's own detection. A no-op with one process; never
    raises (it runs while an error is on its way out)."""
    try:
        client = _client()  # first: process_count would start a backend before init
        if client is None or jax.process_count() == 1:
            return
        client.key_value_set(f"{FAILED_DIR}/{jax.process_index()}", message[:4000],
                                allow_overwrite=True)
    except Exception:  # noqa: BLE001 - the coordinator may be gone already
        pass


@contextlib.contextmanager
def failures_announced():
    """Runs the block; an exception leaving it is announced to the other processes
    (`announce_failure`) before it propagates. Programs wrap their main in it."""
    try:
        yield
    except BaseException as e:
        announce_failure(f"{type(e).__name__}: {e}")
        raise


def _wait(client, prefix: str, what: str, timeout_s: float) -> dict[int, str]:
    """{process: value} of the keys PREFIX/I once every process has set its own; raises
    ProcessFailed as soon as a process announces a failure, TimeoutError (naming the
    missing processes) after `timeout_s`. Polls the coordination service with a growing
    interval (10 ms to 1 s): a short wait stays short, a long one costs little."""
    n = jax.process_count()
    deadline, pause = time.monotonic() + timeout_s, 0.01
    while True:
        got = {int(k.rsplit("/", 1)[1]): v for k, v in client.key_value_dir_get(prefix + "/")}
        if len(got) == n:
            return got
        failed = client.key_value_dir_get(FAILED_DIR + "/")
        if failed:
            k, message = sorted(failed)[0]
            raise ProcessFailed(f"{what}: process {k.rsplit('/', 1)[1]} of {n} failed while "
                                f"process {jax.process_index()} waited for it: {message}")
        if time.monotonic() > deadline:
            missing = sorted(set(range(n)) - set(got))
            raise TimeoutError(f"{what}: processes {missing} of {n} did not arrive within "
                               f"{timeout_s:.0f} s")
        time.sleep(pause)
        pause = min(1.0, pause * 2)


def sync(name: str, timeout_s: float = 3600) -> None:
    """Waits until every process has reached `sync(name)` (a no-op with one process); every
    process must make the same sequence of calls. Through jax.distributed's coordination
    service, not a device collective: a process may wait here for as long as `timeout_s`
    (another's long CPU work) while its heartbeats keep it alive, and it stops at once
    (ProcessFailed) when another announces a failure (`announce_failure`)."""
    if jax.process_count() == 1:
        return
    key = f"fdpo.sync.{next(_SYNCS)}.{name.replace('/', '|')}"  # '/' ends a key's directory
    client = _client()
    if client is None:  # processes set up another way: a collective over every device
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(key)
        return
    client.key_value_set(f"{key}/{jax.process_index()}", "")
    _wait(client, key, f"sync {name!r}", timeout_s)


def gather(value, name: str, timeout_s: float = 3600) -> list:
    """Every process's `value` (JSON-serialisable and small: it travels through
    jax.distributed's key-value store), in process order, on every process ([value] with one
    process); every process must make the same sequence of `gather` and `sync` calls. Waits
    as `sync` does."""
    if jax.process_count() == 1:
        return [value]
    client = _client()
    if client is None:
        raise RuntimeError(f"gather {name!r}: several processes but no jax.distributed "
                           "client (call jax.distributed.initialize first)")
    key = f"fdpo.gather.{next(_SYNCS)}.{name.replace('/', '|')}"
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(value))
    got = _wait(client, key, f"gather {name!r}", timeout_s)
    return [json.loads(got[i]) for i in range(jax.process_count())]
