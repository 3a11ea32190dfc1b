"""Tests for codec_jax.nn.discriminators.

Parity tests port random weights from small PyTorch transcriptions of the
reference modules (DAC ``MPD`` / ``MRD``, EnCodec ``DiscriminatorSTFT``, written
NCHW with torch's weight_norm exactly as the references build them) and compare
every feature map. Parameters are built from the torch modules rather than with
``Discriminator.init`` because compiling Flax's per-parameter RNG init dominates
CPU test time.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn
from torch.nn.utils.parametrizations import weight_norm

from codec_jax import losses
from codec_jax.nn.discriminators import (
    DAC_BANDS,
    Discriminator,
    MultiBandSTFTDiscriminator,
    PeriodDiscriminator,
    STFTDiscriminator,
    dac_aligned_stft,
)

# --------------------------------------------------------------------------------------
# PyTorch references (NCHW: [batch, channels, time, width])
# --------------------------------------------------------------------------------------


def _wn_conv(*args, **kwargs) -> tnn.Module:
    conv = weight_norm(tnn.Conv2d(*args, **kwargs))
    # Move the magnitude away from ||v|| so the test exercises the normalisation.
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(torch.empty_like(conv.parametrizations.weight.original0).uniform_(0.5, 1.5))
    return conv


class TorchMPD(tnn.Module):
    def __init__(self, period, channels):
        super().__init__()
        self.period = period
        widths = [1, *channels]
        self.convs = tnn.ModuleList(
            [_wn_conv(widths[i], widths[i + 1], (5, 1), (3, 1) if i < len(channels) - 1 else 1, padding=(2, 0)) for i in range(len(channels))]
        )
        self.conv_post = _wn_conv(channels[-1], 1, (3, 1), padding=(1, 0))

    def forward(self, x):
        x = x[:, None]
        x = F.pad(x, (0, self.period - x.shape[-1] % self.period), mode="reflect")
        x = x.reshape(x.shape[0], 1, -1, self.period)
        fmap = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.1)
            fmap.append(x)
        fmap.append(self.conv_post(x))
        return fmap


class TorchMRD(tnn.Module):
    def __init__(self, window_length, channels, bands=DAC_BANDS):
        super().__init__()
        self.window_length = window_length
        num_bins = window_length // 2 + 1
        self.bands = [(int(lo * num_bins), int(hi * num_bins)) for lo, hi in bands]
        ch = channels

        def stack():
            return tnn.ModuleList(
                [
                    _wn_conv(2, ch, (3, 9), (1, 1), padding=(1, 4)),
                    _wn_conv(ch, ch, (3, 9), (1, 2), padding=(1, 4)),
                    _wn_conv(ch, ch, (3, 9), (1, 2), padding=(1, 4)),
                    _wn_conv(ch, ch, (3, 9), (1, 2), padding=(1, 4)),
                    _wn_conv(ch, ch, (3, 3), (1, 1), padding=(1, 1)),
                ]
            )

        self.band_convs = tnn.ModuleList([stack() for _ in self.bands])
        self.conv_post = _wn_conv(ch, 1, (3, 3), (1, 1), padding=(1, 1))

    def spectrogram(self, x):
        # audiotools AudioSignal.stft with match_stride=True and its default sqrt-hann window.
        hop = self.window_length // 4
        length = x.shape[-1]
        right_pad = math.ceil(length / hop) * hop - length
        pad = (self.window_length - hop) // 2
        x = F.pad(x[:, None], (pad, pad + right_pad), mode="reflect")[:, 0]
        window = torch.hann_window(self.window_length).sqrt()
        spec = torch.stft(x, self.window_length, hop, window=window, center=True, return_complex=True)[..., 2:-2]
        return torch.view_as_real(spec).permute(0, 3, 2, 1)  # b f t c -> b c t f

    def forward(self, x):
        x = self.spectrogram(x)
        fmap, outs = [], []
        for (lo, hi), stack in zip(self.bands, self.band_convs):
            band = x[..., lo:hi]
            for conv in stack:
                band = F.leaky_relu(conv(band), 0.1)
                fmap.append(band)
            outs.append(band)
        fmap.append(self.conv_post(torch.cat(outs, dim=-1)))
        return fmap


class TorchEncodecSTFTD(tnn.Module):
    def __init__(self, n_fft, filters, dilations=(1, 2, 4)):
        super().__init__()
        self.n_fft = n_fft
        # EnCodec's first NormConv2d gets no norm argument: a plain conv.
        self.convs = tnn.ModuleList([tnn.Conv2d(2, filters, (3, 9), padding=(1, 4))])
        for d in dilations:
            self.convs.append(_wn_conv(filters, filters, (3, 9), stride=(1, 2), dilation=(d, 1), padding=(d, 4)))
        self.convs.append(_wn_conv(filters, filters, (3, 3), padding=(1, 1)))
        self.conv_post = _wn_conv(filters, 1, (3, 3), padding=(1, 1))

    def forward(self, x):
        window = torch.hann_window(self.n_fft)
        # torchaudio Spectrogram(normalized=True, center=False, power=None).
        spec = torch.stft(x, self.n_fft, self.n_fft // 4, window=window, center=False, return_complex=True) / window.pow(2).sum().sqrt()
        z = torch.cat([spec.real[:, None], spec.imag[:, None]], dim=1).permute(0, 1, 3, 2)  # b c w t -> b c t w
        fmap = []
        for conv in self.convs:
            z = F.leaky_relu(conv(z), 0.2)
            fmap.append(z)
        fmap.append(self.conv_post(z))
        return fmap


def _conv_params(conv: tnn.Module) -> dict:
    to_hwio = lambda w: jnp.asarray(w.detach().permute(2, 3, 1, 0).numpy())  # noqa: E731
    if hasattr(conv, "parametrizations"):
        return {
            "direction": to_hwio(conv.parametrizations.weight.original1),
            "magnitude": jnp.asarray(conv.parametrizations.weight.original0.detach().flatten().numpy()),
            "bias": jnp.asarray(conv.bias.detach().numpy()),
        }
    return {"kernel": to_hwio(conv.weight), "bias": jnp.asarray(conv.bias.detach().numpy())}


def _mpd_params(ref: TorchMPD) -> dict:
    params = {f"conv_{i}": _conv_params(conv) for i, conv in enumerate(ref.convs)}
    params["conv_post"] = _conv_params(ref.conv_post)
    return params


def _mrd_params(ref: TorchMRD) -> dict:
    params = {f"band_{b}_conv_{l}": _conv_params(conv) for b, stack in enumerate(ref.band_convs) for l, conv in enumerate(stack)}
    params["conv_post"] = _conv_params(ref.conv_post)
    return params


def _stftd_params(ref: TorchEncodecSTFTD) -> dict:
    params = {f"conv_{i}": _conv_params(conv) for i, conv in enumerate(ref.convs)}
    params["conv_post"] = _conv_params(ref.conv_post)
    return params


def _audio(batch=2, samples=4096, seed=0) -> np.ndarray:
    return (0.3 * np.random.default_rng(seed).standard_normal((batch, samples))).astype(np.float32)


def _assert_parity(module, params, reference, audio):
    """Feature maps and d(mean logit)/d(audio) agree with the torch reference."""
    apply = jax.jit(module.apply)
    ours = apply({"params": params}, audio)
    audio_torch = torch.from_numpy(audio).requires_grad_(True)
    theirs = reference(audio_torch)
    _assert_maps_match(ours, theirs)
    theirs[-1].mean().backward()
    grad = jax.jit(jax.grad(lambda x: jnp.mean(module.apply({"params": params}, x)[-1])))(audio)
    expected = audio_torch.grad.numpy()
    assert np.abs(expected).max() > 0.0
    np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-3 * np.abs(expected).max())
    return ours


def _assert_maps_match(ours, reference, rtol=2e-4):
    assert len(ours) == len(reference)
    for index, (mine, theirs) in enumerate(zip(ours, reference)):
        theirs = theirs.detach().permute(0, 2, 3, 1).numpy()  # NCHW -> NHWC
        assert mine.shape == theirs.shape, (index, mine.shape, theirs.shape)
        np.testing.assert_allclose(np.asarray(mine), theirs, atol=rtol * np.abs(theirs).max(), err_msg=f"feature map {index}")


# --------------------------------------------------------------------------------------
# Parity with the references
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("period, samples", [(3, 4000), (2, 4096)])  # 4096 % 2 == 0: DAC pads a full period
def test_period_discriminator_matches_dac_mpd(period, samples):
    torch.manual_seed(0)
    channels = (4, 8, 16, 16, 16)
    reference = TorchMPD(period, channels)
    audio = _audio(samples=samples)
    ours = _assert_parity(PeriodDiscriminator(period, channels), _mpd_params(reference), reference, audio)
    rows = samples // period + 1
    for _ in range(4):
        rows = math.ceil(rows / 3)
    assert ours[-1].shape == (2, rows, period, 1)


def test_multiband_stft_discriminator_matches_dac_mrd():
    torch.manual_seed(1)
    reference = TorchMRD(512, channels=4)
    audio = _audio(samples=3000)
    module = MultiBandSTFTDiscriminator(512, channels=4)
    ours = _assert_parity(module, _mrd_params(reference), reference, audio)
    assert len(ours) == 5 * len(DAC_BANDS) + 1
    assert ours[-1].shape[:2] == (2, math.ceil(3000 / 128))
    widths = [hi - lo for lo, hi in module.band_bins()]
    assert sum(widths) == 257 and widths[0] == 25
    assert ours[-1].shape[2] == sum(math.ceil(w / 8) for w in widths)


def test_stft_discriminator_matches_encodec_msstftd():
    torch.manual_seed(2)
    reference = TorchEncodecSTFTD(512, filters=4)
    audio = _audio(samples=3000)
    module = STFTDiscriminator(512, filters=4)
    params = _stftd_params(reference)
    assert "direction" not in params["conv_0"] and "direction" in params["conv_1"]
    ours = _assert_parity(module, params, reference, audio)
    assert ours[-1].shape == (2, 1 + (3000 - 512) // 128, math.ceil(257 / 8), 1)


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


def test_bf16_compute_with_f32_params(tiny_setup):
    module, variables, audio, objective = tiny_setup
    bf16_module = Discriminator(**TINY, dtype=jnp.bfloat16)
    init_shapes = jax.eval_shape(bf16_module.init, jax.random.key(0), audio)
    assert {x.dtype for x in jax.tree_util.tree_leaves(init_shapes)} == {jnp.dtype(jnp.float32)}

    (_, reference), _ = objective(variables, audio)
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
