"""Audio file discovery, decoding, resampling and PCM conversion.

Everything here is plain numpy + soundfile + soxr so that it can run in the
dataset-building worker processes without importing JAX or TFDS.

Conventions:
  * audio arrays are `[samples, channels]` (soundfile's layout);
  * float audio is in [-1, 1) with the same int16 <-> float scale soundfile
    uses (1/32768), so `pcm16_to_float(file read as int16)` equals
    `soundfile.read(file, dtype="float32")` bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import soundfile as sf
import soxr

# Extensions libsndfile (>= 1.1, the one bundled with soundfile wheels) decodes.
# Matching is case-insensitive. .opus is Ogg/Opus, which libsndfile reads too.
AUDIO_EXTENSIONS: tuple[str, ...] = (
    ".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff",
)

# Every format this libsndfile reads, by its usual extensions (header-less RAW excluded:
# it cannot be decoded without being told its layout).
_FORMAT_EXTENSIONS = {
    "AIFF": (".aif", ".aiff", ".aifc"), "AU": (".au", ".snd"), "AVR": (".avr",),
    "CAF": (".caf",), "FLAC": (".flac",), "HTK": (".htk",), "SVX": (".iff", ".svx"),
    "MAT4": (".mat",), "MAT5": (".mat",), "MPC2K": (".mpc",), "MP3": (".mp3",),
    "OGG": (".ogg", ".oga", ".opus"), "PAF": (".paf",), "PVF": (".pvf",), "RF64": (".rf64",),
    "SD2": (".sd2",), "SDS": (".sds",), "IRCAM": (".sf", ".ircam"), "VOC": (".voc",),
    "W64": (".w64",), "WAV": (".wav",), "WAVEX": (".wav",), "NIST": (".nist", ".sph"),
    "WVE": (".wve",), "XI": (".xi",),
}
SOUNDFILE_EXTENSIONS: tuple[str, ...] = tuple(sorted(
    {e for fmt in sf.available_formats() for e in _FORMAT_EXTENSIONS.get(fmt, ())}
    | set(AUDIO_EXTENSIONS)))

_PCM16_SCALE = 32768.0


class AudioReadError(Exception):
    """A file that cannot be used as training audio; `reason` is one short line."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class DecodedAudio:
    """One decoded (and possibly resampled) file.

    Attributes:
      pcm: int16 (or float32 with `read_audio(dtype="float32")`) `[samples, channels]`,
        at `sample_rate`; one channel when read with `mix=True`.
      sample_rate: rate of `pcm` (the target rate after resampling).
      original_sample_rate: rate stored in the source file.
    """

    pcm: np.ndarray
    sample_rate: int
    original_sample_rate: int

    @property
    def channels(self) -> int:
        return int(self.pcm.shape[1])

    @property
    def duration(self) -> float:
        return self.pcm.shape[0] / self.sample_rate


def find_audio_files(
    root: str | os.PathLike, extensions: Sequence[str] = AUDIO_EXTENSIONS
) -> list[str]:
    """All audio files under `root` (recursive), as sorted paths relative to root.

    Sorting makes the file list, hence keys and splits, independent of the
    directory enumeration order of the filesystem.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"audio folder {root!r} does not exist or is not a directory")
    exts = tuple(e.lower() for e in extensions)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden folders are editor/OS clutter (.git, .Trash); skip them.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            if fn.startswith("."):  # e.g. macOS "._foo.wav" resource forks
                continue
            if fn.lower().endswith(exts):
                found.append(os.path.relpath(os.path.join(dirpath, fn), root))
    return sorted(found)


def float_to_pcm16(x: np.ndarray) -> np.ndarray:
    """float `[..]` in [-1, 1) -> int16 with rounding and clipping."""
    y = np.rint(np.asarray(x, np.float32) * _PCM16_SCALE)
    return np.clip(y, -32768, 32767).astype(np.int16)


def pcm16_to_float(x: np.ndarray) -> np.ndarray:
    """int16 `[..]` -> float32 in [-1, 1) (soundfile's scale)."""
    return np.asarray(x, np.int16).astype(np.float32) * np.float32(1.0 / _PCM16_SCALE)


def resample(x: np.ndarray, in_rate: int, out_rate: int, quality: str = "HQ") -> np.ndarray:
    """Resamples float `[samples, channels]` (or `[samples]`) with soxr."""
    if in_rate == out_rate:
        return x
    return soxr.resample(np.ascontiguousarray(x, np.float32), in_rate, out_rate, quality=quality)


def read_audio(
    path: str,
    *,
    target_sample_rate: int | None,
    min_seconds: float = 0.0,
    resample_quality: str = "HQ",
    dtype: str = "int16",
    mix: bool = False,
) -> DecodedAudio:
    """Decodes one file to `[samples, channels]` at `target_sample_rate`.

    The one reader of the project: the dataset builder stores int16, the codec commands
    code float32 (`dtype="float32"`), mixed to mono by the mean of the channels
    (`mix=True`) or one stream per channel.

    Args:
      path: file to read (anything libsndfile decodes).
      target_sample_rate: output rate; None keeps the file's own rate.
      min_seconds: files shorter than this (after decoding) are rejected.
      resample_quality: soxr quality ("QQ", "LQ", "MQ", "HQ", "VHQ").
      dtype: "int16" (PCM, clipped) or "float32" (no clipping).
      mix: average the channels into one.

    Raises:
      AudioReadError: unreadable, empty, truncated, non-finite or too short; the message
        says which, so that a build report can name it.
    """
    if dtype not in ("int16", "float32"):
        raise ValueError(f"dtype must be 'int16' or 'float32', got {dtype!r}")
    if os.path.isdir(path):
        raise AudioReadError(path, "is a directory, not an audio file")
    try:
        if os.path.getsize(path) == 0:
            raise AudioReadError(path, "empty file (0 bytes)")
    except OSError as e:
        raise AudioReadError(path, f"cannot open ({e.strerror or e})") from None
    # One open for the header and the samples: a second open (sf.info, then sf.read) was
    # ~15 % of a short Vorbis file's decoding cost, and the corpus job is bound by it.
    try:
        handle = sf.SoundFile(path)
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/TypeError
        raise AudioReadError(path, f"unreadable ({_one_line(e, path)})") from None
    with handle:
        if handle.frames == 0 or handle.channels == 0:
            raise AudioReadError(path, "empty or truncated (0 readable samples)")
        declared = _declared_wav_frames(path) if handle.format in ("WAV", "WAVEX") else None
        rate = int(handle.samplerate)
        out_rate = rate if target_sample_rate is None else int(target_sample_rate)
        # 16-bit PCM at the target rate is copied verbatim (no float round trip),
        # so stored samples are exactly the file's samples.
        exact = dtype == "int16" and not (mix and handle.channels > 1) and (
            handle.subtype == "PCM_16" and rate == out_rate)
        try:
            data = handle.read(dtype="int16" if exact else "float32", always_2d=True)
        except Exception as e:
            raise AudioReadError(path, f"corrupt ({_one_line(e, path)})") from None
    if data.shape[0] == 0:
        raise AudioReadError(path, "empty (0 samples decoded)")
    # libsndfile silently shortens a cut-off WAV to the bytes present; the header says
    # how many frames the writer meant. Compressed formats fail to decode instead.
    if declared is not None and data.shape[0] < declared:
        raise AudioReadError(
            path, f"truncated ({data.shape[0]} of {declared} declared frames readable)")
    if exact:
        pcm = np.ascontiguousarray(data)
    else:
        if not np.all(np.isfinite(data)):
            raise AudioReadError(path, "corrupt (NaN or infinite samples)")
        if mix and data.shape[1] > 1:
            data = data.mean(axis=1, keepdims=True)
        data = resample(data, rate, out_rate, quality=resample_quality)
        if data.ndim == 1:
            data = data[:, None]
        pcm = float_to_pcm16(data) if dtype == "int16" else np.ascontiguousarray(data, np.float32)
    if pcm.shape[0] == 0:
        raise AudioReadError(path, "empty after resampling")
    if pcm.shape[0] < min_seconds * out_rate:
        raise AudioReadError(
            path, f"too short ({pcm.shape[0] / out_rate:.3f} s < {min_seconds} s)"
        )
    return DecodedAudio(pcm=pcm, sample_rate=out_rate, original_sample_rate=rate)


def _declared_wav_frames(path: str) -> int | None:
    """Frames the RIFF header of a WAV file declares, or None when it does not say.

    Walks the chunks up to `data`; streaming writers put 0 or 0xFFFFFFFF there (unknown).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return None
            block_align = None
            while True:
                chunk = f.read(8)
                if len(chunk) < 8:
                    return None
                cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if cid == b"fmt ":
                    fmt = f.read(size)
                    if len(fmt) < 16:
                        return None
                    block_align = struct.unpack("<H", fmt[12:14])[0]
                    f.seek(size % 2, os.SEEK_CUR)
                elif cid == b"data":
                    if not block_align or size in (0, 0xFFFFFFFF):
                        return None
                    return size // block_align
                else:
                    f.seek(size + size % 2, os.SEEK_CUR)
    except OSError:
        return None


def _process_umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, *, overwrite: bool = True) -> Iterator[str]:
    """Yields a temporary path beside `target`; renames it onto `target` on success.

    An error, Ctrl-C or SIGTERM (raised as an exception by the caller's handler) inside
    the block removes the temporary file, so a reader never sees a partial file. The file
    gets the permissions a plain `open(target, "w")` would (0666 minus the umask), not
    `mkstemp`'s 0600. `overwrite=False` refuses an existing target (FileExistsError).
    """
    target = os.fspath(target)
    if not overwrite and os.path.exists(target):
        raise FileExistsError(target)
    directory = os.path.dirname(target) or "."
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(target)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_process_umask())
        os.close(fd)
        yield tmp
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def is_temporary_output(name: str) -> bool:
    """True for the names `atomic_output` gives its temporary files."""
    return name.startswith(".") and name.endswith(".tmp")


def chunk_bounds(num_samples: int, max_chunk_samples: int | None) -> list[tuple[int, int]]:
    """Splits `[0, num_samples)` into near-equal chunks of <= max_chunk_samples.

    Equal chunks (rather than full chunks plus a short tail) keep every chunk
    long enough to crop from. None or 0 means one chunk.
    """
    if not max_chunk_samples or num_samples <= max_chunk_samples:
        return [(0, num_samples)]
    n = -(-num_samples // max_chunk_samples)  # ceil
    edges = [round(i * num_samples / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:]))


def iter_chunks(audio: DecodedAudio, max_chunk_seconds: float | None) -> Iterator[tuple[int, np.ndarray]]:
    """Yields `(start_sample, pcm[start:end])` chunks of a decoded file."""
    max_samples = int(round(max_chunk_seconds * audio.sample_rate)) if max_chunk_seconds else None
    for start, end in chunk_bounds(audio.pcm.shape[0], max_samples):
        yield start, audio.pcm[start:end]


def _one_line(e: BaseException, path: str = "") -> str:
    # libsndfile repeats the path ("Error opening '<path>': ..."); the caller names it once.
    text = str(e).replace(f"Error opening {path!r}: ", "") if path else str(e)
    text = " ".join(text.split()) or type(e).__name__
    return text[:200]
