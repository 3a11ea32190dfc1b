"""Short-time Fourier transform and mel filterbank, shared by losses and discriminators.

Conventions
-----------
* Audio is ``[batch, samples]`` (any number of leading axes works; the last
  axis is time).
* Spectra are **time-major**: ``[batch, frames, freq_bins]`` with
  ``freq_bins = n_fft // 2 + 1``. That is the transpose of ``torch.stft``'s
  ``[batch, freq_bins, frames]`` and lets the discriminators treat a spectrum
  as an NHWC image ``[batch, time, freq, channels]`` without transposes.
* Everything here runs in float32: inputs are cast on entry, because STFT
  magnitudes of bf16 audio lose too much precision for a log-domain loss.

The STFT reproduces ``torch.stft(..., center=True, pad_mode="reflect",
return_complex=True)`` (checked in ``tests/test_losses.py``), and the mel
filterbank reproduces ``librosa.filters.mel`` defaults (Slaney mel scale,
Slaney area normalisation), which is what DAC's ``MelSpectrogramLoss`` uses
through audiotools.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "window_function",
    "frame_signal",
    "stft",
    "safe_magnitude",
    "hz_to_mel",
    "mel_to_hz",
    "mel_filterbank",
]

# Above this many sub-slices the strided-slice framing below compiles slowly, so
# framing falls back to a gather (only reached when hop and n_fft share a small gcd).
_MAX_FRAMING_SLICES = 64


def window_function(kind: str, length: int) -> np.ndarray:
    """Periodic analysis window, float32 ``[length]``.

    ``kind`` is ``"hann"`` (identical to ``torch.hann_window(length)`` and
    ``scipy.signal.get_window("hann", length)``, both periodic), ``"sqrt_hann"``
    (its square root; audiotools' default window, so the one DAC's losses and
    MRD discriminator actually use) or ``"rectangular"``.
    """
    n = np.arange(length, dtype=np.float64)
    if kind == "hann":
        window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)
    elif kind == "sqrt_hann":
        window = np.sqrt(0.5 - 0.5 * np.cos(2.0 * np.pi * n / length))
    elif kind == "rectangular":
        window = np.ones(length)
    else:
        raise ValueError(f"unknown window {kind!r}; expected 'hann', 'sqrt_hann' or 'rectangular'")
    return window.astype(np.float32)


def frame_signal(signal: jax.Array, frame_length: int, hop_length: int) -> jax.Array:
    """Cut overlapping frames: ``[..., samples] -> [..., frames, frame_length]``.

    ``frames = 1 + (samples - frame_length) // hop_length``; trailing samples that
    do not fill a frame are dropped (same as ``torch.Tensor.unfold``).

    Frames are assembled from strided slices of a ``[chunks, gcd]`` reshape rather
    than a gather, because a gather's transpose is a scatter-add, which is slow on
    accelerators and this runs inside every loss and discriminator backward pass.
    """
    num_samples = signal.shape[-1]
    if num_samples < frame_length:
        raise ValueError(f"signal has {num_samples} samples, fewer than one frame of {frame_length}")
    num_frames = 1 + (num_samples - frame_length) // hop_length
    chunk = math.gcd(frame_length, hop_length)
    chunks_per_frame = frame_length // chunk
    chunks_per_hop = hop_length // chunk
    if chunks_per_frame > _MAX_FRAMING_SLICES:
        starts = hop_length * np.arange(num_frames)[:, None] + np.arange(frame_length)[None, :]
        return signal[..., starts]
    num_chunks = (num_frames - 1) * chunks_per_hop + chunks_per_frame
    chunks = signal[..., : num_chunks * chunk].reshape(*signal.shape[:-1], num_chunks, chunk)
    last = (num_frames - 1) * chunks_per_hop + 1
    pieces = [chunks[..., offset : offset + last : chunks_per_hop, :] for offset in range(chunks_per_frame)]
    return jnp.concatenate(pieces, axis=-1)


def stft(
    audio: jax.Array,
    n_fft: int,
    hop_length: int,
    *,
    win_length: int | None = None,
    window: str = "hann",
    center: bool = True,
    pad_mode: str = "reflect",
    normalization: str | None = None,
) -> jax.Array:
    """Complex STFT matching ``torch.stft(return_complex=True, onesided=True)``.

    Args:
      audio: ``[batch, samples]`` real audio, any float dtype (computed in float32).
      n_fft: FFT size.
      hop_length: frame step in samples.
      win_length: window length (defaults to ``n_fft``); a shorter window is
        zero-padded on both sides to ``n_fft``, as torch does.
      window: see :func:`window_function`.
      center: pad ``n_fft // 2`` samples on both sides so frame ``t`` is centred
        on sample ``t * hop_length``. With reflect padding this needs
        ``samples > n_fft // 2``.
      pad_mode: ``jnp.pad`` mode used when ``center`` (``"reflect"`` excludes the
        edge sample, like torch's ``"reflect"``).
      normalization: None for the raw transform; ``"window"`` divides by
        ``sqrt(sum(window**2))`` (what torchaudio's ``Spectrogram(normalized=True)``
        does, hence EnCodec's MS-STFT discriminator); ``"frame_length"`` divides
        by ``sqrt(n_fft)`` (what ``torch.stft(normalized=True)`` does).

    Returns:
      complex64 ``[batch, frames, n_fft // 2 + 1]`` with
      ``frames = 1 + samples // hop_length`` when ``center`` else
      ``1 + (samples - n_fft) // hop_length``.
    """
    win_length = n_fft if win_length is None else win_length
    if win_length > n_fft:
        raise ValueError(f"win_length {win_length} exceeds n_fft {n_fft}")
    audio = jnp.asarray(audio, jnp.float32)
    if center:
        half = n_fft // 2
        pad_width = [(0, 0)] * (audio.ndim - 1) + [(half, half)]
        audio = jnp.pad(audio, pad_width, mode=pad_mode)
    analysis_window = np.zeros(n_fft, np.float32)
    left = (n_fft - win_length) // 2
    analysis_window[left : left + win_length] = window_function(window, win_length)
    frames = frame_signal(audio, n_fft, hop_length) * analysis_window
    spectrum = jnp.fft.rfft(frames, n=n_fft, axis=-1)
    if normalization == "window":
        spectrum = spectrum / np.float32(np.sqrt(np.sum(analysis_window.astype(np.float64) ** 2)))
    elif normalization == "frame_length":
        spectrum = spectrum / np.float32(np.sqrt(n_fft))
    elif normalization is not None:
        raise ValueError(f"unknown normalization {normalization!r}; expected None, 'window' or 'frame_length'")
    return spectrum


def safe_magnitude(spectrum: jax.Array, floor: float = 0.0) -> jax.Array:
    """``|spectrum|`` (float32) with a zero gradient where the magnitude is zero.

    ``jnp.abs`` of a complex zero has a NaN gradient, and digital silence makes
    exact zeros common; torch defines that gradient as zero, so do the same. With
    ``floor > 0`` this is ``sqrt(max(re**2 + im**2, floor))`` instead
    (ParallelWaveGAN's clamped magnitude).
    """
    power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
    if floor > 0.0:
        return jnp.sqrt(jnp.maximum(power, floor))
    positive = power > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, power, 1.0)), 0.0)


# Slaney's Auditory Toolbox mel scale (librosa's default, htk=False): linear below
# 1 kHz at 3 mel per 200 Hz, logarithmic above with 27 mel per factor 6.4.
_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_LOG_START_HZ = 1000.0
_SLANEY_LOG_START_MEL = _SLANEY_LOG_START_HZ / _SLANEY_HZ_PER_MEL  # 15 mel
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel(frequency_hz: np.ndarray | float) -> np.ndarray:
    """Slaney mel scale (``librosa.hz_to_mel(..., htk=False)``), float64."""
    frequency_hz = np.asarray(frequency_hz, dtype=np.float64)
    linear = frequency_hz / _SLANEY_HZ_PER_MEL
    logarithmic = _SLANEY_LOG_START_MEL + np.log(np.maximum(frequency_hz, _SLANEY_LOG_START_HZ) / _SLANEY_LOG_START_HZ) / _SLANEY_LOG_STEP
    return np.where(frequency_hz >= _SLANEY_LOG_START_HZ, logarithmic, linear)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel` (``librosa.mel_to_hz(..., htk=False)``), float64."""
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _SLANEY_HZ_PER_MEL
    logarithmic = _SLANEY_LOG_START_HZ * np.exp(_SLANEY_LOG_STEP * (np.maximum(mel, _SLANEY_LOG_START_MEL) - _SLANEY_LOG_START_MEL))
    return np.where(mel >= _SLANEY_LOG_START_MEL, logarithmic, linear)


@functools.lru_cache(maxsize=64)
def mel_filterbank(
    sample_rate: int,
    n_fft: int,
    n_mels: int,
    fmin: float = 0.0,
    fmax: float | None = None,
) -> np.ndarray:
    """Triangular mel filterbank as ``librosa.filters.mel`` builds it by default.

    Filter ``m`` rises linearly (in Hz) from mel-spaced edge ``m`` to edge
    ``m + 1`` and falls to edge ``m + 2``, over ``n_mels + 2`` edges equally
    spaced on the Slaney mel scale between ``fmin`` and ``fmax`` (Nyquist when
    None). Each triangle is scaled by ``2 / (upper_edge - lower_edge)`` so it has
    unit area in Hz (librosa ``norm="slaney"``).

    Returns:
      read-only float32 ``[n_fft // 2 + 1, n_mels]``; the transpose of librosa's
      layout so that ``magnitude @ filterbank`` maps ``[..., freq] -> [..., mel]``.
    """
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    bin_frequencies = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    edge_gaps = np.diff(edges_hz)
    offsets = edges_hz[:, None] - bin_frequencies[None, :]  # [n_mels + 2, freq]
    rising = -offsets[:-2] / edge_gaps[:-1, None]
    falling = offsets[2:] / edge_gaps[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    filterbank = np.ascontiguousarray(weights.T, dtype=np.float32)
    filterbank.setflags(write=False)
    return filterbank
