"""Reconstruction, adversarial and feature-matching losses for GAN codec training.

All functions are pure and jit-able. Audio arguments are ``[batch, samples]``
in any float dtype; every loss casts to float32 internally and returns float32,
because bf16 log-spectra and squared errors are too coarse to train on.
Argument order is always ``(prediction, target)`` / ``(real, fake)`` as named.

Discriminator outputs are taken in the format produced by
:mod:`codec_jax.nn.discriminators`: a list with one entry per sub-discriminator,
each a list of feature maps whose **last element is the logit map**. The GAN
losses also accept a plain list of logit arrays.

Reductions follow DAC (``dac/nn/loss.py``), whose weights
:data:`DEFAULT_LOSS_WEIGHTS` reproduces: adversarial terms are **summed** over
sub-discriminators and feature-matching L1s are **summed** over layers and
sub-discriminators. ``reduction="mean"`` gives the EnCodec/audiocraft
normalisation instead (needs correspondingly larger weights).

Typical generator step (names as in :data:`DEFAULT_LOSS_WEIGHTS`)::

    real_out = disc.apply(d_params, audio)
    fake_out = disc.apply(d_params, reconstruction)
    losses = {
        "mel": mel_spectrogram_loss(reconstruction, audio, sample_rate=sr),
        "adversarial": generator_adversarial_loss(fake_out),
        "feature_matching": feature_matching_loss(real_out, fake_out),
        "commitment": commitment_loss,
        "codebook": codebook_loss,
    }
    total = weighted_loss_sum(losses)

and discriminator step::

    d_loss = discriminator_adversarial_loss(
        disc.apply(d_params, audio),
        disc.apply(d_params, jax.lax.stop_gradient(reconstruction)))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from codec_jax.audio.spectral import mel_filterbank, safe_magnitude, stft

__all__ = [
    "DEFAULT_LOSS_WEIGHTS",
    "DAC_MEL_WINDOW_LENGTHS",
    "DAC_MEL_N_MELS",
    "DAC_STFT_WINDOW_LENGTHS",
    "weighted_loss_sum",
    "mel_spectrogram_loss",
    "StftLossTerms",
    "multi_resolution_stft_loss",
    "waveform_l1_loss",
    "si_sdr",
    "discriminator_adversarial_loss",
    "generator_adversarial_loss",
    "feature_matching_loss",
]

# DAC's `lambdas` in conf/base.yml. Keys: mel/loss, adv/feat_loss, adv/gen_loss,
# vq/commitment_loss, vq/codebook_loss.
DEFAULT_LOSS_WEIGHTS: Mapping[str, float] = {
    "mel": 15.0,
    "feature_matching": 2.0,
    "adversarial": 1.0,
    "commitment": 0.25,
    "codebook": 1.0,
}

# DAC's MelSpectrogramLoss configuration (conf/base.yml).
DAC_MEL_WINDOW_LENGTHS: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048)
DAC_MEL_N_MELS: tuple[int, ...] = (5, 10, 20, 40, 80, 160, 320)
# DAC's MultiScaleSTFTLoss window lengths.
DAC_STFT_WINDOW_LENGTHS: tuple[int, ...] = (2048, 512)

# Pin matmul precision so the mel projection is float32-accurate on TPU/GPU, where
# the default may silently drop to bf16/TF32 passes.
_F32_MATMUL = jax.lax.Precision.HIGHEST


def _as_f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _check_same_shape(prediction: jax.Array, target: jax.Array) -> None:
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")


def weighted_loss_sum(losses: Mapping[str, jax.Array], weights: Mapping[str, float] = DEFAULT_LOSS_WEIGHTS) -> jax.Array:
    """``sum(weights[k] * losses[k])`` over the keys of ``losses``.

    Every key of ``losses`` must have a weight: a silently unweighted loss (a
    typo'd key) would otherwise drop out of training unnoticed. Pass a subset of
    losses to combine only those.
    """
    missing = sorted(set(losses) - set(weights))
    if missing:
        raise KeyError(f"no weight for losses {missing}; known weights: {sorted(weights)}")
    return sum((jnp.float32(weights[name]) * _as_f32(value) for name, value in losses.items()), jnp.float32(0.0))


# --------------------------------------------------------------------------------------
# Spectral reconstruction losses
# --------------------------------------------------------------------------------------


def mel_spectrogram_loss(
    prediction: jax.Array,
    target: jax.Array,
    *,
    sample_rate: int,
    window_lengths: Sequence[int] = DAC_MEL_WINDOW_LENGTHS,
    n_mels: Sequence[int] = DAC_MEL_N_MELS,
    clamp_eps: float = 1e-5,
    mag_weight: float = 0.0,
    log_weight: float = 1.0,
    power: float = 1.0,
    mel_fmin: float = 0.0,
    mel_fmax: float | None = None,
    window: str = "hann",
) -> jax.Array:
    """Multi-scale log-mel L1 distance, DAC's ``MelSpectrogramLoss`` with its config.

    For each ``(window_length, n_mels)`` scale: centred reflect-padded STFT with
    ``hop = window_length // 4``, magnitude, Slaney mel projection, then
    ``log_weight * L1(log10(clamp(mel, eps)**power))`` plus
    ``mag_weight * L1(mel)``; the scales are **summed** (not averaged), as in DAC.

    Args:
      prediction, target: ``[batch, samples]`` audio; ``samples`` must exceed
        ``max(window_lengths) // 2`` for reflect padding.
      sample_rate: audio sample rate in Hz (places the mel filters).
      window_lengths, n_mels: per-scale STFT size and mel band count.
      mel_fmin, mel_fmax: mel filter range in Hz (``None`` = Nyquist).
      window: ``"hann"`` is DAC's: it leaves ``window_type`` unset and audiotools fills
        it with ``"hann"`` (checked against pip ``descript-audio-codec``).

    Returns:
      float32 scalar; 0 for identical inputs.
    """
    _check_same_shape(prediction, target)
    if len(window_lengths) != len(n_mels):
        raise ValueError(f"{len(window_lengths)} window lengths but {len(n_mels)} n_mels")
    batch = prediction.shape[0]
    # One STFT over [prediction; target] instead of two halves the number of ops.
    both = jnp.concatenate([_as_f32(prediction), _as_f32(target)], axis=0)
    total = jnp.float32(0.0)
    for window_length, num_mels in zip(window_lengths, n_mels):
        magnitude = safe_magnitude(stft(both, window_length, window_length // 4, window=window))
        filterbank = mel_filterbank(sample_rate, window_length, num_mels, mel_fmin, mel_fmax)
        mel = jnp.matmul(magnitude, filterbank, precision=_F32_MATMUL)  # [2 * batch, frames, n_mels]
        mel_prediction, mel_target = mel[:batch], mel[batch:]
        if log_weight:
            log_prediction = power * jnp.log10(jnp.maximum(mel_prediction, clamp_eps))
            log_target = power * jnp.log10(jnp.maximum(mel_target, clamp_eps))
            total = total + log_weight * jnp.mean(jnp.abs(log_prediction - log_target))
        if mag_weight:
            total = total + mag_weight * jnp.mean(jnp.abs(mel_prediction - mel_target))
    return total


class StftLossTerms(NamedTuple):
    """Both halves of :func:`multi_resolution_stft_loss`, each averaged over resolutions."""

    spectral_convergence: jax.Array
    log_magnitude: jax.Array

    @property
    def total(self) -> jax.Array:
        """``spectral_convergence + log_magnitude``: the usual single training term."""
        return self.spectral_convergence + self.log_magnitude


def multi_resolution_stft_loss(
    prediction: jax.Array,
    target: jax.Array,
    *,
    fft_sizes: Sequence[int] = DAC_STFT_WINDOW_LENGTHS,
    hop_lengths: Sequence[int] | None = None,
    win_lengths: Sequence[int] | None = None,
    window: str = "hann",
    magnitude_floor: float = 1e-7,
) -> StftLossTerms:
    """Multi-resolution STFT loss of ParallelWaveGAN (also EnCodec's spectral term).

    Per resolution, with magnitudes ``|X| = sqrt(max(re**2 + im**2, floor))``:
    spectral convergence ``||Y| - |X||_F / ||Y||_F`` (Frobenius norms over the
    whole batch) and log-magnitude ``mean|log|Y| - log|X||``; each term is then
    averaged over resolutions.

    Args:
      prediction, target: ``[batch, samples]`` audio.
      fft_sizes: FFT size per resolution; default DAC's ``[2048, 512]``.
      hop_lengths: defaults to ``fft_size // 4`` each.
      win_lengths: defaults to ``fft_size`` each.
      magnitude_floor: power floor that keeps ``log`` and the gradient finite
        (ParallelWaveGAN's ``1e-7``).

    Returns:
      :class:`StftLossTerms` of float32 scalars; use ``.total`` for one number.
    """
    _check_same_shape(prediction, target)
    hop_lengths = [size // 4 for size in fft_sizes] if hop_lengths is None else hop_lengths
    win_lengths = list(fft_sizes) if win_lengths is None else win_lengths
    if not len(fft_sizes) == len(hop_lengths) == len(win_lengths):
        raise ValueError("fft_sizes, hop_lengths and win_lengths must have equal lengths")
    batch = prediction.shape[0]
    both = jnp.concatenate([_as_f32(prediction), _as_f32(target)], axis=0)
    convergence = jnp.float32(0.0)
    log_magnitude = jnp.float32(0.0)
    for fft_size, hop_length, win_length in zip(fft_sizes, hop_lengths, win_lengths):
        spectrum = stft(both, fft_size, hop_length, win_length=win_length, window=window)
        magnitude = safe_magnitude(spectrum, floor=magnitude_floor)
        mag_prediction, mag_target = magnitude[:batch], magnitude[batch:]
        convergence = convergence + jnp.linalg.norm(mag_target - mag_prediction) / jnp.linalg.norm(mag_target)
        log_magnitude = log_magnitude + jnp.mean(jnp.abs(jnp.log(mag_target) - jnp.log(mag_prediction)))
    count = len(fft_sizes)
    return StftLossTerms(convergence / count, log_magnitude / count)


def waveform_l1_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean absolute sample error over ``[batch, samples]``; float32 scalar."""
    _check_same_shape(prediction, target)
    return jnp.mean(jnp.abs(_as_f32(prediction) - _as_f32(target)))


def si_sdr(estimate: jax.Array, reference: jax.Array, *, zero_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """Scale-invariant signal-to-distortion ratio in dB, per example (higher is better).

    ``reference`` is projected onto ``estimate``'s direction:
    ``alpha = <estimate, reference> / ||reference||**2``, target
    ``s = alpha * reference``, residual ``e = estimate - s``, and
    ``SI-SDR = 10 log10(||s||**2 / ||e||**2)``. Matches audiotools'
    ``SISDRLoss`` (which DAC logs) up to sign, except that ``eps`` is added to
    both energies so a perfect reconstruction gives a large finite value rather
    than ``inf``.

    Args:
      estimate, reference: ``[batch, samples]``.
      zero_mean: remove each signal's DC offset first (audiotools' default).

    Returns:
      float32 ``[batch]``. For metrics, average over the batch yourself.
    """
    _check_same_shape(estimate, reference)
    estimate = _as_f32(estimate)
    reference = _as_f32(reference)
    if zero_mean:
        estimate = estimate - jnp.mean(estimate, axis=-1, keepdims=True)
        reference = reference - jnp.mean(reference, axis=-1, keepdims=True)
    scale = (jnp.sum(estimate * reference, axis=-1, keepdims=True) + eps) / (jnp.sum(reference**2, axis=-1, keepdims=True) + eps)
    projected = scale * reference
    residual = estimate - projected
    signal_energy = jnp.sum(projected**2, axis=-1)
    residual_energy = jnp.sum(residual**2, axis=-1)
    return 10.0 * jnp.log10((signal_energy + eps) / (residual_energy + eps))


# --------------------------------------------------------------------------------------
# Adversarial losses
# --------------------------------------------------------------------------------------

# A discriminator output: per sub-discriminator, either a list of feature maps with the
# logit map last, or the logit array itself.
DiscriminatorOutputs = Sequence[Sequence[jax.Array] | jax.Array]


def _logits(outputs: DiscriminatorOutputs) -> list[jax.Array]:
    if len(outputs) == 0:
        raise ValueError("empty discriminator output list")
    return [_as_f32(out[-1] if isinstance(out, (list, tuple)) else out) for out in outputs]


def _reduce(terms: list[jax.Array], reduction: str) -> jax.Array:
    if reduction == "sum":
        return sum(terms, jnp.float32(0.0))
    if reduction == "mean":
        return sum(terms, jnp.float32(0.0)) / len(terms)
    raise ValueError(f"unknown reduction {reduction!r}; expected 'sum' or 'mean'")


def discriminator_adversarial_loss(
    real_outputs: DiscriminatorOutputs,
    fake_outputs: DiscriminatorOutputs,
    *,
    kind: str = "least_squares",
    reduction: str = "sum",
) -> jax.Array:
    """Discriminator's GAN loss over all sub-discriminators.

    Per sub-discriminator with logit maps ``r`` (real) and ``f`` (fake):

    * ``"least_squares"`` (DAC / HiFi-GAN): ``mean((1 - r)**2) + mean(f**2)``
    * ``"hinge"`` (EnCodec): ``mean(relu(1 - r)) + mean(relu(1 + f))``

    Args:
      real_outputs, fake_outputs: discriminator outputs (see module docstring) for
        real audio and for (stop-gradient'ed) generated audio.
      kind: ``"least_squares"`` or ``"hinge"``.
      reduction: ``"sum"`` over sub-discriminators (DAC) or ``"mean"`` (EnCodec).

    Returns:
      float32 scalar.
    """
    real_logits, fake_logits = _logits(real_outputs), _logits(fake_outputs)
    if len(real_logits) != len(fake_logits):
        raise ValueError(f"{len(real_logits)} real vs {len(fake_logits)} fake sub-discriminator outputs")
    if kind == "least_squares":
        terms = [jnp.mean((1.0 - r) ** 2) + jnp.mean(f**2) for r, f in zip(real_logits, fake_logits)]
    elif kind == "hinge":
        terms = [jnp.mean(jax.nn.relu(1.0 - r)) + jnp.mean(jax.nn.relu(1.0 + f)) for r, f in zip(real_logits, fake_logits)]
    else:
        raise ValueError(f"unknown GAN loss kind {kind!r}; expected 'least_squares' or 'hinge'")
    return _reduce(terms, reduction)


def generator_adversarial_loss(fake_outputs: DiscriminatorOutputs, *, kind: str = "least_squares", reduction: str = "sum") -> jax.Array:
    """Generator's GAN loss: make the discriminator score generated audio as real.

    Per sub-discriminator with fake logit map ``f``: ``mean((1 - f)**2)`` for
    ``"least_squares"`` (DAC), ``mean(relu(1 - f))`` for ``"hinge"`` (EnCodec's
    generator loss; audiocraft's ``hinge2``). Reduction as in
    :func:`discriminator_adversarial_loss`. Returns a float32 scalar.
    """
    fake_logits = _logits(fake_outputs)
    if kind == "least_squares":
        terms = [jnp.mean((1.0 - f) ** 2) for f in fake_logits]
    elif kind == "hinge":
        terms = [jnp.mean(jax.nn.relu(1.0 - f)) for f in fake_logits]
    else:
        raise ValueError(f"unknown GAN loss kind {kind!r}; expected 'least_squares' or 'hinge'")
    return _reduce(terms, reduction)


def feature_matching_loss(
    real_outputs: Sequence[Sequence[jax.Array]],
    fake_outputs: Sequence[Sequence[jax.Array]],
    *,
    reduction: str = "sum",
) -> jax.Array:
    """L1 between discriminator feature maps of real and generated audio.

    Every feature map except the last (the logit map) contributes
    ``mean|fake - stop_gradient(real)|``; real features are detached because
    this loss trains only the generator (as DAC's ``.detach()``).

    Args:
      real_outputs, fake_outputs: discriminator outputs, list (sub-discriminator)
        of lists (layer) of arrays with matching shapes.
      reduction: ``"sum"`` over all layers of all sub-discriminators (DAC,
        HiFi-GAN; what weight 2 in :data:`DEFAULT_LOSS_WEIGHTS` assumes) or
        ``"mean"``: average over layers within each sub-discriminator, then over
        sub-discriminators (EnCodec / audiocraft).

    Returns:
      float32 scalar; 0 when the features are identical.
    """
    if len(real_outputs) != len(fake_outputs) or len(real_outputs) == 0:
        raise ValueError(f"{len(real_outputs)} real vs {len(fake_outputs)} fake sub-discriminator outputs")
    per_discriminator = []
    for real_maps, fake_maps in zip(real_outputs, fake_outputs):
        if len(real_maps) != len(fake_maps) or len(real_maps) < 2:
            raise ValueError("each sub-discriminator needs matching lists of >= 1 feature map plus the logit map")
        layer_terms = [
            jnp.mean(jnp.abs(_as_f32(fake) - jax.lax.stop_gradient(_as_f32(real))))
            for real, fake in zip(real_maps[:-1], fake_maps[:-1])
        ]
        per_discriminator.append(_reduce(layer_terms, reduction))
    return _reduce(per_discriminator, reduction)
