"""The multi-scale RVQ on n-D latents `[batch, *spatial, dim]` with per-axis strides."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codec_jax.nn.quantizer import QuantizerConfig, ResidualVQ, avg_pool, repeat_upsample

EMA = QuantizerConfig(kind="ema", dead_code_threshold=2.0, kmeans_iters=3, dropout_prob=0.5)
CONFIGS = {"factorized": QuantizerConfig(), "ema": EMA}


def _train_call(model, variables, z, key):
    out, new = model.apply(variables, z, train=True, rngs={"quantizer": key}, mutable=["codebook"])
    return out, new.get("codebook", {})


def test_avg_pool_is_a_block_mean_and_upsample_its_right_inverse():
    x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
    pooled = np.asarray(avg_pool(jnp.asarray(x), (4, 3)))
    want = x.reshape(2, 2, 4, 4, 3, 3).mean(axis=(2, 4))
    # atol: a mean of 12 unit-scale float32 values near zero differs by ~2e-8 with the
    # summation order, which varies with the CPU's vector width.
    tol = dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pooled, want, **tol)
    np.testing.assert_allclose(np.asarray(avg_pool(repeat_upsample(jnp.asarray(pooled), (4, 3)), (4, 3))),
                               pooled, **tol)
    # An int stride applies to every axis.
    np.testing.assert_allclose(np.asarray(avg_pool(jnp.asarray(x), 2)),
                               x.reshape(2, 4, 2, 6, 2, 3).mean(axis=(2, 4)), **tol)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.slow
def test_one_spatial_axis_of_size_one_equals_the_1d_quantizer(kind):
    """[b, 1, t, d] with strides ((1, s), ...) is the 1-D quantizer, training step included
    (EMA update, k-means init, dropout): the same codes, outputs, losses and state."""
    cfg = CONFIGS[kind]
    z = jax.random.normal(jax.random.key(0), (4, 16, 8))
    one_d = ResidualVQ(8, 32, 4, (4, 2, 1), config=cfg)
    two_d = ResidualVQ(8, 32, 4, ((1, 4), (1, 2), (1, 1)), config=cfg)
    v1 = one_d.init(jax.random.key(1), z)
    v2 = two_d.init(jax.random.key(1), z[:, None])
    jax.tree.map(np.testing.assert_array_equal, v1, v2)
    for key in (jax.random.key(5), jax.random.key(6)):
        o1, s1 = _train_call(one_d, v1, z, key)
        o2, s2 = _train_call(two_d, v2, z[:, None], key)
        for a, b in zip(o1["codes"], o2["codes"]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[:, 0])
        np.testing.assert_allclose(np.asarray(o1["z_q"]), np.asarray(o2["z_q"])[:, 0], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(o1["levels_used"]), np.asarray(o2["levels_used"]))
        for name in ("commitment_loss", "codebook_loss"):
            np.testing.assert_allclose(np.asarray(o1[name]), np.asarray(o2[name]), rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), s1, s2)
        if s1:
            v1, v2 = dict(v1, codebook=s1), dict(v2, codebook=s2)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_2d_codes_have_block_shapes_and_decode_reproduces_z_q(kind):
    model = ResidualVQ(6, 16, 3, ((4, 4), (2, 2), (1, 1)), config=CONFIGS[kind])
    z = jax.random.normal(jax.random.key(0), (2, 8, 12, 6))
    variables = model.init(jax.random.key(1), z)
    out = model.apply(variables, z)
    assert [c.shape for c in out["codes"]] == [(2, 2, 3), (2, 4, 6), (2, 8, 12)]
    assert out["z_q"].shape == z.shape
    np.testing.assert_allclose(np.asarray(model.apply(variables, out["codes"], method="decode")),
                               np.asarray(out["z_q"]), rtol=1e-5, atol=1e-5)
    # A prefix of levels decodes to what the quantizer gives with n_levels=2.
    two = model.apply(variables, z, n_levels=2)
    np.testing.assert_allclose(np.asarray(model.apply(variables, out["codes"][:2], method="decode")),
                               np.asarray(two["z_q"]), rtol=1e-5, atol=1e-5)


def test_a_coarse_code_sees_only_its_own_block():
    """2x2 pooling, not raster-order pooling: changing one position changes the coarse
    code of its own 4x4 block at most, never a neighbour's."""
    model = ResidualVQ(4, 64, 4, ((4, 4),), config=QuantizerConfig())
    z = jax.random.normal(jax.random.key(0), (1, 16, 16, 4))
    variables = model.init(jax.random.key(1), z)
    base = np.asarray(model.apply(variables, z)["codes"][0])[0]
    changed = 0
    for i, (r, c) in enumerate([(5, 9), (0, 0), (15, 3), (10, 12)]):
        z2 = z.at[0, r, c].add(30.0 * jax.random.normal(jax.random.key(10 + i), (4,)))
        codes = np.asarray(model.apply(variables, z2)["codes"][0])[0]
        diff = np.argwhere(codes != base)
        assert all(tuple(d) == (r // 4, c // 4) for d in diff), (r, c, diff)
        changed += len(diff)
    assert changed > 0  # the perturbations are large enough to move codes at all


@pytest.mark.slow
def test_video_latents_and_mismatched_shapes():
    model = ResidualVQ(4, 8, 2, ((2, 4, 4), (1, 2, 2), 1), config=EMA)
    z = jax.random.normal(jax.random.key(0), (2, 4, 8, 8, 4))
    variables = model.init(jax.random.key(1), z)
    out, _ = _train_call(model, variables, z, jax.random.key(2))
    assert [c.shape for c in out["codes"]] == [(2, 2, 2, 2), (2, 4, 4, 4), (2, 4, 8, 8)]
    with pytest.raises(ValueError, match="spatial axis 1 .* multiple of 4"):
        model.apply(variables, jnp.zeros((2, 4, 6, 8, 4)))
    with pytest.raises(ValueError, match="has 2 axes, latents have 3"):
        ResidualVQ(4, 8, 2, ((2, 2),), config=EMA).init(jax.random.key(0), z)


@pytest.mark.slow
def test_sharded_2d_ema_update_equals_single_device_update():
    """The batch of images split over 4 fake CPU devices gives the single-device EMA state."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip())
    proc = subprocess.run([sys.executable, "-c", _SHARDED_CHECK], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "SHARDED 2D OK" in proc.stdout, proc.stdout + proc.stderr


_SHARDED_CHECK = r"""
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from codec_jax.nn.quantizer import QuantizerConfig, ResidualVQ
assert jax.device_count() == 4
cfg = QuantizerConfig(kind="ema", dead_code_threshold=2.0, kmeans_iters=3, dropout_prob=1.0)
model = ResidualVQ(4, 16, 4, ((2, 2), (1, 1)), config=cfg)
z = jax.random.normal(jax.random.key(0), (8, 8, 8, 4))
v = model.init(jax.random.key(1), z)
def step(params, cb, z, key):
    out, new = model.apply({"params": params, "codebook": cb}, z, train=True,
                           rngs={"quantizer": key}, mutable=["codebook"])
    return out["codes"], new["codebook"]
cpu0 = jax.devices()[0]
ref = jax.jit(step)(*jax.device_put((v["params"], v["codebook"], z, jax.random.key(2)), cpu0))
mesh = Mesh(np.asarray(jax.devices()), ("data",))
rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
got = jax.jit(step, in_shardings=(rep, rep, data, rep))(v["params"], v["codebook"], z, jax.random.key(2))
for a, b in zip(ref[0], got[0]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5), ref[1], got[1])
print("SHARDED 2D OK")
"""
