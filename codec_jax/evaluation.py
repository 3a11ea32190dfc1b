"""Codec evaluation: the field's quality metrics per file, summaries with intervals, code
statistics and a listening report.

Python API (the `codec-jax eval` command is a thin wrapper around `evaluate_codec`):

    import codec_jax
    from codec_jax import evaluation
    codec = codec_jax.load_pretrained("/models/snac_24khz")
    summary = evaluation.evaluate_codec(codec, ["clips/"], "report/", model_name="snac_24khz")

    # metrics of arrays you already have ([batch, samples] at `sample_rate`):
    values = evaluation.reconstruction_metrics(reference, reconstruction, sample_rate=24000)

Metrics (definitions, modes and rates in docs/evaluation.md):
  mel_distance   DAC's multi-scale log-mel L1 (7 scales, 32..2048-sample windows, summed);
  stft_distance  multi-resolution STFT loss (spectral convergence + log magnitude, DAC's
                 2048/512 windows);
  si_sdr_db      scale-invariant SDR in dB;
  pesq_wb        ITU-T P.862.2 wide-band PESQ (pip `pesq`) on 16 kHz resamples;
  stoi           STOI (pip `pystoi`, classic, not extended);
  visqol         ViSQOL v3 MOS-LQO (pip `visqol-python`): "audio" mode at 48 kHz (music,
                 general audio) or "speech" mode at 16 kHz.

Files of different lengths share a batch: the codec takes each row's length (its codes
and audio are those of the file coded alone), and the spectral metrics and SI-SDR are
computed on the accelerator in one jitted call per batch with each row masked to its own
length, so every figure equals that of the file alone. PESQ, STOI and ViSQOL are CPU
work and run in worker processes while the accelerator codes the next batch.

JAX is imported only inside functions: the perceptual worker processes import this module
and need only numpy.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from codec_jax.errors import UsageError, WorkError

# ---------------------------------------------------------------------------- metric names

SPECTRAL_METRICS = ("mel_distance", "stft_distance", "si_sdr_db")
PERCEPTUAL_METRICS = ("pesq_wb", "stoi", "visqol")
METRICS = SPECTRAL_METRICS + PERCEPTUAL_METRICS
HIGHER_IS_BETTER = {"mel_distance": False, "stft_distance": False, "si_sdr_db": True,
                    "pesq_wb": True, "stoi": True, "visqol": True}
METRIC_LABELS = {"mel_distance": "mel distance", "stft_distance": "STFT distance",
                 "si_sdr_db": "SI-SDR (dB)", "pesq_wb": "PESQ-wb", "stoi": "STOI",
                 "visqol": "ViSQOL MOS-LQO"}

PESQ_RATE = 16000  # P.862.2 wide-band is defined at 16 kHz
VISQOL_RATES = {"audio": 48000, "speech": 16000}  # the rates ViSQOL v3's modes expect
# SI-SDR's eps matches `codec_jax.losses.si_sdr`: a perfect reconstruction gives a large
# finite value (~ 10 log10(energy / eps)) instead of inf, which CSV/JSON cannot hold.
SI_SDR_EPS = 1e-8


def visqol_mode_for(sample_rate: int, mode: str = "auto") -> str:
    """"auto" picks "speech" for codecs at <= 24 kHz (SNAC's 24 kHz model is a speech
    codec) and "audio" above (the 32 and 44.1 kHz models code music and general audio)."""
    if mode == "auto":
        return "speech" if sample_rate <= 24000 else "audio"
    if mode not in VISQOL_RATES:
        raise UsageError(f"ViSQOL mode must be 'auto', 'audio' or 'speech', got {mode!r}")
    return mode


# ------------------------------------------------------------- spectral metrics (jitted)


def min_samples(window_lengths: Sequence[int] | None = None) -> int:
    """Shortest clip the spectral metrics accept: the reflect padding of the largest
    window (2048 samples for DAC's mel scales) needs more than half a window."""
    from codec_jax import losses as L

    longest = max(tuple(window_lengths or L.DAC_MEL_WINDOW_LENGTHS) + L.DAC_STFT_WINDOW_LENGTHS)
    return longest // 2 + 1


def _reflect_pad(audio, lengths, half: int):
    """Per-row reflect padding at each row's own end: `[batch, T] -> [batch, T + 2 half]`.

    Row `b` becomes `reflect(audio[b, :lengths[b]])` followed by junk that only frames past
    the row's last frame read (they are masked out)."""
    import jax.numpy as jnp

    total = audio.shape[1]
    index = jnp.abs(jnp.arange(total + 2 * half) - half)[None, :]  # reflect at the start
    last = lengths[:, None] - 1
    index = jnp.where(index > last, 2 * last - index, index)  # reflect at the row's end
    index = jnp.clip(index, 0, total - 1)
    return jnp.take_along_axis(audio, jnp.broadcast_to(index, (audio.shape[0], index.shape[1])), axis=1)


def _masked_frame_mean(values, frames):
    """Mean of `values [batch, F, bins]` over each row's first `frames[b]` frames."""
    import jax.numpy as jnp

    valid = (jnp.arange(values.shape[1])[None, :] < frames[:, None])[:, :, None]
    return jnp.sum(jnp.where(valid, values, 0.0), axis=(1, 2)) / (frames * values.shape[2])


def _spectral_metrics_impl(reference, estimate, lengths, *, sample_rate: int, mel_window: str):
    """`[batch, T]` x2, lengths `[batch]` -> dict of float32 `[batch]`; see `spectral_metrics`."""
    import jax
    import jax.numpy as jnp

    from codec_jax import losses as L
    from codec_jax.audio.spectral import mel_filterbank, safe_magnitude, stft

    reference = reference.astype(jnp.float32)
    estimate = estimate.astype(jnp.float32)
    batch = reference.shape[0]
    lengths = lengths.astype(jnp.int32)
    both = jnp.concatenate([estimate, reference], axis=0)
    both_lengths = jnp.concatenate([lengths, lengths])
    highest = jax.lax.Precision.HIGHEST

    def magnitudes(n_fft, floor=0.0):
        # center=True framing of each row at its own length: reflect-pad per row, then
        # frame without padding; frames = 1 + length // hop as torch.stft(center=True).
        padded = _reflect_pad(both, both_lengths, n_fft // 2)
        spectrum = stft(padded, n_fft, n_fft // 4, window=mel_window if floor == 0.0 else "hann",
                        center=False)
        frames = 1 + lengths // (n_fft // 4)
        return safe_magnitude(spectrum, floor=floor), frames

    # DAC's MelSpectrogramLoss (see losses.mel_spectrogram_loss): per scale the mean
    # |log10 clamp(mel_est) - log10 clamp(mel_ref)|, summed over scales.
    mel = jnp.zeros((batch,), jnp.float32)
    for window_length, n_mels in zip(L.DAC_MEL_WINDOW_LENGTHS, L.DAC_MEL_N_MELS):
        magnitude, frames = magnitudes(window_length)
        bank = mel_filterbank(sample_rate, window_length, n_mels)
        m = jnp.log10(jnp.maximum(jnp.matmul(magnitude, bank, precision=highest), 1e-5))
        mel = mel + _masked_frame_mean(jnp.abs(m[:batch] - m[batch:]), frames)

    # Multi-resolution STFT loss (losses.multi_resolution_stft_loss) of each file alone:
    # spectral convergence over the file's frames + mean |log magnitude difference|,
    # each averaged over resolutions.
    convergence = jnp.zeros((batch,), jnp.float32)
    log_magnitude = jnp.zeros((batch,), jnp.float32)
    for n_fft in L.DAC_STFT_WINDOW_LENGTHS:
        magnitude, frames = magnitudes(n_fft, floor=1e-7)
        est, ref = magnitude[:batch], magnitude[batch:]
        valid = (jnp.arange(est.shape[1])[None, :] < frames[:, None])[:, :, None]
        diff2 = jnp.sum(jnp.where(valid, (ref - est) ** 2, 0.0), axis=(1, 2))
        ref2 = jnp.sum(jnp.where(valid, ref ** 2, 0.0), axis=(1, 2))
        convergence = convergence + jnp.sqrt(diff2) / jnp.sqrt(ref2)
        log_magnitude = log_magnitude + _masked_frame_mean(jnp.abs(jnp.log(ref) - jnp.log(est)), frames)
    count = len(L.DAC_STFT_WINDOW_LENGTHS)

    # SI-SDR (losses.si_sdr, zero-mean) over each file's own samples.
    valid = jnp.arange(reference.shape[1])[None, :] < lengths[:, None]
    n = lengths.astype(jnp.float32)[:, None]
    r = jnp.where(valid, reference - jnp.sum(jnp.where(valid, reference, 0.0), 1, keepdims=True) / n, 0.0)
    e = jnp.where(valid, estimate - jnp.sum(jnp.where(valid, estimate, 0.0), 1, keepdims=True) / n, 0.0)
    eps = SI_SDR_EPS
    scale = (jnp.sum(e * r, 1, keepdims=True) + eps) / (jnp.sum(r * r, 1, keepdims=True) + eps)
    target = scale * r
    si_sdr = 10.0 * jnp.log10((jnp.sum(target ** 2, 1) + eps) / (jnp.sum((e - target) ** 2, 1) + eps))
    return {"mel_distance": mel, "stft_distance": (convergence + log_magnitude) / count,
            "si_sdr_db": si_sdr}


_SPECTRAL_JIT = None


def spectral_metrics(reference: np.ndarray, estimate: np.ndarray, lengths: Sequence[int] | None = None,
                     *, sample_rate: int, mel_window: str = "hann") -> dict[str, np.ndarray]:
    """Mel distance, STFT distance and SI-SDR per file, float64 `[batch]` each.

    Args:
      reference, estimate: `[batch, samples]`, zero-padded on the right; row `b` is valid
        up to `lengths[b]` (default: all samples). Each file's values equal those of the
        file alone (`losses.mel_spectrogram_loss(estimate[b:b+1, :n], reference[b:b+1, :n])`).
      sample_rate: places the mel filters.
      mel_window: "hann" (this project's training loss) or "sqrt_hann" (bit-for-bit DAC,
        whose audiotools default window is sqrt-Hann).
    """
    import jax
    import jax.numpy as jnp

    global _SPECTRAL_JIT
    if _SPECTRAL_JIT is None:
        _SPECTRAL_JIT = jax.jit(_spectral_metrics_impl, static_argnames=("sample_rate", "mel_window"))
    reference = np.asarray(reference, np.float32)
    estimate = np.asarray(estimate, np.float32)
    if reference.shape != estimate.shape or reference.ndim != 2:
        raise ValueError(f"reference {reference.shape} and estimate {estimate.shape} must both be "
                         "[batch, samples]")
    lengths = np.full(reference.shape[0], reference.shape[1]) if lengths is None else np.asarray(lengths)
    shortest = min_samples()
    if lengths.min() < shortest:
        raise ValueError(f"clips need at least {shortest} samples for the 2048-sample mel window, "
                         f"got {int(lengths.min())}")
    out = _SPECTRAL_JIT(jnp.asarray(reference), jnp.asarray(estimate), jnp.asarray(lengths, jnp.int32),
                        sample_rate=int(sample_rate), mel_window=mel_window)
    return {k: np.asarray(v, np.float64) for k, v in jax.device_get(out).items()}


# ------------------------------------------------------ perceptual metrics (CPU, workers)

_VISQOL_APIS: dict[str, Any] = {}


def _visqol_api(mode: str):
    if mode not in _VISQOL_APIS:
        from visqol import VisqolApi

        api = VisqolApi()
        # Speech mode: the polynomial similarity-to-MOS mapping of ViSQOL v3's speech mode;
        # the deep-lattice mapper would need the TFLite runtime (ai-edge-litert).
        if mode == "speech":
            api.create(mode="speech", use_lattice_model=False)
        else:
            api.create(mode="audio")
        _VISQOL_APIS[mode] = api
    return _VISQOL_APIS[mode]


def _resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    from codec_jax.audio.io import resample

    return np.asarray(resample(np.asarray(x, np.float32), rate, target), np.float64)


def perceptual_metrics_one(reference: np.ndarray, estimate: np.ndarray, sample_rate: int, *,
                           pesq: bool = True, stoi: bool = True,
                           visqol_mode: Optional[str] = None) -> dict[str, float]:
    """PESQ-wb, STOI and ViSQOL of one mono clip (`[samples]` each at `sample_rate`).

    A metric that cannot be computed for this clip (PESQ finds no speech in silence) is
    NaN; the summary counts such files. `visqol_mode=None` skips ViSQOL."""
    reference = np.asarray(reference, np.float64)
    estimate = np.asarray(estimate, np.float64)
    out: dict[str, float] = {}
    if pesq:
        import pesq as pesq_lib

        try:
            with np.errstate(invalid="ignore", divide="ignore"):  # pesq divides silence by its peak
                out["pesq_wb"] = float(pesq_lib.pesq(PESQ_RATE, _resample(reference, sample_rate, PESQ_RATE),
                                                     _resample(estimate, sample_rate, PESQ_RATE), "wb"))
        except pesq_lib.PesqError:  # no utterance found, or a clip too short for P.862
            out["pesq_wb"] = math.nan
    if stoi:
        import warnings

        from pystoi import stoi as stoi_fn

        with warnings.catch_warnings():
            # pystoi warns (and returns 1e-5) when fewer than 30 frames survive its
            # silence removal: report that as "not computable".
            warnings.simplefilter("error", RuntimeWarning)
            try:
                out["stoi"] = float(stoi_fn(reference, estimate, sample_rate, extended=False))
            except RuntimeWarning:
                out["stoi"] = math.nan
    if visqol_mode is not None:
        rate = VISQOL_RATES[visqol_mode]
        api = _visqol_api(visqol_mode)
        try:
            result = api.measure_from_arrays(_resample(reference, sample_rate, rate),
                                             _resample(estimate, sample_rate, rate), rate)
            out["visqol"] = float(result.moslqo)
        except (ValueError, IndexError):
            # visqol-python's ways of saying a clip is shorter than one of its patches
            # (ValueError in audio mode, an IndexError in speech mode, ~0.1 s clips).
            out["visqol"] = math.nan
    return out


def _worker_init() -> None:
    # One thread per worker: the pool already uses every core, and numba (ViSQOL) or
    # BLAS spreading each worker over all cores would oversubscribe them.
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"


def _worker_task(key, reference, estimate, sample_rate, pesq, stoi, visqol_mode):
    return key, perceptual_metrics_one(reference, estimate, sample_rate, pesq=pesq, stoi=stoi,
                                       visqol_mode=visqol_mode)


class PerceptualPool:
    """PESQ/STOI/ViSQOL jobs in worker processes (`workers=0`: in this process).

    `submit(key, reference, estimate)` queues a clip; `results()` waits for all of them
    and returns `{key: {metric: value}}`. Workers are spawned, not forked: a fork of a
    process that runs JAX can deadlock."""

    def __init__(self, sample_rate: int, *, pesq: bool, stoi: bool, visqol_mode: Optional[str],
                 workers: Optional[int] = None, progress: bool = True, desc: str = "perceptual metrics"):
        self.args = (int(sample_rate), bool(pesq), bool(stoi), visqol_mode)
        self.enabled = pesq or stoi or visqol_mode is not None
        workers = (os.cpu_count() or 1) if workers is None else int(workers)
        self.executor = None
        if self.enabled and workers > 0:
            self.executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init)
        self.futures: list[concurrent.futures.Future] = []
        self.done: dict[Any, dict[str, float]] = {}
        self.progress = progress
        self.desc = desc

    def submit(self, key, reference: np.ndarray, estimate: np.ndarray) -> None:
        if not self.enabled:
            return
        if self.executor is None:
            self.done[key] = _worker_task(key, reference, estimate, *self.args)[1]
        else:
            self.futures.append(self.executor.submit(_worker_task, key, np.asarray(reference),
                                                     np.asarray(estimate), *self.args))

    def results(self) -> dict[Any, dict[str, float]]:
        from tqdm import tqdm

        try:
            for future in tqdm(concurrent.futures.as_completed(self.futures), total=len(self.futures),
                               desc=self.desc, disable=not self.progress or not self.futures,
                               file=sys.stderr):
                key, values = future.result()
                self.done[key] = values
        finally:
            self.close()
        return self.done

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None


def reconstruction_metrics(reference, reconstruction, *, sample_rate: int, lengths=None,
                           spectral: bool = True,
                           perceptual: bool = False, pesq: bool = True, stoi: bool = True,
                           visqol: bool = True, visqol_mode: str = "auto",
                           workers: Optional[int] = None) -> dict[str, float]:
    """Batch means of the metrics of `reconstruction` against `reference`.

    The entry point for the trainer's periodic eval and for notebooks.

    Args:
      reference, reconstruction: `[batch, samples]` arrays (numpy or jax).
      sample_rate: their rate in Hz.
      lengths: valid samples per row (default: all).
      spectral: mel distance, STFT distance and SI-SDR.
      perceptual: also PESQ-wb / STOI / ViSQOL (CPU work in `workers` processes; the
        `pesq`, `stoi`, `visqol` switches choose among them).

    Returns:
      `{metric: mean over the batch}`; perceptual means skip clips where the metric is
      undefined (NaN) and `<metric>_undefined` counts them when there are any.
    """
    reference = np.asarray(reference, np.float32)
    reconstruction = np.asarray(reconstruction, np.float32)
    lengths = np.full(reference.shape[0], reference.shape[1]) if lengths is None else np.asarray(lengths)
    out: dict[str, float] = {}
    if spectral:
        per_file = spectral_metrics(reference, reconstruction, lengths, sample_rate=sample_rate)
        out.update({k: float(np.mean(v)) for k, v in per_file.items()})
    if perceptual:
        mode = visqol_mode_for(sample_rate, visqol_mode) if visqol else None
        pool = PerceptualPool(sample_rate, pesq=pesq, stoi=stoi, visqol_mode=mode,
                              workers=min((os.cpu_count() or 1) if workers is None else workers,
                                          len(reference)),
                              progress=False)
        for i, n in enumerate(lengths):
            pool.submit(i, reference[i, :n], reconstruction[i, :n])
        results = pool.results()
        for name in PERCEPTUAL_METRICS:
            values = np.array([results[i][name] for i in range(len(lengths)) if name in results[i]])
            if values.size:
                finite = values[np.isfinite(values)]
                out[name] = float(np.mean(finite)) if finite.size else math.nan
                if finite.size < values.size:
                    out[f"{name}_undefined"] = float(values.size - finite.size)
    return out


# ------------------------------------------------------------------------- statistics


def interval_summary(values: Sequence[float], *, confidence: float = 0.95, resamples: int = 10_000,
                     seed: int = 0) -> dict[str, Any]:
    """n, mean, median, std and a `confidence` interval of the mean.

    The interval is scipy's BCa bootstrap (`scipy.stats.bootstrap`, `resamples` draws,
    fixed `seed`, so it is reproducible). NaN values (metric undefined for that file) are
    left out and counted in `undefined`. With fewer than 2 values there is no interval
    (None); with all values equal it is that value.
    """
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    out: dict[str, Any] = {"n": int(finite.size), "undefined": int(values.size - finite.size)}
    if finite.size == 0:
        out.update(mean=None, median=None, std=None, ci95=None)
        return out
    out.update(mean=float(finite.mean()), median=float(np.median(finite)),
               std=float(finite.std(ddof=1)) if finite.size > 1 else 0.0)
    if finite.size < 2:
        out["ci95"] = None
    elif np.all(finite == finite[0]):
        out["ci95"] = [float(finite[0]), float(finite[0])]
    else:
        from scipy import stats

        result = stats.bootstrap((finite,), np.mean, confidence_level=confidence, n_resamples=resamples,
                                 method="BCa", random_state=np.random.default_rng(seed))
        low, high = result.confidence_interval
        if not (np.isfinite(low) and np.isfinite(high)):  # BCa degenerates on tiny samples
            result = stats.bootstrap((finite,), np.mean, confidence_level=confidence,
                                     n_resamples=resamples, method="percentile",
                                     random_state=np.random.default_rng(seed))
            low, high = result.confidence_interval
        out["ci95"] = [float(low), float(high)]
    return out


def code_statistics(counts: np.ndarray) -> dict[str, float]:
    """Usage statistics of one codebook from its code counts `[codebook_size]`.

    entropy_bits: Shannon entropy of the empirical code distribution in bits per code (the
      rate an ideal entropy coder would need); perplexity = 2**entropy (the effective
      number of codes); headroom_bits = log2(codebook_size) - entropy (what entropy coding
      could save per code); usage = codes used at least once / codebook_size.
    """
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    size = counts.size
    if total <= 0:
        return {"codebook_size": size, "codes": 0, "used": 0, "usage": 0.0, "entropy_bits": 0.0,
                "perplexity": 1.0, "headroom_bits": math.log2(size)}
    p = counts[counts > 0] / total
    entropy = max(0.0, float(-(p * np.log2(p)).sum()))  # no "-0.0" for a single used code
    return {"codebook_size": int(size), "codes": int(total), "used": int(np.count_nonzero(counts)),
            "usage": float(np.count_nonzero(counts) / size), "entropy_bits": entropy,
            "perplexity": float(2.0 ** entropy), "headroom_bits": float(math.log2(size) - entropy)}


# ---------------------------------------------------------------------- inputs and model


def expand_inputs(inputs: Sequence[str]):
    """Files, directories (searched recursively for audio) and `@list.txt` files (one path
    per line, relative to the list's folder; `#` comments) -> `corpus.InputFile`s, as
    `codec-jax encode-corpus` takes them: each with the `relpath` its outputs are named by.
    A missing file, or no file at all, is a UsageError before any work."""
    from codec_jax.audio.io import AUDIO_EXTENSIONS
    from codec_jax.corpus import collect_inputs

    files = collect_inputs(inputs, AUDIO_EXTENSIONS)
    for f in files:
        if not os.path.isfile(f.path):
            raise UsageError(f"{f.path}: no such file")
    if not files:
        raise UsageError(f"no audio files in {' '.join(inputs)}")
    return files


def read_mono(path: str, sample_rate: int) -> np.ndarray:
    """One file -> float32 mono `[samples]` at `sample_rate` (channels averaged)."""
    from codec_jax.audio import io as audio_io

    try:
        decoded = audio_io.read_audio(path, target_sample_rate=sample_rate, dtype="float32", mix=True)
    except audio_io.AudioReadError as e:
        raise WorkError(str(e)) from None
    return decoded.pcm[:, 0]


def model_identity(codec, source: str) -> dict[str, Any]:
    """Where the model came from and a sha256 over its config, quantizer and every
    variable (path, dtype, shape, bytes): two reports with equal hashes evaluated the
    same weights."""
    import jax

    digest = hashlib.sha256()
    config = codec.config.to_dict()
    quantizer = dataclasses.asdict(codec.quantizer)
    digest.update(json.dumps({"config": config, "quantizer": quantizer}, sort_keys=True,
                             default=list).encode())
    leaves = jax.tree_util.tree_flatten_with_path(codec.variables)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        array = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return {"source": source, "sha256": digest.hexdigest(), "config": config,
            "quantizer": quantizer, "sample_rate": codec.sample_rate,
            "n_levels": codec.config.n_levels, "dtype": codec.dtype}


# ------------------------------------------------------------------------ coding files


def _group_length(codec, num_samples: int) -> int:
    """Width a file is batched at: its padded length rounded up to 1, 2, 3, 4, 6, 8, 12,
    ... padding units (at most 50 % padding), so that few shapes compile. The codec's
    per-row `lengths` make each file's codes and audio those of the file alone."""
    config = codec.config
    units = config.padded_length(num_samples) // config.pad_multiple
    bucket = 1
    while bucket < units:
        is_power_of_two = bucket & (bucket - 1) == 0
        bucket = bucket * 3 // 2 if is_power_of_two and bucket >= 2 else bucket * 2 if is_power_of_two else bucket // 3 * 4
    return bucket * config.pad_multiple


def _batch_rows(count: int, batch_size: int) -> int:
    """Rows every batch of a run of `count` files is padded to: the next power of two,
    at most `batch_size`. One row count for the whole run, so that each width bucket
    compiles once: on a GPU each new shape is an autotuned compile of encode, decode and
    the metrics (~10 s each on an H200), which dominated a 37-file evaluation when every
    bucket's partial last batch had a row count of its own."""
    rows = 1
    while rows < count:
        rows *= 2
    return min(max(rows, 1), max(batch_size, count))


def code_batch(codec, audio: np.ndarray, lengths: np.ndarray, levels: Sequence[int]):
    """Encode once, decode with the first `k` levels for each `k` in `levels`.

    Args:
      audio: float32 `[batch, T]`, zero-padded on the right (T a multiple of the codec's
        padding unit); row `b` is valid up to `lengths[b]`.
    Returns:
      (codes: list of int32 `[batch, frames_level]`, {k: float32 `[batch, T]`}).
    """
    import jax

    width = audio.shape[1]
    codes = codec.encode(audio, lengths=lengths)
    recon = {k: codec.decode(codes[:k], lengths=lengths, length=width) for k in levels}
    codes, recon = jax.device_get((codes, recon))
    out = {}
    for k, r in recon.items():
        r = np.asarray(r, np.float32)[:, : audio.shape[1]]
        if r.shape[1] < audio.shape[1]:
            r = np.pad(r, ((0, 0), (0, audio.shape[1] - r.shape[1])))
        out[k] = r
    return [np.asarray(c) for c in codes], out


# -------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class EvalSettings:
    """What `evaluate_codec` measures; the `codec-jax eval` flags map onto these."""

    batch_size: int = 8
    levels: Optional[Sequence[int]] = None  # decoder level counts to sweep; None: 1..L; all L always
    pesq: bool = True
    stoi: bool = True
    visqol: bool = True
    visqol_mode: str = "auto"
    workers: Optional[int] = None  # perceptual worker processes; None: all cores, 0: inline
    rank_by: str = "mel_distance"  # picks the best/median/worst files of the report
    save_audio: bool = False
    bootstrap_resamples: int = 10_000
    seed: int = 0
    report: bool = True
    progress: bool = True


CSV_COLUMNS = ("file", "seconds", "n_levels", "bitrate_bps") + METRICS


def _write_csv(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else
                                 f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items()})
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def evaluate_codec(codec, inputs: Sequence[str], out_dir: str | os.PathLike, *,
                   model_name: str = "", settings: EvalSettings = EvalSettings()) -> dict[str, Any]:
    """Code every input file, measure it, and write the report directory.

    Writes to `out_dir`: `metrics.csv` (one row per file, all levels), `metrics_by_level.csv`
    (one row per file and decoder level count), `summary.json`, `report.html` with its
    PNGs, and with `save_audio` the reconstructions under `audio/`.

    Args:
      codec: a `codec_jax.Codec`.
      inputs: files, directories, `@list.txt` (see `expand_inputs`).
      model_name: path or preset the codec came from (recorded in the summary).

    Returns:
      the summary dict (also written as summary.json).
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    config = codec.config
    sr = codec.sample_rate
    full = config.n_levels
    levels = sorted(set(range(1, full + 1) if settings.levels is None else settings.levels) | {full})
    if levels[0] < 1 or levels[-1] > full:
        raise UsageError(f"levels must be in 1..{full}, got {levels}")
    if settings.rank_by not in METRICS:
        raise UsageError(f"--rank-by must be one of {', '.join(METRICS)}, got {settings.rank_by!r}")
    visqol_mode = visqol_mode_for(sr, settings.visqol_mode) if settings.visqol else None
    inputs_found = expand_inputs(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    audio, kept_files, skipped = [], [], []
    shortest = min_samples()
    for item in tqdm(inputs_found, desc="reading", disable=not settings.progress, file=sys.stderr):
        path = item.path
        x = read_mono(path, sr)
        if x.shape[0] < shortest:
            # Too short for the 2048-sample mel window: left out and listed, not fatal, so
            # one stray clip does not stop a corpus evaluation.
            skipped.append({"file": path, "reason": f"{x.shape[0]} samples, fewer than {shortest}"})
            print(f"codec-jax eval: skipping {path}: {x.shape[0] / sr * 1000:.0f} ms is too short "
                  f"(the metrics need at least {shortest} samples)", file=sys.stderr)
            continue
        audio.append(x)
        kept_files.append(item)
    if not audio:
        raise WorkError(f"every input file is shorter than {shortest} samples at {sr} Hz")
    files = [item.path for item in kept_files]
    names = [os.path.splitext(item.relpath)[0] for item in kept_files]  # unique by construction

    tasks = len(files) * len(levels)
    workers = min(os.cpu_count() or 1, tasks) if settings.workers is None else min(settings.workers, tasks)
    pool = PerceptualPool(sr, pesq=settings.pesq, stoi=settings.stoi, visqol_mode=visqol_mode,
                          workers=workers, progress=settings.progress)
    spectral: dict[tuple[int, int], dict[str, float]] = {}
    kept: dict[int, np.ndarray] = {}  # full-level reconstructions, [samples]
    sizes = codec.quantizer.level_codebook_sizes(config.n_levels, config.codebook_size)
    counts = [np.zeros(size, np.int64) for size in sizes]
    groups: dict[int, list[int]] = {}
    for i, x in enumerate(audio):
        groups.setdefault(_group_length(codec, x.shape[0]), []).append(i)
    batches = [(length, members[j:j + settings.batch_size]) for length, members in sorted(groups.items())
               for j in range(0, len(members), settings.batch_size)]
    rows = _batch_rows(len(audio), settings.batch_size)
    try:
        with tqdm(total=len(files), desc="coding", disable=not settings.progress, file=sys.stderr) as bar:
            for length, members in batches:
                batch = np.zeros((rows, length), np.float32)
                lengths = np.full(rows, length)
                for r, i in enumerate(members):
                    batch[r, : audio[i].shape[0]] = audio[i]
                    lengths[r] = audio[i].shape[0]
                codes, recon = code_batch(codec, batch, lengths, levels)
                for level, c in enumerate(codes):
                    for r, i in enumerate(members):
                        # Frames that cover the file's own samples, not the padding.
                        valid = math.ceil(lengths[r] / (config.hop_length * config.vq_strides[level]))
                        counts[level] += np.bincount(c[r, :valid], minlength=sizes[level])
                for k in levels:
                    values = spectral_metrics(batch, recon[k], lengths, sample_rate=sr)
                    for r, i in enumerate(members):
                        spectral[(i, k)] = {m: float(values[m][r]) for m in SPECTRAL_METRICS}
                        pool.submit((i, k), audio[i], recon[k][r, : lengths[r]])
                for r, i in enumerate(members):
                    kept[i] = recon[full][r, : lengths[r]]
                    if settings.save_audio:
                        _save_wav(out / "audio" / f"{names[i]}.wav", kept[i], sr)
                bar.update(len(members))
        perceptual = pool.results()
    finally:
        pool.close()

    rows_by_level = []
    for i, path in enumerate(files):
        for k in levels:
            row = {"file": path, "seconds": round(audio[i].shape[0] / sr, 4), "n_levels": k,
                   "bitrate_bps": _bitrate(codec, k)}
            row.update({m: math.nan for m in METRICS})
            row.update(spectral[(i, k)])
            row.update(perceptual.get((i, k), {}))
            rows_by_level.append(row)
    rows = [r for r in rows_by_level if r["n_levels"] == full]
    enabled = [m for m in METRICS if m in SPECTRAL_METRICS
               or (m == "pesq_wb" and settings.pesq) or (m == "stoi" and settings.stoi)
               or (m == "visqol" and visqol_mode is not None)]

    def stats(selected):
        return {m: interval_summary([r[m] for r in selected], resamples=settings.bootstrap_resamples,
                                    seed=settings.seed) for m in enabled}

    frame_rate = sr / config.hop_length
    level_stats = []
    for level, c in enumerate(counts):
        s = code_statistics(c)
        s["level"] = level
        s["frame_rate_hz"] = frame_rate / config.vq_strides[level]
        level_stats.append(s)
    summary = {
        "model": model_identity(codec, model_name),
        "files": len(files),
        "skipped": skipped,
        "total_seconds": float(sum(x.shape[0] for x in audio) / sr),
        "metrics": stats(rows),
        "by_level": {str(k): {"bitrate_bps": _bitrate(codec, k),
                              "metrics": stats([r for r in rows_by_level if r["n_levels"] == k])}
                     for k in levels},
        "codes": {
            "levels": level_stats,
            "nominal_bitrate_bps": _bitrate(codec),
            # What an ideal entropy coder of each level's empirical code distribution would
            # need (a lower bound for a static per-level code).
            "entropy_bitrate_bps": float(sum(s["entropy_bits"] * s["frame_rate_hz"] for s in level_stats)),
        },
        "settings": {
            "mel_distance": "DAC multi-scale log-mel L1, windows 32..2048 (hop window/4), "
                            "5..320 Slaney mels, hann window, scales summed",
            "stft_distance": "multi-resolution STFT loss, windows 2048/512 (hop /4): "
                             "spectral convergence + mean |log magnitude| difference",
            "si_sdr_db": "scale-invariant SDR, zero-mean, eps 1e-8",
            "pesq_wb": f"ITU-T P.862.2 wide-band (pip pesq) at {PESQ_RATE} Hz (soxr HQ resample)"
                       if settings.pesq else "off",
            "stoi": f"classic STOI (pip pystoi) from {sr} Hz" if settings.stoi else "off",
            "visqol": (f"ViSQOL v3 {visqol_mode} mode at {VISQOL_RATES[visqol_mode]} Hz (pip visqol-python"
                       + (", polynomial speech mapping)" if visqol_mode == "speech" else ", SVR model)"))
                      if visqol_mode else "off",
            "visqol_mode": visqol_mode,
            "intervals": f"95% BCa bootstrap of the mean ({settings.bootstrap_resamples} resamples, "
                         f"seed {settings.seed}); NaN (undefined) values excluded and counted",
            "decoder_noise": "off (rng=None)",
            "levels": levels,
            "rank_by": settings.rank_by,
        },
        "seconds_taken": None,
    }
    _write_csv(out / "metrics.csv", rows)
    _write_csv(out / "metrics_by_level.csv", rows_by_level)
    if settings.report:
        from codec_jax import evaluation_report

        evaluation_report.write_report(out, summary, rows, rows_by_level, audio, kept, names,
                                       sample_rate=sr, rank_by=settings.rank_by, metrics=enabled)
    summary["seconds_taken"] = round(time.perf_counter() - t_start, 2)
    _write_text(out / "summary.json", json.dumps(summary, indent=2, allow_nan=False, default=_json_default))
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """A few lines for the terminal: each metric's mean [95 % interval] and code usage."""
    lines = [f"{summary['files']} files, {summary['total_seconds']:.1f} s, "
             f"{summary['codes']['nominal_bitrate_bps'] / 1000:.2f} kbps "
             f"({summary['codes']['entropy_bitrate_bps'] / 1000:.2f} kbps entropy-coded)"]
    for name, s in summary["metrics"].items():
        if s["mean"] is None:
            lines.append(f"  {METRIC_LABELS[name]:<16} undefined for every file")
            continue
        ci = s["ci95"]
        interval = f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else ""
        extra = f" ({s['undefined']} undefined)" if s["undefined"] else ""
        lines.append(f"  {METRIC_LABELS[name]:<16} {s['mean']:.4g}{interval}{extra}")
    usage = ", ".join(f"L{s['level']} {s['usage']:.0%} / {s['entropy_bits']:.2f} b"
                      for s in summary["codes"]["levels"])
    lines.append(f"  codes used / entropy: {usage}")
    return "\n".join(lines)


def _bitrate(codec, n_levels: Optional[int] = None) -> float:
    """Bits per second of the codec's first `n_levels` levels (the project's one formula,
    with the quantizer's per-level codebook sizes)."""
    from codec_jax.nn.quantizer import bitrate

    return float(bitrate(codec.config, n_levels, quantizer=codec.quantizer))


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _save_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    sf.write(tmp, np.clip(audio, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    os.replace(tmp, path)
