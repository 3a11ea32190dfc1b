"""The train-state checksums (`codec_jax.training.checkpoint.state_checksums`).

On the CPU backend they are computed with numpy in groups of leaves; elsewhere (and for
arrays numpy cannot read whole) by one jitted program per leaf shape. A checkpoint saved
on one backend is verified on another, so both paths must give the same bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from codec_jax.training import checkpoint as ck


def _leaves(seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    floats = rng.standard_normal(3000).astype(np.float32)
    floats[[7, 900]] = [np.nan, np.inf]
    return {
        "f32": jnp.asarray(rng.standard_normal((17, 5, 3)), jnp.float32),
        "f32_nonfinite": jnp.asarray(floats),
        "bf16": jnp.asarray(rng.standard_normal((33, 4)), jnp.bfloat16),
        "f16_inf": jnp.asarray(np.array([1.0, -np.inf, 3.0], np.float16)),
        "fp8": jnp.asarray(np.array([0.5, 1.0, np.nan], ml_dtypes.float8_e5m2)),
        "i32": jnp.asarray(rng.integers(-2**31, 2**31 - 1, size=(9, 9)), jnp.int32),
        "u32": jnp.asarray(rng.integers(0, 2**32 - 1, size=(11,), dtype=np.uint64).astype(np.uint32)),
        "i8": jnp.asarray(rng.integers(-128, 127, size=(40,)), jnp.int8),
        "bool": jnp.asarray(rng.random((6, 7)) > 0.5),
        "scalar": jnp.float32(2.5),
        "step": jnp.int32(123),
        "empty": jnp.zeros((0, 4), jnp.float32),
        "big": jnp.asarray(rng.standard_normal(70_000), jnp.float32),
        # Sorted last: an empty leaf closing a group must not cut the leaf before it short.
        "z_last": jnp.asarray(rng.standard_normal(5), jnp.float32),
        "zz_empty": jnp.zeros((0,), jnp.float32),
    }


def _device_path(tree) -> tuple[list[np.ndarray], list[bool]]:
    """The per-leaf jitted programs, forced for every leaf (what a GPU or TPU runs)."""
    pairs = [ck._leaf_checksum_jit(x) for x in jax.tree_util.tree_leaves(tree)]
    return [np.asarray(s) for s, _ in pairs], [bool(f) for _, f in pairs]


@pytest.mark.parametrize("group_elements", [1 << 22, 1000])
def test_host_checksums_equal_the_device_programs_bit_for_bit(monkeypatch, group_elements):
    # 1000 elements per group: leaves split over many groups, one leaf larger than a group.
    monkeypatch.setattr(ck, "_HOST_GROUP_ELEMENTS", group_elements)
    tree = _leaves()
    assert all(ck._on_host(x) for x in jax.tree_util.tree_leaves(tree))
    host_sums, host_finite = ck._tree_checksums(tree)
    dev_sums, dev_finite = _device_path(tree)
    for name, h, d in zip(sorted(tree), host_sums, dev_sums):
        np.testing.assert_array_equal(np.asarray(h), d, err_msg=name)
    assert host_finite == dev_finite
    names = sorted(tree)
    assert {n for n, f in zip(names, host_finite) if not f} == {"f32_nonfinite", "f16_inf", "fp8"}


def test_state_checksums_name_every_leaf_and_see_one_changed_element():
    tree = _leaves()
    sums, nonfinite = ck.state_checksums(tree)
    assert set(sums) == {jax.tree_util.keystr((jax.tree_util.DictKey(k),)) for k in tree}
    assert sorted(nonfinite) == ["['f16_inf']", "['f32_nonfinite']", "['fp8']"]
    assert sums["['empty']"] == "0000000000000000"
    for name in ("f32", "bf16", "i8", "big"):
        changed = dict(tree)
        flat = np.array(tree[name]).reshape(-1)
        flat[len(flat) // 2] = flat[len(flat) // 2] + 1 if name == "i8" else -flat[len(flat) // 2] + 1
        changed[name] = jnp.asarray(flat.reshape(tree[name].shape), tree[name].dtype)
        again, _ = ck.state_checksums(changed)
        assert [k for k in sums if sums[k] != again[k]] == [f"['{name}']"]
    # Two elements swapped: the sum of unpositioned hashes would not change; this does.
    swapped = dict(tree)
    values = np.array(tree["f32"]).reshape(-1)
    values[[0, 1]] = values[[1, 0]]
    swapped["f32"] = jnp.asarray(values.reshape(tree["f32"].shape))
    assert ck.state_checksums(swapped)[0]["['f32']"] != sums["['f32']"]


def test_verify_state_accepts_its_own_checksums_and_names_a_damaged_leaf():
    tree = {k: v for k, v in _leaves().items() if k not in ("f32_nonfinite", "f16_inf", "fp8")}
    recorded, nonfinite = ck.state_checksums(tree)
    assert not nonfinite
    assert ck.verify_state(tree, recorded) is None
    damaged = dict(tree, i32=tree["i32"].at[3, 4].add(1))
    assert ck.verify_state(damaged, recorded) == "array ['i32'] differs from the checksum recorded at save"
