"""GAN discriminators for codec training, in flax.linen.

Three families, each a faithful port of its reference:

* :class:`PeriodDiscriminator` — one period of HiFi-GAN's multi-period
  discriminator as configured in DAC (``dac/model/discriminator.py::MPD``).
* :class:`MultiBandSTFTDiscriminator` — one resolution of DAC's multi-band
  complex-STFT discriminator (``MRD``).
* :class:`STFTDiscriminator` — one scale of EnCodec's multi-scale STFT
  discriminator (``encodec/msstftd.py::DiscriminatorSTFT``).

:class:`Discriminator` bundles any subset of them (``kinds``), as DAC's
``Discriminator`` bundles MPD and MRD.

Output format (shared by all modules and consumed by :mod:`codec_jax.losses`):
a sub-discriminator returns a list of feature maps ``[batch, time, width,
channels]`` (``width`` is the period for MPD, frequency for the STFT
discriminators) whose **last element is the logit map** ``[batch, time',
width', 1]``; :class:`Discriminator` returns a list of those lists, one per
sub-discriminator, in the order given by :meth:`Discriminator.names`.

Layout is channels-last (NHWC) with time on the H axis, i.e. the transpose of
the references' NCHW tensors with the same H/W roles, so kernels like DAC's
``(3, 9)`` keep their meaning (3 along time, 9 along frequency).

Parameters are kept in ``param_dtype`` (float32); convolutions run in ``dtype``
(e.g. bfloat16). Spectrograms are always computed in float32 and cast after. Each
conv's bias is added in float32 (see :class:`WNConv2d`), so its gradient is a float32 sum.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from codec_jax.audio.spectral import stft
from codec_jax.nn.layers import torch_uniform_init, weight_normed_kernel

__all__ = [
    "DAC_BANDS",
    "MPD_CHANNELS",
    "dac_aligned_stft",
    "WNConv2d",
    "PeriodDiscriminator",
    "MultiBandSTFTDiscriminator",
    "STFTDiscriminator",
    "Discriminator",
]

Dtype = Any
Array = jax.Array

# Fractions of the one-sided frequency axis that DAC's MRD convolves separately.
DAC_BANDS: tuple[tuple[float, float], ...] = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))
# Conv widths of DAC's / HiFi-GAN's period sub-discriminator.
MPD_CHANNELS: tuple[int, ...] = (32, 128, 512, 1024, 1024)


class WNConv2d(nn.Module):
    """2-D convolution with optional PyTorch-style weight normalisation.

    ``kernel = magnitude * direction / ||direction||``, the norm taken per output
    channel over ``[kh, kw, in]`` (``torch.nn.utils.weight_norm(dim=0)``);
    ``magnitude`` starts at that norm so the initial kernel equals ``direction``.
    The kernel is normalised in float32, then cast to ``dtype`` with the input.

    Input ``[batch, height, width, in]`` -> ``[batch, height', width', features]``
    with explicit symmetric ``padding`` per spatial axis, as torch's ``Conv2d``.
    Parameter names (``direction``, ``magnitude``, ``bias``) match
    :mod:`codec_jax.nn.layers`.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    use_weight_norm: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_features = x.shape[-1]
        fan_in = in_features * self.kernel_size[0] * self.kernel_size[1]
        shape = (*self.kernel_size, in_features, self.features)
        if self.use_weight_norm:
            # torch's weight_norm(dim=0) on an OIHW weight: one magnitude per output channel.
            kernel = weight_normed_kernel(self, shape, fan_in, norm_axes=(0, 1, 2), mag_axis=3,
                                          param_dtype=self.param_dtype)
        else:
            kernel = self.param("kernel", torch_uniform_init(fan_in), shape, self.param_dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=self.strides,
            padding=[(self.padding[0], self.padding[0]), (self.padding[1], self.padding[1])],
            rhs_dilation=self.dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        bias = self.param("bias", torch_uniform_init(fan_in), (self.features,), self.param_dtype)
        # The bias is added in float32 and the sum rounded once to `dtype`. Added in
        # `dtype`, the bias gradient is the transpose of its broadcast: a `dtype`
        # reduce_sum of the output cotangent over batch x height x width, and XLA:CPU
        # accumulates a bfloat16 reduction in bfloat16. For the MRD logit map's ~2000
        # positions that lost 65 % of `conv_post.bias`'s gradient (which carries half of
        # the tiny discriminator's gradient norm); see bench/disc_bf16_precision.py. In
        # float32 the reduction is float32 on every backend; the convolution itself (its
        # forward and both backward convolutions) still runs in `dtype`, and XLA fuses
        # the casts into the neighbouring elementwise ops.
        return (y.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class PeriodDiscriminator(nn.Module):
    """One sub-discriminator of the multi-period discriminator (DAC ``MPD``).

    The waveform is reflect-padded on the right by ``period - samples % period``
    (DAC pads a whole period even when ``samples`` is a multiple), folded into
    ``[batch, samples' / period, period, 1]`` so that each column holds every
    ``period``-th sample, and convolved along time only (kernel ``(5, 1)``).

    Input ``[batch, samples]``. Returns ``len(channels) + 1`` maps; with
    ``n = samples // period + 1`` folded rows, every stride-3 layer maps the time
    axis ``t -> ceil(t / 3)``; the logit map is ``[batch, t_final, period, 1]``.
    """

    period: int
    channels: Sequence[int] = MPD_CHANNELS
    negative_slope: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, audio: Array) -> list[Array]:
        batch, samples = audio.shape
        pad = self.period - samples % self.period
        x = jnp.pad(audio.astype(jnp.float32), ((0, 0), (0, pad)), mode="reflect")
        x = x.reshape(batch, (samples + pad) // self.period, self.period, 1).astype(self.dtype)
        feature_maps = []
        for index, features in enumerate(self.channels):
            # All but the last layer downsample time by 3 (DAC; HiFi-GAN uses 3 too).
            stride = 3 if index < len(self.channels) - 1 else 1
            x = WNConv2d(features, (5, 1), (stride, 1), (2, 0), dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv_{index}")(x)
            x = nn.leaky_relu(x, self.negative_slope)
            feature_maps.append(x)
        logits = WNConv2d(1, (3, 1), padding=(1, 0), dtype=self.dtype, param_dtype=self.param_dtype, name="conv_post")(x)
        feature_maps.append(logits)
        return feature_maps


def dac_aligned_stft(audio: Array, window_length: int, window: str = "hann") -> Array:
    """audiotools' ``match_stride=True`` STFT used by DAC's MRD.

    Hop is ``window_length // 4``. The signal is reflect-padded by
    ``(window_length - hop) // 2`` on both sides plus up to a hop on the right,
    transformed with a centred STFT, and the two extra frames at each end are
    dropped, so frame ``t`` covers samples around ``t * hop`` and
    ``frames = ceil(samples / hop)``, like a stride-``hop`` convolution.

    Args:
      audio: ``[batch, samples]``; needs ``samples > window_length`` for the
        reflect padding.
      window: DAC leaves ``window_type`` unset and audiotools (0.7.2, the version DAC
        1.0 requires) fills it with ``"hann"``; its docstrings say square-root Hann, its
        code does not. Checked against pip ``descript-audio-codec`` itself.

    Returns:
      complex64 ``[batch, ceil(samples / hop), window_length // 2 + 1]``.
    """
    hop = window_length // 4
    samples = audio.shape[-1]
    right_pad = math.ceil(samples / hop) * hop - samples
    pad = (window_length - hop) // 2
    padded = jnp.pad(audio.astype(jnp.float32), ((0, 0), (pad, pad + right_pad)), mode="reflect")
    spectrum = stft(padded, window_length, hop, window=window, center=True)
    return spectrum[:, 2:-2]


class MultiBandSTFTDiscriminator(nn.Module):
    """One resolution of DAC's multi-band complex-STFT discriminator (``MRD``).

    The complex spectrum (:func:`dac_aligned_stft`) becomes a 2-channel image
    ``[batch, frames, freq, (real, imag)]``, is split along frequency into
    ``bands`` (fractions of ``window_length // 2 + 1`` bins, truncated to ints as
    DAC does), and each band goes through its own 5-layer conv stack (kernels
    ``(3, 9)``, frequency stride 2 in layers 2-4, LeakyReLU 0.1). The band outputs
    are concatenated back along frequency and a final ``(3, 3)`` conv gives the
    logit map.

    Input ``[batch, samples]`` with ``samples > window_length``. Returns
    ``5 * len(bands) + 1`` maps (band-major order), each
    ``[batch, ceil(samples / hop), freq', channels]``; logits
    ``[batch, ceil(samples / hop), sum_b ceil(width_b / 8), 1]``.
    """

    window_length: int
    bands: Sequence[tuple[float, float]] = DAC_BANDS
    channels: int = 32
    window: str = "hann"
    negative_slope: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def band_bins(self) -> list[tuple[int, int]]:
        """``(start, stop)`` frequency-bin range of each band."""
        num_bins = self.window_length // 2 + 1
        return [(int(low * num_bins), int(high * num_bins)) for low, high in self.bands]

    @nn.compact
    def __call__(self, audio: Array) -> list[Array]:
        spectrum = dac_aligned_stft(audio, self.window_length, self.window)
        image = jnp.stack([jnp.real(spectrum), jnp.imag(spectrum)], axis=-1).astype(self.dtype)
        # (kernel, frequency stride, padding) per layer, as DAC's band conv stack.
        layer_specs = [((3, 9), 1, (1, 4)), ((3, 9), 2, (1, 4)), ((3, 9), 2, (1, 4)), ((3, 9), 2, (1, 4)), ((3, 3), 1, (1, 1))]
        feature_maps = []
        band_outputs = []
        for band_index, (start, stop) in enumerate(self.band_bins()):
            x = image[:, :, start:stop, :]
            for layer_index, (kernel, freq_stride, padding) in enumerate(layer_specs):
                x = WNConv2d(
                    self.channels,
                    kernel,
                    (1, freq_stride),
                    padding,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"band_{band_index}_conv_{layer_index}",
                )(x)
                x = nn.leaky_relu(x, self.negative_slope)
                feature_maps.append(x)
            band_outputs.append(x)
        x = jnp.concatenate(band_outputs, axis=2)
        logits = WNConv2d(1, (3, 3), padding=(1, 1), dtype=self.dtype, param_dtype=self.param_dtype, name="conv_post")(x)
        feature_maps.append(logits)
        return feature_maps


class STFTDiscriminator(nn.Module):
    """One scale of EnCodec's multi-scale STFT discriminator (``DiscriminatorSTFT``).

    The un-centred, window-normalised complex STFT (torchaudio ``Spectrogram(
    center=False, normalized=True)``) as a ``[batch, frames, freq, (real, imag)]``
    image goes through: a ``(3, 9)`` conv; one ``(3, 9)`` conv per entry of
    ``dilations`` with frequency stride 2 and that dilation along time; a
    ``(3, 3)`` conv; each followed by LeakyReLU 0.2; then a ``(3, 3)`` conv to
    the logits. Channel count is ``min(filters * filters_scale**i, max_filters)``.

    As in EnCodec, the first conv is *not* weight-normalised (its ``NormConv2d``
    is built without ``norm=``, so it defaults to ``'none'``).

    Input ``[batch, samples]`` with ``samples >= n_fft``. Returns
    ``len(dilations) + 3`` maps ``[batch, frames, freq', channels]`` with
    ``frames = 1 + (samples - n_fft) // hop_length``; logits
    ``[batch, frames, ceil((n_fft // 2 + 1) / 2**len(dilations)), 1]``.
    """

    n_fft: int
    hop_length: int | None = None
    win_length: int | None = None
    filters: int = 32
    filters_scale: int = 1
    max_filters: int = 1024
    dilations: Sequence[int] = (1, 2, 4)
    negative_slope: float = 0.2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, audio: Array) -> list[Array]:
        hop_length = self.n_fft // 4 if self.hop_length is None else self.hop_length
        spectrum = stft(audio, self.n_fft, hop_length, win_length=self.win_length, center=False, normalization="window")
        image = jnp.stack([jnp.real(spectrum), jnp.imag(spectrum)], axis=-1).astype(self.dtype)
        conv = functools.partial(WNConv2d, dtype=self.dtype, param_dtype=self.param_dtype)

        x = conv(self.filters, (3, 9), padding=(1, 4), use_weight_norm=False, name="conv_0")(image)
        x = nn.leaky_relu(x, self.negative_slope)
        feature_maps = [x]
        for index, dilation in enumerate(self.dilations):
            features = min(self.filters * self.filters_scale ** (index + 1), self.max_filters)
            # Padding keeps the time length: (kernel - 1) * dilation // 2 = dilation.
            x = conv(features, (3, 9), (1, 2), (dilation, 4), (dilation, 1), name=f"conv_{index + 1}")(x)
            x = nn.leaky_relu(x, self.negative_slope)
            feature_maps.append(x)
        features = min(self.filters * self.filters_scale ** (len(self.dilations) + 1), self.max_filters)
        x = conv(features, (3, 3), padding=(1, 1), name=f"conv_{len(self.dilations) + 1}")(x)
        x = nn.leaky_relu(x, self.negative_slope)
        feature_maps.append(x)
        logits = conv(1, (3, 3), padding=(1, 1), name="conv_post")(x)
        feature_maps.append(logits)
        return feature_maps


_KINDS = ("mpd", "mrd", "msstft")


def _scaled(channels: int, scale: float) -> int:
    return max(1, int(round(channels * scale)))


class Discriminator(nn.Module):
    """Any combination of multi-period, DAC multi-band STFT and EnCodec MS-STFT discriminators.

    Attributes:
      kinds: subset of ``("mpd", "mrd", "msstft")``; DAC uses ``("mpd", "mrd")``.
      periods: MPD periods.
      mrd_window_lengths: MRD STFT sizes (hop = size // 4).
      mrd_bands: MRD frequency bands as fractions of the spectrum.
      msstft_n_ffts: MS-STFT FFT sizes (hop = n_fft // 4), EnCodec's order.
      channel_scale: multiplies every channel count (rounded, at least 1); e.g.
        ``1 / 16`` gives a discriminator small enough to train on CPU in seconds.
      normalize_input: DAC's preprocessing: remove each example's DC offset and
        peak-normalise it to 0.8 before every sub-discriminator. This makes the
        discriminator blind to overall gain (left to the reconstruction losses).
      dtype: compute dtype of the convolutions (e.g. ``jnp.bfloat16``).
      param_dtype: parameter dtype (keep float32).

    Input ``[batch, samples]`` (longer than the largest FFT size). Returns one
    list of feature maps per sub-discriminator (logit map last), ordered as
    :meth:`names`.
    """

    kinds: Sequence[str] = ("mpd", "mrd")
    periods: Sequence[int] = (2, 3, 5, 7, 11)
    mrd_window_lengths: Sequence[int] = (2048, 1024, 512)
    mrd_bands: Sequence[tuple[float, float]] = DAC_BANDS
    msstft_n_ffts: Sequence[int] = (1024, 2048, 512)
    channel_scale: float = 1.0
    normalize_input: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def names(self) -> list[str]:
        """Sub-discriminator names in output order, e.g. ``["mpd_2", ..., "mrd_2048", ...]``."""
        unknown = [kind for kind in self.kinds if kind not in _KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {_KINDS}, got {tuple(self.kinds)}")
        names = []
        for kind in self.kinds:
            if kind == "mpd":
                names += [f"mpd_{period}" for period in self.periods]
            elif kind == "mrd":
                names += [f"mrd_{size}" for size in self.mrd_window_lengths]
            else:
                names += [f"msstft_{size}" for size in self.msstft_n_ffts]
        return names

    @nn.compact
    def __call__(self, audio: Array) -> list[list[Array]]:
        if audio.ndim != 2:
            raise ValueError(f"expected audio [batch, samples], got shape {audio.shape}")
        x = audio.astype(jnp.float32)
        if self.normalize_input:
            x = x - jnp.mean(x, axis=-1, keepdims=True)
            x = 0.8 * x / (jnp.max(jnp.abs(x), axis=-1, keepdims=True) + 1e-9)
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        outputs = []
        for name in self.names():
            kind, size = name.split("_")
            size = int(size)
            if kind == "mpd":
                channels = tuple(_scaled(c, self.channel_scale) for c in MPD_CHANNELS)
                module = PeriodDiscriminator(size, channels, name=name, **common)
            elif kind == "mrd":
                module = MultiBandSTFTDiscriminator(
                    size, tuple(self.mrd_bands), _scaled(32, self.channel_scale), name=name, **common
                )
            else:
                module = STFTDiscriminator(size, filters=_scaled(32, self.channel_scale), name=name, **common)
            outputs.append(module(x))
        return outputs
