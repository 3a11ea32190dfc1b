"""Training metrics: aggregation, TensorBoard/JSONL writing, console progress, images.

TensorBoard files are written with tensorboardX (clu's writers need TensorFlow, which
this project does not depend on). Only process 0 writes; every other process gets a
writer whose methods do nothing, so the training loop needs no `if` around logging.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

# Per-step metrics that are counts over the interval rather than averages.
_SUMMED = ("skipped",)
# Metrics that describe the latest state, not the interval.
_LATEST = ("skipped_total", "consecutive_skips")


def aggregate(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Combine per-step metric dicts (host numpy scalars) over a logging interval.

    Counts (`skipped`) are summed, state counters (`skipped_total`, `consecutive_skips`)
    take the last value, and everything else is averaged over the steps whose value is
    finite, so one skipped (NaN) step does not turn the interval's mean into NaN.
    A metric that is non-finite on every step stays NaN, which is what it should show.
    """
    if not history:
        return {}
    out: dict[str, float] = {}
    for key in history[-1]:
        values = np.asarray([float(np.asarray(h[key])) for h in history if key in h], np.float64)
        if key in _SUMMED:
            out[key] = float(values.sum())
        elif key in _LATEST:
            out[key] = float(values[-1])
        else:
            finite = values[np.isfinite(values)]
            out[key] = float(finite.mean()) if finite.size else float("nan")
    return out


def device_memory() -> dict[str, float]:
    """Memory of the first local device in GiB (`bytes_in_use`, `peak_bytes_in_use`);
    empty where the backend does not report it (CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without the API
        return {}
    if not stats:
        return {}
    out = {}
    for key in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit"):
        if key in stats:
            out[f"memory/{key.replace('bytes_', '')}_gib"] = stats[key] / 2 ** 30
    return out


class MetricWriter:
    """Scalars, audio and images to TensorBoard (`workdir/tensorboard`) and scalars to
    `workdir/metrics.jsonl` (one JSON object per logged step, easy to read back)."""

    def __init__(self, workdir: str, *, enabled: bool = True, jsonl: bool = True):
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)
        if jsonl:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for key, value in values.items():
            name = f"{prefix}{key}"
            value = float(value)
            self._tb.add_scalar(name, value, int(step))
            row[name] = value if math.isfinite(value) else str(value)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(row) + "\n")
            self._jsonl.flush()

    def audio(self, step: int, name: str, audio: np.ndarray, sample_rate: int) -> None:
        """audio float `[samples]` in [-1, 1]."""
        if self.enabled:
            clip = np.clip(np.asarray(audio, np.float32), -1.0, 1.0)
            self._tb.add_audio(name, clip, int(step), sample_rate=int(sample_rate))

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        """image uint8 `[height, width, 3]`."""
        if not self.enabled:
            return
        # tensorboardX's add_image needs PIL only to PNG-encode; encode here instead.
        from tensorboardX.proto.summary_pb2 import Summary

        image = np.ascontiguousarray(image, np.uint8)
        height, width, channels = image.shape
        proto = Summary.Image(height=height, width=width, colorspace=channels,
                              encoded_image_string=encode_png(image))
        summary = Summary(value=[Summary.Value(tag=name, image=proto)])
        self._tb._get_file_writer().add_summary(summary, int(step))

    def text(self, step: int, name: str, text: str) -> None:
        if self.enabled:
            self._tb.add_text(name, text, int(step))

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            if self._jsonl is not None:
                self._jsonl.close()
            self.enabled = False


# A 5-point approximation of matplotlib's "magma" colormap (matplotlib is not a
# dependency); interpolated linearly in RGB.
_MAGMA = np.array([[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]],
                  np.float32)


def colorize(values: np.ndarray) -> np.ndarray:
    """values in [0, 1], any shape -> uint8 RGB `[..., 3]`."""
    x = np.clip(values, 0.0, 1.0) * (len(_MAGMA) - 1)
    lo = np.floor(x).astype(np.int64)
    hi = np.minimum(lo + 1, len(_MAGMA) - 1)
    frac = (x - lo)[..., None]
    return (_MAGMA[lo] * (1 - frac) + _MAGMA[hi] * frac).astype(np.uint8)


def spectrogram_image(audio: np.ndarray, n_fft: int = 512, hop: Optional[int] = None,
                      dynamic_range_db: float = 80.0) -> np.ndarray:
    """Log-magnitude spectrogram picture of one clip: float `[samples]` -> uint8
    `[n_fft // 2 + 1, frames, 3]`, low frequencies at the bottom, 0 dB at the clip's peak."""
    audio = np.asarray(audio, np.float32)
    hop = hop or n_fft // 4
    if audio.shape[0] < n_fft:
        audio = np.pad(audio, (0, n_fft - audio.shape[0]))
    frames = 1 + (audio.shape[0] - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)
    mag = np.abs(np.fft.rfft(audio[idx] * window, axis=-1)).T  # [freq, frames]
    db = 20 * np.log10(np.maximum(mag, 1e-8))
    db = db - db.max()
    return colorize((db + dynamic_range_db) / dynamic_range_db)[::-1]


def encode_png(image: np.ndarray) -> bytes:
    """uint8 RGB `[height, width, 3]` -> PNG file bytes (no imaging library needed)."""
    import struct
    import zlib

    height, width, channels = image.shape
    if channels != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected uint8 [height, width, 3], got {image.dtype} {image.shape}")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    # Each row is prefixed with filter type 0 (none).
    raw = np.concatenate([np.zeros((height, 1), np.uint8), image.reshape(height, -1)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Throughput:
    """Step time and audio throughput over the steps since the last `reset`.

    The first interval of a run includes compilation; `reset` after the first step
    keeps that out of the reported speed.
    """

    def __init__(self, audio_seconds_per_step: float):
        self.audio_seconds_per_step = audio_seconds_per_step
        self.reset(0)

    def reset(self, step: int) -> None:
        self._t0 = time.perf_counter()
        self._step0 = step

    def rates(self, step: int) -> dict[str, float]:
        dt = time.perf_counter() - self._t0
        steps = step - self._step0
        if steps <= 0 or dt <= 0:
            return {}
        return {
            "perf/step_time_s": dt / steps,
            "perf/steps_per_s": steps / dt,
            "perf/audio_seconds_per_s": steps * self.audio_seconds_per_step / dt,
        }


def progress_line(step: int, total: int, metrics: Mapping[str, float],
                  keys: Sequence[tuple[str, str]] = (("loss/mel", "mel"),
                                                     ("loss/generator", "gen"),
                                                     ("loss/discriminator", "disc"),
                                                     ("grad_norm/generator", "|g|"))) -> str:
    """`step 120/1000 (12.0%) | mel 3.210 | ... | 0.41 s/step | 12.3 audio-s/s | ETA 6m01s`."""
    parts = [f"step {step}/{total} ({100.0 * step / max(total, 1):.1f}%)"]
    for key, label in keys:
        if key in metrics:
            parts.append(f"{label} {metrics[key]:.4g}")
    skipped = metrics.get("skipped", 0)
    if skipped:
        parts.append(f"skipped {int(skipped)}")
    step_time = metrics.get("perf/step_time_s")
    if step_time:
        parts.append(f"{step_time:.3g} s/step")
        parts.append(f"{metrics['perf/audio_seconds_per_s']:.3g} audio-s/s")
        parts.append(f"ETA {format_duration((total - step) * step_time)}")
    return " | ".join(parts)
