"""The layers' alternative lowerings compute the same function (issue 16).

`codec_jax.nn.layers.IMPL` picks how transposed and 1x1 convs are lowered and whether
bfloat16 elementwise chains compute in float32. The polyphase transposed conv is checked
against PyTorch's `conv_transpose1d` (the reference's op) and against XLA's dilated form;
whole decodes under every choice against each other. `rows_per_call`'s arithmetic is here;
that it leaves codes and audio unchanged is in tests/test_invariance.py.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import codec_jax
from codec_jax import api
from codec_jax.errors import UsageError
from codec_jax.nn import layers

# (stride, kernel, padding, output_padding): SNAC's (kernel 2*stride, padding ceil(stride/2),
# output_padding stride % 2) for every stride the presets use, and shapes where the kernel is
# not a multiple of the stride or the output padding reaches past the uncropped output.
TRANSPOSE_CASES = [(2, 4, 1, 0), (3, 6, 2, 1), (4, 8, 2, 0), (8, 16, 4, 0), (5, 10, 3, 1),
                   (4, 7, 1, 0), (3, 3, 0, 2), (2, 5, 0, 1), (4, 4, 3, 1)]


@pytest.mark.parametrize("stride,kernel,padding,output_padding", TRANSPOSE_CASES)
def test_polyphase_conv_transpose_is_torchs_conv_transpose1d(stride, kernel, padding, output_padding):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(stride * 100 + kernel)
    x = rng.normal(size=(2, 11, 6)).astype(np.float32)  # [batch, time, in]
    w = rng.normal(size=(kernel, 6, 5)).astype(np.float32)  # [kernel, in, out]
    want = torch.nn.functional.conv_transpose1d(
        torch.from_numpy(x.transpose(0, 2, 1)), torch.from_numpy(w.transpose(1, 2, 0)),
        stride=stride, padding=padding, output_padding=output_padding).numpy().transpose(0, 2, 1)
    got = layers.polyphase_conv_transpose(jnp.asarray(x), jnp.asarray(w), stride, padding,
                                          output_padding, precision="highest")
    dilated = layers._dilated_conv_transpose(jnp.asarray(x), jnp.asarray(w), stride, padding,
                                             output_padding, 1, 1, "highest")
    assert got.shape == want.shape == dilated.shape
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6 * scale)
    np.testing.assert_allclose(np.asarray(dilated), want, atol=1e-6 * scale)


@pytest.mark.parametrize("stride,kernel,padding,output_padding",
                         [(2, 4, 1, 0), (3, 6, 2, 1), (4, 8, 2, 0), (8, 16, 4, 0)])
def test_polyphase_weight_gradient_by_matmuls_is_the_convolutions(stride, kernel, padding,
                                                                  output_padding):
    """The polyphase conv's gradients with its weight gradient as one matmul per tap
    (`polyphase_weight_grad="dot"`, the CPU default) equal XLA's weight-gradient
    convolution's ("conv"), in reverse and in forward mode, and the output is the same."""
    rng = np.random.default_rng(stride + kernel)
    x = jnp.asarray(rng.normal(size=(3, 13, 6)), jnp.float32)  # [batch, time, in]
    w = jnp.asarray(rng.normal(size=(kernel, 6, 5)), jnp.float32)  # [kernel, in, out]
    f = lambda x, w: layers.polyphase_conv_transpose(x, w, stride, padding, output_padding,
                                                     precision="highest")
    g = jnp.asarray(rng.normal(size=f(x, w).shape), jnp.float32)
    saved = dict(layers.IMPL)
    results = {}
    try:
        for choice in ("conv", "dot", "auto"):
            layers.set_lowering(polyphase_weight_grad=choice)
            y, pullback = jax.vjp(f, x, w)
            jaxpr = str(jax.make_jaxpr(f)(x, w))
            # Forward mode too (the decoder's receptive-field test differentiates so).
            _, tangent = jax.jvp(f, (x, w), (x[::-1], w[::-1]))
            results[choice] = (y, *pullback(g), tangent, "custom_jvp" in jaxpr)
    finally:
        layers.set_lowering(**saved)
    y, dx, dw, dy, custom = results["conv"]
    assert not custom and results["dot"][4]
    assert results["auto"][4] == (jax.default_backend() == "cpu")
    for choice in ("dot", "auto"):
        np.testing.assert_array_equal(np.asarray(results[choice][0]), np.asarray(y))
        for got, want in zip(results[choice][1:4], (dx, dw, dy)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                                       atol=1e-5 * float(jnp.abs(want).max()))
    assert float(jnp.abs(dw).max()) > 1.0  # a real gradient


def test_sin_squared_is_accurate_over_the_range_snake_sees():
    u = np.concatenate([np.linspace(-1000, 1000, 2_000_001), np.linspace(-4, 4, 100_001),
                        [0.0, np.pi / 2, np.pi, -np.pi, 1e-30, 12345.678]]).astype(np.float32)
    exact = np.sin(u.astype(np.float64)) ** 2
    got = np.asarray(layers.sin_squared(jnp.asarray(u)), np.float64)
    assert np.abs(got - exact).max() < 5e-7  # jnp.sin's own square: 9e-8
    assert np.all((got >= -1e-7) & (got <= 1 + 1e-6))
    bad = np.asarray(layers.sin_squared(jnp.asarray([np.nan, np.inf, -np.inf], jnp.float32)))
    assert np.all(np.isnan(bad))  # as jnp.sin: never a finite value from a non-finite input
    # bfloat16 in, bfloat16 out, computed in float32 (the reduction constants need it).
    half = layers.sin_squared(jnp.asarray(u[:1000], jnp.bfloat16))
    assert half.dtype == jnp.bfloat16
    exact_half = np.sin(np.asarray(jnp.asarray(u[:1000], jnp.bfloat16), np.float64)) ** 2
    assert np.abs(np.asarray(half, np.float64) - exact_half).max() < 8e-3  # one bf16 rounding
    # Its gradient is 2 sin cos = sin(2u), which training relies on.
    grad = np.asarray(jax.vmap(jax.grad(layers.sin_squared))(jnp.asarray(u[-100_001:-6])))
    np.testing.assert_allclose(grad, np.sin(2 * u[-100_001:-6].astype(np.float64)), atol=2e-6)


def test_unknown_lowering_is_refused():
    with pytest.raises(ValueError, match="conv_transpose"):
        layers.set_lowering(conv_transpose="polyphase_aligned")
    with pytest.raises(ValueError, match="keys"):
        layers.set_lowering(pointwize="dot")


@pytest.fixture
def restore_impl():
    saved = dict(layers.IMPL)
    yield
    layers.set_lowering(**saved)


def _decode_under(impl, variables, codes, config, dtype):
    layers.set_lowering(**impl)
    with jax.default_matmul_precision("highest"):
        return np.asarray(codec_jax.decode(variables, codes, config=config, dtype=dtype,
                                           rng=jax.random.key(5)))


@pytest.mark.slow  # 67 s on the 2-core VM: keeps the fast tier under 5 minutes
def test_every_lowering_decodes_the_same_audio(restore_impl):
    config = codec_jax.get_preset("tiny")
    variables = codec_jax.init_variables(config, 0)
    samples = config.padded_length(4000)
    codes = [jax.random.randint(jax.random.key(i), (2, f), 0, config.codebook_size, jnp.int32)
             for i, f in enumerate(config.frames_per_level(samples))]
    base = _decode_under(dict(conv_transpose="xla", pointwise="conv", elementwise_f32=True,
                              snake_sine="jnp"),
                         variables, codes, config, "float32")
    assert np.abs(base).max() > 0.05  # random codes through a random decoder: real signal
    # Every pair of choices of the three (a 4-run orthogonal array of the 8 combinations):
    # each choice is tried against each other one, at half the compilations.
    for ct, pw, sine in [("polyphase", "conv", "jnp"), ("xla", "dot", "jnp"),
                         ("xla", "conv", "polynomial"), ("polyphase", "dot", "polynomial")]:
        out = _decode_under(dict(conv_transpose=ct, pointwise=pw, snake_sine=sine), variables, codes,
                            config, "float32")
        np.testing.assert_allclose(out, base, atol=2e-5, err_msg=f"{ct}/{pw}/{sine}")
    # bfloat16: float32 elementwise math is at least as close to the float32 decode as the
    # op-by-op bfloat16 math it replaced.
    err = {}
    for f32 in (False, True):
        out = _decode_under(dict(conv_transpose="polyphase", pointwise="dot", elementwise_f32=f32,
                                 snake_sine="polynomial"),
                            variables, codes, config, "bfloat16")
        err[f32] = float(np.sqrt(np.mean((out - base) ** 2)))
    assert err[True] <= err[False] * 1.05, err
    assert err[True] < 0.05 * float(np.sqrt(np.mean(base ** 2))), err


@pytest.mark.parametrize("batch,samples,want", [
    (64, 331776, 11),     # 32 kHz, 10 s: 6 passes of 11 rows (2 pad rows), not 5 of 12 + 4
    (16, 331776, 8),
    (12, 331776, None),   # fits the budget: one pass
    (1, 10 ** 8, None),   # one row is never split
    (3, 1000, None),
])
def test_auto_rows_per_call_spreads_rows_evenly(batch, samples, want):
    assert api.rows_per_call_for("auto", batch, samples) == want


def test_rows_per_call_is_checked():
    assert api.rows_per_call_for(None, 8, 100) is None
    assert api.rows_per_call_for(3, 8, 100) == 3
    assert api.rows_per_call_for(8, 8, 100) is None
    for bad in (0, -1, 2.5, "all", True):
        with pytest.raises(UsageError, match="rows_per_call"):
            api.rows_per_call_for(bad, 8, 100)
