"""The `.snac` codes file: round trip, compact dtypes, permissions and a fuzzed reader."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import codec_jax
from codec_jax.audio import codes_file as cf
from codec_jax.errors import UserError

FIELDS = dict(length=4000, sample_rate=16000, original_sample_rate=44100,
              model_id="ab" * 32, model_name="tiny", config={"sampling_rate": 16000})


def _codes(channels=1, sizes=(64, 64, 64), frames=(6, 12, 24), seed=0):
    rng = np.random.default_rng(seed)
    shape = (lambda f: (f,)) if channels == 1 else (lambda f: (channels, f))
    return [rng.integers(0, s, shape(f)) for s, f in zip(sizes, frames)]


def _blob(**kw):
    codes = kw.pop("codes", None) or _codes()
    return cf.encode_codes(codes, codebook_sizes=[64, 64, 64], **{**FIELDS, **kw})


def test_round_trip_mono_and_stereo_in_smallest_dtype(tmp_path):
    for channels in (1, 2):
        codes = _codes(channels)
        path = tmp_path / f"c{channels}.snac"
        codec_jax.save_codes(path, codes, codebook_sizes=[64, 64, 64], source="a/x.wav", **FIELDS)
        out = codec_jax.load_codes(path)
        assert out.channels == channels and out.length == 4000 and out.source == "a/x.wav"
        assert (out.sample_rate, out.original_sample_rate) == (16000, 44100)
        assert out.model_id == FIELDS["model_id"] and out.frames == [6, 12, 24]
        for a, b in zip(out.codes, codes):
            assert a.dtype == np.uint8 and a.shape == b.shape
            np.testing.assert_array_equal(a, b)
    # 4096-entry codebooks need 12 bits: uint16; the payload is 2 bytes a code, not 4.
    big = [np.full(100, 4095)]
    blob = cf.encode_codes(big, codebook_sizes=[4096], **FIELDS)
    out = cf.parse_codes(blob)
    assert out.codes[0].dtype == np.uint16 and out.codes[0][0] == 4095
    longer = cf.encode_codes([np.full(200, 7)], codebook_sizes=[4096], **FIELDS)
    assert len(longer) - len(blob) == 200


def test_codes_outside_codebook_are_refused_on_write():
    with pytest.raises(ValueError, match=r"outside \[0, 64\)"):
        cf.encode_codes([np.array([64])], codebook_sizes=[64], **FIELDS)


def test_written_with_the_users_umask_and_atomically(tmp_path):
    old = os.umask(0o027)
    try:
        codec_jax.save_codes(tmp_path / "x.snac", _codes(), codebook_sizes=[64] * 3, **FIELDS)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.snac").stat().st_mode) == 0o640
    # A failing write leaves neither the target nor a temporary file.
    with pytest.raises(ValueError):
        codec_jax.save_codes(tmp_path / "y.snac", [np.array([99])], codebook_sizes=[64], **FIELDS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.snac"]
    with pytest.raises(FileExistsError):
        codec_jax.save_codes(tmp_path / "x.snac", _codes(), codebook_sizes=[64] * 3,
                             overwrite=False, **FIELDS)


def test_named_errors(tmp_path):
    blob = _blob()
    cases = {
        "truncated": (blob[: len(blob) // 2], cf.TruncatedCodesError, "truncated"),
        "flipped": (blob[:-10] + bytes([blob[-10] ^ 1]) + blob[-9:], cf.CorruptCodesError,
                    "checksum"),
        "other": (b"RIFF....WAVEfmt " + bytes(40), cf.NotCodesFileError, "not a codes file"),
        "empty": (b"", cf.TruncatedCodesError, "truncated"),
    }
    for name, (data, err, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(err, match=words) as info:
            codec_jax.load_codes(tmp_path / name)
        assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    # A future version, written consistently (valid checksum), is named as such.
    import struct
    import zlib
    body = blob[:8] + struct.pack("<I", 3) + blob[12:-4]
    (tmp_path / "v3").write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    with pytest.raises(cf.CodesVersionError, match="version 3"):
        codec_jax.load_codes(tmp_path / "v3")
    # Version 2 (entropy-coded) without its coding entry is inconsistent, not misread.
    body = blob[:8] + struct.pack("<I", 2) + blob[12:-4]
    (tmp_path / "v2").write_bytes(body + struct.pack("<I", zlib.crc32(body)))
    with pytest.raises(cf.CorruptCodesError, match="version 2 without an entropy coding entry"):
        codec_jax.load_codes(tmp_path / "v2")
    with pytest.raises(cf.ModelMismatchError, match="--force"):
        codec_jax.load_codes(_write(tmp_path, blob),
                             expect_model_id="cd" * 32)
    with pytest.raises(cf.CodesFileError, match="cannot read"):
        codec_jax.load_codes(tmp_path / "missing.snac")


def _write(tmp_path, blob):
    p = tmp_path / "ok.snac"
    p.write_bytes(blob)
    return p


_REFERENCE = _blob(codes=_codes(channels=2, seed=3))
_REFERENCE_CODES = cf.parse_codes(_REFERENCE).codes


def _check(data: bytes):
    """The reader either returns exactly the written codes or raises a named error."""
    try:
        out = cf.parse_codes(data)
    except cf.CodesFileError as e:
        assert "\n" not in str(e)
        return
    for a, b in zip(out.codes, _REFERENCE_CODES, strict=True):
        np.testing.assert_array_equal(a, b)


_FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.lists(st.tuples(st.integers(0, len(_REFERENCE) - 1), st.integers(1, 255)),
                min_size=1, max_size=4))
def test_fuzz_byte_flips(flips):
    data = bytearray(_REFERENCE)
    for pos, mask in flips:
        data[pos] ^= mask
    _check(bytes(data))


@_FUZZ
@given(st.integers(0, len(_REFERENCE) - 1))
def test_fuzz_truncation(cut):
    with pytest.raises(cf.CodesFileError):
        cf.parse_codes(_REFERENCE[:cut])


@_FUZZ
@given(st.binary(max_size=400) | st.binary(max_size=200).map(lambda b: cf.MAGIC + b))
def test_fuzz_random_bytes(data):
    _check(data)
