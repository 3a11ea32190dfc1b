"""A clip's codes and audio do not depend on how it is batched or chunked.

Coded alone at its own length, zero-padded in a batch of other lengths (`lengths=`), or as
overlapping windows of a long file (`codec_jax.chunking`), a clip must get the same codes;
chunked and batched decodes must equal the whole decode. The only differences allowed are
float near-ties: XLA may sum in another order for another shape, so a frame whose two nearest
codes are within `NEAR_TIE` (the reference's own distance margin, see snac_reference.py) may
pick either, and the finer levels under such a frame then quantize another residual.

The model is the reference SNAC with perturbed weights and codebooks drawn from its latents
(codes vary frame to frame); the signals are the project's synthetic audio.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax

import codec_jax
from codec_jax import chunking
from codec_jax.data.synthetic import signal_at
from codec_jax.nn.snac import SNAC
from snac_reference import (build_reference, code_disagreements, make_signals, reference_margins,
                            save_hub_directory)

# Margin (squared distance between unit vectors, in [0, 4]) below which a frame is a near-tie.
# The disagreements seen are ~1e-7 (a float32 ulp of the distances); typical margins ~1e-3.
NEAR_TIE = 1e-5
# Decoded audio from chunks vs whole (both float32 through the same model).
DECODE_TOL = 1e-5
# Width of the padded batches in the tiny tests: 40 padding units (0.24 s at 16 kHz).
TINY_WIDTH_UNITS = 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = codec_jax.get_preset("tiny")
    model = build_reference(config.to_dict(), seed=3)
    path = save_hub_directory(model, config.to_dict(), str(tmp_path_factory.mktemp("tiny_ref")))
    return codec_jax.load_pretrained(path), model


def clip(seed: int, index: int, length: int, sample_rate: int) -> np.ndarray:
    """A real-sounding clip: the project's synthetic mixtures, tones, chirps ... (no silence)."""
    kinds = ("harmonic", "chirp", "am", "fm", "noise_burst", "mixture")
    return signal_at(seed, index, sample_rate=sample_rate, num_samples=length, kinds=kinds)[1]


def disagreements(config, got, want, margins, bound=NEAR_TIE):
    """`snac_reference.code_disagreements` with this module's near-tie bound."""
    return code_disagreements(config, got, want, margins, bound)


def alone(codec, x: np.ndarray) -> list[np.ndarray]:
    """Codes of one clip coded alone: `encode(x[None])`, which pads it with zeros to its
    padded length inside the program (padding it ourselves gives the same program)."""
    padded = np.zeros(codec.config.padded_length(len(x)), np.float32)
    padded[: len(x)] = x
    return [np.asarray(c)[0] for c in codec.encode(padded[None])]


def tiny_lengths(rng, count: int, config) -> list[int]:
    """Random lengths whose padded lengths come from a few widths (few compilations for the
    clips coded alone), from a single sample to a full batch width."""
    m = config.pad_multiple
    units = rng.choice([1, 7, 23, TINY_WIDTH_UNITS], size=count)
    return [int(u * m - rng.integers(0, m)) for u in units]


# ---------------------------------------------------------------------------------------
# Receptive field
# ---------------------------------------------------------------------------------------
def structural_response(fn, x, impulses):
    """fn's directional derivative at `x` along `impulses` (jvp): non-zero exactly where the
    output depends on the impulse's position. Differencing two forward passes would lose
    the faint edges of the dependence in float32 rounding."""
    return np.asarray(jax.jit(lambda x, t: jax.jvp(fn, (x,), (t,))[1])(x, impulses))


def test_receptive_field_is_the_measured_impulse_response(tiny):
    """An impulse at sample p changes exactly the latent frames whose computed input span
    holds p (every hop and attention phase), and the widest reach is `receptive_field`."""
    codec, _ = tiny
    c = codec.config
    period = chunking.alignment(c)
    width = c.pad_multiple * TINY_WIDTH_UNITS
    base = clip(0, 0, width, c.sampling_rate)
    positions = width // 2 + np.arange(period)
    batch = np.repeat(base[None], len(positions), axis=0)
    impulses = np.zeros_like(batch)
    impulses[np.arange(len(positions)), positions] = 1.0
    changed = np.any(structural_response(
        lambda x: codec_jax.encode_latents(codec.variables, x, config=c), batch, impulses) != 0,
        axis=-1)  # [rows, frames]
    layers = chunking.encoder_layers(c)
    spans = np.array([chunking._reads(layers, (f, f)) for f in range(changed.shape[1])])
    left = right = 0
    for row, p in enumerate(positions):
        predicted = (spans[:, 0] <= p) & (p <= spans[:, 1])
        np.testing.assert_array_equal(changed[row], predicted, err_msg=f"impulse at {p}")
        frames = np.nonzero(changed[row])[0]
        # The last changed frame reaches back (left) to p, the first one forward (right) to it.
        left = max(left, frames.max() * c.hop_length - p)
        right = max(right, p - (frames.min() * c.hop_length + c.hop_length - 1))
    rf = chunking.receptive_field(c)
    assert (left, right) == (rf.encoder_left, rf.encoder_right)


def test_decoder_receptive_field_is_the_measured_impulse_response(tiny):
    codec, _ = tiny
    c = codec.config
    frames = TINY_WIDTH_UNITS * c.pad_multiple // c.hop_length
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1, (1, frames, c.latent_channels)).astype(np.float32)
    grid = chunking.alignment(c) // c.hop_length
    targets = frames // 2 + np.arange(grid)
    batch = np.repeat(z, len(targets), axis=0)
    impulses = np.zeros_like(batch)
    impulses[np.arange(len(targets)), targets] = rng.normal(0, 1, (len(targets), c.latent_channels))
    decoder = lambda x: SNAC(c).apply(codec.variables, x, method=lambda m, x: m.decoder(x))
    changed = structural_response(decoder, batch, impulses)[..., 0] != 0
    layers = chunking.decoder_layers(c)
    spans = np.array([chunking._reads(layers, (u, u)) for u in range(changed.shape[1])])
    left = right = 0
    for row, q in enumerate(targets):
        predicted = (spans[:, 0] <= q) & (q <= spans[:, 1])
        np.testing.assert_array_equal(changed[row], predicted, err_msg=f"frame {q}")
        samples = np.nonzero(changed[row])[0]
        left = max(left, samples.max() - q * c.hop_length)
        right = max(right, (q + 1) * c.hop_length - 1 - samples.min())
    rf = chunking.receptive_field(c)
    assert (left, right) == (rf.decoder_left, rf.decoder_right)


def test_window_plans_tile_the_clip_on_the_grid():
    for name in ("tiny", "snac_24khz", "snac_32khz"):
        c = codec_jax.get_preset(name)
        rf, grid = chunking.receptive_field(c), chunking.alignment(c)
        rng = np.random.default_rng(len(name))
        for seconds in (2.5, 3.7, 30.0):
            size = chunking.window_samples(c, seconds)
            for length in rng.integers(1, int(200 * c.sampling_rate), 30):
                windows = chunking.encode_windows(c, int(length), seconds)
                assert all(w.start % grid == 0 and w.length <= size for w in windows)
                offsets = [w.offset for w in windows]
                kept = [w.keep[1] - w.keep[0] for w in windows]
                assert offsets == list(np.cumsum([0] + kept[:-1]))  # cores tile without gaps
                assert sum(kept) * c.hop_length == c.padded_length(int(length))
                for w in windows:  # every kept frame has its full receptive field in the window
                    first = w.start + w.keep[0] * c.hop_length
                    last = w.start + w.keep[1] * c.hop_length - 1
                    assert w.start == 0 or first - w.start >= rf.encoder_left
                    assert w.start + w.length == length or w.start + w.length - 1 - last >= rf.encoder_right
    with pytest.raises(codec_jax.errors.UsageError, match="too short"):
        chunking.encode_windows(codec_jax.get_preset("snac_24khz"), 10 ** 6, 0.3)


# ---------------------------------------------------------------------------------------
# Batched (length buckets)
# ---------------------------------------------------------------------------------------
def test_batched_codes_equal_alone_over_random_lengths_and_batches(tiny):
    codec, model = tiny
    c = codec.config
    rng = np.random.default_rng(1)
    lengths = tiny_lengths(rng, 10, c)
    clips = [clip(1, i, n, c.sampling_rate) for i, n in enumerate(lengths)]
    want = [alone(codec, x) for x in clips]
    margins = [[m[0] for m in reference_margins(model, x[None])] for x in clips]
    width = c.pad_multiple * TINY_WIDTH_UNITS
    total = 0
    for trial in range(4):  # random batch compositions, one padded width: one compilation
        members = rng.choice(len(clips), size=4, replace=trial == 0)
        batch = np.zeros((4, width), np.float32)
        for row, i in enumerate(members):
            batch[row, : lengths[i]] = clips[i]
        # Garbage beyond the valid samples must not matter either.
        batch[1, lengths[members[1]]:] = rng.normal(0, 1, width - lengths[members[1]])
        codes = [np.asarray(x) for x in codec.encode(batch, lengths=[lengths[i] for i in members])]
        for row, i in enumerate(members):
            frames = c.num_frames(lengths[i])
            got = [x[row, :f] for x, f in zip(codes, frames)]
            assert all(np.all(x[row, f:] == 0) for x, f in zip(codes, frames))
            count, bad = disagreements(c, got, want[i], margins[i])
            assert not bad, (lengths[i], bad)
            total += count
    assert total <= 0.01 * 4 * 4 * sum(map(len, want[0]))
    # The exact-length program equals the padded one used above as "alone".
    np.testing.assert_array_equal(np.asarray(codec.encode(clips[0][None])[0])[0], want[0][0])
    # encode_many is the same thing for a list of clips.
    many = codec.encode_many(clips[:5])
    for i in range(5):
        assert [x.shape for x in many[i]] == [(f,) for f in c.num_frames(lengths[i])]
        assert not disagreements(c, many[i], want[i], margins[i])[1]


def test_padding_without_lengths_changes_codes(tiny):
    """Control: the same batches coded without `lengths` (today's SNAC behaviour) give the
    shorter clips other codes, and not as near-ties: the check above can fail."""
    codec, model = tiny
    c = codec.config
    width = c.pad_multiple * TINY_WIDTH_UNITS
    short = [c.pad_multiple * 7 - 5, c.pad_multiple * 23 - 50]
    clips = [clip(2, i, n, c.sampling_rate) for i, n in enumerate(short)]
    batch = np.zeros((4, width), np.float32)
    batch[0, : short[0]], batch[1, : short[1]] = clips
    batch[2:] = [clip(2, 9, width, c.sampling_rate), clip(2, 10, width, c.sampling_rate)]
    codes = [np.asarray(x) for x in codec.encode(batch)]
    unexplained = 0
    for row, (n, x) in enumerate(zip(short, clips)):
        got = [level[row, :f] for level, f in zip(codes, c.num_frames(n))]
        margins = [m[0] for m in reference_margins(model, x[None])]
        unexplained += len(disagreements(c, got, alone(codec, x), margins)[1])
    assert unexplained > 0


@pytest.mark.slow  # 30 s on the 2-core VM: keeps the fast tier under 5 minutes
def test_rows_per_call_leaves_codes_and_audio_unchanged(tiny):
    """Coding 2 rows per pass (the last pass padded with a zero row) equals coding all 5 at
    once, with per-row lengths and, decoding, with noise (positional, so independent of
    the pass). Codes may differ only at near-ties: the two programs have other shapes."""
    codec, model = tiny
    c = codec.config
    width = c.pad_multiple * TINY_WIDTH_UNITS
    lengths = [width, width - 700, 300, width, 2100]
    clips = [clip(5, i, n, c.sampling_rate) for i, n in enumerate(lengths)]
    batch = np.zeros((5, width), np.float32)
    for row, x in enumerate(clips):
        batch[row, : len(x)] = x
    whole = [np.asarray(x) for x in codec_jax.encode(codec.variables, batch, config=c,
                                                     lengths=np.array(lengths), rows_per_call=None)]
    parts = [np.asarray(x) for x in codec_jax.encode(codec.variables, batch, config=c,
                                                     lengths=np.array(lengths), rows_per_call=2)]
    assert len(np.unique(whole[-1])) > 10  # codes that vary frame to frame
    for row, x in enumerate(clips):
        frames = c.num_frames(len(x))
        margins = [m[0] for m in reference_margins(model, x[None])]
        got = [p[row, :f] for p, f in zip(parts, frames)]
        want = [w[row, :f] for w, f in zip(whole, frames)]
        assert not disagreements(c, got, want, margins)[1], row
        assert all(np.all(p[row, f:] == 0) for p, f in zip(parts, frames))
    for key in (None, jax.random.key(3)):
        one, two = (np.asarray(codec_jax.decode(codec.variables, whole, config=c, rng=key,
                                                lengths=np.array(lengths), rows_per_call=r))
                    for r in (None, 2))
        assert one.shape == two.shape == (5, width)
        np.testing.assert_allclose(two, one, atol=DECODE_TOL, rtol=0)


@pytest.mark.slow
def test_batched_decode_equals_alone_with_and_without_noise(tiny):
    codec, _ = tiny
    c = codec.config
    rng = np.random.default_rng(4)
    m = c.pad_multiple
    # Random lengths within two padded widths: two programs for the clips decoded alone.
    lengths = [int(u * m - rng.integers(0, m)) for u in (TINY_WIDTH_UNITS, 7, 7, TINY_WIDTH_UNITS)]
    clips = [clip(4, i, n, c.sampling_rate) for i, n in enumerate(lengths)]
    codes = codec.encode_many(clips)
    frames0 = max(c.num_frames(n)[0] for n in lengths)
    batch = [np.zeros((4, frames0 * c.vq_strides[0] // s), np.int32) for s in c.vq_strides]
    for row, item in enumerate(codes):
        for level, x in enumerate(item):
            batch[level][row, : len(x)] = x
    for rng_key in (None, jax.random.key(7)):
        out = np.asarray(codec.decode(batch, lengths=lengths, rng=rng_key))
        assert out.shape == (4, max(lengths))
        for row, (n, item) in enumerate(zip(lengths, codes)):
            # Trimmed here rather than with length=n: one program per padded width.
            single = np.asarray(codec.decode([x[None] for x in item], rng=rng_key))[0, :n]
            np.testing.assert_allclose(out[row, :n], single, atol=DECODE_TOL, rtol=0)
            assert np.all(out[row, n:] == 0)


# ---------------------------------------------------------------------------------------
# Chunked (long files)
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_chunked_codes_equal_whole_file_codes(tiny):
    codec, model = tiny
    c = codec.config
    rng = np.random.default_rng(5)
    total = frames = 0
    for index, (length, seconds) in enumerate([(int(rng.integers(20_000, 40_000)), 0.21),
                                               (int(rng.integers(20_000, 40_000)), 0.37),
                                               (int(rng.integers(40_000, 60_000)), 0.37)]):
        x = clip(5, index, length, c.sampling_rate)
        whole = [np.asarray(v)[0] for v in codec.encode(x[None])]
        margins = [m[0] for m in reference_margins(model, x[None])]
        chunked = chunking.encode_long(codec, x, seconds, batch_size=3)
        assert len(chunking.encode_windows(c, length, seconds)) >= 5
        count, bad = disagreements(c, chunked, whole, margins)
        assert not bad, (length, seconds, bad)
        total += count
        frames += sum(map(len, whole))
    assert total <= 0.01 * frames


@pytest.mark.slow
def test_windows_of_many_clips_share_one_batch(tiny):
    """The corpus form: the windows of several clips coded together in one padded batch of
    `window_samples` give each clip its whole-file codes."""
    codec, model = tiny
    c = codec.config
    seconds = 0.37
    lengths = [31_111, 700, 17_000]
    clips = [make_signals(kind, 1, n, c.sampling_rate, seed=6)[0]
             for kind, n in zip(("speech", "music", "noise"), lengths)]
    plans = [chunking.encode_windows(c, n, seconds) for n in lengths]
    rows = [(i, w) for i, plan in enumerate(plans) for w in plan]
    batch = np.zeros((len(rows), chunking.window_samples(c, seconds)), np.float32)
    for r, (i, w) in enumerate(rows):
        batch[r, : w.length] = clips[i][w.start: w.start + w.length]
    codes = [np.asarray(x) for x in codec.encode(batch, lengths=[w.length for _, w in rows])]
    for i, (x, plan) in enumerate(zip(clips, plans)):
        mine = [[level[r] for level in codes] for r, (j, _) in enumerate(rows) if j == i]
        stitched = chunking.stitch_codes(c, plan, mine)
        margins = [m[0] for m in reference_margins(model, x[None])]
        assert not disagreements(c, stitched, [np.asarray(v)[0] for v in codec.encode(x[None])],
                                 margins)[1]


@pytest.mark.slow
def test_chunked_decode_equals_whole_decode(tiny):
    codec, _ = tiny
    c = codec.config
    length = 41_234
    x = clip(8, 0, length, c.sampling_rate)
    codes = [np.asarray(v)[0] for v in codec.encode(x[None])]
    for seconds, key in ((0.23, None), (0.41, jax.random.key(3))):
        whole = np.asarray(codec.decode([v[None] for v in codes], length=length, rng=key))[0]
        assert len(chunking.decode_windows(c, codes[0].shape[0] * c.vq_strides[0], seconds)) >= 5
        chunked = chunking.decode_long(codec, codes, length, seconds, rng=key, batch_size=2)
        assert chunked.shape == (length,)
        np.testing.assert_allclose(chunked, whole, atol=DECODE_TOL, rtol=0)
    # Noise really is on: another key gives other audio.
    other = chunking.decode_long(codec, codes, length, 0.41, rng=jax.random.key(4), batch_size=2)
    assert np.abs(other - chunked).max() > 1e-3


@pytest.mark.long
def test_snac_24khz_batched_and_chunked_codes_equal_whole(tmp_path):
    config = codec_jax.get_preset("snac_24khz")
    model = build_reference(config.to_dict(), seed=1, calib_seconds=1.0)
    codec = codec_jax.load_pretrained(save_hub_directory(model, config.to_dict(), str(tmp_path / "m")))
    sr = config.sampling_rate
    x = make_signals("speech", 1, int(7.3 * sr), sr, seed=21)[0]
    whole = [np.asarray(v)[0] for v in codec.encode(x[None])]
    margins = [m[0] for m in reference_margins(model, x[None])]
    chunked = chunking.encode_long(codec, x, 1.5, batch_size=2)
    count, bad = disagreements(config, chunked, whole, margins)
    assert not bad and count <= 0.01 * sum(map(len, whole)), (count, bad)
    short = make_signals("music", 1, int(1.1 * sr) + 17, sr, seed=22)[0]
    many = codec.encode_many([x, short])
    assert not disagreements(config, many[0], whole, margins)[1]
    short_margins = [m[0] for m in reference_margins(model, short[None])]
    assert not disagreements(config, many[1], alone(codec, short), short_margins)[1]
    y = np.asarray(codec.decode([v[None] for v in whole], length=len(x)))[0]
    np.testing.assert_allclose(chunking.decode_long(codec, whole, len(x), 1.5), y,
                               atol=DECODE_TOL, rtol=0)
