"""Lossless entropy coding of multi-level codes (range coding through pip `constriction`).

Fixed-width codes spend log2(codebook_size) bits on every code, but codes are far from
uniform, and neighbouring codes depend on each other. This module codes one clip's code
streams (one `[frames]` array per level, coarse level first) into a byte string with a
range coder, under one of two probability models:

- ``"adaptive"``: per level, an adaptive frequency model that starts uniform and counts
  every code it has seen (Krichevsky-Trofimov estimate, counts + 1/2). No side
  information and no training; it pays a learning cost on short clips.
- ``"context"``: a trained `ContextModel`: per level,
  ``p(c | previous code at this level, code of the coarser level at this time)`` as an
  interpolation of a smoothed unigram, the conditional on the previous code and the
  conditional on the coarser level's code (sparse tables fitted on a corpus of codes with
  `ContextModel.fit`, or `codec-jax entropy-fit`). The model's identity (a hash of its
  arrays) is stored in every stream, so a stream never decodes under another model.

Stream layout, version 2 (written; integers little-endian, "uvarint" = LEB128)::

    b"CJEC"  u8 version (2)  u8 model kind  u8 n_levels
    per level: uvarint codebook size, uvarint frames
    u32 crc32 of the raw codes  first 8 bytes of the model id (context only)
    u32 words of the range coder's output

20-30 bytes before the payload for SNAC's three levels. Version 1 (still read) spent
fixed u16/u32 fields and the whole 32-byte model id: 36 / 68 bytes, which on the 1-3 s
clips of a speech corpus cost more bits per second than entropy coding saved
(BENCHMARKS.md §8). Eight bytes of a sha256 tell models apart as surely as the 32 for
this purpose (refusing the wrong model), and a `.snac` file's header carries the full id.

A range decoder fed corrupted words returns other symbols instead of failing, so the
CRC of the raw codes, checked after decoding, is what turns corruption into an
`EntropyStreamError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from codec_jax.errors import WorkError

MAGIC = b"CJEC"
VERSION = 2
_READS = (1, 2)
_MODEL_ID_BYTES = {1: 32, 2: 8}
_KINDS = {"adaptive": 1, "context": 2}
_KIND_NAMES = {v: k for k, v in _KINDS.items()}
_BLOCK = 512  # symbols per block of probability rows: bounds memory at block * codebook floats


class EntropyStreamError(WorkError):
    """An entropy-coded stream is truncated, corrupted, of an unknown version, or was
    written under a different context model."""


def _constriction():
    try:
        import constriction
    except ImportError as e:  # pragma: no cover - declared dependency
        raise WorkError("entropy coding needs pip `constriction` (pip install constriction)") from e
    return constriction


def _crc(levels: Sequence[np.ndarray]) -> int:
    crc = 0
    for level in levels:
        crc = zlib.crc32(np.ascontiguousarray(level, dtype="<u4").tobytes(), crc)
    return crc


def _check_levels(levels: Sequence[np.ndarray], codebook_sizes: Sequence[int]) -> list[np.ndarray]:
    if len(levels) != len(codebook_sizes):
        raise ValueError(f"{len(levels)} code levels but {len(codebook_sizes)} codebook sizes")
    out = []
    for i, (level, size) in enumerate(zip(levels, codebook_sizes)):
        level = np.asarray(level)
        if level.ndim != 1:
            raise ValueError(f"level {i}: codes must be 1-D [frames], got shape {level.shape}")
        if level.size and (not np.issubdtype(level.dtype, np.integer) or level.min() < 0 or level.max() >= size):
            raise ValueError(f"level {i}: codes must be integers in [0, {size})")
        out.append(level.astype(np.int32))
    return out


# ---------------------------------------------------------------------------------------
# The adaptive model
# ---------------------------------------------------------------------------------------


def _adaptive_rows(codes: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Probability rows `[len(codes), V]` of the adaptive model for one block, given the
    counts before the block; updates `counts` in place."""
    onehot = np.zeros((len(codes), counts.size), np.float32)
    onehot[np.arange(len(codes)), codes] = 1.0
    before = counts[None, :] + np.cumsum(onehot, axis=0) - onehot  # counts seen before each code
    counts += onehot.sum(axis=0)
    return before + 0.5


# ---------------------------------------------------------------------------------------
# The trained context model
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SparseTable:
    """Conditional distributions `p(c | context)` for each context, CSR-style: row r's
    codes are `codes[offsets[r]:offsets[r+1]]` with probabilities `probs[...]`."""

    offsets: np.ndarray  # int64 [contexts + 1]
    codes: np.ndarray  # int32 [nnz]
    probs: np.ndarray  # float32 [nnz]; each non-empty row sums to 1

    @classmethod
    def from_pairs(cls, context: np.ndarray, code: np.ndarray, n_contexts: int, top_k: int) -> "_SparseTable":
        """Empirical `p(code | context)`, keeping each context's `top_k` most frequent codes."""
        width = int(code.max()) + 1 if code.size else 1
        keys, counts = np.unique(context.astype(np.int64) * width + code, return_counts=True)
        ctx, cd = keys // width, (keys % width).astype(np.int32)
        order = np.lexsort((-counts, ctx))  # by context, most frequent first
        ctx, cd, counts = ctx[order], cd[order], counts[order]
        first = np.searchsorted(ctx, ctx, side="left")
        keep = (np.arange(ctx.size) - first) < top_k
        ctx, cd, counts = ctx[keep], cd[keep], counts[keep].astype(np.float64)
        offsets = np.searchsorted(ctx, np.arange(n_contexts + 1)).astype(np.int64)
        totals = np.zeros(n_contexts)
        np.add.at(totals, ctx, counts)
        probs = (counts / totals[ctx]).astype(np.float32) if ctx.size else np.zeros(0, np.float32)
        return cls(offsets, cd, probs)

    def add_rows(self, rows: np.ndarray, contexts: np.ndarray, weights: np.ndarray) -> None:
        """rows[i] += weights[i] * p(. | contexts[i]) (rows with an empty context get nothing)."""
        starts, stops = self.offsets[contexts], self.offsets[contexts + 1]
        lengths = stops - starts
        if not lengths.sum():
            return
        row_idx = np.repeat(np.arange(len(contexts)), lengths)
        entry = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) + np.repeat(starts, lengths)
        np.add.at(rows, (row_idx, self.codes[entry]), (np.repeat(weights, lengths) * self.probs[entry]).astype(rows.dtype))

    def has(self, contexts: np.ndarray) -> np.ndarray:
        return self.offsets[contexts + 1] > self.offsets[contexts]


@dataclasses.dataclass(frozen=True)
class ContextModel:
    """Per-level code distributions fitted on a corpus of codes (see module docstring).

    Attributes:
      codebook_sizes: codes per level.
      strides: each level's frame stride in the finest level's frames (SNAC's
        `vq_strides`, e.g. (4, 2, 1)); level l's frame t lies under the coarser level's
        frame `t * strides[l] // strides[l-1]`.
      unigrams: per level, smoothed `p(c)` `[V]`.
      previous: per level, `p(c | previous code)`.
      coarser: per level, `p(c | coarser level's code)` (level 0: empty).
      weights: per level, interpolation weights (unigram, previous, coarser), fitted on
        held-out clips.
    """

    codebook_sizes: tuple[int, ...]
    strides: tuple[int, ...]
    unigrams: tuple[np.ndarray, ...]
    previous: tuple[_SparseTable, ...]
    coarser: tuple[_SparseTable, ...]
    weights: tuple[tuple[float, float, float], ...]

    # ---- fitting ----

    @classmethod
    def fit(cls, clips: Sequence[Sequence[np.ndarray]], codebook_sizes: Sequence[int],
            strides: Sequence[int], top_k: int = 64, held_out: float = 0.1) -> "ContextModel":
        """Fit on `clips`, each a list per level of `[frames]` codes. A `held_out` share of
        the clips (every k-th) picks the interpolation weights by grid search on bits/code."""
        sizes, strides = tuple(int(s) for s in codebook_sizes), tuple(int(s) for s in strides)
        if len(sizes) != len(strides):
            raise ValueError("one stride per level")
        clips = [_check_levels(c, sizes) for c in clips]
        if not clips:
            raise ValueError("no clips to fit the context model on")
        every = max(2, round(1 / held_out)) if held_out > 0 and len(clips) >= 4 else None
        train = [c for i, c in enumerate(clips) if every is None or i % every]
        dev = [c for i, c in enumerate(clips) if every is not None and not i % every] or train
        unigrams, previous, coarser, weights = [], [], [], []
        for level, size in enumerate(sizes):
            codes, prev, coarse = cls._pairs(train, level, strides)
            counts = np.bincount(codes, minlength=size).astype(np.float64) + 0.5
            unigrams.append((counts / counts.sum()).astype(np.float32))
            previous.append(_SparseTable.from_pairs(prev[prev >= 0], codes[prev >= 0], size, top_k))
            if level:
                coarser.append(_SparseTable.from_pairs(coarse, codes, sizes[level - 1], top_k))
            else:
                coarser.append(_SparseTable(np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)))
            weights.append((1.0, 0.0, 0.0))
        model = cls(sizes, strides, tuple(unigrams), tuple(previous), tuple(coarser), tuple(weights))
        grid = [(u, p, 1.0 - u - p) for u in (0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)
                for p in np.linspace(0, 1 - u, 6)]
        best = []
        for level in range(len(sizes)):
            codes, prev, coarse = cls._pairs(dev, level, strides)
            options = grid if level else [(u, 1.0 - u, 0.0) for u in (0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)]
            scores = [model._bits(level, codes, prev, coarse, w) for w in options]
            best.append(tuple(float(x) for x in options[int(np.argmin(scores))]))
        return dataclasses.replace(model, weights=tuple(best))

    @staticmethod
    def _pairs(clips, level: int, strides) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All (code, previous code or -1, coarser code) triples of `level` over `clips`."""
        codes, prev, coarse = [], [], []
        for clip in clips:
            c = clip[level]
            codes.append(c)
            prev.append(np.concatenate([[-1], c[:-1]]).astype(np.int32) if c.size else c)
            coarse.append(_coarser_context(clip, level, strides, c.size))
        return np.concatenate(codes), np.concatenate(prev), np.concatenate(coarse)

    def _bits(self, level, codes, prev, coarse, w) -> float:
        total = 0.0
        for a in range(0, len(codes), _BLOCK):
            rows = self.rows(level, prev[a:a + _BLOCK], coarse[a:a + _BLOCK], w)
            p = rows[np.arange(len(rows)), codes[a:a + _BLOCK]] / rows.sum(axis=1)
            total -= float(np.log2(p).sum())
        return total

    # ---- probabilities ----

    def rows(self, level: int, prev: np.ndarray, coarse: np.ndarray, weights=None) -> np.ndarray:
        """Unnormalised probability rows `[n, V]` for codes with these contexts (`prev` -1
        = none). A context never seen in training gives its weight to the unigram."""
        wu, wp, wc = self.weights[level] if weights is None else weights
        n = len(prev)
        has_prev = (prev >= 0) & self.previous[level].has(np.maximum(prev, 0))
        has_coarse = np.zeros(n, bool) if level == 0 else self.coarser[level].has(coarse)
        wp_i = np.where(has_prev, wp, 0.0)
        wc_i = np.where(has_coarse, wc, 0.0)
        wu_i = 1.0 - wp_i - wc_i
        rows = wu_i[:, None].astype(np.float32) * self.unigrams[level][None, :]
        self.previous[level].add_rows(rows, np.maximum(prev, 0), wp_i)
        if level:
            self.coarser[level].add_rows(rows, coarse, wc_i)
        return rows

    # ---- identity and storage (npz, no pickle) ----

    def _arrays(self) -> dict[str, np.ndarray]:
        out = {"codebook_sizes": np.asarray(self.codebook_sizes, np.int64),
               "strides": np.asarray(self.strides, np.int64),
               "weights": np.asarray(self.weights, np.float64)}
        for l in range(len(self.codebook_sizes)):
            out[f"unigram_{l}"] = self.unigrams[l]
            for name, table in (("previous", self.previous[l]), ("coarser", self.coarser[l])):
                for field in ("offsets", "codes", "probs"):
                    out[f"{name}_{l}_{field}"] = getattr(table, field)
        return out

    @property
    def model_id(self) -> bytes:
        """sha256 over every array (name, dtype, shape, bytes): 32 bytes."""
        h = hashlib.sha256()
        for name, a in sorted(self._arrays().items()):
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.digest()

    def save(self, path) -> None:
        from etils import epath

        buf = io.BytesIO()
        np.savez_compressed(buf, **self._arrays())
        epath.Path(path).write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path) -> "ContextModel":
        from etils import epath

        try:
            with np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False) as z:
                a = {k: z[k] for k in z.files}
            n = len(a["codebook_sizes"])
            tables = lambda name: tuple(_SparseTable(a[f"{name}_{l}_offsets"], a[f"{name}_{l}_codes"],
                                                     a[f"{name}_{l}_probs"]) for l in range(n))
            return cls(tuple(int(x) for x in a["codebook_sizes"]), tuple(int(x) for x in a["strides"]),
                       tuple(a[f"unigram_{l}"] for l in range(n)), tables("previous"), tables("coarser"),
                       tuple(tuple(float(x) for x in w) for w in a["weights"]))
        except (OSError, KeyError, ValueError) as e:
            raise WorkError(f"cannot read context model {path}: {e}") from None


def _coarser_context(clip: Sequence[np.ndarray], level: int, strides, frames: int) -> np.ndarray:
    """For each frame of `level`, the coarser level's code above it (zeros for level 0)."""
    if level == 0:
        return np.zeros(frames, np.int32)
    above = clip[level - 1]
    idx = np.arange(frames) * strides[level] // strides[level - 1]
    return above[np.minimum(idx, max(above.size - 1, 0))] if above.size else np.zeros(frames, np.int32)


# ---------------------------------------------------------------------------------------
# Encode / decode
# ---------------------------------------------------------------------------------------


def encode(levels: Sequence[np.ndarray], codebook_sizes: Sequence[int], *, model: ContextModel | None = None) -> bytes:
    """One clip's codes (list per level of `[frames]`) -> an entropy-coded byte string.

    `model=None` uses the adaptive model; a `ContextModel` must match the codebook sizes.
    """
    constriction = _constriction()
    sizes = tuple(int(s) for s in codebook_sizes)
    levels = _check_levels(levels, sizes)
    if model is not None and tuple(model.codebook_sizes) != sizes:
        raise ValueError(f"context model is for codebooks {model.codebook_sizes}, codes use {sizes}")
    family = constriction.stream.model.Categorical(perfect=False)
    encoder = constriction.stream.queue.RangeEncoder()
    for level, (codes, size) in enumerate(zip(levels, sizes)):
        counts = np.zeros(size, np.float32)
        prev = np.concatenate([[-1], codes[:-1]]).astype(np.int32)
        coarse = _coarser_context(levels, level, model.strides if model else (1,) * len(sizes), codes.size)
        for a in range(0, codes.size, _BLOCK):
            block = codes[a:a + _BLOCK]
            if model is None:
                rows = _adaptive_rows(block, counts)
            else:
                rows = model.rows(level, prev[a:a + _BLOCK], coarse[a:a + _BLOCK])
            encoder.encode(block, family, rows / rows.sum(axis=1, keepdims=True))
    words = encoder.get_compressed().astype("<u4")
    kind = "adaptive" if model is None else "context"
    header = MAGIC + struct.pack("<BBB", VERSION, _KINDS[kind], len(sizes))
    for size, level in zip(sizes, levels):
        header += _uvarint(size) + _uvarint(level.size)
    header += struct.pack("<I", _crc(levels))
    if model is not None:
        header += model.model_id[:_MODEL_ID_BYTES[VERSION]]
    return header + words.tobytes()


def header_bytes(data: bytes) -> int:
    """Length of a stream's header (everything before the range coder's words)."""
    return _parse_header(bytes(data), None)[-1]


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 35:
            raise EntropyStreamError("entropy stream is truncated (header)")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _parse_header(data: bytes, model):
    """-> (kind name, codebook sizes, frames, crc, model to decode with, payload offset)."""
    if len(data) < 7 or data[:4] != MAGIC:
        raise EntropyStreamError("not an entropy-coded codes stream (bad magic)")
    version, kind = data[4], data[5]
    if version not in _READS:
        raise EntropyStreamError(f"entropy stream version {version} is not supported "
                                 f"(this build reads {', '.join(map(str, _READS))})")
    if kind not in _KIND_NAMES:
        raise EntropyStreamError(f"unknown entropy model kind {kind}")
    kind = _KIND_NAMES[kind]
    if version == 1:
        if len(data) < 8:
            raise EntropyStreamError("entropy stream is truncated (header)")
        (n,) = struct.unpack_from("<H", data, 6)
        pos = 8
        if len(data) < pos + 8 * n + 4:
            raise EntropyStreamError("entropy stream is truncated (header)")
        sizes = struct.unpack_from(f"<{n}I", data, pos); pos += 4 * n
        frames = struct.unpack_from(f"<{n}I", data, pos); pos += 4 * n
    else:
        n, pos = data[6], 7
        sizes, frames = [], []
        for _ in range(n):
            size, pos = _read_uvarint(data, pos)
            count, pos = _read_uvarint(data, pos)
            sizes.append(size)
            frames.append(count)
    if n == 0:
        raise EntropyStreamError("entropy stream header is corrupted (no levels)")
    id_bytes = _MODEL_ID_BYTES[version] if kind == "context" else 0
    if len(data) < pos + 4 + id_bytes:
        raise EntropyStreamError("entropy stream is truncated (header)")
    (crc,) = struct.unpack_from("<I", data, pos); pos += 4
    stored_id = data[pos:pos + id_bytes]
    pos += id_bytes
    if kind == "context" and model is not None:
        if stored_id != model.model_id[:id_bytes] or tuple(model.codebook_sizes) != tuple(sizes):
            raise EntropyStreamError("stream was coded with a different context model")
    elif kind == "adaptive":
        model = None  # an adaptive stream needs no model
    return kind, tuple(sizes), tuple(frames), crc, model, pos


def decode(data: bytes, *, model: ContextModel | None = None) -> list[np.ndarray]:
    """Inverse of `encode`: -> list per level of int32 `[frames]`. Raises
    `EntropyStreamError` for anything but an intact stream of this format and model."""
    constriction = _constriction()
    data = bytes(data)
    kind, sizes, frames, crc, model_in, pos = _parse_header(data, model)
    if kind == "context" and model is None:
        raise EntropyStreamError("stream was coded with a context model; pass the same model to decode it")
    model = model_in
    n = len(sizes)
    if (len(data) - pos) % 4:
        raise EntropyStreamError("entropy stream is truncated (payload)")
    if min(sizes) < 1 or max(sizes) > 1 << 20 or sum(frames) > 1 << 26:  # one clip: at most ~67M codes (~200 h)
        raise EntropyStreamError("entropy stream header is corrupted (implausible sizes)")
    words = np.frombuffer(data, dtype="<u4", offset=pos).astype(np.uint32)
    family = constriction.stream.model.Categorical(perfect=False)
    decoder = constriction.stream.queue.RangeDecoder(words)
    levels: list[np.ndarray] = []
    try:
        for level, (size, count) in enumerate(zip(sizes, frames)):
            out = np.zeros(count, np.int32)
            counts = np.zeros(size, np.float32)
            coarse = _coarser_context(levels + [out], level, model.strides if model else (1,) * n, count)
            prev = -1
            for a in range(0, count, _BLOCK if model is None else 1):
                if model is None:
                    # The adaptive rows of a block depend on the block's own codes, so go
                    # one symbol at a time; counts are updated after each.
                    for i in range(a, min(a + _BLOCK, count)):
                        row = (counts + 0.5)[None, :]
                        out[i] = decoder.decode(family, row / row.sum())[0]
                        counts[out[i]] += 1.0
                else:
                    row = model.rows(level, np.array([prev], np.int32), coarse[a:a + 1])
                    out[a] = decoder.decode(family, row / row.sum())[0]
                    prev = int(out[a])
            levels.append(out)
    except (AssertionError, ValueError, RuntimeError, OverflowError) as e:  # constriction asserts on invalid data
        raise EntropyStreamError(f"entropy stream is corrupted ({e})") from None
    if _crc(levels) != crc:
        raise EntropyStreamError("entropy stream is corrupted (checksum of the decoded codes does not match)")
    return levels


def fixed_width_bits(frames: Sequence[int], codebook_sizes: Sequence[int]) -> int:
    """Bits the same codes take at a fixed ceil(log2(V)) bits each (today's format)."""
    return int(sum(f * int(np.ceil(np.log2(v))) for f, v in zip(frames, codebook_sizes)))
