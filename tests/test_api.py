"""Public API contract: shapes, dtypes, trimming, compile-once, input validation."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import codec_jax
from codec_jax.nn import snac as models


@pytest.fixture(scope="module")
def codec():
    return codec_jax.load_pretrained("tiny")


def test_encode_shapes_and_dtypes(codec):
    c = codec.config
    audio = np.random.default_rng(0).normal(0, 0.2, (3, 5000)).astype(np.float32)
    codes = codec.encode(audio)
    assert len(codes) == c.n_levels
    assert [x.shape for x in codes] == [(3, f) for f in c.frames_per_level(5000)]
    assert all(x.dtype == jnp.int32 for x in codes)
    assert all(int(x.min()) >= 0 and int(x.max()) < c.codebook_size for x in codes)
    out = codec.decode(codes, length=5000)
    assert out.shape == (3, 5000) and out.dtype == jnp.float32
    full = codec.decode(codes)
    assert full.shape == (3, c.padded_length(5000))
    # jax input works the same as numpy input
    np.testing.assert_array_equal(np.asarray(codec.encode(jnp.asarray(audio))[0]), np.asarray(codes[0]))


@pytest.mark.slow
def test_decode_without_rng_is_deterministic_and_noise_differs(codec):
    audio = np.random.default_rng(1).normal(0, 0.2, (1, 3000)).astype(np.float32)
    codes = codec.encode(audio)
    a, b = codec.decode(codes), codec.decode(codes)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    noisy = codec.decode(codes, rng=jax.random.key(0))
    assert float(jnp.abs(noisy - a).max()) > 0


@pytest.mark.slow
def test_prefix_of_levels_decodes(codec):
    audio = np.random.default_rng(2).normal(0, 0.2, (2, 3000)).astype(np.float32)
    codes = codec.encode(audio)
    coarse = codec.encode(audio, n_levels=1)
    assert len(coarse) == 1
    np.testing.assert_array_equal(np.asarray(coarse[0]), np.asarray(codes[0]))
    assert codec.decode(codes[:1], length=3000).shape == (2, 3000)


@pytest.mark.slow
def test_functional_encode_compiles_once_per_shape():
    config = codec_jax.get_preset("tiny")
    variables = codec_jax.init_variables(config, 0)
    model = models.SNAC(config)

    @jax.jit
    @chex.assert_max_traces(n=2)
    def encode(variables, audio):
        return model.apply(variables, audio, method=models.SNAC.encode)

    x = jnp.zeros((2, 4000))
    for _ in range(3):
        encode(variables, x)
        encode(variables, x + 1)
    encode(variables, jnp.zeros((2, 6000)))  # new shape: one more trace, allowed
    with pytest.raises(AssertionError):
        encode(variables, jnp.zeros((2, 7000)))  # a third shape exceeds the budget


@pytest.mark.slow
def test_public_jitted_functions_cache(codec, monkeypatch):
    """`Codec.encode` / `codec_jax.encode` trace the model once per input shape: the static
    arguments they pass (config, dtype, quantizer) must hash equal across calls."""
    traces = []
    original = models.SNAC.encode

    def counting_encode(self, *args, **kwargs):
        traces.append(args[0].shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(models.SNAC, "encode", counting_encode)
    audio = np.zeros((1, 2 * codec.config.pad_multiple + 17), np.float32)  # a shape no other test uses
    for seed in range(3):
        codec.encode(audio + seed)
    assert len(traces) == 1
    for seed in range(3):  # the functional form: its own cache entry (other kwargs), once
        codec_jax.encode(codec.variables, jnp.asarray(audio) + seed, config=codec.config)
    assert len(traces) == 2
    codec.encode(np.zeros((1, audio.shape[1] + 1), np.float32))
    assert len(traces) == 3


@pytest.mark.parametrize("bad, message", [
    (np.zeros(100, np.float32), "batch"),
    (np.zeros((1, 1, 100), np.float32), r"\[batch, samples\]"),
    (np.zeros((1, 0), np.float32), "no samples"),
    (np.zeros((1, 100), np.int16), "floating point"),
    (np.full((1, 100), np.nan, np.float32), "NaN"),
    (np.array([[0.0, np.inf]], np.float32), "infinite"),
])
def test_bad_audio_is_rejected(codec, bad, message):
    with pytest.raises(ValueError, match=message):
        codec.encode(bad)


def test_bad_codes_are_rejected(codec):
    codes = codec.encode(np.zeros((1, 3000), np.float32))
    with pytest.raises(ValueError, match="code values"):
        codec.decode([codes[0] + codec.config.codebook_size] + list(codes[1:]))
    with pytest.raises(ValueError, match="frames"):
        codec.decode([codes[0], codes[1][:, :-1], codes[2]])
    with pytest.raises(ValueError, match="levels"):
        codec.decode(list(codes) + [codes[-1]])
    with pytest.raises(ValueError, match="no frames"):
        codec.decode([c[:, :0] for c in codes])
    with pytest.raises(ValueError, match=r"codes\[1\]: code values"):  # names the bad level
        codec.decode([codes[0], codes[1] - codes[1] - 1, codes[2]])


@pytest.mark.slow
def test_bfloat16_compute_stays_close(codec):
    audio = np.random.default_rng(3).normal(0, 0.2, (2, 4000)).astype(np.float32)
    codes = codec.encode(audio)
    bf16 = codec_jax.Codec(codec.config, codec.variables, dtype="bfloat16")
    y32 = np.asarray(codec.decode(codes))
    y16 = np.asarray(bf16.decode(codes))
    assert y16.dtype == np.float32
    rel = np.linalg.norm(y16 - y32) / np.linalg.norm(y32)
    assert rel < 5e-2, rel
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(bf16.params))


def test_bitrates_of_published_presets():
    assert round(codec_jax.get_preset("snac_24khz").bitrate() / 1000, 2) == 0.98
    assert round(codec_jax.get_preset("snac_32khz").bitrate() / 1000, 1) == 1.9
    assert round(codec_jax.get_preset("snac_44khz").bitrate() / 1000, 1) == 2.6


@pytest.mark.slow
def test_ema_codec_encodes_decodes_and_round_trips(tmp_path):
    """A codec with EMA codebooks (the `codebook` collection) works through the public API
    and survives save/load with its quantizer config."""
    from codec_jax.nn.quantizer import QuantizerConfig

    config = codec_jax.get_preset("tiny")
    quantizer = QuantizerConfig(kind="ema", codebook_sizes=(16, 32, 64))
    variables = codec_jax.init_variables(config, 0, quantizer=quantizer)
    assert "codebook" in variables
    codec = codec_jax.Codec(config, variables, quantizer=quantizer)
    audio = np.random.default_rng(4).normal(0, 0.2, (2, 3000)).astype(np.float32)
    codes = codec.encode(audio)
    assert [int(c.max()) < s for c, s in zip(codes, (16, 32, 64))] == [True] * 3
    with pytest.raises(ValueError, match=r"codes\[0\]"):
        codec.decode([codes[0] + 16] + list(codes[1:]))
    out = np.asarray(codec.decode(codes, length=3000))
    codec.save(tmp_path / "ema")
    again = codec_jax.load_pretrained(str(tmp_path / "ema"))
    assert again.quantizer == quantizer
    np.testing.assert_array_equal(np.asarray(again.encode(audio)[1]), np.asarray(codes[1]))
    np.testing.assert_array_equal(np.asarray(again.decode(codes, length=3000)), out)


@pytest.mark.parametrize("shape, message", [
    ((4800, 2), r"looks like \[samples, channels\].*audio\.T"),  # soundfile's stereo layout
    ((100,), r"\[batch, samples\].*encode_many"),
    ((1, 2, 100), r"\[batch, samples\]"),
])
def test_layout_errors_name_the_expected_layout(codec, shape, message):
    from codec_jax.errors import UsageError

    with pytest.raises(UsageError, match=message):
        codec.encode(np.zeros(shape, np.float32))


def test_lengths_are_checked(codec):
    from codec_jax.errors import UsageError

    audio = np.zeros((2, 1000), np.float32)
    for bad, message in [([1000], "one int per row"), ([0, 10], r"lengths\[0\]=0 is outside"),
                         ([10, 1001], r"lengths\[1\]=1001"), ([1.5, 2], "whole numbers")]:
        with pytest.raises(UsageError, match=message):
            codec.encode(audio, lengths=bad)
    codes = codec.encode(audio, lengths=[1000, 200])
    assert [x.shape[1] for x in codes] == list(codec.config.num_frames(1000))
    with pytest.raises(UsageError, match="outside"):
        codec.decode(codes, lengths=[1000, 10 ** 6])


def test_num_frames_is_what_encode_gives(codec):
    c = codec.config
    for length in (1, 2500):
        codes = codec.encode(np.zeros((1, length), np.float32))
        assert tuple(x.shape[1] for x in codes) == c.num_frames(length)
    assert c.num_frames(c.pad_multiple + 1) == tuple(2 * c.pad_multiple // c.hop_length // s
                                                     for s in c.vq_strides)
    with pytest.raises(ValueError, match="at least one sample"):
        c.num_frames(0)


def test_other_sample_rates_are_resampled_with_soxr(codec):
    import soxr

    rng = np.random.default_rng(5)
    rate = 44100
    x = rng.normal(0, 0.2, int(0.3 * rate)).astype(np.float32)
    y = soxr.resample(x, rate, codec.sample_rate)
    assert codec.resampled_length(len(x), rate) == len(y)
    want = [np.asarray(c) for c in codec.encode(y[None])]
    got = [np.asarray(c) for c in codec.encode(x[None], sample_rate=rate)]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    # The model's own rate is no resampling; a batch with lengths resamples each valid part.
    np.testing.assert_array_equal(np.asarray(codec.encode(y[None], sample_rate=codec.sample_rate)[0]),
                                  want[0])
    short = x[:5000]
    batch = np.zeros((2, len(x)), np.float32)
    batch[0], batch[1, :5000] = x, short
    codes = [np.asarray(c) for c in codec.encode(batch, lengths=[len(x), 5000], sample_rate=rate)]
    many = codec.encode_many([x, short], sample_rate=rate)
    for row, n in enumerate((len(x), 5000)):
        frames = codec.config.num_frames(codec.resampled_length(n, rate))
        for level, f in enumerate(frames):
            np.testing.assert_array_equal(codes[level][row, :f], many[row][level])


def test_encode_many_checks_its_clips(codec):
    from codec_jax.errors import UsageError

    with pytest.raises(UsageError, match="at least one clip"):
        codec.encode_many([])
    with pytest.raises(UsageError, match=r"clips\[1\] must be a non-empty 1-D"):
        codec.encode_many([np.zeros(10, np.float32), np.zeros((2, 10), np.float32)])
    with pytest.raises(UsageError, match=r"clips\[0\] must be floating"):
        codec.encode_many([np.zeros(10, np.int16)])
