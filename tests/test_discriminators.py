"""Tests for codec_jax.nn.discriminators.

Parity tests copy the weights of the reference packages' own modules (pip
`descript-audio-codec`'s `Discriminator` = MPD + MRD, pip `encodec`'s
`MultiScaleSTFTDiscriminator`; see tests/torch_oracles.py) into ours and compare every
feature map and the input gradient. Parameters are built from the torch modules rather
than with `Discriminator.init` because compiling Flax's per-parameter RNG init dominates
CPU test time.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from codec_jax import losses
from codec_jax.nn.discriminators import DAC_BANDS, Discriminator, dac_aligned_stft
from torch_oracles import conv2d_params, import_reference, perturb_weight_norm_magnitudes


def _audio(batch=2, samples=4096, seed=0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal((batch, samples))).astype(np.float32)


def _assert_parity(module, params, reference, audio):
    """Feature maps and d(sum of mean logits)/d(audio) agree with the torch reference.

    `reference(audio_torch)` returns one list of NCHW feature maps (logits last) per
    sub-discriminator, in our `names()` order."""
    ours = jax.jit(module.apply)({"params": params}, audio)
    audio_torch = torch.from_numpy(audio).requires_grad_(True)
    theirs = reference(audio_torch)
    assert len(ours) == len(theirs)
    for name, mine, maps in zip(module.names(), ours, theirs):
        assert len(mine) == len(maps), name
        for index, (a, b) in enumerate(zip(mine, maps)):
            b = b.detach().permute(0, 2, 3, 1).numpy()  # NCHW -> NHWC
            assert a.shape == b.shape, (name, index, a.shape, b.shape)
            np.testing.assert_allclose(np.asarray(a), b, atol=2e-4 * np.abs(b).max(),
                                       err_msg=f"{name} feature map {index}")
    sum(maps[-1].mean() for maps in theirs).backward()
    grad = jax.jit(jax.grad(lambda x: sum(jnp.mean(maps[-1]) for maps in module.apply({"params": params}, x))))(audio)
    expected = audio_torch.grad.numpy()
    assert np.abs(expected).max() > 0.0
    np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-3 * np.abs(expected).max())
    return ours


@pytest.mark.slow
def test_mpd_and_mrd_match_dac_discriminator():
    """DAC's own `Discriminator(rates=[], periods, fft_sizes)` at full width: its input
    normalisation, MPD (4000 % 2 == 0: DAC pads a whole period) and the five-band MRD."""
    dac = import_reference("dac.model.discriminator", "descript-audio-codec")
    torch.manual_seed(0)
    reference = dac.Discriminator(rates=[], periods=[2, 3], fft_sizes=[512], sample_rate=16000)
    perturb_weight_norm_magnitudes(reference, seed=0)
    module = Discriminator(kinds=("mpd", "mrd"), periods=(2, 3), mrd_window_lengths=(512,))
    params = {}
    for name, disc in zip(module.names(), reference.discriminators):
        if name.startswith("mpd"):
            convs = [layer[0] for layer in disc.convs]
            params[name] = {f"conv_{i}": conv2d_params(c) for i, c in enumerate(convs)}
        else:
            params[name] = {f"band_{b}_conv_{i}": conv2d_params(layer[0])
                            for b, stack in enumerate(disc.band_convs) for i, layer in enumerate(stack)}
        params[name]["conv_post"] = conv2d_params(disc.conv_post)
    samples = 4000
    audio = _audio(samples=samples)
    ours = _assert_parity(module, params, lambda x: reference(x[:, None]), audio)
    rows = samples // 2 + 1
    for _ in range(4):
        rows = math.ceil(rows / 3)
    assert ours[0][-1].shape == (2, rows, 2, 1)
    mrd = ours[2]
    assert len(mrd) == 5 * len(DAC_BANDS) + 1 and mrd[-1].shape[:2] == (2, math.ceil(samples / 128))


def test_msstft_matches_encodec_multiscale_stft_discriminator():
    encodec = import_reference("encodec.msstftd", "encodec")
    torch.manual_seed(2)
    n_ffts = [512, 256]
    reference = encodec.MultiScaleSTFTDiscriminator(
        filters=4, n_ffts=n_ffts, hop_lengths=[n // 4 for n in n_ffts], win_lengths=n_ffts)
    perturb_weight_norm_magnitudes(reference, seed=2)
    # EnCodec normalises nothing: the input goes straight to the spectrogram.
    module = Discriminator(kinds=("msstft",), msstft_n_ffts=tuple(n_ffts), channel_scale=4 / 32,
                           normalize_input=False)
    params = {}
    for name, disc in zip(module.names(), reference.discriminators):
        params[name] = {f"conv_{i}": conv2d_params(c.conv) for i, c in enumerate(disc.convs)}
        params[name]["conv_post"] = conv2d_params(disc.conv_post.conv)
    # EnCodec's first conv has no weight norm; the others do.
    assert "kernel" in params["msstft_512"]["conv_0"] and "direction" in params["msstft_512"]["conv_1"]

    def run_reference(x):
        logits, fmaps = reference(x[:, None])
        return [fmap + [logit] for logit, fmap in zip(logits, fmaps)]

    samples = 3000
    ours = _assert_parity(module, params, run_reference, _audio(samples=samples))
    assert ours[0][-1].shape == (2, 1 + (samples - 512) // 128, math.ceil(257 / 8), 1)


def test_dac_aligned_stft_frames_match_conv_stride():
    for samples in (4096, 4097, 4000):
        spectrum = dac_aligned_stft(jnp.zeros((1, samples)), 1024)
        assert spectrum.shape == (1, math.ceil(samples / 256), 513)


# --------------------------------------------------------------------------------------
# Container: counts and shapes at full size (shape inference only, nothing compiled)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kinds, expected_names, maps_per_disc",
    [
        (("mpd",), ["mpd_2", "mpd_3", "mpd_5", "mpd_7", "mpd_11"], 6),
        (("mrd",), ["mrd_2048", "mrd_1024", "mrd_512"], 26),
        (("msstft",), ["msstft_1024", "msstft_2048", "msstft_512"], 6),
    ],
)
def test_full_size_output_counts_and_shapes(kinds, expected_names, maps_per_disc):
    samples = 8192
    module = Discriminator(kinds=kinds)
    assert module.names() == expected_names
    audio = jax.ShapeDtypeStruct((2, samples), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), audio)
    outputs = jax.eval_shape(module.apply, variables, audio)
    assert len(outputs) == len(expected_names)
    for name, maps in zip(expected_names, outputs):
        size = int(name.split("_")[1])
        assert len(maps) == maps_per_disc
        assert maps[-1].shape[-1] == 1 and all(m.shape[0] == 2 for m in maps)
        if kinds == ("mpd",):
            assert [m.shape[-1] for m in maps] == [32, 128, 512, 1024, 1024, 1]
            assert all(m.shape[2] == size for m in maps)  # width axis is the period
        elif kinds == ("mrd",):
            assert all(m.shape[1] == samples // (size // 4) for m in maps)
            assert all(m.shape[-1] == 32 for m in maps[:-1])
        else:
            assert all(m.shape[1] == 1 + (samples - size) // (size // 4) for m in maps)
            assert [m.shape[2] for m in maps] == [size // 2 + 1] + [math.ceil((size // 2 + 1) / 2**k) for k in (1, 2, 3, 3, 3)]


def test_dac_default_is_mpd_plus_mrd_and_channel_scale_shrinks_params():
    audio = jax.ShapeDtypeStruct((1, 4096), jnp.float32)
    full = Discriminator()
    assert full.names() == ["mpd_2", "mpd_3", "mpd_5", "mpd_7", "mpd_11", "mrd_2048", "mrd_1024", "mrd_512"]
    count = lambda m: sum(x.size for x in jax.tree_util.tree_leaves(jax.eval_shape(m.init, jax.random.key(0), audio)))  # noqa: E731
    full_count, tiny_count = count(full), count(Discriminator(channel_scale=1 / 16))
    assert 40e6 < full_count < 45e6  # DAC's discriminator is ~42.5M parameters
    assert tiny_count < full_count / 100
    with pytest.raises(ValueError):
        Discriminator(kinds=("mpd", "msd")).names()


# --------------------------------------------------------------------------------------
# Container behaviour on a tiny configuration with all three kinds
# --------------------------------------------------------------------------------------

# Two MRD bands instead of five keeps compile time down; the five-band layout is covered above.
TINY = dict(
    kinds=("mpd", "mrd", "msstft"),
    periods=(2, 3),
    mrd_window_lengths=(512,),
    mrd_bands=((0.0, 0.5), (0.5, 1.0)),
    msstft_n_ffts=(256,),
    channel_scale=1 / 16,
)


def _random_variables(module, audio_shape, seed=0):
    """Variables of `module`'s shapes filled from numpy (no RNG compile); magnitudes positive."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct(audio_shape, jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        low, high = (0.5, 1.5) if path[-1].key == "magnitude" else (-0.3, 0.3)
        return jnp.asarray(rng.uniform(low, high, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _logit_objective(module):
    """jit(value_and_grad) of sum(mean logit) w.r.t. (variables, audio), outputs as aux."""

    def objective(variables, audio):
        outputs = module.apply(variables, audio)
        return sum(jnp.mean(maps[-1].astype(jnp.float32)) for maps in outputs), outputs

    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))


@pytest.fixture(scope="module")
def tiny_setup():
    module = Discriminator(**TINY)
    audio = jnp.asarray(_audio(samples=2048, seed=3))
    variables = _random_variables(module, audio.shape)
    objective = _logit_objective(module)
    return module, variables, audio, objective


def test_tiny_all_kinds_outputs_and_gradients(tiny_setup):
    module, variables, audio, objective = tiny_setup
    (_, outputs), (param_grads, input_grad) = objective(variables, audio)
    assert len(outputs) == len(module.names()) == 4
    assert [len(maps) for maps in outputs] == [6, 6, 11, 6]
    assert all(np.all(np.isfinite(np.asarray(m))) for maps in outputs for m in maps)
    assert input_grad.shape == audio.shape
    assert np.all(np.isfinite(input_grad)) and float(jnp.abs(input_grad).sum()) > 0.0
    # Every sub-discriminator's parameters receive gradient.
    for name in module.names():
        leaves = jax.tree_util.tree_leaves(param_grads["params"][name])
        assert all(np.all(np.isfinite(g)) for g in leaves)
        assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0.0, name


def test_input_normalisation_removes_gain_and_dc(tiny_setup):
    module, variables, audio, objective = tiny_setup
    (_, plain), _ = objective(variables, audio)
    (_, shifted), _ = objective(variables, 3.0 * audio + 0.2)
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(shifted)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_bf16_compute_with_f32_params(tiny_setup):
    module, variables, audio, objective = tiny_setup
    bf16_module = Discriminator(**TINY, dtype=jnp.bfloat16)
    init_shapes = jax.eval_shape(bf16_module.init, jax.random.key(0), audio)
    assert {x.dtype for x in jax.tree_util.tree_leaves(init_shapes)} == {jnp.dtype(jnp.float32)}

    (_, reference), (reference_grads, _) = objective(variables, audio)
    (value, outputs), (param_grads, input_grad) = _logit_objective(bf16_module)(variables, audio)
    assert value.dtype == jnp.float32 and np.isfinite(float(value))
    for ref_maps, maps in zip(reference, outputs):
        for ref, out in zip(ref_maps, maps):
            assert out.dtype == jnp.bfloat16
            out = np.asarray(out, np.float32)
            assert np.all(np.isfinite(out))
            # bf16 keeps ~3 significant digits; errors compound over ~6 layers.
            assert np.abs(out - np.asarray(ref)).max() <= 0.05 * np.abs(np.asarray(ref)).max() + 1e-3
    grads = jax.tree_util.tree_leaves(param_grads)
    assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in grads)
    assert float(jnp.abs(input_grad.astype(jnp.float32)).sum()) > 0.0
    # Parameter gradients agree with float32's. The objective's gradient with respect to
    # each `conv_post.bias` is exactly 1 (the mean over the logit map); with the bias added
    # in bfloat16 its gradient was a bfloat16 sum over the map, and XLA:CPU returned 0.5
    # for MRD and MS-STFT (1.03 for MPD-3), whole-sub-discriminator errors 0.16 and 0.44. Measured
    # with the bias added in float32 (2026-12-02, CPU): bias gradients within 0.3 % of 1,
    # each sub-discriminator's gradient within 0.8 % in norm.
    for name in bf16_module.names():
        got, want = param_grads["params"][name], reference_grads["params"][name]
        assert float(got["conv_post"]["bias"][0]) == pytest.approx(1.0, rel=0.01), name
        diff = jax.tree_util.tree_map(lambda a, b: a - b, got, want)
        error = float(optax.tree.norm(diff) / optax.tree.norm(want))
        assert error < 0.02, (name, error)
    # The losses accept bf16 feature maps and reduce them in float32.
    generator_loss = losses.generator_adversarial_loss(outputs)
    assert generator_loss.dtype == jnp.float32
    assert float(generator_loss) == pytest.approx(float(losses.generator_adversarial_loss(reference)), rel=0.05)
    assert float(losses.feature_matching_loss(outputs, outputs)) == 0.0
    assert float(losses.feature_matching_loss(reference, outputs)) > 0.0


def test_weight_norm_conv_init_and_parametrisation():
    from codec_jax.nn.discriminators import WNConv2d

    x = jnp.asarray(_audio(batch=1, samples=48).reshape(1, 6, 8, 1))
    conv = WNConv2d(3, (3, 3), strides=(1, 2), padding=(1, 1))
    variables = conv.init(jax.random.key(0), x)["params"]
    direction = np.asarray(variables["direction"])
    assert direction.shape == (3, 3, 1, 3)
    assert np.all(np.abs(direction) <= 1.0 / 3.0)  # torch default bound 1/sqrt(fan_in), fan_in = 9
    np.testing.assert_allclose(variables["magnitude"], np.sqrt((direction**2).sum(axis=(0, 1, 2))), rtol=1e-6)
    y = conv.apply({"params": variables}, x)
    assert y.shape == (1, 6, 4, 3)
    # Scaling the direction leaves the kernel unchanged; scaling the magnitude scales the output.
    scaled_direction = dict(variables, direction=variables["direction"] * 7.0)
    np.testing.assert_allclose(conv.apply({"params": scaled_direction}, x), y, rtol=1e-5, atol=1e-6)
    doubled = dict(variables, magnitude=variables["magnitude"] * 2.0, bias=variables["bias"] * 2.0)
    np.testing.assert_allclose(conv.apply({"params": doubled}, x), 2.0 * y, rtol=1e-5, atol=1e-6)
