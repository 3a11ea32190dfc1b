"""The fused residual unit kernel computes the XLA path's unit (issue 16).

`codec_jax.nn.fused_residual` is one Pallas (Triton) kernel per residual unit; on the CPU
it runs in Pallas's interpreter, which executes the same kernel body (masked loads, the 7
taps, both Snakes, the matmul) that Triton compiles on the GPU. The GPU check of the
compiled kernel is `bench/check_fused_residual.py` (BENCHMARKS §1b).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codec_jax.nn import fused_residual as fr
from codec_jax.nn import layers


def _weights(channels: int, seed: int = 0):
    ks = jax.random.split(jax.random.key(seed), 6)
    return (0.5 + jax.random.uniform(ks[0], (channels,)),            # alpha_1
            0.3 * jax.random.normal(ks[1], (fr.TAPS, channels)),      # depthwise taps
            0.1 * jax.random.normal(ks[2], (channels,)),              # depthwise bias
            0.5 + jax.random.uniform(ks[3], (channels,)),             # alpha_2
            jax.random.normal(ks[4], (channels, channels)) / np.sqrt(channels),
            0.1 * jax.random.normal(ks[5], (channels,)))


def _bf16_ulps(a, b):
    """Largest difference of two bfloat16 arrays in units of bfloat16's spacing at b."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    spacing = np.maximum(np.abs(b), 1e-3) * 2.0 ** -7
    return float(np.max(np.abs(a - b) / spacing))


@pytest.mark.parametrize("channels,dilation,steps", [(24, 3, 100), (40, 9, 77)])
def test_kernel_is_the_xla_unit(channels, dilation, steps):
    """Padded channels (24 -> 32, 40 -> 64), a dilation whose halo crosses tile borders, a
    length that is not a multiple of the tile, and a row shorter than the batch."""
    x = jax.random.normal(jax.random.key(channels), (2, steps, channels)).astype(jnp.bfloat16)
    w = _weights(channels)
    for valid in (None, jnp.array([steps, steps // 3], jnp.int32)):
        want = fr.residual_unit_reference(x, *w, dilation, valid)
        got = fr.fused_residual_unit(x, *w, dilation, valid, block_time=32, interpret=True)
        assert got.shape == want.shape and got.dtype == jnp.bfloat16
        assert float(jnp.abs(want.astype(jnp.float32)).max()) > 1.0  # a real signal
        # The kernel keeps the XLA path's roundings: equal up to accumulation order (XLA on a
        # GPU may also drop intermediate roundings: 1-2 ulps there, bench/check_fused_residual.py).
        assert _bf16_ulps(got, want) <= 2.0
        assert np.mean(np.asarray(got) == np.asarray(want)) > 0.99


def test_short_rows_see_zeros_beyond_their_end():
    """A row's output up to its valid length does not depend on what lies beyond it."""
    channels, steps, valid = 24, 90, 50
    w = _weights(channels, 1)
    x = jax.random.normal(jax.random.key(3), (1, steps, channels)).astype(jnp.bfloat16)
    garbage = x.at[:, valid:].set(jnp.bfloat16(50.0))
    a = fr.fused_residual_unit(x, *w, 3, jnp.array([valid]), block_time=32, interpret=True)
    b = fr.fused_residual_unit(garbage, *w, 3, jnp.array([valid]), block_time=32, interpret=True)
    alone = fr.fused_residual_unit(x[:, :valid], *w, 3, None, block_time=32, interpret=True)
    np.testing.assert_array_equal(np.asarray(a[:, :valid]), np.asarray(b[:, :valid]))
    np.testing.assert_array_equal(np.asarray(a[:, :valid]), np.asarray(alone))


@pytest.mark.slow
def test_gradients_are_the_xla_units():
    channels, dilation = 16, 1
    x = jax.random.normal(jax.random.key(4), (2, 40, channels)).astype(jnp.bfloat16)
    w = _weights(channels, 2)
    valid = jnp.array([40, 25], jnp.int32)
    probe = jax.random.normal(jax.random.key(5), x.shape)

    def loss(fn, *args):
        return jnp.sum(fn(*args).astype(jnp.float32) * probe)

    fused = lambda x, *w: fr.fused_residual_unit(x, *w, dilation, valid, block_time=16,
                                                 interpret=True)
    xla = lambda x, *w: fr.residual_unit_reference(x, *w, dilation, valid)
    got = jax.grad(lambda *a: loss(fused, *a), argnums=tuple(range(7)))(x, *w)
    want = jax.grad(lambda *a: loss(xla, *a), argnums=tuple(range(7)))(x, *w)
    for g, h in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(h, np.float32),
                                   rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(got[0].astype(jnp.float32)).max()) > 0.1


@pytest.mark.slow
def test_residual_unit_module_runs_the_kernel_from_its_parameters():
    """`layers.ResidualUnit` under residual_unit="pallas_interpret" takes its weight-normed
    kernels and alphas from its own parameters and gives the XLA path's output."""
    saved = dict(layers.IMPL)
    try:
        unit = layers.ResidualUnit(dilation=9, groups=40, dtype=jnp.bfloat16)
        x = jax.random.normal(jax.random.key(1), (2, 120, 40))
        params = unit.init(jax.random.key(0), x)
        # Move every parameter off its initial value (zero biases, unit alphas, magnitudes
        # equal to the norms) so that a parameter read from the wrong place would show.
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(7), len(leaves))
        params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape)
                                           for p, k in zip(leaves, keys)])
        valid = jnp.array([120, 61])
        layers.set_lowering(residual_unit="xla")
        want = unit.apply(params, x, valid)
        layers.set_lowering(residual_unit="pallas_interpret")
        got = unit.apply(params, x, valid)
    finally:
        layers.set_lowering(**saved)
    assert _bf16_ulps(got, want) <= 2.0
    assert np.mean(np.asarray(got) == np.asarray(want)) > 0.99


def test_supported_shapes():
    assert fr.supported((2, 100, 96), jnp.bfloat16, 7, 96, any_backend=True)
    assert fr.supported((2, 100, 256), jnp.bfloat16, 7, 256, any_backend=True)
    assert not fr.supported((2, 100, 96), jnp.float32, 7, 96, any_backend=True)  # float32: XLA
    assert not fr.supported((2, 100, 384), jnp.bfloat16, 7, 384, any_backend=True)  # too wide
    assert not fr.supported((2, 100, 96), jnp.bfloat16, 7, 1, any_backend=True)  # not depthwise
    assert not fr.supported((2, 100, 96), jnp.bfloat16, 5, 96, any_backend=True)
    assert not fr.supported((2**16, 2**12, 128), jnp.bfloat16, 7, 128, any_backend=True)  # int32
    if jax.default_backend() != "gpu":
        assert not fr.supported((2, 100, 96), jnp.bfloat16, 7, 96)  # Triton needs a GPU


# ------------------------------------------------------------- the stack form (3 units)
@pytest.mark.parametrize("channels,steps", [(24, 100), (40, 77)])
def test_stack_is_the_xla_units(channels, steps):
    """Three units (dilations 1, 3, 9; each kernel takes its first Snake precomputed and
    writes the next unit's) give the XLA path's three units: padded channels, halos across
    tile borders, a length off the tile grid, a row shorter than the batch."""
    x = jax.random.normal(jax.random.key(channels), (2, steps, channels)).astype(jnp.bfloat16)
    units = tuple(_weights(channels, seed) for seed in range(3))
    for valid in (None, jnp.array([steps, steps // 3], jnp.int32)):
        want = fr.residual_stack_reference(x, units, (1, 3, 9), valid)
        got = fr.fused_residual_stack(x, units, (1, 3, 9), valid, block_time=32, interpret=True)
        assert got.shape == want.shape and got.dtype == jnp.bfloat16
        assert float(jnp.abs(want.astype(jnp.float32)).max()) > 1.0
        assert _bf16_ulps(got, want) <= 2.0
        assert np.mean(np.asarray(got) == np.asarray(want)) > 0.99
        # A control: the units in another order are another function.
        other = fr.residual_stack_reference(x, units[::-1], (1, 3, 9), valid)
        assert np.mean(np.asarray(got) == np.asarray(other)) < 0.5


def test_stack_short_rows_see_zeros_beyond_their_end():
    channels, steps, valid = 24, 90, 50
    units = tuple(_weights(channels, seed) for seed in (4, 5))
    x = jax.random.normal(jax.random.key(3), (1, steps, channels)).astype(jnp.bfloat16)
    garbage = x.at[:, valid:].set(jnp.bfloat16(50.0))
    run = lambda x, v: fr.fused_residual_stack(x, units, (3, 9), v, block_time=32,
                                               interpret=True)
    a, b = run(x, jnp.array([valid])), run(garbage, jnp.array([valid]))
    alone = run(x[:, :valid], None)
    np.testing.assert_array_equal(np.asarray(a[:, :valid]), np.asarray(b[:, :valid]))
    np.testing.assert_array_equal(np.asarray(a[:, :valid]), np.asarray(alone))


@pytest.mark.slow
def test_stack_gradients_are_the_xla_units():
    channels = 16
    x = jax.random.normal(jax.random.key(4), (2, 40, channels)).astype(jnp.bfloat16)
    units = tuple(_weights(channels, seed) for seed in (6, 7))
    valid = jnp.array([40, 25], jnp.int32)
    probe = jax.random.normal(jax.random.key(5), x.shape)

    def loss(fn, x, units):
        return jnp.sum(fn(x, units).astype(jnp.float32) * probe)

    fused = lambda x, u: fr.fused_residual_stack(x, u, (1, 9), valid, block_time=16,
                                                 interpret=True)
    xla = lambda x, u: fr.residual_stack_reference(x, u, (1, 9), valid)
    got = jax.grad(lambda *a: loss(fused, *a), argnums=(0, 1))(x, units)
    want = jax.grad(lambda *a: loss(xla, *a), argnums=(0, 1))(x, units)
    for g, h in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(h, np.float32),
                                   rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(got[0].astype(jnp.float32)).max()) > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("block", ["decoder", "encoder"])
def test_blocks_run_the_stack_from_their_parameters(block, monkeypatch):
    """A decoder block (transposed conv, then the stack) and an encoder block (the stack,
    then Snake and the strided conv) under residual_unit="pallas_stack_interpret" take each
    unit's weights from its own parameters and give the XLA path's output."""
    calls = []
    stack = fr.fused_residual_stack
    monkeypatch.setattr(fr, "fused_residual_stack",
                        lambda *a, **k: calls.append(a[0].shape) or stack(*a, **k))
    saved = dict(layers.IMPL)
    try:
        if block == "decoder":
            module = layers.DecoderBlock(features=32, stride=2, groups=32, dtype=jnp.bfloat16)
            x = jax.random.normal(jax.random.key(1), (2, 40, 48))
            valid = jnp.array([40, 23])
        else:
            module = layers.EncoderBlock(features=48, stride=2, groups=32, dtype=jnp.bfloat16)
            x = jax.random.normal(jax.random.key(1), (2, 80, 32))
            valid = jnp.array([80, 47])
        layers.set_lowering(residual_unit="xla")
        params = module.init(jax.random.key(0), x)
        # Every parameter off its initial value, so that one read from the wrong unit shows.
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(7), len(leaves))
        params = jax.tree.unflatten(tree, [p + 0.1 * jax.random.normal(k, p.shape)
                                           for p, k in zip(leaves, keys)])
        want = module.apply(params, x, valid)
        layers.set_lowering(residual_unit="pallas_stack_interpret")
        got = module.apply(params, x, valid)
        # The parameters the stack reads are the ones init made: same tree either way.
        assert jax.tree.structure(module.init(jax.random.key(0), x)) == tree
    finally:
        layers.set_lowering(**saved)
    assert len(calls) == 1  # the kernels ran (once: the stack of the block's 3 units)
    assert got.shape == want.shape
    assert _bf16_ulps(got, want) <= 2.0
    assert np.mean(np.asarray(got) == np.asarray(want)) > 0.99


def test_kernels_lower_to_triton_for_the_gpu():
    """Both kernels lower to Triton for a CUDA target from any host (JAX's cross-platform
    lowering): every op in their bodies has a Triton lowering, which the interpreter runs
    above do not check. Compiling the Triton code needs a GPU (bench/check_fused_residual.py)."""
    channels = 96
    x = jnp.zeros((2, 1000, channels), jnp.bfloat16)
    units = tuple(_weights(channels, seed) for seed in range(3))
    stack = jax.jit(lambda x, u: fr.fused_residual_stack(x, u, (1, 3, 9), None, block_time=64))
    unit = jax.jit(lambda x, w: fr.fused_residual_unit(x, *w, 9, None, block_time=32))
    for fn, args, kernels in ((stack, (x, units), 3), (unit, (x, units[0]), 1)):
        text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == kernels
