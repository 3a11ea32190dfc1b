"""The `.snac` codes file: one coded clip, self-describing, checksummed, pickle-free.

Layout (all integers little-endian; docs/codes_format.md is the specification):

    offset  size  field
    0       8     magic b"SNACODES"
    8       4     format version (uint32): 1 for fixed-width codes, 2 for entropy-coded
    12      4     header length H in bytes (uint32)
    16      H     header: UTF-8 JSON object (keys below)
    16+H    P     payload: version 1: each level's codes, coarse first, C order
                  `[channels, frames]`, in the header's unsigned dtype; version 2: per
                  channel a uint32 byte count and that channel's entropy-coded stream
                  (`codec_jax.audio.entropy`, named by the header's "coding" entry)
    16+H+P  4     CRC-32 (zlib) of every byte before it

The same bytes are one record of a `--format shards` array_record shard, so one parser
(`parse_codes`) serves both outputs. Every reading error is a named `CodesFileError`
(a `codec_jax.errors.WorkError`) with a one-line message; the reader never returns
codes it could not verify.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import zlib
from typing import Any, Optional, Sequence

import numpy as np

from codec_jax.audio.io import atomic_output
from codec_jax.errors import WorkError

MAGIC = b"SNACODES"
VERSION = 1  # fixed-width codes: what every reader since the first reads
ENTROPY_VERSION = 2  # entropy-coded payload (`--entropy`)
VERSIONS = (VERSION, ENTROPY_VERSION)
SUFFIX = ".snac"
_PREFIX = struct.Struct("<8sII")  # magic, version, header length
_CRC = struct.Struct("<I")
_MAX_HEADER = 1 << 24  # a header is a few hundred bytes; anything this big is corruption


class CodesFileError(WorkError):
    """A codes file (or shard record) that cannot be used."""


class NotCodesFileError(CodesFileError):
    """The bytes do not start with the codes-file magic."""


class TruncatedCodesError(CodesFileError):
    """The file ends before the size its header declares."""


class CorruptCodesError(CodesFileError):
    """The checksum or the header does not match the content."""


class CodesVersionError(CodesFileError):
    """Written by a format version this reader does not know."""


class ModelMismatchError(CodesFileError):
    """The codes were made by a different model than the one asked for."""


class EntropyModelError(CodesFileError):
    """The payload is entropy-coded with a context model that was not given (or another one)."""


@dataclasses.dataclass(frozen=True)
class CodesFile:
    """One coded clip.

    Attributes:
      codes: per level (coarse first) an unsigned int array, `[frames]` for one channel,
        `[channels, frames]` for more.
      length: samples per channel at the model's rate (decode trims to this).
      sample_rate: the model's rate.
      original_sample_rate: rate of the source file before resampling.
      channels: number of code streams (1 for mono or `--channels mix`).
      model_id: hash of the model's config and parameters (see `model_identity`).
      model_name: the preset or directory name the model was loaded from.
      config: the model's `SNACConfig` as a dict.
      source: the input's path relative to its input root ("" when unknown).
      codebook_sizes: codes per level's codebook (from the header's level descriptions).
    """

    codes: list[np.ndarray]
    length: int
    sample_rate: int
    original_sample_rate: int
    channels: int
    model_id: str
    model_name: str
    config: dict
    source: str = ""
    codebook_sizes: tuple[int, ...] = ()

    @property
    def frames(self) -> list[int]:
        return [int(c.shape[-1]) for c in self.codes]

    def codes_2d(self) -> list[np.ndarray]:
        """codes as `[channels, frames]` per level, whatever the channel count."""
        return [c.reshape(self.channels, -1) for c in self.codes]


def code_dtype(codebook_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds codes in [0, codebook_size)."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if codebook_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"codebook_size {codebook_size} does not fit in 32 bits")


def model_identity(config, variables) -> str:
    """sha256 hex of a model's config and every variable (names, dtypes, shapes, bytes).

    Two codecs with the same identity give the same codes; any changed weight changes it.
    """
    import jax  # only the encoding side needs this; load_codes does not

    h = hashlib.sha256()
    h.update(json.dumps(config.to_dict(), sort_keys=True).encode())
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.asarray(jax.device_get(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def encode_codes(
    codes: Sequence[np.ndarray],
    *,
    length: int,
    sample_rate: int,
    original_sample_rate: int,
    model_id: str,
    model_name: str,
    config: dict,
    codebook_sizes: Sequence[int],
    source: str = "",
    entropy: Any = None,
) -> bytes:
    """Codes per level (`[frames]` or `[channels, frames]`, any int dtype) -> file bytes.

    `entropy`: None stores fixed-width codes (format version 1); `"adaptive"` or a
    `codec_jax.audio.entropy.ContextModel` range-codes each channel's code streams
    (version 2: lossless, typically a fraction of the fixed width; a context model must
    then be given to `parse_codes` / `load_codes` too)."""
    if not codes:
        raise ValueError("no code levels to store")
    arrays = [np.asarray(c) for c in codes]
    channels = 1 if arrays[0].ndim == 1 else int(arrays[0].shape[0])
    levels, payload = [], []
    for level, (arr, size) in enumerate(zip(arrays, codebook_sizes, strict=True)):
        arr2 = arr.reshape(channels, -1) if arr.ndim == 1 else arr
        if arr2.ndim != 2 or arr2.shape[0] != channels:
            raise ValueError(f"codes[{level}] has shape {arr.shape}; expected [{channels}, frames]")
        if arr2.size and (arr2.min() < 0 or arr2.max() >= size):
            raise ValueError(f"codes[{level}] outside [0, {size})")
        dt = code_dtype(int(size))
        levels.append({"frames": int(arr2.shape[1]), "dtype": dt.name, "codebook_size": int(size)})
        payload.append(np.ascontiguousarray(arr2, dt.newbyteorder("<")).tobytes())
    coding = None
    if entropy is not None:
        from codec_jax.audio import entropy as entropy_coding

        model = None if isinstance(entropy, str) and entropy == "adaptive" else entropy
        if model is not None and not isinstance(model, entropy_coding.ContextModel):
            raise ValueError(f"entropy must be None, 'adaptive' or a ContextModel, got {entropy!r}")
        coding = {"kind": "adaptive" if model is None else "context",
                  "model_id": None if model is None else model.model_id.hex()}
        sizes = [int(s) for s in codebook_sizes]
        payload = []
        for ch in range(channels):
            stream = entropy_coding.encode(
                [(a.reshape(channels, -1) if a.ndim == 1 else a)[ch] for a in arrays], sizes, model=model)
            payload.append(struct.pack("<I", len(stream)) + stream)
        coding["bytes"] = sum(len(x) for x in payload)  # lets a reader tell truncation from damage
    header = {
        "model": {"id": model_id, "name": model_name, "config": config},
        "sample_rate": int(sample_rate),
        "original_sample_rate": int(original_sample_rate),
        "channels": channels,
        "length": int(length),
        "levels": levels,
        "source": source,
    }
    if coding is not None:
        header["coding"] = coding
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    version = VERSION if coding is None else ENTROPY_VERSION
    body = _PREFIX.pack(MAGIC, version, len(head)) + head + b"".join(payload)
    return body + _CRC.pack(zlib.crc32(body))


def parse_codes(data: bytes, *, name: str = "<bytes>",
                expect_model_id: Optional[str] = None, entropy_model: Any = None) -> CodesFile:
    """File bytes -> `CodesFile`, or a named `CodesFileError` saying what is wrong.

    `entropy_model`: the `ContextModel` a context-coded (version 2) file was written with;
    not needed for fixed-width or adaptive files."""
    data = bytes(data)
    if len(data) < len(MAGIC) or bytes(data[: len(MAGIC)]) != MAGIC:
        if len(data) < len(MAGIC) and MAGIC.startswith(bytes(data)):
            raise TruncatedCodesError(f"{name}: truncated codes file ({len(data)} bytes)")
        raise NotCodesFileError(f"{name}: not a codes file (no {MAGIC.decode()} magic)")
    if len(data) < _PREFIX.size + _CRC.size:
        raise TruncatedCodesError(f"{name}: truncated codes file ({len(data)} bytes)")
    _, version, head_len = _PREFIX.unpack_from(data, 0)
    body, (crc,) = data[:-_CRC.size], _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(body) != crc:
        # Tell a cut-off file from a damaged one by the size the (plausible) header claims.
        expected = _declared_size(data, head_len)
        if expected is not None and expected > len(data):
            raise TruncatedCodesError(
                f"{name}: truncated codes file ({len(data)} of {expected} bytes)")
        if version not in VERSIONS and expected is None:
            raise CodesVersionError(
                f"{name}: codes format version {version}; this codec_jax reads versions {VERSIONS}")
        raise CorruptCodesError(f"{name}: corrupted codes file (checksum mismatch)")
    if version not in VERSIONS:
        raise CodesVersionError(
            f"{name}: codes format version {version}; this codec_jax reads versions {VERSIONS}")
    try:
        header = _parse_header(bytes(data[_PREFIX.size:_PREFIX.size + head_len]))
        if ("coding" in header) != (version == ENTROPY_VERSION):
            raise ValueError(f"version {version} with{'' if 'coding' in header else 'out'} an entropy coding entry")
        offset = _PREFIX.size + head_len
        channels = header["channels"]
        codes = []
        if "coding" in header:
            codes = _entropy_payload(data[:len(body)], offset, header, name, entropy_model)
            offset = len(body)
        for level in header["levels"] if "coding" not in header else ():
            dt = np.dtype(level["dtype"]).newbyteorder("<")
            count = channels * level["frames"]
            arr = np.frombuffer(data, dtype=dt, count=count, offset=offset)
            offset += count * dt.itemsize
            arr = arr.astype(dt.newbyteorder("="), copy=True).reshape(channels, level["frames"])
            if arr.size and arr.max() >= level["codebook_size"]:
                raise ValueError(f"code >= codebook size {level['codebook_size']}")
            codes.append(arr[0] if channels == 1 else arr)
        if offset != len(body):
            raise ValueError(f"payload is {len(body) - _PREFIX.size - head_len} bytes, "
                             f"header describes {offset - _PREFIX.size - head_len}")
    except (ValueError, KeyError, TypeError, struct.error) as e:
        # A valid checksum over an inconsistent header: written by a broken writer.
        raise CorruptCodesError(f"{name}: inconsistent codes file ({e})") from None
    model = header["model"]
    out = CodesFile(
        codes=codes, length=header["length"], sample_rate=header["sample_rate"],
        original_sample_rate=header["original_sample_rate"], channels=channels,
        model_id=model["id"], model_name=model["name"], config=model["config"],
        source=header["source"],
        codebook_sizes=tuple(int(lv["codebook_size"]) for lv in header["levels"]))
    if expect_model_id is not None and out.model_id != expect_model_id:
        raise ModelMismatchError(
            f"{name}: made by model {out.model_name!r} ({out.model_id[:12]}), not the model "
            f"given ({expect_model_id[:12]}); pass --force to decode anyway")
    return out


def _entropy_payload(body: bytes, offset: int, header: dict, name: str, entropy_model) -> list[np.ndarray]:
    """Version 2 payload -> codes per level (`[frames]` or `[channels, frames]`)."""
    from codec_jax.audio import entropy as entropy_coding

    coding = header["coding"]
    if coding.get("kind") == "context":
        want = coding.get("model_id")
        if entropy_model is None:
            raise EntropyModelError(
                f"{name}: entropy-coded with context model {str(want)[:12]}; pass that model "
                "(--entropy-model MODEL.npz, or entropy_model=ContextModel.load(...))")
        if entropy_model.model_id.hex() != want:
            raise EntropyModelError(
                f"{name}: entropy-coded with context model {str(want)[:12]}, not the model "
                f"given ({entropy_model.model_id.hex()[:12]})")
    elif coding.get("kind") != "adaptive":
        raise ValueError(f"unknown entropy coding {coding.get('kind')!r}")
    else:
        entropy_model = None
    per_channel = []
    for _ in range(header["channels"]):
        (size,) = struct.unpack_from("<I", body, offset)
        stream = bytes(body[offset + 4: offset + 4 + size])
        if len(stream) != size:
            raise ValueError("entropy stream shorter than its byte count")
        offset += 4 + size
        try:
            per_channel.append(entropy_coding.decode(stream, model=entropy_model))
        except entropy_coding.EntropyStreamError as e:
            raise ValueError(str(e)) from None
    if offset != len(body):
        raise ValueError(f"{len(body) - offset} bytes after the last entropy stream")
    codes = []
    for level, lv in enumerate(header["levels"]):
        rows = [ch[level] for ch in per_channel]
        if any(r.size != lv["frames"] for r in rows) or any(
                r.size and r.max() >= lv["codebook_size"] for r in rows):
            raise ValueError(f"level {level}: decoded codes do not match the header")
        dt = np.dtype(lv["dtype"])
        codes.append(rows[0].astype(dt) if len(rows) == 1 else np.stack(rows).astype(dt))
    return codes


def _declared_size(data, head_len: int) -> Optional[int]:
    """Total size the header claims, or None when the header cannot be read."""
    if head_len > _MAX_HEADER:
        return None
    if _PREFIX.size + head_len + _CRC.size > len(data):
        return _PREFIX.size + head_len + _CRC.size  # at least: the file ends inside its header
    try:
        header = _parse_header(bytes(data[_PREFIX.size:_PREFIX.size + head_len]))
    except (ValueError, KeyError, TypeError):
        return None
    if isinstance(header.get("coding"), dict):
        payload = header["coding"].get("bytes")
        if not isinstance(payload, int):
            return None
    else:
        payload = sum(header["channels"] * lv["frames"] * np.dtype(lv["dtype"]).itemsize
                      for lv in header["levels"])
    return _PREFIX.size + head_len + payload + _CRC.size


def _parse_header(raw: bytes) -> dict[str, Any]:
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    for key, kind in (("sample_rate", int), ("original_sample_rate", int), ("channels", int),
                      ("length", int), ("levels", list), ("model", dict), ("source", str)):
        if not isinstance(header.get(key), kind):
            raise ValueError(f"header field {key!r} missing or not {kind.__name__}")
    if header["channels"] < 1 or header["length"] < 0 or not header["levels"]:
        raise ValueError("header has no channels, a negative length or no levels")
    for lv in header["levels"]:
        if not (isinstance(lv, dict) and isinstance(lv.get("frames"), int) and lv["frames"] >= 0
                and lv.get("dtype") in ("uint8", "uint16", "uint32")
                and isinstance(lv.get("codebook_size"), int)):
            raise ValueError(f"bad level description {lv!r}")
    m = header["model"]
    if not (isinstance(m.get("id"), str) and isinstance(m.get("name"), str)
            and isinstance(m.get("config"), dict)):
        raise ValueError("bad model description")
    return header


def save_codes(path: str | os.PathLike, codes: Sequence[np.ndarray], *, overwrite: bool = True,
               **fields) -> None:
    """Writes `encode_codes(codes, **fields)` to `path` atomically (umask permissions)."""
    data = encode_codes(codes, **fields)
    with atomic_output(path, overwrite=overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def load_codes(path: str | os.PathLike, *, expect_model_id: Optional[str] = None,
               entropy_model: Any = None) -> CodesFile:
    """Reads a `.snac` codes file; raises a named `CodesFileError` for any bad file.

    `expect_model_id` (a `model_identity`) makes codes of any other model a
    `ModelMismatchError`.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise CodesFileError(f"{path}: is a directory, not a codes file") from None
    except OSError as e:
        raise CodesFileError(f"{path}: cannot read ({e.strerror or e})") from None
    return parse_codes(data, name=os.fspath(path), expect_model_id=expect_model_id,
                       entropy_model=entropy_model)
