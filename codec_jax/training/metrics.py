"""Training metrics: aggregation, TensorBoard/JSONL writing, console progress, images.

TensorBoard files are written with tensorboardX. clu's metric writers were the plan,
but clu 0.0.12 (the newest release) imports TensorFlow as soon as
`clu.metric_writers` is imported, and this project does not depend on TensorFlow. The
writers below keep clu's method names (`write_scalars`, `write_images`,
`write_audios`, `flush`, `close`) so that a clu writer could stand in for them.

`create_writer` gives process 0 the real writers and every other process a
`MultiWriter` of none, so the training loop needs no `if` around logging. Every file
goes through `etils.epath`, so the workdir may be a bucket (`gs://...`).
"""

from __future__ import annotations

import io
import json
import math
import struct
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from codec_jax.paths import as_path, is_remote

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


@jax.jit
def _stack_steps(history: Sequence[Mapping[str, jax.Array]]) -> dict[str, jax.Array]:
    # One small program per interval length (all but the last interval share it).
    return jax.tree_util.tree_map(lambda *values: jnp.stack(values), *history)


def fetch_history(history: Sequence[Mapping[str, jax.Array]]) -> list[dict[str, np.ndarray]]:
    """An interval's per-step metric dicts (device scalars) as host values, for `aggregate`.

    `jax.device_get(history)` copies every scalar of every step on its own: ~30 metrics x
    100 steps are 3000 device-to-host copies while the accelerator waits for the next
    step. Stacked on the device first, the interval is one copy per metric.
    """
    if not history:
        return []
    stacked = jax.device_get(_stack_steps(list(history)))
    return [{key: values[i] for key, values in stacked.items()} for i in range(len(history))]


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


class TensorBoardWriter:
    """TensorBoard event files written by tensorboardX: scalars, images, audio, text, histograms.

    `logdir` may be local or any etils.epath URL; remote event files go through
    `_EpathEventFile` (tensorboardX's own `gs://` writer would need google-cloud-storage
    and credentials of its own).
    """

    def __init__(self, logdir: str | epath.Path):
        from tensorboardX import SummaryWriter

        logdir = as_path(logdir)
        if is_remote(logdir):
            _register_epath_event_files(str(logdir).split("://", 1)[0])
        else:
            logdir.mkdir(parents=True, exist_ok=True)
        self._tb = SummaryWriter(str(logdir), flush_secs=30)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for key, value in scalars.items():
            self._tb.add_scalar(key, float(value), int(step))

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """images uint8 `[height, width, channels]` or `[n, height, width, channels]`."""
        for key, value in images.items():
            value = np.asarray(value)
            if value.ndim == 3:
                self._tb.add_image(key, value, int(step), dataformats="HWC")
            else:
                self._tb.add_images(key, value, int(step), dataformats="NHWC")

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        """audios float `[n, samples, channels]` (clu's layout) in [-1, 1]; mono only,
        the first of the `n` clips (TensorBoard shows one clip per tag and step)."""
        for key, value in audios.items():
            clip = np.clip(np.asarray(value, np.float32)[0, :, 0], -1.0, 1.0)
            self._tb.add_audio(key, clip, int(step), sample_rate=int(sample_rate))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for key, value in texts.items():
            self._tb.add_text(key, value, int(step))

    def flush(self) -> None:
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()


class JsonlWriter:
    """Scalars as `{"step": 10, "train/loss/mel": 3.2, ...}` lines in one JSON-lines file
    (easy to read back in a notebook or a test); everything else is ignored.

    Non-finite values are written as the strings "nan", "inf", "-inf" (JSON has no
    such numbers). A local file gets each row appended at once. Buckets cannot append, so
    for a remote path the existing lines are read once and the whole object is
    rewritten at each `flush` that has new lines (a few hundred kB over a long run);
    the loop flushes at every eval and checkpoint.
    """

    def __init__(self, path: str | epath.Path):
        self.path = as_path(path)
        self._remote = is_remote(self.path)
        self._pending: list[str] = []
        self._written = ""
        if self._remote:
            if self.path.exists():
                self._written = self.path.read_text()
            if self._written and not self._written.endswith("\n"):
                self._written += "\n"
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        row: dict[str, Any] = {"step": int(step)}
        for key, value in scalars.items():
            value = float(value)
            row[key] = value if math.isfinite(value) else str(value)
        self._pending.append(json.dumps(row) + "\n")
        if not self._remote:
            self.flush()  # a local append is cheap: every row is on disk at once

    def flush(self) -> None:
        if not self._pending:
            return
        new, self._pending = "".join(self._pending), []
        if self._remote:
            self._written += new
            self.path.write_text(self._written)
        else:
            with self.path.open("a") as f:
                f.write(new)

    def close(self) -> None:
        self.flush()

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        pass

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        pass

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        pass


class MultiWriter:
    """Forwards every call to each of `writers` (none: a writer that writes nothing)."""

    def __init__(self, writers: Sequence[Any] = ()):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_images(step, images)

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        for w in self.writers:
            w.write_audios(step, audios, sample_rate=sample_rate)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for w in self.writers:
            w.write_texts(step, texts)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


def create_writer(workdir: str | epath.Path, *, enabled: bool = True,
                  jsonl: bool = True) -> MultiWriter:
    """TensorBoard (`workdir/tensorboard`) and, with `jsonl`, `workdir/metrics.jsonl`;
    a writer that writes nothing when not `enabled` (the processes other than 0 of a
    multi-host run)."""
    if not enabled:
        return MultiWriter()
    workdir = as_path(workdir)
    writers: list[Any] = [TensorBoardWriter(workdir / "tensorboard")]
    if jsonl:
        writers.append(JsonlWriter(workdir / "metrics.jsonl"))
    return MultiWriter(writers)


class _EpathEventFile:
    """A TensorBoard event file on an object store, written through etils.epath.

    Objects cannot be appended to, so the file's bytes are kept and the whole object is
    rewritten at each flush (what tensorboardX's own GCS writer does). Past
    `max_bytes` the writer continues, at the next record, in a new object `<name>.0001`, `<name>.0002`, ...
    (TensorBoard reads every `*tfevents*` file of a directory in name order), so each
    flush rewrites at most `max_bytes` however long the run.
    """

    def __init__(self, path: str, max_bytes: int):
        self.base, self.part, self.max_bytes = path, 0, max_bytes
        self.buffer = io.BytesIO()
        self.closed = False
        self._record_left = 0  # bytes of the current TFRecord still to come

    def _path(self) -> epath.Path:
        return epath.Path(self.base if self.part == 0 else f"{self.base}.{self.part:04d}")

    def write(self, data: bytes) -> None:
        # tensorboardX writes a record as 4 pieces, the first its 8-byte length (TFRecord
        # framing: length, crc, data, crc); a new part may only start there.
        if self._record_left == 0:
            if self.buffer.tell() >= self.max_bytes:
                self.flush()
                self.part += 1
                self.buffer = io.BytesIO()
            (length,) = struct.unpack("<Q", data[:8])
            self._record_left = 8 + 4 + length + 4
        self.buffer.write(data)
        self._record_left -= len(data)

    def flush(self) -> None:
        if self.buffer.tell():
            self._path().write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


# Size of one remote event-file object (each flush rewrites the current one).
REMOTE_EVENT_PART_BYTES = 16 * 2 ** 20


class _EpathEventFileFactory:
    def open(self, path: str) -> _EpathEventFile:
        return _EpathEventFile(path, REMOTE_EVENT_PART_BYTES)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _register_epath_event_files(scheme: str) -> None:
    """Route tensorboardX's event files under `scheme://` through etils.epath."""
    from tensorboardX import record_writer

    record_writer.register_writer_factory(scheme, _EpathEventFileFactory())


def finite_or_none(audio: np.ndarray) -> Optional[str]:
    """None if every sample of `audio` is finite, else a short description of what is not."""
    audio = np.asarray(audio)
    bad = ~np.isfinite(audio)
    if not bad.any():
        return None
    return (f"{int(bad.sum())} of {audio.size} samples are non-finite "
            f"({int(np.isnan(audio).sum())} NaN)")


def spectrogram_image(audio: np.ndarray, n_fft: int = 512, hop: Optional[int] = None,
                      dynamic_range_db: float = 80.0, colormap: str = "magma") -> np.ndarray:
    """Log-magnitude spectrogram picture of one clip: float `[samples]` -> uint8
    `[n_fft // 2 + 1, frames, 3]`, low frequencies at the bottom, 0 dB at the clip's
    peak, coloured with a matplotlib colormap.

    Raises:
      ValueError: the clip holds NaN or inf samples (a diverged model); there is no
        meaningful picture of it.
    """
    from matplotlib import colormaps

    audio = np.asarray(audio, np.float32)
    problem = finite_or_none(audio)
    if problem is not None:
        raise ValueError(f"no spectrogram of a clip with non-finite audio: {problem}")
    hop = hop or n_fft // 4
    if audio.shape[0] < n_fft:
        audio = np.pad(audio, (0, n_fft - audio.shape[0]))
    frames = 1 + (audio.shape[0] - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    window = np.hanning(n_fft + 1)[:-1].astype(np.float32)
    mag = np.abs(np.fft.rfft(audio[idx] * window, axis=-1)).T  # [freq, frames]
    db = 20 * np.log10(np.maximum(mag, 1e-8))
    db = db - db.max()
    rgba = colormaps[colormap](np.clip((db + dynamic_range_db) / dynamic_range_db, 0.0, 1.0),
                               bytes=True)
    return np.ascontiguousarray(rgba[::-1, :, :3])


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
