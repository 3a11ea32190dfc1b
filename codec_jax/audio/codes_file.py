"""The `.snac` codes file: one coded clip, self-describing, checksummed, pickle-free.

Layout (all integers little-endian; docs/codes_format.md is the specification):

    offset  size  field
    0       8     magic b"SNACODES"
    8       4     format version (uint32), currently 1
    12      4     header length H in bytes (uint32)
    16      H     header: UTF-8 JSON object (keys below)
    16+H    P     payload: each level's codes, coarse first, C order `[channels, frames]`,
                  in the header's unsigned dtype
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
VERSION = 1
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
) -> bytes:
    """Codes per level (`[frames]` or `[channels, frames]`, any int dtype) -> file bytes."""
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
    header = {
        "model": {"id": model_id, "name": model_name, "config": config},
        "sample_rate": int(sample_rate),
        "original_sample_rate": int(original_sample_rate),
        "channels": channels,
        "length": int(length),
        "levels": levels,
        "source": source,
    }
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = _PREFIX.pack(MAGIC, VERSION, len(head)) + head + b"".join(payload)
    return body + _CRC.pack(zlib.crc32(body))


def parse_codes(data: bytes, *, name: str = "<bytes>",
                expect_model_id: Optional[str] = None) -> CodesFile:
    """File bytes -> `CodesFile`, or a named `CodesFileError` saying what is wrong."""
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
        if version != VERSION and expected is None:
            raise CodesVersionError(
                f"{name}: codes format version {version}; this codec_jax reads version {VERSION}")
        raise CorruptCodesError(f"{name}: corrupted codes file (checksum mismatch)")
    if version != VERSION:
        raise CodesVersionError(
            f"{name}: codes format version {version}; this codec_jax reads version {VERSION}")
    try:
        header = _parse_header(bytes(data[_PREFIX.size:_PREFIX.size + head_len]))
        offset = _PREFIX.size + head_len
        channels = header["channels"]
        codes = []
        for level in header["levels"]:
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
    except (ValueError, KeyError, TypeError) as e:
        # A valid checksum over an inconsistent header: written by a broken writer.
        raise CorruptCodesError(f"{name}: inconsistent codes file ({e})") from None
    model = header["model"]
    out = CodesFile(
        codes=codes, length=header["length"], sample_rate=header["sample_rate"],
        original_sample_rate=header["original_sample_rate"], channels=channels,
        model_id=model["id"], model_name=model["name"], config=model["config"],
        source=header["source"])
    if expect_model_id is not None and out.model_id != expect_model_id:
        raise ModelMismatchError(
            f"{name}: made by model {out.model_name!r} ({out.model_id[:12]}), not the model "
            f"given ({expect_model_id[:12]}); pass --force to decode anyway")
    return out


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


def load_codes(path: str | os.PathLike, *, expect_model_id: Optional[str] = None) -> CodesFile:
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
    return parse_codes(data, name=os.fspath(path), expect_model_id=expect_model_id)
