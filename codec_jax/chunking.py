"""Coding long files in bounded memory with exactly the whole-file codes and audio.

SNAC is convolutional with windowed attention, so each latent frame depends on a finite
span of samples around it (the encoder's receptive field) and each output sample on a
finite span of latent frames (the decoder's). `receptive_field(config)` computes both
spans from the architecture (kernel sizes, dilations, strides, paddings, attention window)
by following one position back through every layer.

A long clip is cut into fixed-size windows whose starts lie on the *alignment grid*
(`alignment(config)` samples: the hop times the lcm of the quantizer strides and the
attention window), so every stride phase, attention window and quantizer block inside a
window is the whole file's. Each window reaches past the part it keeps (its core) by at
least the receptive field on both sides, and only the core's frames are kept: those never
see the window's edges, so they equal the whole-file result. The first and last windows
end where the file ends, and there the window sees the same zero padding as the whole
file. No crossfades: the stitched codes and audio *are* the whole-file ones (up to float
near-ties in the codes: XLA may sum in another order for another shape).

- `encode_windows` / `decode_windows` plan the windows of one clip; windows of many clips
  all fit one padded size, so a corpus job can batch them together (one length bucket),
  code them with `Codec.encode(..., lengths=)` and reassemble them with `stitch_codes` /
  `stitch_audio`.
- `encode_long` / `decode_long` do that for one clip.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

import numpy as np

from codec_jax.config import SNACConfig
from codec_jax.errors import UsageError

__all__ = [
    "ReceptiveField",
    "receptive_field",
    "alignment",
    "Window",
    "encode_windows",
    "decode_windows",
    "window_samples",
    "window_frames",
    "stitch_codes",
    "stitch_audio",
    "encode_long",
    "decode_long",
]

# ---------------------------------------------------------------------------------------
# Receptive field: each layer maps an output interval [a, b] to the input interval it reads.
# ---------------------------------------------------------------------------------------
Interval = tuple[int, int]
Layer = Callable[[Interval], Interval]


def _conv(kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> Layer:
    """Conv1d: output u reads inputs [u*stride - padding, u*stride - padding + dilation*(kernel-1)]."""
    def reads(iv: Interval) -> Interval:
        return iv[0] * stride - padding, iv[1] * stride - padding + dilation * (kernel - 1)
    return reads


def _conv_transpose(kernel: int, stride: int, padding: int) -> Layer:
    """ConvTranspose1d: output u = t*stride - padding + k (0 <= k < kernel) reads inputs
    t in [ceil((u + padding - kernel + 1) / stride), floor((u + padding) / stride)]."""
    def reads(iv: Interval) -> Interval:
        return -((kernel - 1 - iv[0] - padding) // stride), (iv[1] + padding) // stride
    return reads


def _windows(size: int) -> Layer:
    """Attention within non-overlapping windows of `size` steps aligned to step 0."""
    def reads(iv: Interval) -> Interval:
        return iv[0] // size * size, iv[1] // size * size + size - 1
    return reads


def _residual_units(kernel: int = 7) -> list[Layer]:
    # SNAC's residual units: dilations 1, 3, 9 with "same" padding; the 1x1 conv is pointwise.
    return [_conv(kernel, padding=(kernel - 1) * d // 2, dilation=d) for d in (1, 3, 9)]


def encoder_layers(config: SNACConfig) -> list[Layer]:
    """The encoder's time-mixing layers, input (samples) to output (latent frames)."""
    layers = [_conv(7, padding=3)]
    for stride in config.encoder_rates:
        layers += _residual_units()
        layers.append(_conv(2 * stride, stride=stride, padding=math.ceil(stride / 2)))
    if config.attn_window_size is not None:
        layers.append(_windows(config.attn_window_size))
    layers.append(_conv(7, padding=3))
    return layers


def decoder_layers(config: SNACConfig) -> list[Layer]:
    """The decoder's time-mixing layers, input (latent frames) to output (samples)."""
    layers = [_conv(7, padding=3)]  # depthwise 7-tap (+ pointwise) or a full 7-tap conv
    if config.attn_window_size is not None:
        layers.append(_windows(config.attn_window_size))
    for stride in config.decoder_rates:
        layers.append(_conv_transpose(2 * stride, stride, math.ceil(stride / 2)))
        layers += _residual_units()
    layers.append(_conv(7, padding=3))
    return layers


def _reads(layers: Sequence[Layer], iv: Interval) -> Interval:
    for layer in reversed(layers):
        iv = layer(iv)
    return iv


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """Context a position needs on each side, in samples at the model's rate.

    `encoder_left` / `encoder_right`: samples before the first / after the last sample of a
    latent frame's own hop that the frame depends on. `decoder_left` / `decoder_right`:
    samples before / after an output sample that the latent frames it depends on cover.
    """

    encoder_left: int
    encoder_right: int
    decoder_left: int
    decoder_right: int

    def __iter__(self):
        return iter(dataclasses.astuple(self))


@functools.lru_cache(maxsize=None)
def receptive_field(config: SNACConfig) -> ReceptiveField:
    """`(encoder_left, encoder_right, decoder_left, decoder_right)` in samples, computed by
    following positions back through the encoder's and decoder's layers (see module doc).

    Every phase of the strides and attention windows is tried; the widest reach counts.
    """
    hop = config.hop_length
    if math.prod(config.decoder_rates) != hop:
        raise UsageError(f"decoder rates {config.decoder_rates} do not undo the encoder's hop {hop}")
    period = alignment(config) // hop  # latent frames after which every phase repeats
    enc = encoder_layers(config)
    enc_left = enc_right = 0
    for frame in range(period):
        lo, hi = _reads(enc, (frame, frame))
        enc_left = max(enc_left, frame * hop - lo)
        enc_right = max(enc_right, hi - (frame * hop + hop - 1))
    dec = decoder_layers(config)
    dec_left = dec_right = 0
    for sample in range(period * hop):
        lo, hi = _reads(dec, (sample, sample))
        dec_left = max(dec_left, sample - lo * hop)
        dec_right = max(dec_right, (hi + 1) * hop - 1 - sample)
    return ReceptiveField(enc_left, enc_right, dec_left, dec_right)


def alignment(config: SNACConfig) -> int:
    """Samples between possible window starts: the hop times the lcm of every quantizer
    stride and the attention window (a multiple of `config.pad_multiple`)."""
    return config.hop_length * math.lcm(*config.vq_strides, config.attn_window_size or 1)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------------------
# Window plans
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Window:
    """One window of a clip. Units: samples for `encode_windows`, latent frames for
    `decode_windows` (a latent frame is `hop_length` samples; level `l`'s codes have one
    frame per `vq_strides[l]` latent frames).

    `start`: where the window begins in the clip (on the alignment grid); `length`: units of
    the clip it holds (the valid length to give `Codec.encode`/`decode`); `keep`: the
    window's own result to keep, `[keep[0], keep[1])` latent frames (encode) or samples
    (decode) relative to the window; `offset`: where that kept part goes in the clip's
    output, in the same units as `keep`.
    """

    start: int
    length: int
    keep: tuple[int, int]
    offset: int

    def level_keep(self, config: SNACConfig, level: int) -> slice:
        """Frames of level `level`'s codes to keep from an encode window."""
        s = config.vq_strides[level]
        return slice(self.keep[0] // s, self.keep[1] // s)


def _context(reach: int, unit: int, grid: int) -> int:
    """Context in `unit`s covering `reach` samples, rounded up to the grid (in units)."""
    return _round_up(-(-reach // unit), grid)


def window_samples(config: SNACConfig, chunk_seconds: float) -> int:
    """The encode window size in samples for `chunk_seconds`: rounded down to the alignment
    grid. Every encode window of every clip fits in it (one padded batch width)."""
    grid = alignment(config)
    size = int(chunk_seconds * config.sampling_rate) // grid * grid
    rf = receptive_field(config)
    need = _context(rf.encoder_left, 1, grid) + _context(rf.encoder_right, 1, grid) + grid
    if size < need:
        raise UsageError(
            f"chunk_seconds={chunk_seconds} is too short for this model: a window needs at least "
            f"{need} samples ({need / config.sampling_rate:.3f} s) to hold its receptive field "
            f"({rf.encoder_left} + {rf.encoder_right} samples) and one {grid}-sample core"
        )
    return size


def window_frames(config: SNACConfig, chunk_seconds: float) -> int:
    """The decode window size in latent frames for `chunk_seconds` (rounded down to the grid)."""
    grid = alignment(config) // config.hop_length
    size = int(chunk_seconds * config.sampling_rate) // config.hop_length // grid * grid
    rf = receptive_field(config)
    need = (_context(rf.decoder_left, config.hop_length, grid)
            + _context(rf.decoder_right, config.hop_length, grid) + grid)
    if size < need:
        raise UsageError(
            f"chunk_seconds={chunk_seconds} is too short for this model: a decode window needs at "
            f"least {need} latent frames ({need * config.hop_length / config.sampling_rate:.3f} s)"
        )
    return size


def _plan(total: int, size: int, left: int, right: int) -> list[tuple[int, int, int, int]]:
    """Cores of `size - left - right` units tiling [0, total); each window reaches `left` /
    `right` units past its core (clipped to the clip). -> (start, stop, core_start, core_stop)."""
    if total <= size:
        return [(0, total, 0, total)]
    core = size - left - right
    plans = []
    for core_start in range(0, total, core):
        core_stop = min(core_start + core, total)
        plans.append((max(0, core_start - left), min(total, core_stop + right), core_start, core_stop))
    return plans


def encode_windows(config: SNACConfig, length: int, chunk_seconds: float = 30.0) -> list[Window]:
    """Plan the encode windows of a clip of `length` samples (see `Window`, units samples;
    `keep`/`offset` in latent frames). Each window holds at most
    `window_samples(config, chunk_seconds)` samples; code window `w` as a row of
    `audio[w.start : w.start + w.length]` with `lengths=w.length`, keep its frames
    `w.level_keep(config, l)` at level `l`, and `stitch_codes` gives the whole-clip codes
    (`config.num_frames(length)` frames per level)."""
    if length < 1:
        raise UsageError(f"a clip needs at least one sample, got length={length}")
    grid, hop = alignment(config), config.hop_length
    rf = receptive_field(config)
    size = window_samples(config, chunk_seconds)
    windows = []
    for start, stop, core_start, core_stop in _plan(
            length, size, _context(rf.encoder_left, 1, grid), _context(rf.encoder_right, 1, grid)):
        # The last core ends at the clip's end: keep through the clip's padded end.
        end = config.padded_length(core_stop) if core_stop == length else core_stop
        windows.append(Window(start, stop - start, ((core_start - start) // hop, (end - start) // hop),
                              core_start // hop))
    return windows


def decode_windows(config: SNACConfig, frames: int, chunk_seconds: float = 30.0) -> list[Window]:
    """Plan the decode windows of a clip of `frames` latent frames (units latent frames;
    `keep`/`offset` in samples). Decode window `w` from the codes of latent frames
    `[w.start, w.start + w.length)` (level `l`: divided by `vq_strides[l]`) with
    `lengths=w.length * hop_length` and `frame_offsets=w.start`, keep samples `w.keep`, and
    `stitch_audio` gives the whole decode."""
    grid = alignment(config) // config.hop_length
    if frames < 1 or frames % grid:
        raise UsageError(f"latent frames={frames} must be a positive multiple of {grid}")
    hop = config.hop_length
    rf = receptive_field(config)
    size = window_frames(config, chunk_seconds)
    windows = []
    for start, stop, core_start, core_stop in _plan(
            frames, size, _context(rf.decoder_left, hop, grid), _context(rf.decoder_right, hop, grid)):
        windows.append(Window(start, stop - start, ((core_start - start) * hop, (core_stop - start) * hop),
                              core_start * hop))
    return windows


def stitch_codes(config: SNACConfig, windows: Sequence[Window],
                 window_codes: Sequence[Sequence[Any]]) -> list[np.ndarray]:
    """Per-window codes (for each window, a list per level of `[frames]`, at least through the
    kept frames) -> the clip's codes, a list per level of int32 `[frames]`."""
    out = []
    for level in range(len(window_codes[0])):
        parts = [np.asarray(codes[level])[w.level_keep(config, level)]
                 for w, codes in zip(windows, window_codes)]
        out.append(np.concatenate(parts).astype(np.int32))
    return out


def stitch_audio(windows: Sequence[Window], window_audio: Sequence[Any], length: int) -> np.ndarray:
    """Per-window decoded audio (`[samples]` each) -> the clip's float32 `[length]`."""
    out = np.concatenate([np.asarray(a)[w.keep[0]:w.keep[1]] for w, a in zip(windows, window_audio)])
    if out.shape[0] < length:
        raise UsageError(f"length={length} exceeds the {out.shape[0]} samples the codes decode to")
    return out[:length].astype(np.float32)


def _batches(items: Sequence[Any], batch_size: int, progress: bool, desc: str):
    starts = range(0, len(items), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, unit="batch")
    for i in starts:
        yield items[i:i + batch_size]


def encode_long(codec, audio: Any, chunk_seconds: float = 30.0, *, batch_size: int = 1,
                n_levels: Optional[int] = None, progress: bool = False) -> list[np.ndarray]:
    """One clip `[samples]` (float, model rate) -> a list per level of int32 `[frames]` equal
    to `codec.encode(audio[None])`, computed `batch_size` windows of `chunk_seconds` at a time
    (memory bounded by `batch_size * chunk_seconds`; one compilation for all windows)."""
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise UsageError(f"encode_long takes one clip [samples]; got shape {audio.shape}")
    if audio.size == 0:
        raise UsageError("audio has no samples")
    config = codec.config
    windows = encode_windows(config, audio.shape[0], chunk_seconds)
    width = config.padded_length(max(w.length for w in windows))
    codes = []
    for group in _batches(windows, batch_size, progress, "encode"):
        rows = np.zeros((batch_size, width), np.float32)  # fixed shape: one compilation
        lengths = np.ones(batch_size, np.int32)
        for i, w in enumerate(group):
            rows[i, :w.length] = audio[w.start:w.start + w.length]
            lengths[i] = w.length
        out = [np.asarray(c) for c in codec.encode(rows, lengths=lengths, n_levels=n_levels)]
        codes += [[c[i] for c in out] for i in range(len(group))]
    return stitch_codes(config, windows, codes)


def decode_long(codec, codes: Sequence[Any], length: int, chunk_seconds: float = 30.0,
                rng=None, *, batch_size: int = 1, progress: bool = False) -> np.ndarray:
    """One clip's codes (a list per level, coarse first, of `[frames]`) -> float32 `[length]`
    equal to `codec.decode([c[None] for c in codes], length=length, rng=rng)[0]`, decoded
    `batch_size` windows of `chunk_seconds` at a time. With `rng` the noise is the same as
    in the whole decode (it depends on the key and the absolute latent frame only)."""
    config = codec.config
    codes = [np.asarray(c) for c in codes]
    if not codes or any(c.ndim != 1 for c in codes):
        raise UsageError("decode_long takes one clip's codes: a list per level of [frames]")
    frames = codes[0].shape[0] * config.vq_strides[0]
    windows = decode_windows(config, frames, chunk_seconds)
    width = max(w.length for w in windows)
    audio = []
    for group in _batches(windows, batch_size, progress, "decode"):
        rows = [np.zeros((batch_size, width // s), np.int32) for s in config.vq_strides[:len(codes)]]
        lengths = np.full(batch_size, config.hop_length, np.int32)
        offsets = np.zeros(batch_size, np.int32)
        for i, w in enumerate(group):
            for row, c, s in zip(rows, codes, config.vq_strides):
                row[i, :w.length // s] = c[w.start // s:(w.start + w.length) // s]
            lengths[i] = w.length * config.hop_length
            offsets[i] = w.start
        out = np.asarray(codec.decode(rows, lengths=lengths, length=width * config.hop_length,
                                      rng=rng, frame_offsets=offsets))
        audio += list(out[:len(group)])
    return stitch_audio(windows, audio, length)
