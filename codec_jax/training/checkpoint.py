"""Resumable training checkpoints: orbax `CheckpointManager` over the train state and
the data iterator position, with a checksum of every array.

Each checkpoint `workdir/checkpoints/<step>/` holds three items:

* `state`: the whole `TrainState` (both models, both optimizer states, codebook
  statistics, balancer, rng, step, skip counters), written by every process for its
  own shards (`StandardSave`) and read back against an *abstract* target that carries
  the shardings of the current mesh, so a run can resume on a different mesh;
* `data`: the grain iterator state of every process (`process_<i>-of-<n>.json`);
* `integrity`: `{"format": 1, "arrays": {"<leaf path>": "<16 hex digits>"}}`, a 64-bit
  checksum of every state array (`state_checksums`), computed on device from the very
  arrays being saved.

Why per-array checksums computed from the values rather than file hashes: orbax writes
uncompressed OCDBT chunks, so a flipped byte in a data file reads back as a silently
wrong number (a leaf off by 1e38, a NaN in Adam's `nu`). A checksum of the *values*
catches that whatever the file layout, names the array, is one cheap fused pass over
device memory (no re-reading of GBs from a bucket after each save), gives the same
result on any mesh, and is written inside orbax's own atomic commit: a checkpoint never
exists without its checksums, asynchronous save or not.

Saving is asynchronous (the step loop continues while the arrays are written); a
checkpoint only appears in `all_steps()` once finalised, so a run killed mid-save
resumes from the previous one. A state with a non-finite array is never saved.

At restore every array is compared with its checksum and checked finite. A checkpoint
that fails (unreadable or truncated file, deleted file, garbled metadata, checksum
mismatch, NaN) is *damaged*: `restore_latest` reports it in one line and falls back to
the previous one; when the run reaches the damaged step again, `save` replaces it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from codec_jax.errors import WorkError

from codec_jax.paths import as_path

log = logging.getLogger(__name__)

INTEGRITY_ITEM = "integrity"
INTEGRITY_FORMAT = 1


class DamagedCheckpointError(RuntimeError):
    """A checkpoint read back with wrong, missing or non-finite arrays."""


class NoRestorableCheckpointError(WorkError):
    """There are checkpoints, but none restores into the configured train state."""


# ---------------------------------------------------------------------------------------
# Array checksums
# ---------------------------------------------------------------------------------------


def _mix32(h):
    """murmur3's 32-bit finaliser: a bijection of uint32 that spreads every input bit.

    For jax and numpy uint32 arrays alike (the constants take `h`'s own scalar type, and
    uint32 arithmetic wraps mod 2**32 in both), so the host checksums below are the
    device ones bit for bit.
    """
    u32 = h.dtype.type
    h = h ^ (h >> u32(16))
    h = h * u32(0x85EBCA6B)
    h = h ^ (h >> u32(13))
    h = h * u32(0xC2B2AE35)
    return h ^ (h >> u32(16))


def _as_uint32_bits(x: jax.Array) -> jax.Array:
    """The raw bits of every element as uint32, same shape as `x`."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if size == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    if size == 8:  # only with jax_enable_x64: [..., 2] halves
        halves = jax.lax.bitcast_convert_type(x, jnp.uint32)
        return halves[..., 0] ^ _mix32(halves[..., 1] + jnp.uint32(0x27D4EB2F))
    raise TypeError(f"no checksum for dtype {x.dtype}")


def _linear_index(shape: tuple[int, ...]) -> jax.Array:
    """uint32 `shape` array of row-major element positions (mod 2**32). Built from
    iotas rather than a reshape so that a sharded leaf stays sharded."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


_LANE_SEEDS = (0x9E3779B9, 0x7F4A7C15)


def _leaf_checksum(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(uint32 `[2]` checksum, bool `[]` all-finite) of one array.

    Each element's bits are xor-ed with a hash of its position, mixed, and summed mod
    2**32, in two independently seeded lanes. The mix is a bijection, so changing any
    single element always changes the sum; integer sums are exact, so the result does
    not depend on how the array is sharded.
    """
    x = jnp.asarray(x)
    bits = _as_uint32_bits(x)
    index = _linear_index(x.shape)
    lanes = [jnp.sum(_mix32(bits ^ _mix32(index * jnp.uint32(2) + jnp.uint32(seed))),
                     dtype=jnp.uint32) for seed in _LANE_SEEDS]
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.stack(lanes), finite


# One small program per distinct (shape, dtype, sharding), called leaf by leaf. A single
# jitted pass over the whole state (~3000 leaves for SNAC 24 kHz with its Adam moments)
# was one huge XLA module: compiling it took about 3.5 minutes on an H200 at the first
# checkpoint of a run (seen as a silent stall after the last step, 2026-12-02). Per leaf,
# the state's few hundred distinct shapes each compile in milliseconds.
_leaf_checksum_jit = jax.jit(_leaf_checksum)


# On the CPU backend the arrays already live in host memory, and the per-leaf programs
# were the cost: a compile for each of the state's distinct leaf shapes at the first save
# and again at the first restore of every process (44 shapes for the tiny config: 13.8 s
# on the 2-core VM, 2026-12-03). There the same checksums are computed with numpy, one
# vectorised pass over groups of leaves. Concatenating the leaves inside one XLA program
# instead is no way out: XLA's compile of a 1000-operand concatenate alone took 24 s.
_HOST_GROUP_ELEMENTS = 1 << 22  # bounds numpy's temporaries (16 MiB per uint32 buffer)
_NP_BITS = {4: np.uint32, 2: np.uint16, 1: np.uint8}


def _host_group_checksums(arrays: list[np.ndarray]) -> tuple[list[np.ndarray], list[bool]]:
    """`_leaf_checksum` of each host array, bit for bit, in one numpy pass over the group."""
    sizes = np.array([a.size for a in arrays], np.int64)
    bits = np.concatenate([
        (a.astype(np.uint32) if a.dtype == np.bool_
         else a.view(_NP_BITS[a.dtype.itemsize]).astype(np.uint32)).reshape(-1) for a in arrays])
    ends = np.cumsum(sizes)
    starts = ends - sizes
    # Each element's position inside its own leaf (mod 2**32, as the device path's iotas).
    index = (np.arange(bits.size, dtype=np.int64) - np.repeat(starts, sizes)).astype(np.uint32)
    lanes = []
    for seed in _LANE_SEEDS:
        mixed = _mix32(bits ^ _mix32(index * np.uint32(2) + np.uint32(seed)))
        # A leaf's sum mod 2**32 is the difference of two prefix sums (0 for an empty leaf).
        prefix = np.concatenate([np.zeros(1, np.uint32), np.cumsum(mixed, dtype=np.uint32)])
        lanes.append(prefix[ends] - prefix[starts])
    sums = np.stack(lanes, axis=-1)
    finite = [bool(np.isfinite(a).all()) if jnp.issubdtype(a.dtype, jnp.inexact) else True
              for a in arrays]
    return list(sums), finite


def _on_host(x: Any) -> bool:
    """A fully addressable array of the CPU backend whose bits numpy can read."""
    devices = getattr(x, "devices", None)
    return (devices is not None and getattr(x, "is_fully_addressable", False)
            and all(d.platform == "cpu" for d in x.devices())
            and x.dtype.itemsize in _NP_BITS)


def _tree_checksums(tree: Any) -> tuple[list[Any], list[Any]]:
    leaves = jax.tree_util.tree_leaves(tree)
    sums: list[Any] = [None] * len(leaves)
    finite: list[Any] = [None] * len(leaves)
    group: list[int] = []
    group_elements = 0

    def flush():
        nonlocal group, group_elements
        if group:
            s, f = _host_group_checksums([np.asarray(leaves[i]) for i in group])
            for i, si, fi in zip(group, s, f):
                sums[i], finite[i] = si, fi
        group, group_elements = [], 0

    for i, x in enumerate(leaves):
        if not _on_host(x):
            sums[i], finite[i] = _leaf_checksum_jit(x)
            continue
        if group and group_elements + x.size > _HOST_GROUP_ELEMENTS:
            flush()
        group.append(i)
        group_elements += x.size
    flush()
    return sums, finite


def _host_value(x: jax.Array) -> np.ndarray:
    """A replicated (or single-device) array's value, also in multi-process runs."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(x.addressable_shards[0].data)


def state_checksums(state: Any) -> tuple[dict[str, str], list[str]]:
    """`({leaf path: 16 hex digits}, [paths of leaves holding NaN/inf])` of a pytree
    of (possibly sharded) arrays; one small jitted program per distinct leaf shape."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    sums, finite = _tree_checksums(state)
    sums = [_host_value(s) for s in sums]
    finite = [bool(_host_value(f)) for f in finite]
    checksums = {p: f"{int(s[0]):08x}{int(s[1]):08x}" for p, s in zip(paths, sums)}
    return checksums, [p for p, ok in zip(paths, finite) if not ok]


def verify_state(state: Any, recorded: Optional[dict[str, str]]) -> Optional[str]:
    """Why `state` (just restored) is damaged, or None when it is sound: every array
    finite and, when `recorded` checksums are given, equal to them."""
    checksums, nonfinite = state_checksums(state)
    if recorded is not None:
        bad = [p for p, c in checksums.items() if recorded.get(p) != c]
        extra = sorted(set(recorded) - set(checksums))
        if bad or extra:
            names = bad + extra
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            return f"array {names[0]}{more} differs from the checksum recorded at save"
    if nonfinite:
        more = f" and {len(nonfinite) - 1} more" if len(nonfinite) > 1 else ""
        return f"array {nonfinite[0]}{more} holds NaN or inf"
    return None


# ---------------------------------------------------------------------------------------
# The checkpointer
# ---------------------------------------------------------------------------------------


def _summary(error: BaseException, limit: int = 240) -> str:
    """`Type: first line of the message`, at most `limit` characters: tensorstore
    errors carry multi-kilobyte specs that would bury the one fact that matters."""
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > limit:
        first = first[:limit] + "..."
    return f"{type(error).__name__}: {first}"


@contextlib.contextmanager
def _quiet_orbax():
    """Silence orbax's (absl) logging: a failed restore otherwise logs pages of
    tensorstore detail; the checkpointer reports the outcome itself in one line."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _agree_all_failed(failed: bool) -> bool:
    """True on every process if it is True on any: processes read different shards,
    so one may see damage the others cannot; they must fall back together."""
    if jax.process_count() == 1:
        return failed
    flags = multihost_utils.process_allgather(np.asarray([int(failed)], np.int32))
    return bool(np.any(flags))


class TrainCheckpointer:
    """Save/restore `(state, data iterator)` pairs under `directory`.

    `damaged`: steps that `restore_latest` found damaged; `save` replaces them.
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = as_path(directory)  # local, or a bucket: gs://bucket/run/checkpoints
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(keep) if keep and keep > 0 else None,
            enable_async_checkpointing=bool(async_save),
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.damaged: set[int] = set()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def good_steps(self) -> list[int]:
        """Steps not known to be damaged, oldest first."""
        return [s for s in self.all_steps() if s not in self.damaged]

    def save(self, step: int, state: Any, data_iterator: Any, *, force: bool = False) -> bool:
        """Start writing checkpoint `step`; returns whether a save was started.

        Refused (False, with a warning) when `state` holds a non-finite array: a
        checkpoint must always be a safe place to resume from. A step that exists and
        was found damaged is deleted and written again; one that exists and is sound is
        kept (False). The checksums and the iterator state are captured now,
        synchronously, so they match `state` although the arrays are written in the
        background. `force` is accepted for callers' clarity: the loop, not orbax's
        save policy, decides when to save (a newer damaged step must not block saves).
        """
        del force
        checksums, nonfinite = state_checksums(state)
        if nonfinite:
            log.warning("not saving checkpoint %d: %d array(s) hold NaN or inf (first: %s)",
                        step, len(nonfinite), nonfinite[0])
            return False
        if step in self.manager.all_steps():
            if step not in self.damaged:
                return False
            log.warning("replacing damaged checkpoint %s", self._step_path(step))
            self.manager.delete(step)
            self.damaged.discard(step)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            **{INTEGRITY_ITEM: ocp.args.JsonSave({"format": INTEGRITY_FORMAT,
                                                  "arrays": checksums})},
        )
        return self.manager.save(step, args=args, force=True)

    def _step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _has_integrity(self, step: int) -> bool:
        # epath: also right for gs:// directories, where os.path would say "no".
        return (epath.Path(self._step_path(step)) / INTEGRITY_ITEM).exists()

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """Restore checkpoint `step` into `abstract_state`'s shapes, dtypes and shardings
        (leaves: `jax.ShapeDtypeStruct(..., sharding=...)`), move `data_iterator` to
        the saved position, verify every array; returns the state.

        Raises `DamagedCheckpointError` when an array differs from its checksum or is
        not finite (checkpoints written before checksums existed are checked for
        finiteness only); orbax's own errors (unreadable files) pass through.
        """
        import jax

        items = dict(state=ocp.args.StandardRestore(abstract_state))
        data_file = (self.directory / str(step) / "data"
                     / f"process_{jax.process_index()}-of-{jax.process_count()}.json")
        if data_file.exists():
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        else:
            # Written by a group of another size: every process's data shard changed, so
            # there is no position to resume; the model state still restores exactly.
            log.warning("checkpoint %d in %s holds no data position for %d process(es); "
                        "the model state is restored, the data iterators start afresh",
                        step, self.directory, jax.process_count())
        has_integrity = self._has_integrity(step)
        if has_integrity:
            items[INTEGRITY_ITEM] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        recorded = None
        if has_integrity:
            record = restored[INTEGRITY_ITEM]
            if not isinstance(record, dict) or not isinstance(record.get("arrays"), dict):
                raise DamagedCheckpointError("its integrity record is malformed")
            recorded = record["arrays"]
        why = verify_state(restored.state, recorded)
        if why is not None:
            raise DamagedCheckpointError(why)
        return restored.state

    def restore_latest(self, abstract_state: Any, data_iterator: Any
                       ) -> tuple[Optional[Any], Optional[int]]:
        """Restore the newest sound checkpoint, newest first.

        A checkpoint that fails to restore or verify is reported in one line (path,
        step, why) and the previous one is tried; the failed steps are remembered in
        `damaged` so that `save` replaces them when the run gets there. Returns
        `(None, None)` when there are no checkpoints. If there are some but none
        restores (typically: the config now describes another model), raises instead of
        letting the run start from scratch and rotate the old checkpoints away.
        """
        errors = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            error: Optional[BaseException] = None
            state = None
            try:
                with _quiet_orbax():
                    state = self.restore(step, abstract_state, data_iterator)
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types
                error = e
            if _agree_all_failed(error is not None):
                why = _summary(error) if error is not None else "damaged on another process"
                errors.append(f"  step {step}: {why}")
                self.damaged.add(step)
                log.warning("checkpoint %s (step %d) is damaged or unreadable: %s; "
                            "trying an older one", self._step_path(step), step, why)
                continue
            return state, step
        if errors:
            raise NoRestorableCheckpointError(
                f"none of the checkpoints in {self.directory} could be restored into the "
                "configured train state (was the model, optimizer or data config changed, "
                "or are they all damaged?):\n" + "\n".join(errors))
        return None, None

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
