"""Entropy coding of codes (codec_jax/audio/entropy.py): lossless, smaller than fixed
width where codes are predictable, and corruption raises instead of returning garbage."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from codec_jax.audio import entropy as E

SIZES = (256, 256, 256)
STRIDES = (4, 2, 1)


def _markov_clip(rng, frames: int):
    """Codes with the structure a codec's have: a slowly moving coarse level, finer
    levels that depend on the level above and on their previous code."""
    l0 = np.cumsum(rng.integers(-2, 3, frames)) % SIZES[0]
    l1 = (np.repeat(l0, 2) * 7 + rng.integers(0, 4, 2 * frames)) % SIZES[1]
    l2 = (np.repeat(l1, 2) * 3 + rng.integers(0, 3, 4 * frames)) % SIZES[2]
    return [l0.astype(np.int32), l1.astype(np.int32), l2.astype(np.int32)]


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(0)
    return [_markov_clip(rng, int(rng.integers(10, 120))) for _ in range(40)]


@pytest.fixture(scope="module")
def model(corpus):
    return E.ContextModel.fit(corpus, SIZES, STRIDES)


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=3, max_size=3), st.integers(0, 2**31 - 1))
def test_adaptive_is_lossless_on_random_streams(frames, seed):
    rng = np.random.default_rng(seed)
    levels = [rng.integers(0, v, n).astype(np.int32) for n, v in zip(frames, SIZES)]
    assert _same(E.decode(E.encode(levels, SIZES)), levels)


def test_context_model_is_lossless_and_beats_adaptive_and_fixed(corpus, model):
    rng = np.random.default_rng(123)  # clips the model was not fitted on
    fixed = adaptive = context = 0
    for _ in range(5):
        clip = _markov_clip(rng, 100)
        a, c = E.encode(clip, SIZES), E.encode(clip, SIZES, model=model)
        assert _same(E.decode(a), clip) and _same(E.decode(c, model=model), clip)
        fixed += E.fixed_width_bits([x.size for x in clip], SIZES)
        adaptive, context = adaptive + 8 * len(a), context + 8 * len(c)
    # Uniform 8-bit codes cannot be compressed; these have ~2 bits of entropy per code
    # given their context, so the context model must get well under half of fixed width.
    assert context < 0.5 * fixed
    assert context < adaptive


def test_context_model_round_trips_unseen_contexts_and_uniform_noise(model):
    rng = np.random.default_rng(7)
    noise = [rng.integers(0, v, n).astype(np.int32) for n, v in zip((30, 60, 120), SIZES)]
    assert _same(E.decode(E.encode(noise, SIZES, model=model), model=model), noise)


def test_model_save_load_keeps_identity(tmp_path, model, corpus):
    model.save(tmp_path / "m.npz")
    loaded = E.ContextModel.load(tmp_path / "m.npz")
    assert loaded.model_id == model.model_id
    stream = E.encode(corpus[0], SIZES, model=model)
    assert _same(E.decode(stream, model=loaded), corpus[0])


def test_stream_under_another_model_or_without_one_is_refused(corpus, model):
    other = E.ContextModel.fit(corpus[:10], SIZES, STRIDES)
    stream = E.encode(corpus[0], SIZES, model=model)
    with pytest.raises(E.EntropyStreamError, match="different context model"):
        E.decode(stream, model=other)
    with pytest.raises(E.EntropyStreamError, match="pass the same model"):
        E.decode(stream)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_corrupted_or_truncated_streams_raise_or_decode_exactly(corpus, model, data):
    """Any byte flip or truncation gives EntropyStreamError or (flips in padding bits
    the range decoder never reads) exactly the original codes: never other codes."""
    use_model = data.draw(st.booleans())
    clip = corpus[data.draw(st.integers(0, len(corpus) - 1))]
    stream = bytearray(E.encode(clip, SIZES, model=model if use_model else None))
    if data.draw(st.booleans()):
        stream = stream[: data.draw(st.integers(0, len(stream) - 1))]
    else:
        i = data.draw(st.integers(0, len(stream) - 1))
        stream[i] ^= data.draw(st.integers(1, 255))
    try:
        out = E.decode(bytes(stream), model=model if use_model else None)
    except E.EntropyStreamError:
        return
    assert _same(out, clip)


def test_bad_codes_are_rejected_before_coding():
    with pytest.raises(ValueError, match=r"in \[0, 256\)"):
        E.encode([np.array([0, 256]), np.zeros(2, int), np.zeros(4, int)], SIZES)
    with pytest.raises(ValueError, match="3 codebook sizes"):
        E.encode([np.zeros(2, int)], SIZES)
    with pytest.raises(E.EntropyStreamError, match="bad magic"):
        E.decode(b"RIFF0000")


# ---- the codes file's entropy-coded payload (format version 2) ------------------------------

import json  # noqa: E402

from codec_jax.audio import codes_file as cf  # noqa: E402

HEADER = dict(length=25_000, sample_rate=24_000, original_sample_rate=44_100, model_id="ab" * 32,
              model_name="test", config={}, codebook_sizes=list(SIZES))


def test_codes_file_entropy_payload_round_trips_and_is_smaller(corpus, model):
    clip = corpus[1]
    stereo = [np.stack([c, c[::-1]]) for c in clip]
    raw = cf.encode_codes(clip, **HEADER)
    for entropy, kw in (("adaptive", {}), (model, {"entropy_model": model})):
        blob = cf.encode_codes(clip, entropy=entropy, **HEADER)
        assert blob[8:12] == (2).to_bytes(4, "little")
        if entropy is model:  # on a clip this short only the trained model beats fixed width
            head = json.loads(blob[16:16 + int.from_bytes(blob[12:16], "little")])
            fixed_payload = sum(c.size for c in clip)  # uint8 codes: a byte each
            assert head["coding"]["bytes"] < 0.6 * fixed_payload, (head["coding"], fixed_payload)
        got = cf.parse_codes(blob, **kw)
        assert _same([c.astype(np.int32) for c in got.codes], clip)
        assert got.codebook_sizes == SIZES and got.length == HEADER["length"]
        two = cf.parse_codes(cf.encode_codes(stereo, entropy=entropy, **HEADER), **kw)
        assert two.channels == 2 and _same(two.codes, stereo)
    assert raw[8:12] == (1).to_bytes(4, "little")  # fixed-width files stay version 1


def test_context_coded_file_needs_its_model(corpus, model):
    blob = cf.encode_codes(corpus[2], entropy=model, **HEADER)
    with pytest.raises(cf.EntropyModelError, match="pass that model"):
        cf.parse_codes(blob)
    other = E.ContextModel.fit(corpus[:8], SIZES, STRIDES)
    with pytest.raises(cf.EntropyModelError, match="not the model given"):
        cf.parse_codes(blob, entropy_model=other)


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_damaged_entropy_coded_files_raise_named_errors(corpus, data):
    blob = bytearray(cf.encode_codes(corpus[data.draw(st.integers(0, 9))], entropy="adaptive", **HEADER))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
        error = cf.CodesFileError
    else:
        blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
        error = cf.CodesFileError
    with pytest.raises(error):
        cf.parse_codes(bytes(blob))


# ---- stream versions -------------------------------------------------------------------------

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "entropy_v1"


def test_version_1_streams_still_decode():
    """Streams written by the version-1 writer (36- and 68-byte headers, kept as bytes
    in tests/fixtures/entropy_v1 with their codes and context model) decode exactly."""
    with np.load(FIXTURES / "codes.npz") as z:
        clip = [z[f"level_{i}"] for i in range(3)]
    model = E.ContextModel.load(FIXTURES / "model.npz")
    adaptive, context = (FIXTURES / "adaptive.bin").read_bytes(), (FIXTURES / "context.bin").read_bytes()
    assert adaptive[4] == 1 and context[4] == 1
    assert E.header_bytes(adaptive) == 36 and E.header_bytes(context) == 68
    assert _same(E.decode(adaptive), clip)
    assert _same(E.decode(context, model=model), clip)
    with pytest.raises(E.EntropyStreamError, match="different context model"):
        E.decode(context, model=E.ContextModel.fit([clip], SIZES, STRIDES))


def test_version_2_header_is_compact():
    """SNAC 24 kHz's three 4096-entry levels on a 1.7 s clip (20/40/80 frames): magic 4,
    version/kind/levels 3, per level a 2-byte size and a 1-byte frame count, CRC 4, and
    for the context kind 8 bytes of the model id: 20 and 28 bytes."""
    sizes = (4096, 4096, 4096)
    rng = np.random.default_rng(3)
    clip = [rng.integers(0, 4096, n).astype(np.int32) for n in (20, 40, 80)]
    stream = E.encode(clip, sizes)
    assert stream[4] == 2 and E.header_bytes(stream) == 20
    model = E.ContextModel.fit([clip, clip[::-1]], sizes, STRIDES)
    coded = E.encode(clip, sizes, model=model)
    assert E.header_bytes(coded) == 28
    assert coded[20:28] == model.model_id[:8]
    assert _same(E.decode(coded, model=model), clip) and _same(E.decode(stream), clip)
    # Frame counts of 128 or more take two bytes (150 and 300 here) and still round-trip.
    long = [rng.integers(0, 4096, n).astype(np.int32) for n in (75, 150, 300)]
    assert E.header_bytes(E.encode(long, sizes)) == 22
    assert _same(E.decode(E.encode(long, sizes)), long)


def test_entropy_fit_reports_held_out_bits_per_second(tmp_path, corpus):
    """`codec-jax entropy-fit` on .snac files: fits on 9 of 10 files and reports the rest,
    with each figure recomputed here from the files it names."""
    from codec_jax.cli import entropy as entropy_cli

    rate, hop = 24_000, 512
    fields = dict(HEADER, config={"vq_strides": list(STRIDES)})
    for i, clip in enumerate(corpus):
        fields["length"] = clip[2].size * hop
        cf.save_codes(tmp_path / "codes" / f"{i:02d}.snac", clip, **fields, source=f"{i:02d}.wav")
    report = tmp_path / "report.json"
    assert entropy_cli.main([str(tmp_path / "codes"), "-o", str(tmp_path / "m.npz"), "--report", str(report)]) == 0
    got = json.loads(report.read_text())
    held = corpus[::10]  # files 00, 10, 20, 30 (sorted names)
    assert got["files"] == {"train": len(corpus) - len(held), "held_out": len(held)}
    seconds = sum(c[2].size * hop for c in held) / rate
    assert got["held_out_seconds"] == pytest.approx(seconds)
    bps = got["bits_per_second"]
    codes = sum(x.size for c in held for x in c)
    assert bps["fixed_packed"] == pytest.approx(8 * codes / seconds)  # 256 entries: 8 bits
    assert bps["fixed_payload"] == pytest.approx(8 * codes / seconds)  # uint8 payload
    model = E.ContextModel.load(tmp_path / "m.npz")
    context = sum(len(E.encode(c, SIZES, model=model)) for c in held)
    assert bps["context"] == pytest.approx(8 * context / seconds)
    varint = lambda n: 1 + (n >= 128) + (n >= 1 << 14)  # LEB128 length for n < 2**21
    header = sum(7 + sum(varint(v) + varint(x.size) for v, x in zip(SIZES, c)) + 4 + 8 for c in held)
    assert bps["context_header"] == pytest.approx(8 * header / seconds)
    files = sum((tmp_path / "codes" / f"{i:02d}.snac").stat().st_size for i in range(0, len(corpus), 10))
    assert bps["file_fixed"] == pytest.approx(8 * files / seconds)
    # These codes are predictable: the trained model codes them in well under fixed width,
    # headers included, and so do whole files.
    assert bps["context"] < 0.6 * bps["fixed_packed"] and bps["file_context"] < bps["file_fixed"]
    with pytest.raises(Exception, match="at least 2 codes files"):
        entropy_cli.main([str(tmp_path / "codes" / "00.snac"), "-o", str(tmp_path / "n.npz")])
