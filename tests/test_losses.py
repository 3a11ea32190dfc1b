"""Tests for codec_jax.audio.spectral and codec_jax.losses."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from codec_jax import losses
from codec_jax.training.balancer import Balancer
from codec_jax.audio.spectral import frame_signal, hz_to_mel, mel_filterbank, mel_to_hz, safe_magnitude, stft, window_function
from torch_oracles import import_reference

SAMPLE_RATE = 16000


def _tone_plus_noise(batch: int = 2, samples: int = 8192, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / SAMPLE_RATE
    tone = 0.5 * np.sin(2 * np.pi * 440.0 * t + rng.uniform(0, 2 * np.pi, (batch, 1)))
    return (tone + 0.05 * rng.standard_normal((batch, samples))).astype(np.float32)


# --------------------------------------------------------------------------------------
# STFT
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_fft, hop, win_length, center",
    [
        (512, 128, None, True),  # hop divides n_fft: reshape framing
        (64, 16, None, True),
        (400, 160, 300, True),  # short window zero-padded to n_fft, gcd framing
        (129, 7, None, True),  # odd n_fft, gcd 1: gather framing
        (2048, 512, None, False),
    ],
)
def test_stft_matches_torch(n_fft, hop, win_length, center):
    audio = np.random.default_rng(1).standard_normal((3, 5000)).astype(np.float32)
    ours = np.asarray(stft(audio, n_fft, hop, win_length=win_length, center=center))
    reference = torch.stft(
        torch.from_numpy(audio),
        n_fft,
        hop,
        win_length=win_length,
        window=torch.hann_window(win_length or n_fft),
        center=center,
        pad_mode="reflect",
        return_complex=True,
    ).numpy()
    reference = reference.transpose(0, 2, 1)  # torch is [batch, freq, frames]
    assert ours.shape == reference.shape
    assert ours.dtype == np.complex64
    np.testing.assert_allclose(ours, reference, atol=2e-6 * np.abs(reference).max())


def test_stft_normalizations_and_sqrt_hann_match_torch():
    audio = np.random.default_rng(2).standard_normal((2, 3000)).astype(np.float32)
    sqrt_hann = torch.hann_window(256).sqrt()
    raw = torch.stft(torch.from_numpy(audio), 256, 64, window=sqrt_hann, return_complex=True).numpy().transpose(0, 2, 1)
    ours = np.asarray(stft(audio, 256, 64, window="sqrt_hann"))
    np.testing.assert_allclose(ours, raw, atol=2e-6 * np.abs(raw).max())

    hann = torch.hann_window(256)
    torch_normalized = torch.stft(torch.from_numpy(audio), 256, 64, window=hann, normalized=True, return_complex=True)
    ours = np.asarray(stft(audio, 256, 64, normalization="frame_length"))
    np.testing.assert_allclose(ours, torch_normalized.numpy().transpose(0, 2, 1), atol=1e-6)

    # torchaudio's normalized=True divides by the window's L2 norm instead.
    unnormalized = np.asarray(stft(audio, 256, 64))
    by_window = np.asarray(stft(audio, 256, 64, normalization="window"))
    np.testing.assert_allclose(by_window, unnormalized / float(hann.pow(2).sum().sqrt()), rtol=1e-5, atol=1e-6)


def test_stft_frame_count_and_float32_for_bf16_input():
    audio = jnp.zeros((2, 1000), jnp.bfloat16)
    spectrum = stft(audio, 64, 16)
    assert spectrum.shape == (2, 1 + 1000 // 16, 33)
    assert spectrum.dtype == jnp.complex64


def test_frame_signal_matches_unfold():
    signal = np.arange(50, dtype=np.float32)[None]
    for frame_length, hop in [(8, 2), (9, 6), (7, 3)]:
        expected = torch.from_numpy(signal).unfold(-1, frame_length, hop).numpy()
        np.testing.assert_array_equal(np.asarray(frame_signal(signal, frame_length, hop)), expected)


def test_window_function_matches_torch():
    np.testing.assert_allclose(window_function("hann", 32), torch.hann_window(32).numpy(), atol=3e-7)


def test_safe_magnitude_gradient_is_finite_at_zero():
    def total_magnitude(audio):
        return jnp.sum(safe_magnitude(stft(audio, 64, 16)))

    grad = jax.grad(total_magnitude)(jnp.zeros((1, 256)))
    assert np.all(np.isfinite(grad))
    assert np.all(grad == 0.0)


# --------------------------------------------------------------------------------------
# Mel filterbank
# --------------------------------------------------------------------------------------


def test_slaney_mel_scale_known_values():
    # Values from librosa's documentation (htk=False).
    assert float(hz_to_mel(60.0)) == pytest.approx(0.9)
    np.testing.assert_allclose(hz_to_mel([110.0, 220.0, 440.0]), [1.65, 3.3, 6.6])
    np.testing.assert_allclose(mel_to_hz([1, 2, 3, 4, 5]), [66.667, 133.333, 200.0, 266.667, 333.333], atol=1e-3)
    # The scale turns logarithmic at 1 kHz = 15 mel, 27 mel per factor of 6.4.
    assert float(hz_to_mel(1000.0)) == pytest.approx(15.0)
    assert float(hz_to_mel(6400.0)) == pytest.approx(42.0)
    frequencies = np.array([0.0, 37.0, 999.0, 1000.0, 4321.0, 22050.0])
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(frequencies)), frequencies, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("sample_rate, n_fft, n_mels, fmin, fmax", [(44100, 2048, 320, 0.0, None), (24000, 512, 80, 50.0, 8000.0), (44100, 32, 5, 0.0, None)])
def test_mel_filterbank_matches_librosa(sample_rate, n_fft, n_mels, fmin, fmax):
    librosa = pytest.importorskip("librosa", reason="librosa (test extra) is the filterbank oracle")
    bank = mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax)
    # librosa's defaults are Slaney's scale and area normalisation, which DAC (via
    # audiotools) uses; librosa returns [n_mels, bins].
    expected = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax).T
    assert bank.shape == expected.shape == (n_fft // 2 + 1, n_mels)
    assert bank.dtype == np.float32
    np.testing.assert_allclose(bank, expected, rtol=1e-5, atol=1e-9)


def test_mel_filterbank_properties():
    sample_rate, n_fft, n_mels = 44100, 2048, 80
    bank = mel_filterbank(sample_rate, n_fft, n_mels)
    bin_hz = sample_rate / n_fft
    assert np.all(bank >= 0.0)
    assert np.all(bank.max(axis=0) > 0.0), "no empty filters at this resolution"
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))
    # Each filter peaks at the bin nearest its centre frequency.
    peak_hz = bank.argmax(axis=0) * bin_hz
    assert np.all(np.abs(peak_hz - edges[1:-1]) <= bin_hz)
    # Slaney normalisation: unit area in Hz (exact for wide triangles, approximate for narrow).
    area = bank.sum(axis=0) * bin_hz
    wide = (edges[2:] - edges[:-2]) > 10 * bin_hz
    assert wide.sum() > 30
    np.testing.assert_allclose(area[wide], 1.0, rtol=0.02)
    # Un-normalised triangles form a partition of unity between the first and last centres.
    heights = bank / (2.0 / (edges[2:] - edges[:-2]))
    inside = (np.arange(n_fft // 2 + 1) * bin_hz >= edges[1]) & (np.arange(n_fft // 2 + 1) * bin_hz <= edges[-2])
    np.testing.assert_allclose(heights[inside].sum(axis=1), 1.0, atol=1e-5)
    # Constant width in the linear region below 1 kHz, widening above it.
    widths = edges[2:] - edges[:-2]
    assert np.all(np.diff(widths) > -1e-6)
    assert np.all(np.diff(widths[edges[:-2] >= 1000.0]) > 0)
    assert widths[-1] > 10 * widths[0]


def test_mel_filterbank_respects_fmax():
    bank = mel_filterbank(32000, 1024, 40, 0.0, 4000.0)
    above = np.fft.rfftfreq(1024, 1 / 32000) >= 4000.0
    assert np.all(bank[above] == 0.0)


# --------------------------------------------------------------------------------------
# Reconstruction losses
# --------------------------------------------------------------------------------------


def test_mel_loss_zero_for_identical_and_increasing_with_noise():
    target = _tone_plus_noise()
    noise = np.random.default_rng(3).standard_normal(target.shape).astype(np.float32)
    mel_loss = jax.jit(lambda a, b: losses.mel_spectrogram_loss(a, b, sample_rate=SAMPLE_RATE))
    assert float(mel_loss(target, target)) == 0.0
    values = [float(mel_loss(target + level * noise, target)) for level in (1e-3, 1e-2, 1e-1, 1.0)]
    assert values[0] > 0.0
    assert all(b > a for a, b in zip(values, values[1:])), values


@pytest.mark.slow
def test_mel_loss_matches_dac_mel_spectrogram_loss():
    """DAC's own `MelSpectrogramLoss` with DAC's training config (conf/base.yml: seven
    scales 32..2048, mag_weight 0, pow 1, clamp 1e-5) on 44.1 kHz audio."""
    dac_loss = import_reference("dac.nn.loss", "descript-audio-codec")
    from audiotools import AudioSignal

    sample_rate = 44100
    prediction = _tone_plus_noise(seed=4, samples=8192)
    target = _tone_plus_noise(seed=5, samples=8192)
    reference = dac_loss.MelSpectrogramLoss(
        n_mels=list(losses.DAC_MEL_N_MELS), window_lengths=list(losses.DAC_MEL_WINDOW_LENGTHS),
        mel_fmin=[0.0] * 7, mel_fmax=[None] * 7, pow=1.0, clamp_eps=1e-5, mag_weight=0.0)
    expected = float(reference(AudioSignal(torch.from_numpy(prediction[:, None]), sample_rate),
                               AudioSignal(torch.from_numpy(target[:, None]), sample_rate)))
    ours = losses.mel_spectrogram_loss(prediction, target, sample_rate=sample_rate)
    assert expected > 0.1
    assert float(ours) == pytest.approx(expected, rel=1e-4)
    # The magnitude term and a power other than 1 (the class defaults) as well.
    reference = dac_loss.MelSpectrogramLoss(n_mels=[20, 40], window_lengths=[128, 512])
    expected = float(reference(AudioSignal(torch.from_numpy(prediction[:, None]), sample_rate),
                               AudioSignal(torch.from_numpy(target[:, None]), sample_rate)))
    ours = losses.mel_spectrogram_loss(prediction, target, sample_rate=sample_rate, n_mels=(20, 40),
                                       window_lengths=(128, 512), mag_weight=1.0, power=2.0)
    assert float(ours) == pytest.approx(expected, rel=1e-4)


def test_mel_loss_bf16_input_float32_output_and_finite_gradient():
    target = _tone_plus_noise(samples=4096)
    prediction = jnp.asarray(target + 0.1, jnp.bfloat16)
    value, grad = jax.jit(jax.value_and_grad(lambda p: losses.mel_spectrogram_loss(p, target, sample_rate=SAMPLE_RATE)))(prediction)
    assert value.dtype == jnp.float32 and float(value) > 0.0
    assert grad.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(grad, np.float32))) and np.any(np.asarray(grad, np.float32) != 0.0)


def test_multi_resolution_stft_loss_matches_parallel_wavegan_formula():
    prediction = _tone_plus_noise(seed=6, samples=4096)
    target = _tone_plus_noise(seed=7, samples=4096)
    same = losses.multi_resolution_stft_loss(target, target)
    assert float(same.spectral_convergence) == 0.0 and float(same.log_magnitude) == 0.0

    sizes, hops, wins = (1024, 256), (120, 50), (600, 240)
    terms = losses.multi_resolution_stft_loss(prediction, target, fft_sizes=sizes, hop_lengths=hops, win_lengths=wins)
    sc_expected, mag_expected = 0.0, 0.0
    for size, hop, win in zip(sizes, hops, wins):
        mags = []
        for audio in (prediction, target):
            spec = torch.stft(torch.from_numpy(audio), size, hop, win, torch.hann_window(win), return_complex=True)
            mags.append(torch.sqrt(torch.clamp(spec.real**2 + spec.imag**2, min=1e-7)))
        x_mag, y_mag = mags
        sc_expected += (torch.norm(y_mag - x_mag, p="fro") / torch.norm(y_mag, p="fro")).item()
        mag_expected += torch.nn.functional.l1_loss(torch.log(y_mag), torch.log(x_mag)).item()
    assert float(terms.spectral_convergence) == pytest.approx(sc_expected / 2, rel=1e-4)
    assert float(terms.log_magnitude) == pytest.approx(mag_expected / 2, rel=1e-4)
    assert float(terms.total) == pytest.approx((sc_expected + mag_expected) / 2, rel=1e-4)


def test_waveform_l1_known_value():
    target = jnp.zeros((2, 10))
    prediction = jnp.concatenate([jnp.full((1, 10), 0.5), jnp.full((1, 10), -1.5)])
    assert float(losses.waveform_l1_loss(prediction, target)) == pytest.approx(1.0)


def test_si_sdr_scaled_copy_is_very_high_and_scale_invariant():
    reference = _tone_plus_noise()
    assert np.all(np.asarray(losses.si_sdr(0.3 * reference, reference)) > 90.0)
    noisy = reference + 0.05 * np.random.default_rng(8).standard_normal(reference.shape).astype(np.float32)
    np.testing.assert_allclose(losses.si_sdr(7.0 * noisy, reference), losses.si_sdr(noisy, reference), atol=1e-3)


@pytest.mark.parametrize("target_db", [0.0, 10.0, 20.0])
def test_si_sdr_known_noise_level(target_db):
    rng = np.random.default_rng(9)
    reference = rng.standard_normal((3, 16000))
    reference -= reference.mean(axis=-1, keepdims=True)
    noise = rng.standard_normal((3, 16000))
    noise -= noise.mean(axis=-1, keepdims=True)
    # Remove the part of the noise along the reference so the distortion is exactly `noise`.
    noise -= (np.sum(noise * reference, -1, keepdims=True) / np.sum(reference**2, -1, keepdims=True)) * reference
    noise *= np.sqrt(np.sum(reference**2, -1, keepdims=True) / np.sum(noise**2, -1, keepdims=True)) * 10 ** (-target_db / 20)
    estimate = (reference + noise).astype(np.float32)
    np.testing.assert_allclose(losses.si_sdr(estimate, reference.astype(np.float32)), target_db, atol=0.01)


# --------------------------------------------------------------------------------------
# Adversarial and feature-matching losses
# --------------------------------------------------------------------------------------


def _outputs(*logit_values, feature_value=0.0, shape=(2, 4, 3, 1)):
    """Discriminator-style output: one [feature, feature, logit] list per value."""
    return [[jnp.full(shape, feature_value), jnp.full(shape, feature_value), jnp.full(shape, value)] for value in logit_values]


def test_least_squares_gan_losses_known_values():
    # A perfect discriminator (real -> 1, fake -> 0) has zero loss.
    assert float(losses.discriminator_adversarial_loss(_outputs(1.0, 1.0), _outputs(0.0, 0.0))) == 0.0
    # real 0.5, fake 0.25: (1 - 0.5)^2 + 0.25^2 = 0.3125 per sub-discriminator, summed over 2.
    value = losses.discriminator_adversarial_loss(_outputs(0.5, 0.5), _outputs(0.25, 0.25))
    assert float(value) == pytest.approx(0.625)
    value = losses.discriminator_adversarial_loss(_outputs(0.5, 0.5), _outputs(0.25, 0.25), reduction="mean")
    assert float(value) == pytest.approx(0.3125)
    # Generator: (1 - 0)^2 + (1 - 3)^2 = 5.
    assert float(losses.generator_adversarial_loss(_outputs(0.0, 3.0))) == pytest.approx(5.0)
    assert float(losses.generator_adversarial_loss(_outputs(1.0, 1.0))) == 0.0


def test_hinge_gan_losses_known_values():
    # Margins satisfied: real >= 1, fake <= -1.
    assert float(losses.discriminator_adversarial_loss(_outputs(2.0), _outputs(-3.0), kind="hinge")) == 0.0
    # relu(1 - 0) + relu(1 + 0.5) = 2.5.
    assert float(losses.discriminator_adversarial_loss(_outputs(0.0), _outputs(0.5), kind="hinge")) == pytest.approx(2.5)
    # Generator: relu(1 - (-1)) + relu(1 - 4) = 2.
    assert float(losses.generator_adversarial_loss(_outputs(-1.0, 4.0), kind="hinge")) == pytest.approx(2.0)


def test_gan_losses_accept_plain_logit_lists_and_mixed_values():
    real = [jnp.array([[1.0, 0.0]]), jnp.array([[2.0]])]
    fake = [jnp.array([[0.0, 1.0]]), jnp.array([[-1.0]])]
    # disc 1: mean((1-r)^2) = 0.5, mean(f^2) = 0.5; disc 2: 1 + 1.
    assert float(losses.discriminator_adversarial_loss(real, fake)) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        losses.discriminator_adversarial_loss(real, fake[:1])


def test_feature_matching_known_values_and_ignores_logits():
    real = _outputs(1.0, 1.0, 1.0, feature_value=0.0)
    assert float(losses.feature_matching_loss(real, real)) == 0.0
    # Logits differ wildly but are not feature maps, so the loss stays zero.
    assert float(losses.feature_matching_loss(real, _outputs(-9.0, 5.0, 0.0, feature_value=0.0))) == 0.0
    fake = _outputs(0.0, 0.0, 0.0, feature_value=0.5)
    # 3 sub-discriminators x 2 feature maps x 0.5.
    assert float(losses.feature_matching_loss(real, fake)) == pytest.approx(3.0)
    assert float(losses.feature_matching_loss(real, fake, reduction="mean")) == pytest.approx(0.5)


def test_feature_matching_gradient_reaches_fake_only():
    real = _outputs(0.0, feature_value=1.0)
    fake = _outputs(0.0, feature_value=0.0)
    grad_real, grad_fake = jax.grad(losses.feature_matching_loss, argnums=(0, 1))(real, fake)
    assert all(float(jnp.abs(g).sum()) == 0.0 for g in jax.tree_util.tree_leaves(grad_real))
    assert float(jnp.abs(grad_fake[0][0]).sum()) > 0.0


def test_weighted_loss_sum():
    rng = np.random.default_rng(0)
    names = ["mel", "adversarial", "commitment", "extra"]
    weights = dict(zip(names, rng.uniform(0.1, 10.0, len(names))))
    values = {name: jnp.float32(v) for name, v in zip(names, rng.uniform(0.0, 5.0, len(names)))}
    expected = sum(weights[k] * float(values[k]) for k in names)
    assert float(losses.weighted_loss_sum(values, weights)) == pytest.approx(expected, rel=1e-6)
    # A subset of the losses combines only those; bf16 inputs are summed in float32.
    subset = {"mel": jnp.bfloat16(2.0), "commitment": jnp.float32(4.0)}
    total = losses.weighted_loss_sum(subset, weights)
    assert total.dtype == jnp.float32
    assert float(total) == pytest.approx(2.0 * weights["mel"] + 4.0 * weights["commitment"], rel=1e-6)
    # Without weights, every default-weighted loss counts with its default weight.
    unit = {name: jnp.float32(1.0) for name in losses.DEFAULT_LOSS_WEIGHTS}
    assert float(losses.weighted_loss_sum(unit)) == pytest.approx(sum(losses.DEFAULT_LOSS_WEIGHTS.values()))
    with pytest.raises(KeyError, match="mell"):
        losses.weighted_loss_sum({"mell": jnp.float32(1.0)})


# --------------------------------------------------------------------------------------
# Balancer
# --------------------------------------------------------------------------------------


def _split_losses():
    """Two losses on disjoint halves of the output whose gradients differ 1000x in norm."""
    half = 64

    def big(y):
        return 1000.0 * jnp.sum(y[:, :half] ** 2)

    def small(y):
        return jnp.sum(y[:, half:] ** 2)

    # Constant output so the 1000x loss scale is exactly the gradient norm ratio.
    output = jnp.full((1, 2 * half), 0.3, jnp.float32)
    return {"big": big, "small": small}, output, half


def test_balancer_gives_each_loss_gradient_norm_proportional_to_weight():
    loss_fns, output, half = _split_losses()
    balancer = Balancer(weights={"big": 1.0, "small": 3.0}, total_norm=2.0)
    state = balancer.init()
    grad, state, metrics = balancer.balance_losses(loss_fns, output, state)
    big_norm = float(jnp.linalg.norm(grad[:, :half]))
    small_norm = float(jnp.linalg.norm(grad[:, half:]))
    raw_big, raw_small = float(metrics["grad_norm/big"]), float(metrics["grad_norm/small"])
    assert raw_big / raw_small == pytest.approx(1000.0, rel=1e-4)
    # After balancing: norms are weight / sum(weights) * total_norm.
    assert big_norm == pytest.approx(0.25 * 2.0, rel=1e-5)
    assert small_norm == pytest.approx(0.75 * 2.0, rel=1e-5)
    assert float(metrics["grad_ratio/big"]) == pytest.approx(1000.0 / 1001.0, rel=1e-5)
    assert float(metrics["loss/small"]) == pytest.approx(float(loss_fns["small"](output)))


def test_balancer_ema_uses_bias_corrected_average_of_norms():
    balancer = Balancer(weights={"a": 1.0}, ema_decay=0.5, per_batch_item=False)
    state = balancer.init()
    _, state, _ = balancer.balance_gradients({"a": jnp.array([[3.0, 4.0]])}, state)  # norm 5
    grad, state, _ = balancer.balance_gradients({"a": jnp.array([[0.0, 10.0]])}, state)  # norm 10
    # EMA: (0.5 * 5 + 10) / (0.5 * 1 + 1) = 25 / 3, so the gradient is scaled by 3 / 25.
    np.testing.assert_allclose(grad, [[0.0, 10.0 * 3.0 / 25.0]], rtol=1e-6)
    assert float(state.weight_ema["a"]) == pytest.approx(1.5)


def test_balancer_per_batch_item_norm_and_plain_weighted_sum():
    grads = {"a": jnp.array([[3.0, 4.0], [0.0, 1.0]]), "b": jnp.ones((2, 2))}
    per_item = Balancer(weights={"a": 1.0, "b": 1.0})
    _, _, metrics = per_item.balance_gradients(grads, per_item.init())
    assert float(metrics["grad_norm/a"]) == pytest.approx((5.0 + 1.0) / 2)
    plain = Balancer(weights={"a": 2.0, "b": 0.5}, rescale_grads=False)
    combined, _, _ = plain.balance_gradients(grads, plain.init())
    np.testing.assert_allclose(combined, 2.0 * grads["a"] + 0.5 * grads["b"])


def test_balancer_reproduces_encodec_reference_test():
    # encodec/balancer.py test(): opposing L1 losses, the second scaled 100x.
    output = jnp.zeros((1,))
    loss_fns = {"1": lambda x: jnp.mean(jnp.abs(x - 1.0)), "2": lambda x: 100.0 * jnp.mean(jnp.abs(x + 1.0))}
    plain = Balancer(weights={"1": 1.0, "2": 1.0}, rescale_grads=False)
    grad, _, _ = plain.balance_losses(loss_fns, output, plain.init())
    np.testing.assert_allclose(grad, [99.0])
    balanced = Balancer(weights={"1": 1.0, "2": 1.0})
    grad, _, _ = balanced.balance_losses(loss_fns, output, balanced.init())
    np.testing.assert_allclose(grad, [0.0], atol=1e-6)


def test_balancer_is_jittable_and_state_is_a_pytree():
    loss_fns, output, half = _split_losses()
    balancer = Balancer(weights={"big": 1.0, "small": 1.0})

    @jax.jit
    def step(y, state):
        return balancer.balance_losses(loss_fns, y, state)

    state = balancer.init()
    for _ in range(3):
        grad, state, _ = step(output, state)
    assert float(state.weight_ema["big"]) == pytest.approx(1.0 + 0.999 + 0.999**2)
    np.testing.assert_allclose(float(jnp.linalg.norm(grad[:, :half])), 0.5, rtol=1e-5)
