"""Device mesh, sharding rules and global batches for training.

The mesh has two axes:

* ``data``: pure data parallelism. Parameters are replicated along it.
* ``fsdp``: fully sharded data parallelism (ZeRO-3 style). Large parameter and
  optimizer-state tensors are split along it; XLA all-gathers them where they are used
  and reduce-scatters their gradients.

Both axes carry different examples: the batch is split over ``("data", "fsdp")``, so a
mesh of ``data=4, fsdp=2`` runs 8 distinct shards of the batch, exactly like ``data=8``,
and only the parameter layout differs. (Splitting the batch over ``data`` alone would
make the two devices of an ``fsdp`` group compute the same thing twice.)

Everything here is shape-driven, so the same rules apply to parameters, to optimizer
states (whose moments have the parameters' shapes) and to abstract ``ShapeDtypeStruct``
trees from ``jax.eval_shape``: a state can be created, and a checkpoint restored,
directly into its sharded layout on any mesh.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
# The batch dimension is split over every mesh axis (see the module docstring).
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def create_mesh(data: int = -1, fsdp: int = 1,
                devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all devices of all processes).

    One of the two sizes may be ``-1``: it is filled in so that the mesh uses every
    device. The axes are ``Auto`` so that XLA's partitioner propagates shardings through
    the model (layers are not annotated by hand).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data, fsdp = int(data), int(fsdp)
    if data == -1 and fsdp == -1:
        raise ValueError("at most one of mesh.data and mesh.fsdp may be -1")
    if data == -1:
        if n % fsdp:
            raise ValueError(f"mesh.fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    elif fsdp == -1:
        if n % data:
            raise ValueError(f"mesh.data={data} does not divide the {n} devices")
        fsdp = n // data
    if data < 1 or fsdp < 1:
        raise ValueError(f"mesh sizes must be positive, got data={data}, fsdp={fsdp}")
    if data * fsdp != n:
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} are available; "
            "set mesh.data=-1 to use all of them"
        )
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
    """PartitionSpec for one array under the FSDP rule.

    Arrays with at least ``min_size`` elements are split along ``fsdp`` on their largest
    axis that ``fsdp_size`` divides (ties: the last such axis, which for channels-last
    kernels ``[kernel, in, out]`` is the output channels). Everything else, including
    scalars, biases and small kernels whose all-gather would cost more than it saves, is
    replicated.
    """
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return P()
    candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0 and d >= fsdp_size]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: (shape[i], i))
    spec = [None] * len(shape)
    spec[axis] = FSDP_AXIS
    return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh, min_size: int = 2 ** 14) -> Any:
    """NamedSharding for every leaf of a (possibly abstract) pytree, by :func:`fsdp_spec`.

    Leaves may be arrays or ``jax.ShapeDtypeStruct``; typed PRNG keys and other
    non-array leaves are replicated.
    """
    fsdp_size = mesh.shape[FSDP_AXIS]

    def one(leaf):
        shape = getattr(leaf, "shape", ())
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, fsdp_spec(tuple(shape), fsdp_size, min_size))

    return jax.tree_util.tree_map(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis, the rest whole: `[batch, ...]`."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh) -> int:
    """The global batch size must be a multiple of this (the number of batch shards)."""
    return mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Examples each process loads per step: its share of the global batch.

    Every process holds the same number of devices of the mesh in a regular multi-host
    setup, so the batch divides evenly over processes.
    """
    if global_batch_size % batch_divisor(mesh):
        raise ValueError(
            f"global batch size {global_batch_size} is not divisible by the "
            f"{batch_divisor(mesh)} batch shards of mesh {dict(mesh.shape)}"
        )
    if global_batch_size % jax.process_count():
        raise ValueError(f"global batch size {global_batch_size} is not divisible by "
                         f"{jax.process_count()} processes")
    return global_batch_size // jax.process_count()


def make_global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble per-process host arrays into global arrays sharded over the batch axes.

    Each value is `[local_batch, ...]` on this process; the result is `[global_batch, ...]`
    with `global_batch = local_batch * process_count`, each process contributing its own
    rows (`jax.make_array_from_process_local_data`), so no host ever holds the full batch.
    """
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(
            batch_sharding(mesh, value.ndim), value, global_shape)
    return out


def describe_shardings(tree: Any, shardings: Any, max_lines: int = 20) -> str:
    """Human-readable list of the sharded (non-replicated) leaves, for the startup log."""
    lines = []
    total = sharded = 0
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    flat_sh = jax.tree_util.tree_leaves(shardings)
    for (path, leaf), sh in zip(flat, flat_sh):
        size = math.prod(getattr(leaf, "shape", ()))
        total += size
        if any(s is not None for s in sh.spec):
            sharded += size
            if len(lines) < max_lines:
                lines.append(f"  {jax.tree_util.keystr(path)} {tuple(leaf.shape)} -> {sh.spec}")
    head = f"{sharded}/{total} elements sharded over fsdp"
    return "\n".join([head] + lines)
